"""models/cpu_attention.py's kernel: the causal grouped-query attention of the compiled path, forward and
backward, against a float64 reference and against the bmm path it replaces, on the CPUs that can build it."""

import pytest
import torch

from lorasmith.models import cpu_attention
from lorasmith.models.attention import bmm_causal_attention, causal_matmul_attention
from lorasmith.training.memory import saved_for_backward

pytestmark = pytest.mark.skipif(not cpu_attention.load(), reason="no bf16 brgemm on this CPU, or no C++ compiler")


@pytest.fixture
def taken(monkeypatch):
    """Compiled attention takes the kernel, as prepare() has it on CPUs with AMX (also where it was not measured)."""
    monkeypatch.setattr(cpu_attention, "taken", True)


def _inputs(batch, heads, kv_heads, length, dim, seed=0, strided=False):
    """bf16 query, key and value; ``strided`` lays query and value out as transformers' projections leave them
    (views of [batch, length, heads, dim])."""
    torch.manual_seed(seed)
    if strided:
        q = torch.randn(batch, length, heads, dim, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        v = torch.randn(batch, length, kv_heads, dim, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    else:
        q = torch.randn(batch, heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(batch, kv_heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, length, heads, dim, dtype=torch.bfloat16)
    return q, k, v, grad


def _reference(q, k, v, grad, scaling):
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True, scale=scaling
    ).transpose(1, 2)
    return (ref, *torch.autograd.grad(ref, (q, k, v), grad.double()))


def _errors(attention, q, k, v, grad, scaling):
    out = attention(q, k, v, scaling)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    want = _reference(q, k, v, grad, scaling)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == torch.bfloat16
    return [((a.double() - b).norm() / max(b.norm(), 1e-6)).item() for a, b in zip(got, want)]  # 1 token: dq = dk = 0


@pytest.mark.parametrize(
    "heads, kv_heads, length, dim, strided",
    [
        (9, 3, 112, 64, True),  # the embedded model's heads, the bench's typical rows, transformers' layout
        (4, 4, 1, 32, False),  # one token; no grouping
        (6, 2, 33, 16, False),  # odd length: rows padded to a pair for the VNNI layout
        (8, 2, 130, 128, True),  # past two key blocks of 64, a larger head
        (2, 1, 200, 64, False),
    ],
)
def test_kernel_matches_float64_as_closely_as_the_bmm_path(heads, kv_heads, length, dim, strided):
    q, k, v, grad = _inputs(2, heads, kv_heads, length, dim, strided=strided)
    scaling = dim**-0.5
    kernel = _errors(cpu_attention.causal_attention, q, k, v, grad, scaling)
    bmm = _errors(bmm_causal_attention, q, k, v, grad, scaling)
    for got, base in zip(kernel, bmm):
        assert got < 1e-2 and got <= 1.25 * base + 1e-4, (kernel, bmm)


def test_kernel_keeps_a_log_sum_exp_per_row_not_its_probabilities():
    """What the backward pass holds beside query, key and value: one fp32 log-sum-exp per (position, head), positions
    padded to a pair; nothing of the scores' size (the bmm path keeps a bf16 probability per score)."""
    batch, heads, kv_heads, length, dim = 2, 6, 2, 99, 16
    q, k, v, _ = _inputs(batch, heads, kv_heads, length, dim)
    kept = saved_for_backward(lambda: cpu_attention.causal_attention(q, k, v, 0.25))
    inputs = [(t.numel(), torch.bfloat16) for t in (q, k, v)]
    assert sorted((t.numel, t.dtype) for t in kept) == sorted([*inputs, (batch * heads * 100, torch.float32)])


def test_compiled_layers_call_the_kernel_with_dynamic_lengths(taken):
    """Under torch.compile (dynamic shapes, as the compiled layers run) the dispatching path takes the kernel,
    and gives what the kernel gives eagerly, bit for bit, at two lengths through one graph."""
    compiled = torch.compile(causal_matmul_attention, dynamic=True)
    for length in (40, 57):
        q, k, v, grad = _inputs(2, 6, 2, length, 32, seed=length, strided=True)
        eager = cpu_attention.causal_attention(q, k, v, 0.2)
        want = (eager, *torch.autograd.grad(eager, (q, k, v), grad))
        out = compiled(q, k, v, 0.2)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_custom_ops_pass_torch_library_checks():
    """Schema, fake (meta) shapes, autograd registration: what torch.compile relies on."""
    q, k, v, grad = _inputs(1, 4, 2, 24, 16, strided=True)
    forward = getattr(torch.ops.lorasmith, f"causal_attention_{cpu_attention.VERSION}").default
    backward = getattr(torch.ops.lorasmith, f"causal_attention_backward_{cpu_attention.VERSION}").default
    torch.library.opcheck(forward, (q, k, v, 0.25))
    q, k, v = q.detach(), k.detach(), v.detach()
    _, lse = forward(q, k, v, 0.25)
    torch.library.opcheck(backward, (grad, q, k, v, lse, 0.25))


def test_model_cpu_attention_kernel_false_keeps_the_bmm_path_in_this_process(monkeypatch):
    """A model compiled with the kernel, then one with model.cpu_attention_kernel: false, in one process."""
    monkeypatch.setattr(cpu_attention, "taken", cpu_attention.taken)  # restored afterwards
    q, k, v, _ = _inputs(1, 4, 2, 8, 16)
    if cpu_attention.prepare():  # where this CPU has AMX
        assert cpu_attention.usable(q, k, v)
    assert not cpu_attention.prepare(False) and not cpu_attention.usable(q, k, v)


def test_inputs_the_kernel_does_not_take_keep_the_bmm_path(taken):
    q, k, v, _ = _inputs(1, 4, 2, 8, 16)
    assert cpu_attention.usable(q, k, v)
    assert not cpu_attention.usable(q.float(), k.float(), v.float())
    assert not cpu_attention.usable(q.half(), k.half(), v.half())
    odd = torch.randn(1, 4, 8, 15, dtype=torch.bfloat16)
    assert not cpu_attention.usable(odd, odd[:, :2], odd[:, :2])


def test_compiled_bf16_training_with_the_kernel_stays_close_to_eager(tiny_model_dir, tokenizer, monkeypatch, taken):
    """The compiled layers of a bf16 LoRA model take the kernel, and loss and gradients stay those of the eager
    step (the same bound as the bmm path's test in test_attention.py)."""
    from tests.conftest import tiny_lora
    from tests.test_attention import BF16, _loss_and_grads, assert_close_to_reference, spelled_numbers

    from lorasmith.models.attention import SDPA_FP32
    from lorasmith.training.compile import compile_decoder_layers

    batch = spelled_numbers(tokenizer, ((7, "seven"), (12, "twelve"), (90, "ninety"), (300, "three hundred")))
    reference, ref_grads = _loss_and_grads(tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train(), batch, BF16)
    calls = []
    original = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: calls.append(a[0].shape) or original(*a))
    model = tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train()
    assert compile_decoder_layers(model) == 2
    loss, grads = _loss_and_grads(model, batch, BF16)
    assert calls  # traced through the kernel
    assert_close_to_reference(loss, grads, reference, ref_grads)
