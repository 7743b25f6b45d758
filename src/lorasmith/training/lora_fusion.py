"""Graph passes for LoRA layers: one matmul for the down-projections that read the same input (q/k/v,
gate/up), LoRA's scaling applied on the rank-r side, and LoRA's output added into its projection's by the GEMM.

A LoRA layer multiplies its input by a rank-r matrix A before its B: q, k and v read the same
normed hidden states, as do gate and up, so a decoder layer runs three and two [tokens, hidden] x
[hidden, r] matmuls on one input, and as many again in the backward pass for the input's gradient
and for A's. They are small (r columns) and cost mostly their call: one matmul against the A's
stacked ([tokens, hidden] x [hidden, 3r]) does the same work in one call each way. The compiler
differentiates through the stacking (its backward is slicing the gradient), so training is the same
up to summation order.

Why a pass of our own: inductor's `batch_linear_lhs` fusion does this for 2-D inputs only, and
sees the LoRA inputs as different nodes wherever peft casts the input to A's dtype (once per layer);
this pass takes [batch, tokens, hidden] inputs and looks through such identical casts. It fuses only
linears without bias whose weights need gradients and are narrow (a LoRA rank, not a projection):
the frozen base projections would have to be stacked again on every call, costing a copy for no
faster matmul. Dropout on LoRA's input (lora.dropout > 0) gives each layer its own input, so
nothing matches then and the graph is left as it is.

peft scales a LoRA layer's output, ``B(A(x)) * scaling``: a [tokens, out] product, and in the
backward pass the output's gradient times the scaling, a [tokens, out] tensor of its own written and
read again before B's two matmuls (up to 1,536 wide here, where A's output is 16). Scaling A's output
instead, ``B(A(x) * scaling)``, is the same product (exactly so for a power-of-two scaling, as
alpha = 2r gives) and the scaled tensors are [tokens, r]: in the profile the gradient's scaled copies
had been extra outputs of the fused backward kernels, which run at the memory's rate on CPU.

After autograd (a post-grad pass, ``LORA_POST_GRAD``), a LoRA layer's output, ``x @ W + h @ B`` (the
base projection's product plus B's rank-r one), is one op on a CPU: the base product, then B's added
into it in place by the GEMM (``addmm_``, which costs what B's product alone does). The sum was a [tokens,
out] tensor of its own, computed in the next fused kernel from the two products, and written again
where the backward pass keeps it (gate and up's, SiLU's inputs); now that kernel reads one tensor, not
two. Measured on the AMX Xeon, LoRA on all linear layers: steps 2% faster (docs/benchmarks.md,
fifteenth round). The sum is rounded to bf16 once rather than after each product.

In the same pass, where models/cpu_lora.py's kernel is taken (CPUs with AMX), LoRA's gradient products that
contract over the tokens, B's ``dY^T h`` and A's ``dh^T x``, go to that kernel, and B's together with the
rank-r input gradient ``dY @ B`` that reads the same dY: one pass over dY for both.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lorasmith.models import cpu_lora
from lorasmith.training import row_split

MAX_RANK = 256
"""Widest A fused: LoRA ranks are 8-128; a wider weight is a projection of its own."""

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _value(node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _source(node: torch.fx.Node) -> tuple:
    """What a linear's input is, seen through casts (``x.to(dtype)``, ``x.float()``): two casts of one
    node to one dtype and device are the same tensor."""
    if node.op == "call_method" and node.target in ("to", "float", "bfloat16", "half") and not node.kwargs:
        value = _value(node)
        if value is not None and isinstance(node.args[0], torch.fx.Node):
            return ("cast", node.args[0], value.dtype, value.device)
    return ("node", node)


def _operands(node: torch.fx.Node) -> tuple:
    """A linear's (input, weight, bias), given by position or by name."""
    named = [node.kwargs.get(k) for k in ("input", "weight", "bias")[len(node.args) :]]
    return tuple([*node.args, *named, None, None, None][:3])


def _mutates(node: torch.fx.Node) -> bool:
    """Whether a node writes into its input (``x.add_(...)``, ``operator.iadd``): the graph is torch IR,
    where in-place ops keep their names. A fused linear's outputs are views of one tensor, which
    autograd does not let a caller modify in place."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") or (getattr(node.target, "__module__", None) == "_operator" and name.startswith("i"))


def _fusable(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _LINEAR or any(_mutates(u) for u in node.users):
        return False
    x, weight, bias = _operands(node)
    if bias is not None or not isinstance(x, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
        return False
    w, out = _value(weight), _value(node)
    return (
        isinstance(w, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and w.dim() == 2
        and w.requires_grad
        and w.shape[0] <= MAX_RANK
    )


def fuse_shared_input_linears(graph: torch.fx.Graph) -> int:
    """Replace each group of fusable linears on one input by one linear on their stacked weights and a
    split of its output; return how many groups were fused."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if _fusable(node):
            x, weight, _ = _operands(node)
            groups[(_source(x), _value(weight).dtype)].append(node)
    fused = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = min(nodes, key=order.__getitem__)
        weights = [_operands(n)[1] for n in nodes]
        if any(order[w] > order[first] for w in weights):  # a weight computed after the first linear
            continue
        x = _operands(first)[0]
        with graph.inserting_before(first):
            stacked = graph.call_function(torch.cat, (weights,), {"dim": 0})
            stacked.meta["example_value"] = torch.cat([_value(w) for w in weights], dim=0)
            out = graph.call_function(torch._C._nn.linear, (x, stacked))
            out.meta["example_value"] = torch._C._nn.linear(_value(x), stacked.meta["example_value"])
            widths = [_value(w).shape[0] for w in weights]
            parts = graph.call_function(torch.split, (out, widths), {"dim": -1})
            parts.meta["example_value"] = torch.split(out.meta["example_value"], widths, dim=-1)
            for i, node in enumerate(nodes):
                part = graph.call_function(operator.getitem, (parts, i))
                part.meta.update(node.meta)
                node.replace_all_uses_with(part)
        for node in nodes:
            graph.erase_node(node)
        fused += 1
    return fused


def _scalar(arg) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def scale_before_lora_b(graph: torch.fx.Graph) -> int:
    """Rewrite each ``linear(h, B) * s`` into ``linear(h * s, B)`` where B needs a gradient and reads
    fewer features than it writes (at most MAX_RANK), ``s`` is a Python number and the product is the
    linear's only use (a LoRA layer's up-projection and its scaling); return how many were rewritten."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
            continue
        linear, scale = node.args if isinstance(node.args[0], torch.fx.Node) else node.args[::-1]
        if not (isinstance(linear, torch.fx.Node) and _scalar(scale) and not node.kwargs):
            continue
        if linear.op != "call_function" or linear.target not in _LINEAR or list(linear.users) != [node]:
            continue
        h, weight, bias = _operands(linear)
        w, hv = _value(weight), _value(h)
        if bias is not None or not isinstance(w, torch.Tensor) or not isinstance(hv, torch.Tensor):
            continue
        if not (w.dim() == 2 and w.requires_grad and w.shape[1] <= MAX_RANK and w.shape[1] < w.shape[0]):
            continue
        with graph.inserting_before(linear):
            scaled = graph.call_function(operator.mul, (h, scale))
            scaled.meta["example_value"] = hv * scale
        linear.args, linear.kwargs = (scaled, weight), {}
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


_LIB = torch.library.Library("lorasmith", "FRAGMENT")
_LIB.define("lora_sum_mm(Tensor a, Tensor w, Tensor h, Tensor b) -> Tensor")


def lora_sum_mm(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ w + h @ b``: the base projection's product (in row blocks where this CPU measured that faster,
    training/row_split.py), then the rank-r product added into it by the GEMM."""
    return row_split.row_split_mm(a, w).addmm_(h, b)  # a fresh tensor: nothing else sees it changed


_LIB.impl("lora_sum_mm", lora_sum_mm, "CPU")


@torch.library.register_fake("lorasmith::lora_sum_mm", lib=_LIB)
def _(a, w, h, b):
    return a.new_empty((a.shape[0], w.shape[1]))


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _through_view(node):
    """The node under a view that only this use reads (a linear's 2-D product seen as [batch, tokens, out])."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS and len(node.users) == 1:
        return node.args[0], node
    return node, None


def _plain_mm(node) -> bool:
    """``aten.mm`` (a projection with a bias is an ``addmm``: its sum is left as it is)."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == torch.ops.aten.mm.default


def _narrow_mm(node, dtype) -> bool:
    """A rank-r product read by one use: ``aten.mm`` in ``dtype`` whose inner width is at most MAX_RANK and
    narrower than any routed projection's."""
    if not _plain_mm(node):
        return False
    a, b = (arg.meta.get("val") for arg in node.args)
    inner = b.shape[0] if isinstance(b, torch.Tensor) else None
    return (
        len(node.users) == 1
        and not node.kwargs
        and isinstance(a, torch.Tensor)
        and a.dtype == dtype
        and isinstance(inner, int)
        and inner <= MAX_RANK
        and inner < row_split.MIN_WIDTH
    )


def _same_shape(one, other) -> bool:
    """Equal shapes, symbolic sizes included, decided without adding a guard (unknown: not equal)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(one) == len(other) and all(statically_known_true(a == b) for a, b in zip(one, other, strict=True))


def sum_lora_into_base(graph: torch.fx.Graph) -> int:
    """Replace each ``add(x @ W, h @ B)`` (either order, each product possibly under a view read by the add
    alone) where ``x @ W`` is a projection row_split routes and is read by the add alone, and ``h @ B`` a
    rank-r product of the same dtype, by ``lorasmith::lora_sum_mm``; return how many were replaced."""
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.add.Tensor or node.kwargs:
            continue
        if len(node.args) != 2 or not all(isinstance(arg, torch.fx.Node) for arg in node.args):
            continue
        (x, x_view), (y, y_view) = _through_view(node.args[0]), _through_view(node.args[1])
        if _plain_mm(y) and row_split.routable(y):
            (x, x_view), (y, y_view) = (y, y_view), (x, x_view)
        if not (_plain_mm(x) and row_split.routable(x) and len(x.users) == 1 and (x_view is None) == (y_view is None)):
            continue
        wide, total = x.meta["val"], node.meta.get("val")
        if not (_narrow_mm(y, wide.dtype) and isinstance(total, torch.Tensor) and total.dtype == wide.dtype):
            continue
        if not _same_shape(y.meta["val"].shape, wide.shape) or (x_view is not None and x_view.args[1:] != y_view.args[1:]):
            continue
        with graph.inserting_before(node):
            out = graph.call_function(torch.ops.lorasmith.lora_sum_mm.default, (*x.args, *y.args))
            out.meta["val"] = wide.new_empty(wide.shape)
            if x_view is not None:
                out = graph.call_function(x_view.target, (out, *x_view.args[1:]), dict(x_view.kwargs))
                out.meta["val"] = total
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        for dead in (x_view, y_view, x, y):
            if dead is not None:
                graph.erase_node(dead)
        replaced += 1
    return replaced


KERNEL_RANK = 32
"""Widest rank-r side routed to models/cpu_lora.py's kernel, which reads the wide operand once per 16 of it. AMX Xeon,
896 rows, caches flushed, oneDNN against the kernel (ms): A's gradient with x 1,536 wide at 16 / 32 / 48 / 64 columns
0.30 / 0.34 / 0.38 / 0.38 against 0.16 / 0.27 / 0.41 / 0.49; B's with dY @ B, 1,536 wide, 0.57 / 0.51 / 0.57 / 0.62
against 0.23 / 0.37 / 0.53 / 0.70 (docs/benchmarks.md, "Sixteenth round")."""


def _transposed(node):
    """``t`` for a node ``permute(t, [1, 0])``, else None."""
    permute = isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == torch.ops.aten.permute.default
    return node.args[0] if permute and list(node.args[1]) == [1, 0] else None


def _bf16_matrix(node):
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.dtype == torch.bfloat16 and value.device.type == "cpu":
        return value
    return None


def _wide(width) -> bool:
    return isinstance(width, int) and width >= row_split.MIN_WIDTH and width % cpu_lora.BLOCK == 0


def _rank(width) -> bool:
    return isinstance(width, int) and width <= KERNEL_RANK


def _input_gradient(q, wide: int, rank: int, position: dict):
    """A product ``q @ bt`` (the rank-r input gradient, bt [wide, rank]) among q's readers, or None."""
    for user in q.users:
        if _plain_mm(user) and not user.kwargs and user.args[0] is q and user in position:
            bt = _bf16_matrix(user.args[1])
            if bt is not None and tuple(bt.shape) == (wide, rank):
                return user
    return None


def _defined_before(node, place: torch.fx.Node, position: dict) -> bool:
    """Whether ``node`` is computed before ``place``, once views of earlier values (B's weight transposed, which
    autograd puts where it is first read) are moved there; views cost nothing and have no effects."""
    if position.get(node, len(position)) < position[place]:
        return True
    views = (*_VIEWS, torch.ops.aten.permute.default)
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in views):
        return False
    if not all(_defined_before(arg, place, position) for arg in node.all_input_nodes):
        return False
    place.prepend(node)
    position[node] = position[place] - 0.5
    return True


def route_lora_gradients(graph: torch.fx.Graph) -> int:
    """Where models/cpu_lora.py's kernel is taken: each bf16 ``mm(permute(t), u)`` contracting over the tokens
    with one side rank-r and the other wide (a multiple of 32), B's gradient ``dY^T h`` or A's ``dh^T x``, calls
    the kernel; B's together with ``dY @ B`` where that reads the same dY and can be computed at the same point
    of the graph. Returns how many products were routed."""
    if not cpu_lora.taken:
        return 0
    position = {node: i for i, node in enumerate(graph.nodes)}
    routed, erased = 0, set()
    for node in list(graph.nodes):
        t = _transposed(node.args[0]) if _plain_mm(node) and not node.kwargs and node not in erased else None
        one, other = _bf16_matrix(t), _bf16_matrix(node.args[1]) if t is not None else None
        if one is None or other is None or not _same_shape(one.shape[:1], other.shape[:1]):
            continue
        if _wide(one.shape[1]) and _rank(other.shape[1]):  # dY^T h: [wide, r]
            q, p, flip = t, node.args[1], False
        elif _rank(one.shape[1]) and _wide(other.shape[1]):  # dh^T x: [r, wide], the transpose of x^T dh
            q, p, flip = node.args[1], t, True
        else:
            continue
        wide, rank = q.meta["val"].shape[1], p.meta["val"].shape[1]
        partner = None if flip else _input_gradient(q, wide, rank, position)
        if partner is not None:  # computed where the earlier of the two was: the later one's inputs must be there
            first, later_input = (node, partner.args[1]) if position[node] < position[partner] else (partner, p)
            if not _defined_before(later_input, first, position):
                partner = None
        product = q.meta["val"].new_empty((wide, rank))
        with graph.inserting_before(node if partner is None else first):
            if partner is None:
                out = graph.call_function(cpu_lora.op_tn(), (q, p))
                out.meta["val"] = product
            else:
                both = graph.call_function(cpu_lora.op_tn_mm(), (q, p, partner.args[1]))
                both.meta["val"] = (product, partner.meta["val"])
                out = graph.call_function(operator.getitem, (both, 0))
                out.meta["val"] = product
                dh = graph.call_function(operator.getitem, (both, 1))
                dh.meta["val"] = partner.meta["val"]
                partner.replace_all_uses_with(dh)
                graph.erase_node(partner)
                erased.add(partner)
            if flip:
                out = graph.call_function(torch.ops.aten.permute.default, (out, [1, 0]))
                out.meta["val"] = product.t()
        node.replace_all_uses_with(out)
        transpose = node.args[0]
        graph.erase_node(node)
        if not transpose.users:
            graph.erase_node(transpose)
        routed += 1 + (partner is not None)
    return routed


class LoraPostGrad(CustomGraphPass):
    """inductor's post-grad hook for the compiled layers (``post_grad_custom_post_pass``): LoRA's outputs
    summed into their base projections' by the GEMM, LoRA's gradient products routed to models/cpu_lora.py's
    kernel where it is taken, then the projections routed through row_split's row blocks. Its uuid (the files'
    hash, and whether the kernel is taken) keeps compiled graphs cached across runs."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        sum_lora_into_base(graph)
        route_lora_gradients(graph)
        row_split.ROW_SPLIT(graph)

    def uuid(self) -> bytes:
        files = get_hash_for_files((__file__, row_split.__file__, cpu_lora.__file__, str(cpu_lora.SOURCE)))
        return files + (b"|lora kernel" if cpu_lora.taken else b"")


LORA_POST_GRAD = LoraPostGrad()
"""The one instance every compiled layer shares (training/compile.py says why)."""


class LoraFusion(CustomGraphPass):
    """inductor's pre-grad hook (``torch._inductor.config.pre_grad_custom_pass``); its uuid, this file's
    hash, keeps compiled graphs cached across runs."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_shared_input_linears(graph)
        scale_before_lora_b(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


LORA_FUSION = LoraFusion()
"""The one instance every compiled layer shares (training/compile.py says why)."""
