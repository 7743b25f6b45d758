"""lorasmith: fine-tune chat language models with LoRA and QLoRA."""

__version__ = "0.1.0"
