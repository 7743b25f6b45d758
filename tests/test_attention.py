"""The CPU fast paths change speed, never results: sdpa_fp32 attention, mask-free right padding,
LoRA input casts off under autocast."""

import pytest
import torch
from tests.conftest import tiny_lora

from lorasmith.data.batching import collate
from lorasmith.data.masking import encode
from lorasmith.models.attention import SDPA_FP32
from lorasmith.models.hardware import Precision, choose_attention
from lorasmith.training.loss import causal_lm, lora_input_casts_off, weighted_loss

FP32 = Precision("fp32", "cpu")
BF16 = Precision("bf16", "cpu")


@pytest.fixture
def encoded(tokenizer, demo_rows):
    train, _ = demo_rows
    return [encode(tokenizer, r["messages"], max_length=256) for r in train[:4]]


@pytest.fixture
def batch(encoded, tokenizer):
    return collate(encoded, tokenizer.pad_token_id)


def _loss_and_grads(model, batch, precision):
    model.zero_grad(set_to_none=True)
    parts = weighted_loss(model, batch, precision)
    (parts.loss_sum / parts.weight_sum).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(parts.loss_sum.detach()) / parts.weight_sum, grads


def test_auto_attention_on_cpu_follows_the_precision():
    cpu = torch.device("cpu")
    assert choose_attention("auto", cpu, BF16) == SDPA_FP32
    assert choose_attention("auto", cpu, FP32) == "sdpa"
    assert choose_attention("eager", cpu, BF16) == "eager"


def test_sdpa_fp32_matches_sdpa_and_eager_with_and_without_a_padding_mask(tiny_model_dir, batch):
    logits = {}
    for attention in ("eager", "sdpa", SDPA_FP32):
        lm = causal_lm(tiny_lora(tiny_model_dir, attention))
        with torch.no_grad():
            logits[attention] = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    for attention in ("sdpa", SDPA_FP32):
        torch.testing.assert_close(logits[attention][real], logits["eager"][real], rtol=1e-4, atol=1e-4)


def test_sdpa_fp32_under_bf16_stays_close_to_fp32(tiny_model_dir, batch):
    reference, ref_grads = _loss_and_grads(tiny_lora(tiny_model_dir, "sdpa"), batch, FP32)
    loss, grads = _loss_and_grads(tiny_lora(tiny_model_dir, SDPA_FP32), batch, BF16)
    assert loss == pytest.approx(reference, rel=1e-2)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_mask_free_padded_rows_equal_each_row_alone(tiny_model_dir, encoded, batch, tokenizer):
    """Right padding without a padding mask: a padded batch gives each row's own loss and gradients."""
    model = tiny_lora(tiny_model_dir, SDPA_FP32)
    whole, g_whole = _loss_and_grads(model, batch, FP32)
    rows = [collate([e], tokenizer.pad_token_id) for e in encoded]
    model.zero_grad(set_to_none=True)
    total = sum(b.weight_sum for b in rows)
    loss = 0.0
    for b in rows:
        parts = weighted_loss(model, b, FP32)
        (parts.loss_sum / total).backward()
        loss += float(parts.loss_sum) / total
    assert loss == pytest.approx(whole, rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_whole[name], rtol=1e-4, atol=1e-7)


def test_lora_input_casts_off_changes_nothing_under_autocast(tiny_model_dir, batch):
    model = tiny_lora(tiny_model_dir, SDPA_FP32)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal_lm(model)(input_ids=batch.input_ids).logits.float().square().mean().backward()
    with_casts = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), lora_input_casts_off(model, BF16):
        causal_lm(model)(input_ids=batch.input_ids).logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, with_casts[name], rtol=0, atol=0)
    layer = next(m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    assert layer.cast_input_dtype_enabled  # restored afterwards
