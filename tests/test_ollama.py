"""The Ollama Modelfile's template: read off real chat templates, it renders conversations exactly as the
Jinja template does, and its Go-template text means what the layout renders (a small evaluator of the
Go-template subset it uses, written here apart from the code that emits it)."""

import re
from pathlib import Path

import pytest
from tests.templates import FAMILIES_WITH_TOOLS, family_tokenizer

from lorasmith.export.ollama import NoLayout, layout_of, modelfile

MORE = [
    [{"role": "user", "content": "Translate 'cat' to French."}],
    [
        {"role": "system", "content": "Reply in JSON."},
        {"role": "user", "content": "Give me a colour."},
        {"role": "assistant", "content": '{"colour": "red"}'},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": '{"colour": "blue"}'},
        {"role": "user", "content": "Last one."},
    ],
]


def go_render(template: str, messages: list[dict]) -> str:
    """Go's text/template on the subset the Modelfile uses: literal text, one ``range .Messages``, an
    if / else-if chain on ``eq .Role "..."``, ``.Content``, ``end``."""
    tokens = re.split(r"(\{\{.*?\}\})", template)
    assert not any(t.startswith("{{-") or t.endswith("-}}") for t in tokens)  # no whitespace trimming at all
    start = tokens.index("{{ range .Messages }}")
    stop = len(tokens) - 1 - tokens[::-1].index("{{ end }}")
    out = "".join(tokens[:start])
    body = tokens[start + 1 : stop]
    for message in messages:
        taking = done = False
        for t in body:
            if m := re.fullmatch(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}', t):
                taking = not done and m.group(1) == message["role"]
                done = done or taking
            elif t == "{{ end }}":
                taking = False
            elif t == "{{ .Content }}":
                out += message["content"] if taking else ""
            else:
                assert not t.startswith("{{"), t
                out += t if taking else ""
    return out + "".join(tokens[stop + 1 :])


@pytest.fixture(scope="module")
def layouts(tokenizer):
    found = {}
    for name in FAMILIES_WITH_TOOLS:
        tok = family_tokenizer(tokenizer, name)
        try:
            modelfile(tok, Path("m.gguf"), None, ["<eos>"])  # what export writes only when it passes its check
            found[name] = (tok, layout_of(tok))
        except NoLayout:
            found[name] = (tok, None)
    return found


def test_layouts_render_like_the_jinja_template_and_the_go_text_means_the_same(layouts):
    read = {name for name, (_, layout) in layouts.items() if layout is not None}
    assert {"chatml-smollm2", "qwen2.5", "llama3", "llama3.1", "phi4", "command-r", "granite3"} <= read
    for name in read:
        tok, layout = layouts[name]
        for messages in MORE:
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert layout.render(messages) == want, name
            shown = (
                messages
                if layout.default_system is None or messages[0]["role"] == "system"
                else [
                    {"role": "system", "content": layout.default_system},
                    *messages,
                ]
            )  # Ollama puts the Modelfile's SYSTEM first when a request has no system message
            assert go_render(layout.go_template(), shown) == want, name


def test_templates_it_cannot_restate_get_no_modelfile_and_a_reason(layouts, tokenizer):
    """Gemma folds the system prompt into the first user turn; Mistral v0.3 writes tools and the last
    user message differently: a per-role layout would prompt them differently from training."""
    for name in ("gemma3", "mistral-v0.3", "qwen3"):
        tok, layout = layouts[name]
        assert layout is None
        with pytest.raises(NoLayout, match=r"\w"):
            modelfile(tok, Path("m.gguf"), None, ["<eos>"])


def test_the_embedded_models_modelfile(tokenizer):
    text, check = modelfile(tokenizer, Path("out/model.gguf"), "You are a ticket triage assistant.", ["<|im_end|>"])
    assert check == {"passed": True, "identical_renderings": 4, "of": 4}
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert 'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and lines[-1] == 'SYSTEM """You are a ticket triage assistant."""'
    assert text.count('"""') == 4 and "<|im_start|>assistant\n" + '"""' in text  # the turn opened at the end
