"""models/cpu_lora.py's kernel (LoRA's rank-r gradient products on AMX tiles) against float64 and oneDNN, and
training/lora_fusion.py's pass that routes a compiled layer's backward products to it."""

import operator

import pytest
import torch

from lorasmith.models import cpu_lora
from lorasmith.training.lora_fusion import LoraPostGrad, route_lora_gradients

amx = pytest.mark.skipif(not cpu_lora.load(), reason="no AMX on this CPU, or no C++ compiler")


def _bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _relative(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@amx
@pytest.mark.parametrize(
    "rows, width, rank",
    [
        (896, 1536, 16),  # the embedded model's gate/up at the bench's micro-batches
        (451, 576, 8),  # rows not a multiple of the kernel's 32: the last block padded
        (33, 192, 48),  # three passes of 16 columns of p (the fused q/k/v A's)
        (1, 64, 24),  # one row; a rank not a multiple of 16
    ],
)
def test_the_products_are_those_of_float64_as_close_as_onednn(rows, width, rank):
    q, p, bt = _bf16(rows, width, seed=0), _bf16(rows, rank, seed=1), _bf16(width, rank, seed=2)
    q_strided = torch.cat([q, _bf16(rows, 32, seed=3)], dim=1)[:, :width]  # rows of a wider tensor, as a view
    tn_want, mm_want = q.double().t() @ p.double(), q.double() @ bt.double()
    tn = cpu_lora.op_tn()(q_strided, p)
    tn_fused, mm = cpu_lora.op_tn_mm()(q, p, bt)
    assert tn.shape == tn_fused.shape == (width, rank) and mm.shape == (rows, rank) and tn.dtype == mm.dtype == torch.bfloat16
    assert torch.equal(tn, tn_fused)
    # fp32 sums rounded to bf16 once: as close to float64 as oneDNN's products (within one bf16 step of them)
    assert _relative(tn, tn_want) <= _relative(q.t() @ p, tn_want) + 2**-8
    assert _relative(mm, mm_want) <= _relative(q @ bt, mm_want) + 2**-8


# The pass, on a graph written as autograd leaves a LoRA layer's backward pass (runs on any CPU).


def _backward_graph(wide: int = 256, rank: int = 16, inner: int = 192, late: str | None = None):
    """dY [M, wide] with B's gradient mm(dY^T, h), the rank-r input gradient mm(dY, bt) and A's mm(dh^T, x)."""
    graph = torch.fx.Graph()
    values = {"dy": (320, wide), "h": (320, rank), "x": (320, inner), "bw": (rank, wide)}

    def node(name, value, op=None, *args):
        n = graph.placeholder(name) if op is None else graph.call_function(op, args)
        n.meta["val"] = value.to(torch.bfloat16)
        return n

    dy, h, x, bw = (node(name, torch.empty(values[name])) for name in ("dy", "h", "x", "bw"))
    permute, mm = torch.ops.aten.permute.default, torch.ops.aten.mm.default

    def b_transposed():
        return node("bt", torch.empty(wide, rank), permute, bw, [1, 0])

    bt = None if late else b_transposed()  # B's weight, as the graph's inputs come first
    dbw = node("dbw", torch.empty(wide, rank), mm, node("dyt", torch.empty(wide, 320), permute, dy, [1, 0]), h)
    if late == "view":  # B's weight transposed where dY @ B reads it, after B's gradient: moved up (a view)
        bt = b_transposed()
    elif late == "value":  # computed after B's gradient: the two cannot be computed at one point
        bt = node("bt", torch.empty(wide, rank), torch.ops.aten.mul.Tensor, b_transposed(), 2.0)
    dh = node("dh", torch.empty(320, rank), mm, dy, bt)
    da = node("da", torch.empty(rank, inner), mm, node("dht", torch.empty(rank, 320), permute, dh, [1, 0]), x)
    graph.output((dbw, dh, da))
    return graph


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


@pytest.mark.parametrize("late", [None, "view"])
def test_b_gradient_and_input_gradient_share_one_call_and_a_gradient_takes_the_transposed_one(monkeypatch, late):
    monkeypatch.setattr(cpu_lora, "taken", True)
    graph = _backward_graph(late=late)
    assert route_lora_gradients(graph) == 3
    graph.lint()
    targets = _targets(graph)
    assert targets.count(cpu_lora.op_tn_mm()) == 1 and targets.count(cpu_lora.op_tn()) == 1
    assert torch.ops.aten.mm.default not in targets
    da = graph.output_node().args[0][2]  # A's gradient: the kernel's [inner, r], transposed back to [r, inner]
    assert da.target == torch.ops.aten.permute.default and da.args[0].target == cpu_lora.op_tn()
    assert da.args[0].args[0].name == "x" and tuple(da.meta["val"].shape) == (16, 192)


def test_products_the_kernel_does_not_take_stay_with_onednn(monkeypatch):
    monkeypatch.setattr(cpu_lora, "taken", True)
    assert route_lora_gradients(_backward_graph(wide=200)) == 1  # not a multiple of 32: only A's gradient moves
    assert route_lora_gradients(_backward_graph(rank=48)) == 0  # past KERNEL_RANK: oneDNN is as fast there
    late = _backward_graph(late="value")
    assert route_lora_gradients(late) == 2  # B's and A's alone: dY @ B stays an mm
    assert torch.ops.aten.mm.default in _targets(late)
    late.lint()
    monkeypatch.setattr(cpu_lora, "taken", False)  # model.cpu_lora_kernel: false, or no AMX
    assert route_lora_gradients(_backward_graph()) == 0


def test_the_compiled_graphs_cache_key_says_whether_the_kernel_is_taken(monkeypatch):
    monkeypatch.setattr(cpu_lora, "taken", False)
    off = LoraPostGrad().uuid()
    monkeypatch.setattr(cpu_lora, "taken", True)
    assert LoraPostGrad().uuid() != off


def test_the_kernel_is_prepared_for_compiled_bf16_cpu_runs_only(monkeypatch):
    from lorasmith.config.schema import ModelConfig
    from lorasmith.models.hardware import Precision
    from lorasmith.training.compile import lora_gradient_kernel

    asked = []
    monkeypatch.setattr(cpu_lora, "prepare", lambda enabled=True: asked.append(enabled) or enabled)
    cpu, bf16, fp32 = torch.device("cpu"), Precision("bf16", "cpu"), Precision("fp32", "cpu")
    lora_gradient_kernel(ModelConfig(), bf16, cpu)
    lora_gradient_kernel(ModelConfig(cpu_lora_kernel=False), bf16, cpu)
    lora_gradient_kernel(ModelConfig(), fp32, cpu)
    assert asked == [True, False, False]


class _LoraLinear(torch.nn.Module):
    """A frozen bf16 projection with a LoRA on it, as under autocast; widths the kernel takes."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(_bf16(256, 192, seed=4), requires_grad=False)
        self.a = torch.nn.Parameter(_bf16(16, 192, seed=5) / 8)
        self.b = torch.nn.Parameter(_bf16(256, 16, seed=6) / 8)

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.w) + (x @ self.a.t()) @ self.b.t() * 2.0
        return y.float().square().sum()


class _Counting(LoraPostGrad):
    def __init__(self):
        self.routed = []

    def __call__(self, graph):
        self.routed.append(route_lora_gradients(graph))

    def uuid(self):
        return None  # not cached: the pass runs


def _step(layer, options=None):
    torch._dynamo.reset()
    layer.zero_grad(set_to_none=True)
    x = _bf16(2, 160, 192, seed=7).requires_grad_()
    forward = torch.compile(layer, dynamic=True, options=options) if options is not None else layer
    loss = forward(x)
    loss.backward()
    return loss.detach(), [t.grad.double() for t in (x, layer.a, layer.b)]


@amx
def test_a_compiled_lora_layer_trains_the_same_through_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_lora, "taken", True)
    layer = _LoraLinear()
    want_loss, want = _step(layer)
    counting = _Counting()
    got_loss, got = _step(layer, {"post_grad_custom_post_pass": counting})
    assert counting.routed == [0, 3]  # the backward graph: B's gradient with dY @ B in one call, A's in another
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-2, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=2e-2 * w.abs().max().item())
