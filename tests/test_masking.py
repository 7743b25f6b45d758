"""Loss masks: exactly the tokens the model must generate after the generation prompt, on every
template family, checked against an independent reference (tests/masking_reference.py)."""

import zlib

import pytest
from tests.masking_reference import apply, conversations, policy_weights, reference_weights
from tests.templates import FAMILIES, family_tokenizer

from lorasmith.data.batching import collate
from lorasmith.data.masking import TemplateMismatch, encode, encode_fitted, trained_spans
from lorasmith.data.template import ChatTemplate

N_CONVERSATIONS = 40


@pytest.fixture(scope="module")
def family_toks(tokenizer):
    return {name: family_tokenizer(tokenizer, name) for name in FAMILIES}


def trained_text(tok, enc) -> list[str]:
    return trained_spans(tok, enc)


def assert_runs(runs, expected):
    """Equal, except that a token straddling the prompt/reply boundary is trained whole: predicting
    it is how the model produces the reply's first character (e.g. '\\n\\n\\n' after 'assistant\\n')."""
    assert len(runs) == len(expected), (runs, expected)
    for run, want in zip(runs, expected):
        extra = run[: len(run) - len(want)]
        assert run.endswith(want) and len(extra) <= 2 and not any(c.isalnum() for c in extra), (run, want)


def check_declared(tok, name, conv, enc):
    """Families whose prefix renders are not prefixes of the whole: their documented rendering."""
    fam = FAMILIES[name]
    if name == "mistral-v0.3":
        # v0.3 drops the system prompt unless the conversation ends on a user turn; then the
        # rendering (and so the mask) is the one of the conversation without it, which is prefix-stable.
        rest = [m for m in conv if m["role"] != "system"]
        assert apply(tok, rest) == apply(tok, conv)
        want = reference_weights(tok, rest, fam.end_of_turn, policy_weights(rest))
        assert want is not None and enc.weights == want
    elif name == "deepseek-r1":
        # R1 prompts with '<think>\n', which rendered history never holds: the reply is trained from
        # its first character, as on DeepSeek-V3 whose prompt ends at '<｜Assistant｜>'.
        v3 = family_tokenizer(tok, "deepseek-v3")
        assert apply(v3, conv) == apply(tok, conv)
        want = reference_weights(v3, conv, fam.end_of_turn, policy_weights(conv))
        assert want is not None and enc.weights == want
    elif name == "qwen3":
        # Earlier turns render without a <think> block, the last with an empty one, which is trained.
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        expected = [r + fam.end_of_turn for r in replies[:-1]]
        expected.append(fam.declared["sep_last"] + replies[-1].lstrip("\n") + fam.end_of_turn)
        assert_runs(trained_text(tok, enc), expected)
    else:
        pytest.fail(f"{name}: the reference does not apply and no declared rendering is given")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_masks_match_the_reference_on_hard_conversations(family_toks, name):
    """Property test: seeded random and adversarial conversations (replies that are substrings of the
    markers, quoted or repeated answers, template text inside content, whitespace, unicode, long
    answers) give token-for-token the reference's mask, and the template's own tokenization."""
    tok, fam = family_toks[name], FAMILIES[name]
    template = ChatTemplate(tok)
    checked = 0
    for conv in conversations(seed=zlib.crc32(name.encode()), n=N_CONVERSATIONS, system=fam.system):
        enc = encode(tok, conv, max_length=1 << 20, template=template)
        full = apply(tok, conv)
        assert enc.input_ids == tok(full, add_special_tokens=False)["input_ids"]
        want = reference_weights(tok, conv, fam.end_of_turn, policy_weights(conv))
        if want is None:
            check_declared(tok, name, conv, enc)
        else:
            assert enc.weights == want, (conv, trained_text(tok, enc))
            checked += 1
        assert enc.turn_ends == sum(m["role"] == "assistant" for m in conv)
    if not fam.declared:
        assert checked == N_CONVERSATIONS


@pytest.mark.parametrize("name", ["chatml-smollm2", "qwen2.5", "llama3", "llama3.1", "phi4", "granite3", "command-r"])
@pytest.mark.parametrize("policy", [("all", None), ("last_assistant", None), ("assistant", {"user": 0.25, "system": 0.5})])
def test_train_on_policies_and_role_weights_match_the_reference(family_toks, name, policy):
    tok, fam = family_toks[name], FAMILIES[name]
    train_on, role_weights = policy
    checked = 0
    for conv in conversations(seed=7, n=15):
        conv = [m for m in conv if m["content"].strip() or m["role"] != "system"]  # an empty system prompt renders nothing
        enc = encode(tok, conv, max_length=1 << 20, train_on=train_on, role_weights=role_weights)
        want = reference_weights(tok, conv, fam.end_of_turn, policy_weights(conv, train_on, role_weights))
        if want is not None:
            assert enc.weights == want, (conv, trained_text(tok, enc))
            checked += 1
    assert checked >= 10


def test_truncate_history_keeps_the_reference_mask(tokenizer):
    conv = [{"role": "system", "content": "Be brief."}] + [
        m for c in conversations(seed=4, n=6) for m in c if m["role"] != "system"
    ]
    full = encode(tokenizer, conv, max_length=1 << 20)
    enc = encode_fitted(tokenizer, conv, max_length=len(full.input_ids) // 2, over_length="truncate_history")
    # The kept conversation: the system prompt and the newest exchanges that fit.
    users = [i for i, m in enumerate(conv) if m["role"] == "user"]
    kept = next(
        [conv[0], *conv[u:]]
        for u in users[1:]
        if len(encode(tokenizer, [conv[0], *conv[u:]], max_length=1 << 20).input_ids) <= len(full.input_ids) // 2
    )
    want = reference_weights(tokenizer, kept, "<|im_end|>", policy_weights(kept))
    assert not enc.truncated and enc.weights == want


# --- the five defects found by the reference, one regression each ---------------------------------


def test_a_reply_inside_the_end_of_turn_marker_is_trained(tokenizer):
    """Defect 1: SmolLM2, a multiple-choice answer 'd' was found inside '<|im_end|>'."""
    for reply in ["d", "end", "id", "turn", "s", ">"]:
        conv = [{"role": "user", "content": "Which one: a, b, c or d?"}, {"role": "assistant", "content": reply}]
        assert trained_text(tokenizer, encode(tokenizer, conv, max_length=4096)) == [reply + "<|im_end|>"]


def test_templates_that_are_not_prefix_stable_train_the_reply(family_toks):
    """Defect 2: Phi-3.5 appends EOS when no generation prompt is asked for; Mistral v0.3 folds the
    system prompt into the last user turn. The user's copy of the reply was trained instead."""
    tok = family_toks["phi3.5"]
    conv = [{"role": "user", "content": "Reply with 'Noted.' please"}, {"role": "assistant", "content": "Noted."}]
    assert trained_text(tok, encode(tok, conv, max_length=4096)) == ["Noted.<|end|>"]
    tok = family_toks["mistral-v0.3"]
    conv = [
        {"role": "system", "content": "You are helpful"},
        {"role": "user", "content": "Say helpful"},
        {"role": "assistant", "content": "helpful"},
    ]
    assert trained_text(tok, encode(tok, conv, max_length=4096)) == [" helpful</s>"]


@pytest.mark.parametrize("name", ["llama3", "gemma2", "gemma3"])
def test_leading_newlines_on_trimming_templates_are_not_taken_from_the_header(family_toks, name):
    """Defect 3: Llama-3 trained '\\n\\nParis.<|eot_id|>' where the model generates 'Paris.<|eot_id|>'."""
    tok, fam = family_toks[name], FAMILIES[name]
    conv = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "\n\nParis."}]
    assert trained_text(tok, encode(tok, conv, max_length=4096)) == ["Paris." + fam.end_of_turn]


@pytest.mark.parametrize("reply", ["1, 2, 3", "🙂 fine", "\tindented"])
def test_the_separator_before_a_reply_is_trained(family_toks, reply):
    """Defect 4: Mistral-style templates emit ' ' + content; where that space is a token of its
    own, the model must still generate it after [/INST]."""
    tok = family_toks["mistral-large-2411"]
    conv = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": reply}]
    assert trained_text(tok, encode(tok, conv, max_length=4096)) == [" " + reply + "</s>"]


def test_an_end_of_turn_marker_that_is_not_a_special_token_is_trained(tokenizer):
    """Defect 5: Llama-3's template on a tokenizer without <|eot_id|> as a special token (a base
    model's tokenizer): the marker is text the model must learn to write, or it never stops."""
    tok = family_tokenizer(tokenizer, "llama3", special_markers=False)
    assert "<|eot_id|>" not in ChatTemplate(tok).special_texts
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    enc = encode(tok, conv, max_length=4096)
    assert trained_text(tok, enc) == ["Hello.<|eot_id|>", "Bye.<|eot_id|>"]
    info = ChatTemplate(tok).describe()
    assert info.end_of_turn == "<|eot_id|>" and not info.end_of_turn_is_special and info.end_of_turn_tokens > 1


# --- templates that rewrite history, and what the template description says -----------------------


def test_reasoning_templates_train_what_the_rendering_holds(family_toks):
    """DeepSeek-R1 drops '<think>...</think>' from every assistant turn it renders; Qwen3 keeps it
    only for turns after the last user message. What is trained is what the rendering holds."""
    tok = family_toks["deepseek-r1"]
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]
    assert trained_text(tok, encode(tok, conv, max_length=4096)) == ["\n\n4<｜end▁of▁sentence｜>"]
    tok = family_toks["qwen3"]
    conv = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
    ]
    assert trained_text(tok, encode(tok, conv, max_length=4096)) == ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]


@pytest.mark.parametrize(
    ("name", "stable", "marker"),
    [
        ("chatml-smollm2", True, "<|im_end|>"),
        ("llama3", True, "<|eot_id|>"),
        ("phi3.5", False, "<|end|>"),
        ("mistral-v0.3", False, "</s>"),
        ("gemma3", True, "<end_of_turn>"),
        ("deepseek-r1", False, "<｜end▁of▁sentence｜>"),
    ],
)
def test_template_description(family_toks, name, stable, marker):
    info = ChatTemplate(family_toks[name]).describe()
    assert (info.prefix_stable, info.end_of_turn, info.end_of_turn_is_special) == (stable, marker, True)


def test_rendering_equals_apply_chat_template(family_toks):
    for name, tok in family_toks.items():
        template = ChatTemplate(tok)
        for conv in conversations(seed=11, n=5, system=FAMILIES[name].system):
            for k in range(1, len(conv) + 1):
                for gen in (False, True):
                    assert template.render(conv[:k], add_generation_prompt=gen) == apply(tok, conv[:k], add_generation_prompt=gen)


def test_a_template_that_drops_an_assistant_message_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    )
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(TemplateMismatch, match=r"does not render this assistant message.*message 1"):
        encode(tok, conv, max_length=4096)


# --- batching --------------------------------------------------------------------------------------


def test_truncation_keeps_the_start(tokenizer):
    conv = conversations(seed=5, n=1)[0] + conversations(seed=6, n=1)[0][-2:]
    full = encode(tokenizer, conv, max_length=4096)
    enc = encode(tokenizer, conv, max_length=20)
    assert len(enc.input_ids) == 20 and enc.truncated
    assert enc.input_ids == full.input_ids[:20] and enc.weights == full.weights[:20]


def test_padding_never_masks_the_eos_that_ends_a_turn(tokenizer):
    """SmolLM2's pad token is its EOS (<|im_end|>): masking pads by id would drop every real EOS label."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    conv = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c?"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e?"},
        {"role": "assistant", "content": "f"},
    ]
    short = encode(tokenizer, conv[:2], max_length=4096)
    long = encode(tokenizer, conv, max_length=4096)
    batch = collate([short, long], tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    trained_eos = int(((batch.input_ids == eos) & (batch.weights > 0)).sum())
    assert trained_eos == 1 + 3  # one per assistant turn
    assert batch.weights[0, len(short.input_ids) :].sum() == 0  # padding carries no loss
    assert batch.attention_mask[0].sum() == len(short.input_ids)
