"""Chat templates of popular model families, installed on a copy of the SmolLM2 tokenizer together
with each family's special tokens. The templates are the files in tests/chat_templates/ (their
sources are listed in tests/chat_templates/SOURCES.md); ``chatml-smollm2`` is the embedded
model's own."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent / "chat_templates"
SHIPPED = Path(__file__).parent.parent / "src" / "lorasmith" / "models" / "templates"


@dataclass(frozen=True)
class Family:
    file: str | None
    """Template file in tests/chat_templates (None: the tokenizer's own)."""
    end_of_turn: str
    """The text that ends an assistant turn, as the model card documents it (the reference cuts there)."""
    specials: tuple[str, ...] = ()
    bos: str | None = None
    eos: str | None = None
    system: bool = True
    """The template accepts a system message."""
    declared: dict = field(default_factory=dict)
    """For templates where the prefix-render reference does not apply: how a reply renders."""


LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
DS_SPECIALS = ("<｜User｜>", "<｜Assistant｜>")
PHI3_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

FAMILIES: dict[str, Family] = {
    "chatml-smollm2": Family(None, "<|im_end|>"),
    "qwen2.5": Family("qwen2.5-instruct.jinja", "<|im_end|>"),
    # Qwen3 renders the last turn with a <think> block and earlier turns without (prefix renders differ).
    "qwen3": Family("qwen3.jinja", "<|im_end|>", declared={"sep_last": "<think>\n\n</think>\n\n", "eos": "<|im_end|>"}),
    "llama3": Family("llama-3-instruct.jinja", "<|eot_id|>", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": Family("llama-3.1-instruct.jinja", "<|eot_id|>", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.2": Family("mistral-7b-instruct-v0.2.jinja", "</s>", (), "<s>", "</s>", system=False),
    "mistral-v0.2-system": Family("mistral-7b-instruct-v0.2-system.jinja", "</s>", (), "<s>", "</s>"),
    # v0.3 folds the system prompt into the last user turn: a prompt ending on a user turn holds it, a
    # conversation ending on an assistant turn does not.
    "mistral-v0.3": Family(
        "mistral-7b-instruct-v0.3.jinja", "</s>", ("[INST]", "[/INST]"), "<s>", "</s>", declared={"sep": " ", "trim": True}
    ),
    "mistral-large-2411": Family("mistral-large-instruct-2411.jinja", "</s>", (), "<s>", "</s>"),
    "gemma2": Family("gemma-2-it.jinja", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", system=False),
    "gemma3": Family("gemma-3-it.jinja", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    "phi3": Family("phi-3-mini-4k-instruct.jinja", "<|end|>", PHI3_SPECIALS, "<s>", "<|endoftext|>"),
    "phi3.5": Family("phi-3.5-mini-instruct.jinja", "<|end|>", PHI3_SPECIALS, "<s>", "<|endoftext|>"),
    "phi4": Family("phi-4.jinja", "<|im_end|>", ("<|im_sep|>",)),
    # Zephyr's role markers are plain text in its tokenizer; only </s> is special.
    "zephyr": Family("zephyr-7b-beta.jinja", "</s>", (), "<s>", "</s>"),
    "deepseek-v3": Family(
        "deepseek-v3.jinja", "<｜end▁of▁sentence｜>", DS_SPECIALS, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    ),
    # R1 prompts with '<think>\n', which no rendered history turn holds.
    "deepseek-r1": Family(
        "deepseek-r1-distill-qwen.jinja",
        "<｜end▁of▁sentence｜>",
        DS_SPECIALS,
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        declared={"sep": ""},
    ),
    "command-r": Family(
        "c4ai-command-r-plus.jinja",
        "<|END_OF_TURN_TOKEN|>",
        ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"),
        "<BOS_TOKEN>",
        "<|END_OF_TURN_TOKEN|>",
    ),
    "granite3": Family(
        "granite-3.0-8b-instruct.jinja", "<|end_of_text|>", ("<|start_of_role|>", "<|end_of_role|>"), None, "<|end_of_text|>"
    ),
    "openchat3.5": Family("openchat-3.5-0106.jinja", "<|end_of_turn|>", (), "<s>", "<|end_of_turn|>"),
    "deepseek-coder": Family("deepseek-coder-33b-instruct.jinja", "<|EOT|>", (), "<｜begin▁of▁sentence｜>", "<|EOT|>"),
    "llama2-vigogne": Family("vigogne-2-70b-chat.jinja", "</s>", (), "<s>", "</s>"),
    # Tool-capable templates (tests/test_tool_masks.py) that render plain conversations too.
    "chatml-tools": Family(str(SHIPPED / "chatml-tools.jinja"), "<|im_end|>"),
    "llama3.2": Family("llama-3.2-instruct.jinja", "<|eot_id|>", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
}

MISTRAL_TOOL_SPECIALS = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
TOOL_FAMILIES: dict[str, Family] = {
    # Hermes-2-Pro's tool_use template iterates `tools` unconditionally: it renders tool conversations only.
    "hermes-2-pro": Family("hermes-2-pro-tool-use.jinja", "<|im_end|>"),
    # Nemo folds the system prompt into the last user turn and lists the tools before it.
    "mistral-nemo": Family("mistral-nemo-2407.jinja", "</s>", MISTRAL_TOOL_SPECIALS, "<s>", "</s>"),
}
FAMILIES_WITH_TOOLS = {**FAMILIES, **TOOL_FAMILIES}


def family_tokenizer(base, name: str, *, special_markers: bool = True):
    """A copy of ``base`` with the family's template and special tokens (``special_markers=False``
    leaves the end-of-turn marker as plain text, as a base model's tokenizer would)."""
    fam = FAMILIES_WITH_TOOLS[name]
    tok = copy.deepcopy(base)
    extra = [s for s in fam.specials if special_markers or s != fam.end_of_turn]
    special = {"additional_special_tokens": extra} if extra else {}
    if fam.bos:
        special["bos_token"] = fam.bos
    if fam.eos and (special_markers or fam.eos != fam.end_of_turn):
        special["eos_token"] = fam.eos
    if special:
        tok.add_special_tokens(special)
    if fam.file:
        tok.chat_template = (TEMPLATES / fam.file).read_text(encoding="utf-8")
    return tok
