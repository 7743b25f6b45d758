"""lorasmith: fine-tune chat language models with LoRA and QLoRA."""

__version__ = "0.1.0"

import time as _time

IMPORTED_AT = _time.monotonic()
"""When this package was first imported: the start of a `lorasmith` command, for its time accounting."""
