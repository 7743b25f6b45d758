"""Matmuls cut into row blocks where the CPU's GEMM would leave a thread idle.

PyTorch runs bf16 matmuls on the CPU through oneDNN, which picks a blocking per shape. On the Intel
Xeon with AMX (2 threads, oneDNN 3.12's AMX brgemm) an [M, 1536] x [1536, 576] product with M from 576
to ~1,280 rows runs as one block on one thread: 1,100-1,250 GFLOP/s, what one thread alone measures,
where 448 rows run at 1,860 and 1,344 at 2,100 GFLOP/s (`benchmarks/row_split.py`). The products whose
output is the hidden size (o and down forward, the input gradients of q/o and of gate/up) sit exactly
there at the bench's ~800-token micro-batches: 188 ms of a 763 ms step. Cut into two or three row
blocks (each writing its rows of one output), every block runs on both threads.

No flag or version says which shapes fall in such a gap, and other CPUs and thread counts have their
own (or none), so it is measured: per shape (rows rounded down to ROW_BUCKET, the two widths, the weight's
layout) on first use, one product against 2, 3 and 4 blocks called in turn (ROUNDS calls each: a few ms, inside
the step that first meets the shape), and kept per machine in the lorasmith cache, so later runs only look up.
A post-grad graph pass (given to the compiled layers and loss by training/compile.py) routes their 2-D
bf16/fp16 matmuls of fixed widths (``mm``, and ``addmm`` where the compiler adds a LoRA gradient in) through
``lorasmith::row_split_mm``/``row_split_addmm``, which look the plan up; LoRA's rank-r products and anything
narrower than MIN_WIDTH keep ``aten.mm``.

Cutting rows changes no arithmetic: each output row is the same dot products over the same K.
"""

from __future__ import annotations

import json
import logging
import threading

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lorasmith import atomic
from lorasmith.models.probe import best_seconds_in_turn, cpu_name
from lorasmith.paths import cache_dir

log = logging.getLogger(__name__)

PIECES = (1, 2, 3, 4)
"""Row blocks tried; 1 is the product as it is. Which count wins moves with the rows (AMX Xeon, [M, 1536] x
[1536, 576], GFLOP/s as 1/2/3/4 blocks: 704 rows 1,104/1,302/1,251/1,457; 1,024 rows 1,155/1,859/1,646/1,252;
1,088 rows 1,065/1,250/1,450/1,078: two blocks of 1,088 are 576 + 512 rows, and 576 is inside the gap)."""
ROW_BUCKET = 64
"""Plans are kept per this many rows: oneDNN's gaps measured here start and end on multiples of 64."""
MIN_ROWS = 256
"""Fewer rows are never cut: blocks of under ~128 rows lose more to their calls than a gap costs."""
MIN_WIDTH = 128
"""Products with a narrower fixed width (LoRA's rank-r side) are left to ``aten.mm``: small, and many."""
MARGIN = 1.15
"""How much faster the blocks must measure to be taken: a gap costs ~1.7x, noise ~10%."""
ALIGN = 64
"""Block heights (all but the last) are multiples of this: the GEMM generates its kernels per shape (oneDNN: ~4 ms
for each new one on the AMX Xeon), so blocks of recurring heights reuse them across steps of other lengths."""
ROUNDS = 8
"""Timed calls of each candidate, in turn, after one warm-up call each: with 4, the AMX Xeon's cached plans for
1,088 rows (4 x 272 tokens, the bench's long micro-batches) kept 2 blocks where 3 measure 15-35% faster; measured
again with 8, they take 3 and the other 53 plans of a bench run stay as they were."""


def blocks(rows: int, pieces: int) -> list[tuple[int, int]]:
    """``pieces`` row ranges covering ``rows``, of a height that is a multiple of ALIGN (the last shorter)."""
    height = -(-rows // pieces)
    height = -(-height // ALIGN) * ALIGN
    return [(lo, min(lo + height, rows)) for lo in range(0, rows, height)]


def mm_in_blocks(
    a: torch.Tensor, b: torch.Tensor, pieces: int, out: torch.Tensor | None = None, add: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ b`` (``add + a @ b`` given ``add``, broadcast to the output) computed as ``pieces`` row blocks
    into one output."""
    if out is None:
        out = a.new_empty((a.shape[0], b.shape[1]))
    if add is not None:
        add = add.expand(out.shape)
    for lo, hi in blocks(a.shape[0], pieces):
        if add is None:
            torch.mm(a[lo:hi], b, out=out[lo:hi])
        else:
            torch.addmm(add[lo:hi], a[lo:hi], b, out=out[lo:hi])
    return out


def _layout(t: torch.Tensor) -> str:
    return "t" if t.stride(0) == 1 and t.shape[0] > 1 else "n"  # a transposed view (a linear's weight) or rows


def plan_key(a: torch.Tensor, b: torch.Tensor) -> str:
    rows = a.shape[0] // ROW_BUCKET * ROW_BUCKET
    return f"{rows}x{a.shape[1]}x{b.shape[1]} {_layout(a)}{_layout(b)} {str(a.dtype).removeprefix('torch.')}"


def _machine() -> str:
    # The candidates are part of the key: plans chosen among fewer are measured again.
    return f"{cpu_name()}|{torch.get_num_threads()} threads|torch {torch.__version__}|blocks {PIECES[-1]}, {ROUNDS} rounds"


def choose(seconds: dict[int, float]) -> int:
    """The blocks to run: the fastest candidate if it beats the plain product by MARGIN, else 1."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] * MARGIN <= seconds[1] else 1


class Plans:
    """Measured plans of this machine, read from and added to the cache file on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._plans: dict[str, int] | None = None
        self.measure = self._measure

    @staticmethod
    def path():
        return cache_dir() / "row_splits.json"

    def _load(self) -> dict[str, int]:
        try:
            return json.loads(self.path().read_text()).get(_machine(), {})
        except (OSError, ValueError, AttributeError):
            return {}

    def measured(self) -> dict[str, int]:
        """This machine's plans in the cache (``lorasmith doctor`` shows them; every measurement is saved there)."""
        with self._lock:
            return self._load()

    def forget(self) -> None:
        """Drop this machine's plans: each shape is measured again on its next use."""
        with self._lock:
            self._plans = {}
            try:
                everything = json.loads(self.path().read_text())
                everything.pop(_machine(), None)
                atomic.write_json(self.path(), everything)
            except (OSError, ValueError, AttributeError):
                pass

    def pieces(self, a: torch.Tensor, b: torch.Tensor) -> int:
        if a.shape[0] < MIN_ROWS:
            return 1
        key = plan_key(a, b)
        known = self._plans.get(key) if self._plans is not None else None
        if known is not None:
            return known
        with self._lock:
            if self._plans is None:
                self._plans = self._load()
            if key not in self._plans:
                self._plans[key] = self.measure(a, b)
                self._save(key, self._plans[key])
            return self._plans[key]

    def _measure(self, a: torch.Tensor, b: torch.Tensor) -> int:
        out = a.new_empty((a.shape[0], b.shape[1]))
        seconds = best_seconds_in_turn({k: (lambda k=k: mm_in_blocks(a, b, k, out)) for k in PIECES}, rounds=ROUNDS)
        chosen = choose(seconds)
        if chosen != 1:
            log.info("matmul %s: %d row blocks, %.2f ms against %.2f (measured)", plan_key(a, b), chosen,
                     seconds[chosen] * 1e3, seconds[1] * 1e3)  # fmt: skip
        return chosen

    def _save(self, key: str, pieces: int) -> None:
        try:
            everything = json.loads(self.path().read_text()) if self.path().is_file() else {}
        except (OSError, ValueError):
            everything = {}
        everything.setdefault(_machine(), {})[key] = pieces
        try:
            atomic.write_json(self.path(), everything)
        except OSError as e:  # a read-only cache costs a measurement per process
            log.debug("could not cache the matmul plan in %s (%s)", self.path(), e)


PLANS = Plans()


# Defined through torch.library.Library rather than the custom_op decorator: the decorator's wrapper cost
# ~11 us a call against ~1 us, on products of 0.2-1 ms, ~400 a step.
_LIB = torch.library.Library("lorasmith", "DEF")
_LIB.define("row_split_mm(Tensor a, Tensor b) -> Tensor")
_LIB.define("row_split_addmm(Tensor add, Tensor a, Tensor b) -> Tensor")


def row_split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.mm(a, b)``, in row blocks where this machine measured that faster."""
    pieces = PLANS.pieces(a, b)
    return torch.mm(a, b) if pieces == 1 else mm_in_blocks(a, b, pieces)


def row_split_addmm(add: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.addmm(add, a, b)``, in row blocks where this machine measured ``a @ b`` faster so (a
    projection's input gradient plus its LoRA's, as the compiler joins them)."""
    pieces = PLANS.pieces(a, b)
    return torch.addmm(add, a, b) if pieces == 1 else mm_in_blocks(a, b, pieces, add=add)


_LIB.impl("row_split_mm", row_split_mm, "CPU")
_LIB.impl("row_split_addmm", row_split_addmm, "CPU")


@torch.library.register_fake("lorasmith::row_split_mm", lib=_LIB)
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("lorasmith::row_split_addmm", lib=_LIB)
def _(add, a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


_ROUTES = {
    torch.ops.aten.mm.default: torch.ops.lorasmith.row_split_mm.default,
    torch.ops.aten.addmm.default: torch.ops.lorasmith.row_split_addmm.default,
}


def _static_width(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and isinstance(t.shape[1], int) and t.shape[1] >= MIN_WIDTH


def routable(node: torch.fx.Node) -> bool:
    """An ``aten.mm`` or plain ``aten.addmm`` (no alpha, beta) on the CPU, in bf16 or fp16, whose inner and
    output widths are fixed and wide."""
    if node.op != "call_function" or node.target not in _ROUTES or node.kwargs:
        return False
    a, b = (arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None for arg in node.args[-2:])
    return (
        _static_width(a)
        and _static_width(b)
        and isinstance(b.shape[0], int)
        and a.device.type == "cpu"
        and a.dtype in (torch.bfloat16, torch.float16)
    )


class RowSplit(CustomGraphPass):
    """Post-grad pass: the routable matmuls of a compiled graph call ``lorasmith::row_split_mm``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if routable(node):
                node.target = _ROUTES[node.target]

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


ROW_SPLIT = RowSplit()
