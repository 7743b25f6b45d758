"""The LoRA graph passes: the A's that read one input (q/k/v, gate/up) fused into one matmul, and
LoRA's scaling moved onto A's output: same training, fewer matmuls and smaller tensors, and nothing
fused where LoRA dropout gives each layer its own input."""

import pytest
import torch
from tests.conftest import tiny_lora

from lorasmith.training import row_split
from lorasmith.training.lora_fusion import (
    LoraPostGrad,
    fuse_shared_input_linears,
    lora_sum_mm,
    scale_before_lora_b,
    sum_lora_into_base,
)


def _loss_and_grads(model, ids, fused: list[int] | None = None, scaled: list[int] | None = None):
    forward = model
    if fused is not None:

        def backend(gm, example_inputs):
            fused.append(fuse_shared_input_linears(gm.graph))
            if scaled is not None:
                scaled.append(scale_before_lora_b(gm.graph))
            gm.recompile()
            return gm.forward

        torch._dynamo.reset()
        forward = torch.compile(model, backend=backend)
    model.zero_grad(set_to_none=True)
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qkv_and_gate_up_share_one_matmul_and_train_the_same(tiny_model_dir):
    model = tiny_lora(tiny_model_dir).train()
    ids = torch.randint(0, 1000, (3, 17))
    want_loss, want = _loss_and_grads(model, ids)
    fused: list[int] = []
    got_loss, got = _loss_and_grads(model, ids, fused)
    layers = model.base_model.model.config.num_hidden_layers
    assert sum(fused) == 2 * layers  # q/k/v and gate/up in every layer; o and down read inputs of their own
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7) for k in want)


def test_lora_scaling_moves_onto_the_rank_r_side_and_trains_the_same(tiny_model_dir):
    model = tiny_lora(tiny_model_dir).train()
    ids = torch.randint(0, 1000, (3, 17))
    want_loss, want = _loss_and_grads(model, ids)
    fused, scaled = [], []
    got_loss, got = _loss_and_grads(model, ids, fused, scaled)
    layers = model.base_model.model.config.num_hidden_layers
    assert sum(scaled) == 7 * layers  # every adapted projection (all linear layers), fused A's or not
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7) for k in want)


def test_only_a_narrow_trained_linear_used_by_its_scaling_alone_is_rewritten():
    import torch.nn.functional as F

    class Up(torch.nn.Module):
        def __init__(self, trained: bool, wide: bool, reused: bool):
            super().__init__()
            self.b = torch.nn.Parameter(torch.randn(8 if wide else 32, 16), requires_grad=trained)
            self.reused = reused

        def forward(self, h):
            y = F.linear(h, self.b)
            return y * 2.0 + (y if self.reused else 0)

    def rewritten(**kw) -> int:
        module = Up(**kw)
        graph = torch.fx.symbolic_trace(module).graph
        for node in graph.nodes:
            node.meta["example_value"] = module.b if node.op == "get_attr" else torch.randn(2, 16)
        return scale_before_lora_b(graph)

    assert rewritten(trained=True, wide=False, reused=False) == 1
    assert rewritten(trained=False, wide=False, reused=False) == 0  # a frozen projection
    assert rewritten(trained=True, wide=True, reused=False) == 0  # its input is the wider side
    assert rewritten(trained=True, wide=False, reused=True) == 0  # the unscaled product is used too


def test_lora_dropout_leaves_the_graph_as_it_is(tiny_model_dir):
    from lorasmith import config
    from lorasmith.models.adapter import add_lora
    from lorasmith.models.loading import load_model

    cfg = config.load(None, [f"model.name={tiny_model_dir}", "lora.dropout=0.1"])
    model = add_lora(load_model(cfg.model, device=torch.device("cpu"), attn_implementation="sdpa"), cfg)
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    fused: list[int] = []
    _loss_and_grads(model.train(), torch.randint(0, 1000, (2, 9)), fused)
    assert sum(fused) == 0


def test_a_linear_whose_output_is_changed_in_place_is_not_fused():
    """A fused linear's outputs are views of one tensor, which autograd does not let anyone modify."""
    import torch.nn.functional as F

    class TwoAs(torch.nn.Module):
        def __init__(self, in_place: bool):
            super().__init__()
            self.a, self.b, self.in_place = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(4, 8)), in_place

        def forward(self, x):
            a, b = self.a, self.b  # both weights ahead of the first linear, as dynamo's inputs are
            y = F.linear(x, a)
            if self.in_place:
                y.mul_(2)
            return y + F.linear(x, b)

    def fused(in_place: bool) -> int:
        graph = torch.fx.symbolic_trace(TwoAs(in_place)).graph
        shapes = {"placeholder": (2, 8), "get_attr": (4, 8)}
        for node in graph.nodes:  # the example values dynamo's graphs carry
            node.meta["example_value"] = torch.randn(shapes.get(node.op, (2, 4)), requires_grad=node.op == "get_attr")
        return fuse_shared_input_linears(graph)

    assert fused(in_place=False) == 1
    assert fused(in_place=True) == 0


# After autograd: LoRA's output added into its base projection's by the GEMM (lorasmith::lora_sum_mm).


@pytest.fixture
def three_blocks(tmp_path, monkeypatch):
    """Every product of row_split's size cut into 3 row blocks, as a machine that measured so would."""
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path))
    plans = row_split.Plans()
    plans.measure = lambda a, b: 3
    monkeypatch.setattr(row_split, "PLANS", plans)


def _bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_summed_product_is_both_products_added(three_blocks):
    a, w, h, b = _bf16(320, 192, seed=0), _bf16(256, 192, seed=1).t(), _bf16(320, 16, seed=2), _bf16(256, 16, seed=3).t()
    got = lora_sum_mm(a, w, h, b)
    assert torch.equal(got, row_split.mm_in_blocks(a, w, 3).addmm_(h, b))  # the base in its blocks, then the add
    want = a.double() @ w.double() + h.double() @ b.double()
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=0.05)  # one bf16 rounding of the sum


class _LoraLinear(torch.nn.Module):
    """A frozen projection and a LoRA on it, in bf16 as a compiled layer's products are under autocast."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(_bf16(256, 192, seed=4), requires_grad=False)
        self.bias = torch.nn.Parameter(_bf16(256, seed=8), requires_grad=False) if bias else None
        self.a = torch.nn.Parameter(_bf16(16, 192, seed=5) / 8)
        self.b = torch.nn.Parameter(_bf16(256, 16, seed=6) / 8)

    def forward(self, x, also_read_lora: bool = False):
        lora = (x @ self.a.t()) @ self.b.t()
        base = torch.nn.functional.linear(x, self.w, self.bias)
        out = ((base + lora + 0.5).float().square().sum(),)  # and an add of a number, left alone
        return out + ((lora.float().sum(),) if also_read_lora else ())


class _Counting(LoraPostGrad):
    def __init__(self):
        self.replaced = []

    def __call__(self, graph):
        self.replaced.append(sum_lora_into_base(graph))
        row_split.ROW_SPLIT(graph)

    def uuid(self):
        return None  # not cached: each test compiles, so the pass runs


def _run(layer, options=None, also_read_lora=False):
    torch._dynamo.reset()
    layer.zero_grad(set_to_none=True)
    x = _bf16(2, 160, 192, seed=7).requires_grad_()
    forward = torch.compile(layer, dynamic=True, options=options) if options is not None else layer
    loss = sum(forward(x, also_read_lora))
    loss.backward()
    return loss.detach(), [t.grad.float() for t in (x, layer.a, layer.b)]


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_lora_outputs_are_summed_by_the_gemm_and_train_the_same(three_blocks, bias):
    layer = _LoraLinear(bias)
    want_loss, want = _run(layer)
    counting = _Counting()
    got_loss, got = _run(layer, {"post_grad_custom_post_pass": counting})
    # Forward: x @ W + (x A^T) B^T. Backward: x's gradient, g @ W + (g B) A, the same shape of sum. With a
    # bias (Qwen's q/k/v), the forward's projection is an addmm: its sum is left to the add.
    assert counting.replaced == [0 if bias else 1, 1]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-2, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


def test_a_lora_output_read_elsewhere_is_left_to_the_add(three_blocks):
    counting = _Counting()
    _run(_LoraLinear(), {"post_grad_custom_post_pass": counting}, also_read_lora=True)
    assert counting.replaced[0] == 0  # the forward's LoRA product has a second reader: no in-place sum
