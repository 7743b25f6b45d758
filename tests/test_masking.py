"""Decode exactly what is trained: each assistant message plus its end-of-turn token, nothing else."""

import pytest
from tests.templates import FAMILIES, family_tokenizer

from lorasmith.data.batching import collate
from lorasmith.data.masking import encode, trained_spans

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
CONVERSATION = [
    {"role": "user", "content": "Say the word assistant, then the capital of France."},
    {"role": "assistant", "content": "assistant. Paris."},
    # The user quotes the first answer: a naive search would train the user's copy.
    {"role": "user", "content": "You said: assistant. Paris. Now say helpful."},
    {"role": "assistant", "content": "helpful"},
    {"role": "user", "content": "And JSON?"},
    {"role": "assistant", "content": '{"city": "Paris", "n": 2}'},
]


def assert_spans(spans, expected):
    """Equal, except that a token straddling the template/content boundary is trained whole.

    Mistral's `[/INST]` runs straight into the answer, and SmolLM2's BPE merges `]{` into one token:
    predicting that token is how the model produces the answer's first character, so it is trained.
    """
    assert len(spans) == len(expected)
    for span, want in zip(spans, expected):
        extra = span[: len(span) - len(want)]
        assert span.endswith(want) and len(extra) <= 2 and not any(c.isalnum() for c in extra), (span, want)


def _expected(conv, eot, which="assistant"):
    idx = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if which == "last_assistant":
        idx = idx[-1:]
    return [conv[i]["content"].strip() + eot for i in idx]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("with_system", [False, True])
def test_trained_spans_are_assistant_messages_plus_end_of_turn(tokenizer, family, with_system):
    tok, eot, supports_system = family_tokenizer(tokenizer, family)
    if with_system and not supports_system:
        pytest.skip(f"{family}'s template rejects system messages")
    conv = ([SYSTEM] if with_system else []) + CONVERSATION
    enc = encode(tok, conv, max_length=4096)
    assert_spans(trained_spans(tok, enc), _expected(conv, eot))
    # What the model sees is the template's own tokenization of the whole conversation.
    assert enc.input_ids == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["chatml-smollm2", "llama3", "gemma"])
def test_templates_that_trim_content(tokenizer, family):
    tok, eot, _ = family_tokenizer(tokenizer, family)
    conv = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " Paris is the capital.\n"}]
    enc = encode(tok, conv, max_length=4096)
    spans = trained_spans(tok, enc)
    assert len(spans) == 1
    assert spans[0].strip().removesuffix(eot).strip() == "Paris is the capital."
    assert spans[0].endswith(eot)


def test_train_on_policies_and_message_weights(tokenizer):
    conv = [dict(m, weight=1.0) for m in CONVERSATION]
    enc = encode(tokenizer, conv, max_length=4096, train_on="last_assistant")
    assert trained_spans(tokenizer, enc) == _expected(conv, "<|im_end|>", "last_assistant")

    conv[1]["weight"] = 0.0  # `train: false` on the first answer
    conv[3]["weight"] = 0.5
    enc = encode(tokenizer, conv, max_length=4096)
    assert trained_spans(tokenizer, enc) == ["helpful<|im_end|>", '{"city": "Paris", "n": 2}<|im_end|>']
    assert sorted({w for w in enc.weights if w > 0}) == [0.5, 1.0]

    enc = encode(tokenizer, CONVERSATION, max_length=4096, train_on="all")
    text = "".join(trained_spans(tokenizer, enc))
    for m in CONVERSATION:
        assert m["content"] + "<|im_end|>" in text
    assert "You are a helpful AI assistant named SmolLM" not in text  # injected, not a message


def test_truncation_keeps_the_start(tokenizer):
    enc = encode(tokenizer, CONVERSATION, max_length=40)
    assert len(enc.input_ids) == 40 and enc.truncated
    full = encode(tokenizer, CONVERSATION, max_length=4096)
    assert enc.input_ids == full.input_ids[:40] and enc.weights == full.weights[:40]


def test_padding_never_masks_the_eos_that_ends_a_turn(tokenizer):
    """SmolLM2's pad token is its EOS (<|im_end|>): masking pads by id would drop every real EOS label."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = encode(tokenizer, CONVERSATION[:2], max_length=4096)
    long = encode(tokenizer, CONVERSATION, max_length=4096)
    batch = collate([short, long], tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    trained_eos = int(((batch.input_ids == eos) & (batch.weights > 0)).sum())
    assert trained_eos == 1 + 3  # one per assistant turn
    assert batch.weights[0, len(short.input_ids) :].sum() == 0  # padding carries no loss
    assert batch.attention_mask[0].sum() == len(short.input_ids)
