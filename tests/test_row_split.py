"""Matmuls in row blocks (training/row_split.py): the same product, chosen by measurement, cached per
machine, and routed only where the compiled graphs have wide products of fixed widths."""

import itertools
import json

import pytest
import torch

from lorasmith.training import row_split
from lorasmith.training.row_split import Plans, blocks, choose, mm_in_blocks, plan_key


@pytest.fixture
def plans(tmp_path, monkeypatch):
    """A fresh plan table whose cache is a temporary folder and whose measurement is recorded."""
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path))
    fresh = Plans()
    measured = []

    def measure(a, b):
        measured.append(plan_key(a, b))
        return 3

    fresh.measure = measure
    monkeypatch.setattr(row_split, "PLANS", fresh)
    return fresh, measured


def test_blocks_cover_the_rows_in_tile_aligned_heights():
    for rows in (256, 300, 816, 1153):
        for pieces in (2, 3):
            got = blocks(rows, pieces)
            assert got[0][0] == 0 and got[-1][1] == rows and 1 < len(got) <= pieces
            assert all(hi == lo2 for (_, hi), (lo2, _) in itertools.pairwise(got))
            assert all((hi - lo) % row_split.ALIGN == 0 for lo, hi in got[:-1])


@pytest.mark.parametrize("transposed_weight", [True, False])
def test_blocks_compute_the_same_product(transposed_weight):
    torch.manual_seed(0)
    a = torch.randn(816, 384, dtype=torch.bfloat16)
    w = torch.randn(320, 384, dtype=torch.bfloat16)
    b = w.t() if transposed_weight else w.t().contiguous()  # a linear's weight, or its gradient's layout
    want = torch.mm(a, b)
    for pieces in (2, 3):
        got = mm_in_blocks(a, b, pieces)
        assert got.is_contiguous() and torch.equal(got, want)


def test_blocks_add_a_bias_or_a_gradient_as_addmm_does(plans):
    _, measured = plans  # this table cuts every measured shape into 3 blocks
    torch.manual_seed(0)
    a, b = torch.randn(600, 256, dtype=torch.bfloat16), torch.randn(384, 256, dtype=torch.bfloat16).t()
    for add in (torch.randn(384, dtype=torch.bfloat16), torch.randn(600, 384, dtype=torch.bfloat16)):
        assert torch.equal(row_split.row_split_addmm(add, a, b), torch.addmm(add, a, b))
    assert measured == ["576x256x384 nt bfloat16"]


def test_a_split_is_taken_only_when_clearly_faster():
    assert choose({1: 1.0, 2: 0.6, 3: 0.7}) == 2
    assert choose({1: 1.0, 2: 0.95, 3: 0.9}) == 1  # within the margin: noise, not a gap
    assert choose({1: 0.5, 2: 0.6, 3: 0.7}) == 1


def test_a_shape_is_measured_once_and_cached_for_the_next_process(plans, tmp_path):
    table, measured = plans
    a, b = torch.randn(800, 256, dtype=torch.bfloat16), torch.randn(192, 256, dtype=torch.bfloat16).t()
    want = torch.mm(a, b)
    assert torch.equal(row_split.row_split_mm(a, b), want)
    assert torch.equal(row_split.row_split_mm(a[:790], b), want[:790])  # the same 64-row bucket
    assert measured == ["768x256x192 nt bfloat16"]
    saved = json.loads((tmp_path / "row_splits.json").read_text())
    assert list(saved.values()) == [{"768x256x192 nt bfloat16": 3}]
    again = Plans()
    again.measure = lambda a, b: pytest.fail("measured again")
    assert again.pieces(a, b) == 3
    assert table.pieces(a[:100], b) == 1  # too few rows to cut: not even measured
    assert len(measured) == 1
    assert again.measured() == {"768x256x192 nt bfloat16": 3}  # what `lorasmith doctor` shows
    again.forget()  # doctor --reprobe
    assert again.measured() == {} and Plans().measured() == {}


def test_the_real_measurement_returns_a_candidate():
    a, b = torch.randn(512, 256, dtype=torch.bfloat16), torch.randn(256, 256, dtype=torch.bfloat16)
    assert Plans()._measure(a, b) in row_split.PIECES


def test_compiled_graphs_route_wide_fixed_width_matmuls_only(plans):
    _, measured = plans
    torch.manual_seed(0)

    class Layer(torch.nn.Module):  # a frozen projection and a LoRA-like rank-16 one, as parameters are
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(256, 192, dtype=torch.bfloat16), requires_grad=False)
            self.lora_a = torch.nn.Parameter(torch.randn(16, 192, dtype=torch.bfloat16))

        def forward(self, x):
            return (x @ self.w.t()).float().square().sum() + (x @ self.lora_a.t()).float().square().sum()

    layer = Layer()

    def run(options):
        torch._dynamo.reset()
        x = torch.randn(320, 192, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss = torch.compile(layer, dynamic=True, options=options)(x)
        loss.backward()
        return loss.detach(), x.grad

    want, want_grad = run(None)
    assert measured == []
    got, got_grad = run({"post_grad_custom_post_pass": row_split.ROW_SPLIT})
    # Forward x @ w.T and the input gradient g @ w (an addmm: the LoRA's gradient added in): routed, here
    # in 3 blocks. The rank-16 products (and A's gradient, whose inner width is the rows) keep aten.mm.
    assert sorted(measured) == ["320x192x256 nt bfloat16", "320x256x192 nn bfloat16"]
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
