"""The CPU fast paths change speed, never results: sdpa_fp32 attention, mask-free right padding,
LoRA input casts off under autocast."""

import pytest
import torch
from tests.conftest import tiny_lora

from lorasmith.data.batching import collate
from lorasmith.data.masking import encode
from lorasmith.models.attention import SDPA_FP32
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import causal_lm, lora_input_casts_off, weighted_loss
from lorasmith.training.memory import saved_for_backward

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


def spelled_numbers(tokenizer, pairs):
    """A right-padded batch of "Spell N in words." conversations, one per (N, words) pair."""
    rows = [[{"role": "user", "content": f"Spell {n} in words."}, {"role": "assistant", "content": w}] for n, w in pairs]
    return collate([encode(tokenizer, r, max_length=256) for r in rows], tokenizer.pad_token_id)


def assert_close_to_reference(loss, grads, reference, ref_grads):
    """A bf16 compiled step against the eager one: the same loss within 1%, each gradient's direction within 0.99."""
    assert loss == pytest.approx(reference, rel=1e-2)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.99, name


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
        loss += float(parts.loss_sum.detach()) / total
    assert loss == pytest.approx(whole, rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_whole[name], rtol=1e-4, atol=1e-7)


def test_rows_padded_to_a_multiple_give_the_loss_and_gradients_of_the_unpadded_batch(tiny_model_dir, encoded, batch, tokenizer):
    """train.pad_to_multiple_of: the extra pads change the batch's shape, never its loss or gradients."""
    padded = collate(encoded, tokenizer.pad_token_id, 16)
    assert padded.input_ids.shape[1] % 16 == 0 and padded.input_ids.shape[1] > batch.input_ids.shape[1]
    extra = padded.input_ids[:, batch.input_ids.shape[1] :]
    assert (extra == tokenizer.pad_token_id).all() and not padded.attention_mask[:, batch.input_ids.shape[1] :].any()
    assert padded.weight_sum == batch.weight_sum and padded.num_real_tokens == batch.num_real_tokens
    # Never past the limit training gives (its set's longest conversation): no position beyond a real row's.
    longest = batch.input_ids.shape[1]
    width = lambda limit: collate(encoded, tokenizer.pad_token_id, 16, limit=limit).input_ids.shape[1]  # noqa: E731
    assert width(longest + 1) == min(longest + 1, padded.input_ids.shape[1]) and width(longest) == longest
    model = tiny_lora(tiny_model_dir, SDPA_FP32)
    loss, grads = _loss_and_grads(model, batch, FP32)
    loss_padded, grads_padded = _loss_and_grads(model, padded, FP32)
    assert loss_padded == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_padded[name], g, rtol=1e-4, atol=1e-7)


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


def test_bmm_causal_attention_matches_sdpa_with_grouped_heads():
    """The compiled short-row path: bf16 matmuls around an fp32 softmax, query heads grouped per key/value head."""
    from lorasmith.models.attention import bmm_causal_attention

    torch.manual_seed(0)
    q = torch.randn(2, 6, 40, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 16, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(2, 40, 6, 16, dtype=torch.bfloat16)
    out = bmm_causal_attention(q, k, v, scaling=0.25)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True, scale=0.25
    ).transpose(1, 2)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, b in zip((out, *got), (ref, *want)):
        assert a.shape == b.shape
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max()


def test_matmul_attention_keeps_one_bf16_copy_of_its_probabilities_and_matches_float64():
    """What the backward pass holds per score is one bf16 probability (autograd's softmax would keep fp32 ones
    beside the bf16 copy the value matmul reads), and gradients from it stay as close to a float64 reference
    as the bf16 matmuls allow, eagerly and compiled, at a length past the former 128-token limit."""
    from lorasmith.models.attention import bmm_causal_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 200, 16
    q = torch.randn(batch, heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, dim, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(batch, length, heads, dim, dtype=torch.bfloat16)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True, scale=0.25
    ).transpose(1, 2)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), grad.double()))

    outs = []
    kept = saved_for_backward(lambda: outs.append(bmm_causal_attention(q, k, v, scaling=0.25)))
    out = outs[0]
    scores = [(s.numel, s.dtype) for s in kept if s.numel >= batch * heads * length * length]
    assert scores == [(batch * heads * length * length, torch.bfloat16)]

    compiled = torch.compile(bmm_causal_attention, dynamic=True)
    for got in (out, compiled(q, k, v, 0.25)):
        got = (got, *torch.autograd.grad(got, (q, k, v), grad))
        for a, b in zip(got, want):
            assert ((a.double() - b).norm() / b.norm()).item() < 1e-2


def test_compiled_bf16_training_takes_the_matmul_attention_and_stays_close(tiny_model_dir, tokenizer, monkeypatch):
    import lorasmith.models.attention as attention
    from lorasmith.training.compile import compile_decoder_layers

    batch = spelled_numbers(tokenizer, ((3, "three"), (11, "eleven"), (40, "forty"), (1000, "one thousand")))

    # As training holds it under bf16: base weights in bf16 (so are q, k and v), LoRA in fp32.
    reference, ref_grads = _loss_and_grads(tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train(), batch, BF16)
    shapes = []
    original = attention.causal_matmul_attention

    def recording(query, *args, **kwargs):
        shapes.append(tuple(query.shape))
        return original(query, *args, **kwargs)

    monkeypatch.setattr(attention, "causal_matmul_attention", recording)
    model = tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train()
    assert compile_decoder_layers(model) == 2
    loss, grads = _loss_and_grads(model, batch, BF16)
    assert shapes and batch.input_ids.shape[1] <= attention.SHORT_ROWS  # traced through the matmul path
    assert_close_to_reference(loss, grads, reference, ref_grads)


def test_rows_past_the_measured_limit_take_sdpa(tiny_model_dir, tokenizer, monkeypatch):
    """compile_decoder_layers' matmul_rows (measured per machine) reaches the kernel: wider rows go to SDPA."""
    import lorasmith.models.attention as attention
    from lorasmith.training.compile import compile_decoder_layers

    batch = spelled_numbers(tokenizer, [(12, "twelve")] * 2)
    reference, _ = _loss_and_grads(tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train(), batch, BF16)
    calls = []
    original = attention.causal_matmul_attention
    monkeypatch.setattr(attention, "causal_matmul_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train()
    compile_decoder_layers(model, matmul_rows=batch.input_ids.shape[1] - 1)
    loss, _ = _loss_and_grads(model, batch, BF16)
    assert not calls and loss == pytest.approx(reference, rel=1e-2)
