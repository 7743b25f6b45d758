"""Rotary embedding in one pass (models/rotary.py): transformers' arithmetic, the transposed rotation as its
gradient, taken only by compiled code and only for families whose own rotation it reproduces."""

import sys
import types

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from tests.conftest import tiny_lora
from tests.test_attention import BF16, _loss_and_grads, assert_close_to_reference

from lorasmith.data.batching import collate
from lorasmith.data.masking import encode
from lorasmith.models import rotary
from lorasmith.models.attention import SDPA_FP32


def _transformers_rotation():
    fn = llama.apply_rotary_pos_emb
    return getattr(fn, "lorasmith_original", fn)  # as transformers wrote it, installed or not


def _cos_sin(length: int, head_dim: int, dtype):
    config = llama.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=512)
    emb = llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(2, length, head_dim, dtype=dtype)
    return emb(x, torch.arange(length).expand(2, length))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_pass_is_transformers_rotation_bit_for_bit(dtype):
    torch.manual_seed(0)
    cos, sin = _cos_sin(37, 64, dtype)
    q, k = torch.randn(2, 9, 37, 64, dtype=dtype), torch.randn(2, 3, 37, 64, dtype=dtype)
    want = _transformers_rotation()(q, k, cos, sin)
    got = rotary.one_pass(q, k, cos, sin)
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))


def test_its_gradient_is_the_transposed_rotation():
    g = torch.Generator().manual_seed(1)
    # cos and sin whose halves differ: the backward pass must pair each half with the right one.
    cos, sin = torch.randn(2, 5, 8, dtype=torch.float64, generator=g), torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 1, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: rotary.one_pass(q, k, cos, sin), (q, k))
    want = torch.autograd.grad(sum(t.square().sum() for t in _transformers_rotation()(q, k, cos, sin)), (q, k))
    got = torch.autograd.grad(sum(t.square().sum() for t in rotary.one_pass(q, k, cos, sin)), (q, k))
    assert all(torch.allclose(w, o) for w, o in zip(want, got, strict=True))


def _interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style: pairs (0, 1), (2, 3), ...
    def rot(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _with_position_ids(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return _transformers_rotation()(q, k, cos, sin, unsqueeze_dim)


def _partial(q, k, cos, sin, unsqueeze_dim=1):  # Phi's: the first cos.shape[-1] dims rotate, the rest pass
    d = cos.shape[-1]
    q_rot, k_rot = _transformers_rotation()(q[..., :d], k[..., :d], cos, sin, unsqueeze_dim)
    return torch.cat((q_rot, q[..., d:]), dim=-1), torch.cat((k_rot, k[..., d:]), dim=-1)


def test_install_replaces_only_a_rotation_it_reproduces(monkeypatch):
    modules = {}
    for name, fn in (("partial", _partial), ("interleaved", _interleaved), ("positional", _with_position_ids)):
        module = types.ModuleType(f"fake_family_{name}")
        module.apply_rotary_pos_emb = fn
        module.FamilyAttention = type("FamilyAttention", (torch.nn.Module,), {"__module__": module.__name__})
        monkeypatch.setitem(sys.modules, module.__name__, module)
        modules[name] = module

    class Model(torch.nn.Module):
        config = types.SimpleNamespace(hidden_size=64, num_attention_heads=2, head_dim=32)

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(m.FamilyAttention() for m in modules.values())

    assert rotary.install(Model())
    assert rotary.install(Model())  # again: a wrapper of the original, not of the first wrapper
    patched = modules["partial"].apply_rotary_pos_emb
    assert patched is not _partial and patched.lorasmith_original is _partial
    assert modules["interleaved"].apply_rotary_pos_emb is _interleaved  # another rotation: its own kept
    assert modules["positional"].apply_rotary_pos_emb is _with_position_ids  # another signature: kept

    widths = []
    original = rotary.one_pass

    def recording(q, k, cos, sin, *args):
        widths.append(cos.shape[-1])
        return original(q, k, cos, sin, *args)

    monkeypatch.setattr(rotary, "one_pass", recording)
    compiled = torch.compile(patched, backend="eager", fullgraph=True, dynamic=False)
    cos, sin = _cos_sin(6, 32, torch.float32)
    q, k = torch.randn(2, 2, 6, 32), torch.randn(2, 1, 6, 32)
    for c, s in ((cos, sin), (cos[..., :16], sin[..., :16])):  # the whole head; a partial rotation
        want = _partial(q, k, c, s)
        for got in (patched(q, k, c, s), compiled(q, k, c, s)):
            assert all(torch.allclose(w, g) for w, g in zip(want, got, strict=True))
    assert widths == [32]  # compiled over the whole head only; eagerly never


def test_compiled_training_takes_it_and_stays_close(tiny_model_dir, tokenizer, monkeypatch):
    from lorasmith.training.compile import compile_decoder_layers

    rows = [
        [{"role": "user", "content": f"Spell {n} in words."}, {"role": "assistant", "content": w}]
        for n, w in ((3, "three"), (11, "eleven"), (40, "forty"))
    ]
    batch = collate([encode(tokenizer, r, max_length=256) for r in rows], tokenizer.pad_token_id)
    reference, ref_grads = _loss_and_grads(tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train(), batch, BF16)
    traced = []
    original = rotary.one_pass
    monkeypatch.setattr(rotary, "one_pass", lambda *a, **k: traced.append(1) or original(*a, **k))
    model = tiny_lora(tiny_model_dir, SDPA_FP32, torch.bfloat16).train()
    compile_decoder_layers(model)
    loss, grads = _loss_and_grads(model, batch, BF16)
    assert traced  # the compiled layers were traced through one_pass
    assert_close_to_reference(loss, grads, reference, ref_grads)
