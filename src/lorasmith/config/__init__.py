"""The run configuration: the typed schema (:mod:`.schema`), reading YAML and overrides
(:mod:`.loading`), and the key list `lorasmith config` prints (:mod:`.describe`)."""

from lorasmith.config.describe import describe, field_docs, type_name
from lorasmith.config.loading import all_keys, build, builtin_recipe, load, parse_override, to_yaml
from lorasmith.config.schema import (
    BUILTIN_DATA,
    DEMO,
    FORMATS,
    PREFS_DEMO,
    ROLES,
    TOOLS_DEMO,
    Config,
    DataConfig,
    DataSource,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    QuantizationConfig,
    TrainConfig,
)

__all__ = [
    "BUILTIN_DATA",
    "DEMO",
    "FORMATS",
    "PREFS_DEMO",
    "ROLES",
    "TOOLS_DEMO",
    "Config",
    "DataConfig",
    "DataSource",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "QuantizationConfig",
    "TrainConfig",
    "all_keys",
    "build",
    "builtin_recipe",
    "describe",
    "field_docs",
    "load",
    "parse_override",
    "to_yaml",
    "type_name",
]
