"""Exact match from the validation forward pass (lm-evaluation-harness's ``is_greedy``) against real
generation: the answers it establishes are the answers greedy decoding writes."""

import pytest
import torch

from lorasmith.config import Config, DataConfig, ModelConfig
from lorasmith.data.dataset import tokenize
from lorasmith.data.records import Conversation
from lorasmith.evaluation.compare import evaluate
from lorasmith.evaluation.generate import complete
from lorasmith.evaluation.metrics import length_batches
from lorasmith.models.hardware import Precision

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour. One word.",
    "What is 2 + 3? Answer with a number only.",
    "Say hello in Spanish.",
    "What is the opposite of hot? One word.",
    "Which planet is known as the red planet?",
    "Give me a synonym of big. One word.",
    "What colour is the sky on a clear day?",
]


def test_length_batches_respect_both_bounds_and_keep_every_row():
    lengths = [5, 300, 40, 41, 7, 900, 120, 121, 122, 3]
    batches = length_batches(lengths, max_rows=3, max_tokens=250)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 250  # a longer row is a batch alone


@pytest.mark.slow
def test_forward_pass_answers_equal_generated_answers(tokenizer):
    """References made of the model's own greedy answers: the forward pass must establish most of them
    (their greedy answer is the reference), and every answer it reports, and its exact match, must equal
    what generating every answer gives; wrong references stay wrong."""
    from lorasmith.models.loading import load_model

    model = load_model(ModelConfig(), device=torch.device("cpu"), attn_implementation="sdpa")
    precision = Precision("fp32", "cpu")
    histories = [[{"role": "user", "content": q}] for q in QUESTIONS]
    made = complete(model, tokenizer, histories, precision=precision, max_new_tokens=40, batch_size=8)
    own = [(h, c.text.strip()) for h, c in zip(histories, made) if c.finish_reason == "stop"]
    assert len(own) >= 4, [c.text for c in made]
    wrong = [(histories[0], "Berlin is the capital of France."), (histories[2], "7")]
    convs = [
        Conversation(id=f"c{i}", messages=[*h, {"role": "assistant", "content": a}], source=f"test:{i}")
        for i, (h, a) in enumerate(own + wrong)
    ]
    data = tokenize(tokenizer, convs, DataConfig(train="test", max_length=256))
    cfg = Config()
    cfg.eval.exact_match, cfg.eval.samples, cfg.eval.max_new_tokens, cfg.eval.batch_size = -1, 0, 40, 8

    shortcut = evaluate(model, tokenizer, data, cfg, precision, tokenizer.pad_token_id)
    full = evaluate(model, tokenizer, data, cfg, precision, tokenizer.pad_token_id, answers_from_forward=False)

    assert full["exact_match_from_forward_pass"] == 0
    assert shortcut["exact_match_from_forward_pass"] >= len(own) // 2
    assert shortcut["exact_match_checked"]["generated"] == shortcut["exact_match_checked"]["equal"] >= 1
    assert [a["answer"] for a in shortcut["exact_match_answers"]] == [a["answer"] for a in full["exact_match_answers"]]
    assert [a["match"] for a in shortcut["exact_match_answers"]] == [True] * len(own) + [False] * len(wrong)
    assert shortcut["exact_match"] == full["exact_match"] == len(own) / len(convs)
    assert shortcut["loss"] == pytest.approx(full["loss"])
