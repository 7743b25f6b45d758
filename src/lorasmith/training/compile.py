"""Regional compilation: torch.compile on each decoder layer and on the loss, for training steps only.

One compiled graph serves every layer (same code, parameters as graph inputs), so compiling
costs about one layer's worth of time, not the whole model's; dynamic shapes keep varying batch
sizes and lengths from recompiling, with two exceptions that each cost one more graph, once:
rows longer than the measured matmul-attention limit (models/attention.py) take the flash kernel
instead, and a micro-batch of one row is specialised by the compiler (size 1).

Only training forwards (module in train mode, gradients on, an input that needs a gradient) take
the compiled path: evaluation and generation run eagerly, so they neither trigger another
compilation nor depend on the compiler. The first layer of a LoRA model, whose input (the frozen
embedding's output) needs no gradient, is given an input that asks for one, so it runs the same
graph as the others rather than eagerly or through a graph of its own.
The layers' graphs go through training/lora_fusion.py's passes (the LoRA A's of q/k/v and of
gate/up, one matmul each; LoRA's output added into its projection's by the GEMM) and rotate q and k
in one pass each (models/rotary.py). The loss over
the LM head is compiled too: upcast, log-softmax and gather fuse into single passes over the
logits. If compiling fails (no C++ compiler, no Python headers), training goes on eagerly.
"""

from __future__ import annotations

import logging
import shutil

import torch

from lorasmith.models import cpu_attention, cpu_lora, rotary
from lorasmith.models.attention import MATMUL_ROWS_ATTR, SDPA_FP32, SHORT_ROWS
from lorasmith.models.loading import load_config
from lorasmith.models.loss import causal_lm, token_losses, use_compiled_token_losses
from lorasmith.models.probe import Shapes, probe_matmul_rows

log = logging.getLogger(__name__)

MIN_PARAMETERS = 50_000_000
"""Below this, train.compile=auto stays eager: compiling takes ~10-40 s on any model (one layer's
graph), while the time it saves grows with the model; a tiny model never pays it back."""


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks, found by transformers' own `_no_split_modules` class names."""
    names = set(getattr(causal_lm(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler())
    except Exception:  # inductor's lookup raises when it finds none
        return None


def should_compile(setting: bool | str, model, device: torch.device, quantized: bool) -> tuple[bool, str]:
    """Whether to compile the decoder layers, and why (for the log)."""
    if setting is True or setting is False:
        return setting, f"train.compile={str(setting).lower()}"
    if device.type != "cpu":
        # Measured on CPU only so far (docs/benchmarks.md); on GPUs it is opt-in.
        return False, f"train.compile=auto: not on {device.type} (set train.compile=true to try)"
    if quantized:
        return False, "train.compile=auto: not measured with a quantized base (set train.compile=true to try)"
    params = sum(p.numel() for p in model.parameters())
    if params < MIN_PARAMETERS:
        return False, f"train.compile=auto: {params / 1e6:.1f}M parameters is too small to repay compiling"
    if cpp_compiler() is None:
        return False, "train.compile=auto: no C++ compiler found for torch.compile's CPU backend"
    return True, "train.compile=auto: on CPU with a C++ compiler"


def lora_gradient_kernel(model_cfg, precision, device: torch.device) -> bool:
    """Whether the compiled layers' backward passes run LoRA's rank-r gradient products on models/cpu_lora.py's
    AMX kernel: bf16 on a CPU with AMX tiles, unless model.cpu_lora_kernel is false. Called before compiling."""
    wanted = model_cfg.cpu_lora_kernel and device.type == "cpu" and precision.autocast_dtype == torch.bfloat16
    return cpu_lora.prepare(wanted)


def matmul_attention_rows(model_cfg, attention: str, precision, device: torch.device) -> int:
    """How long the rows are that sdpa_fp32's compiled matmul attention takes: measured on a CPU under
    bf16 autocast for this model's heads (models/probe.py, cached per machine)."""
    if attention != SDPA_FP32 or device.type != "cpu" or precision.autocast_dtype is None:
        return SHORT_ROWS  # that path is not taken
    cpu_attention.prepare(model_cfg.cpu_attention_kernel)  # before the probe, which times the path training runs
    rows = probe_matmul_rows(Shapes.of(load_config(model_cfg)))
    log.info("attention: rows up to %d tokens take the compiled matmul path, longer ones SDPA (measured)", rows)
    return rows


def _is_compiler_failure(err: BaseException) -> bool:
    return isinstance(err, torch._dynamo.exc.TorchDynamoException)


class _Shared:
    """What one model's compiled functions learn together: that compiling failed (they all run eagerly), or that
    inductor's C++ wrapper failed (they all compile with its Python wrapper instead)."""

    def __init__(self):
        self.failed = False
        self.python_wrapper = False


class _Fallback:
    """Runs the compiled function; with the Python wrapper once the C++ wrapper has failed to compile, or the eager
    function once any compilation of the model has failed."""

    def __init__(self, eager, shared: _Shared, options: dict | None = None):
        self.eager, self.shared, self.options = eager, shared, dict(options or {})
        self.compiled = torch.compile(eager, dynamic=True, options=self.options)

    def __call__(self, *args, **kwargs):
        if self.shared.failed:
            return self.eager(*args, **kwargs)
        if self.shared.python_wrapper and self.options.get("cpp_wrapper"):
            del self.options["cpp_wrapper"]
            self.compiled = torch.compile(self.eager, dynamic=True, options=self.options)
        try:
            # Python floats (LoRA's scaling, the norms' epsilon) as constants, not symbolic inputs: traced
            # symbolically they were specialised afterwards, which restarted every first compilation and
            # threw its traced graph away uncached (~3 s of each warm start here).
            with torch._dynamo.config.patch(specialize_float=True):
                return self.compiled(*args, **kwargs)
        except Exception as e:
            if not _is_compiler_failure(e):
                raise
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            if self.options.get("cpp_wrapper"):  # a toolchain that builds kernels may still fail on the wrapper
                self.shared.python_wrapper = True
                log.warning("inductor's C++ wrapper failed to compile, compiling with its Python wrapper: %s", why)
                return self(*args, **kwargs)
            self.shared.failed = True
            log.warning("torch.compile failed, training on eagerly: %s", why)
            return self.eager(*args, **kwargs)


def cache_autocast_regions() -> None:
    """Let AOTAutograd's on-disk cache keep graphs that switch autocast off inside (the fp32 attention of
    models/attention.py does). It refuses any function it does not know, and dynamo writes an autocast
    region as calls to ``_enter_autocast``/``_exit_autocast``: each run then traced that graph again,
    ~7 s of a warm start here. Their effect is fixed by their arguments, which are part of the graph
    and so of the cache key; keyed by the torch version, as the config asks."""
    import torch._inductor.config as inductor_config

    marked = inductor_config.unsafe_marked_cacheable_functions
    for name in ("_enter_autocast", "_exit_autocast"):
        marked.setdefault(f"torch.amp.autocast_mode.{name}", torch.__version__)


def wrapper_options(model) -> dict:
    """Inductor's C++ wrapper for the compiled graphs of a model on the CPU. Its default wrapper is Python: a
    layer's graph calls its kernels, LoRA's matmuls and the custom ops one Python line at a time and allocates
    each buffer from Python, in each direction of each layer; the C++ wrapper makes these C++ calls. Measured on
    the AMX Xeon (docs/benchmarks.md, fourteenth round): whole steps 2-3% faster, the more LoRA matmuls the
    more, and a first compilation no longer."""
    device = next(model.parameters()).device
    return {"cpp_wrapper": True} if device.type == "cpu" else {}


def compile_decoder_layers(model, matmul_rows: int = SHORT_ROWS) -> int:
    """Give each decoder layer, and the loss over the LM head, a compiled version for training steps;
    return how many layers were wrapped. Rows up to ``matmul_rows`` tokens take sdpa_fp32's matmul
    attention there (models/attention.py)."""
    cache_autocast_regions()
    from lorasmith.training.lora_fusion import LORA_FUSION, LORA_POST_GRAD  # imports inductor: only when compiling
    from lorasmith.training.row_split import ROW_SPLIT

    shared = _Shared()  # one failure turns compiling off (or the C++ wrapper) for the whole model
    rotary.install(model)  # the rotation of q and k in one pass (models/rotary.py)
    # One matmul for the LoRA A's of q/k/v and of gate/up, LoRA's scaling on the rank-r side, LoRA's output
    # added into its projection's by the GEMM (training/lora_fusion.py); the projections in row blocks where
    # this CPU's GEMM would leave a thread idle (training/row_split.py). One options dict for
    # all layers: dynamo keeps one compiled graph per backend, and backends are equal when their options
    # are; a pass object per layer made 29 backends, 29 graphs and a cache lookup walking them (+15%).
    wrapper = wrapper_options(model)
    options = {"pre_grad_custom_pass": LORA_FUSION, "post_grad_custom_post_pass": LORA_POST_GRAD, **wrapper}
    layers = decoder_layers(model)
    for layer in layers:
        for module in layer.modules():
            if hasattr(module, "is_causal"):  # transformers' attention modules: what the kernel is called with
                setattr(module, MATMUL_ROWS_ATTR, matmul_rows)
        eager = layer.forward
        compiled = _Fallback(eager, shared, options=options)
        trainable = any(p.requires_grad for p in layer.parameters())

        def forward(hidden_states, *args, _layer=layer, _eager=eager, _compiled=compiled, _trainable=trainable, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _eager(hidden_states, *args, **kwargs)
            if _trainable and not hidden_states.requires_grad:
                # The first layer's input, a frozen embedding's output, needs no gradient. Asking for one (a leaf
                # of the same values) gives that layer the graph every other layer runs, for one input gradient
                # computed for nothing: steps ~2.5% faster than with that layer eager (AMX Xeon). Whether a layer
                # has anything to train is read when it is compiled.
                hidden_states = hidden_states.detach().requires_grad_()
            run = _compiled if hidden_states.requires_grad else _eager
            return run(hidden_states, *args, **kwargs)

        layer.forward = forward
    # weighted_loss takes it for training steps only, like the layers.
    loss_options = {"post_grad_custom_post_pass": ROW_SPLIT, **wrapper}
    use_compiled_token_losses(model, _Fallback(token_losses, shared, options=loss_options))
    log.info("compiling %d decoder layers and the loss for training (the first steps take longer)", len(layers))
    return len(layers)
