import pytest

from lorasmith import config
from lorasmith.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3.0e-4\nlora:\n  r: 4\n")
    cfg = config.load(path, ["lora.r=8", "train.lr=1e-4", "lora.target_modules=q_proj,v_proj", "data.val_fraction=0.1"])
    assert cfg.lora.r == 8
    assert cfg.train.lr == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string; it must still be a float
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.val_fraction == 0.1
    assert cfg.train.micro_batch_size == config.TrainConfig().micro_batch_size


@pytest.mark.parametrize(
    ("override", "expected"),
    [("train.learning_rate=1e-4", "train.lr"), ("lora.rank=4", "lora.r"), ("lr=1e-4", "train.lr"), ("trian.lr=1", "train.lr")],
)
def test_unknown_key_suggests_nearest(override, expected):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert expected in str(e.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lora.r=abc", "expected an integer"),
        ("train.gradient_checkpointing=maybe", "true or false"),
        ("train.scheduler=cosin", "did you mean 'cosine'"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("lora.r=0", "lora.r must be >= 1"),
    ],
)
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert fragment in str(e.value)


def test_contradictions_fail_before_loading():
    with pytest.raises(ConfigError, match="both set"):
        config.load(None, ["data.val=v.jsonl", "data.val_fraction=0.1"])
    with pytest.raises(ConfigError, match="needs validation data"):
        config.load(None, ["data.train=t.jsonl", "eval.exact_match=10"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:"):
        config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    nested = tmp_path / "unknown.yaml"
    nested.write_text("train:\n  epoch: 2\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.epochs'"):
        config.load(nested)


def test_every_key_is_documented():
    text = config.describe()
    for key in config.all_keys():
        name = key.split(".")[1]
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{name}:"))
        assert "# (" in line and len(line.split(")", 1)[1].strip()) > 5, f"{key} has no doc"


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).parent.parent
    paths = [config.builtin_recipe("demo"), *sorted((root / "examples").glob("*.yaml"))]
    for path in paths:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "lorasmith" in first, f"{path} must start with the command that runs it"
        config.load(path)


def test_nested_keys_and_the_model_shorthand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: my/model\ndata:\n  loss_weights: {user: 0.2}\n  fields:\n    messages: dialog\n")
    cfg = config.load(path, ["data.loss_weights.system=0.5", "data.fields.role=speaker"])
    assert cfg.model.name == "my/model"  # `model: NAME` is `model: {name: NAME}`
    assert cfg.data.loss_weights == {"user": 0.2, "system": 0.5}
    assert cfg.data.fields == {"messages": "dialog", "role": "speaker"}
    assert config.load(None, ["model=other"]).model.name == "other"
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lr\.x'"):
        config.load(None, ["train.lr.x=1"])
    assert "data.loss_weights" in config.all_keys() and "train.lr" in config.all_keys()


def test_a_saved_config_loads_back_as_it_was(tmp_path):
    """A run's config.yaml (what `--resume runs/NAME` reads) gives the same config: `all-linear`
    stays the keyword, not a one-item module list."""
    cfg = config.load(None, ["lora.r=8", "data.train=x.jsonl"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg
    assert config.load(path).lora.target_modules == "all-linear"


def test_a_renamed_key_is_still_read_under_its_earlier_name(tmp_path, caplog):
    """train.batch_tokens became train.micro_batch_tokens: old configs and old runs' config.yaml still load."""
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  batch_tokens: 600\n")
    assert config.load(old).train.micro_batch_tokens == 600
    assert config.load(None, ["train.batch_tokens=300"]).train.micro_batch_tokens == 300
    assert "train.batch_tokens is now train.micro_batch_tokens" in caplog.text


def test_a_checkpoint_written_before_a_field_rename_still_loads(tmp_path):
    import json

    from lorasmith.training import checkpoint

    (tmp_path / checkpoint.MARKER).write_text("")
    old = {"step": 3, "micro_batches_done": 6, "tokens_seen": 100, "skipped_steps": 0, "fingerprint": {}, "split": 4}
    (tmp_path / "trainer_state.json").write_text(json.dumps(old))
    assert checkpoint.load_state(tmp_path).oom_pieces == 4
