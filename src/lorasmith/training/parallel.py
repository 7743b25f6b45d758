"""Data-parallel (DDP) and sharded (FSDP2) training of the LoRA model, behind one small interface.

How the loss reaches the gradients is the same in every mode (training/step.py): each process
runs its share of the step's micro-batches with gradient synchronisation off, then one
synchronising pass of zero weight makes DDP all-reduce (FSDP: reduce-scatter) the gradients
accumulated so far. That single collective backward per step is what lets the ranks agree on an
out-of-memory retry before anything is synchronised, and lets them run different numbers of
micro-batches under DDP without a hang. The loss is scaled by the number of processes because
both DDP and FSDP average gradients, while the loss is already normalised by the weight of the
whole global batch (so N processes give the gradient of one process with the same batch).

- DDP wraps a module whose forward is the training loss (:class:`LossModule`): DDP's reducer is
  set up in its forward, and lorasmith's loss applies the LM head to trained positions only,
  bypassing the model's own forward. Every trainable (LoRA) parameter is used in every forward,
  so ``find_unused_parameters`` stays off; gradient checkpointing is non-reentrant.
- FSDP2 ``fully_shard`` on each decoder layer: the frozen base weights and the LoRA weights and
  their AdamW moments in those layers are sharded across ranks (all of them, since the layers hold
  nearly every weight of a decoder and every LoRA weight of the default targets). Embeddings,
  final norm and LM head stay replicated and frozen (``ignored_params``): they then need no
  gathering, and tied embeddings need no special case. Every forward all-gathers a layer, so all
  ranks run the same number of micro-batches (padded with zero-weight ones) and the same
  evaluation passes.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager

import torch

from lorasmith.data.batching import Batch
from lorasmith.distributed import Dist
from lorasmith.errors import TrainingError
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import LossParts, causal_lm, loss_of

log = logging.getLogger(__name__)


class LossModule(torch.nn.Module):
    """The training loss as a module call, so that DDP's forward hooks see it."""

    def __init__(self, model, precision: Precision):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, batch: Batch) -> LossParts:
        return loss_of(self.model, batch, self.precision)


class Parallel:
    """One process, DDP or FSDP2: the loss forward, gradient-sync control and state dicts."""

    def __init__(self, model, precision: Precision, dist: Dist, strategy: str = "none"):
        self.model, self.precision, self.dist, self.strategy = model, precision, dist, strategy
        self.loss_scale = float(dist.world_size)
        self._ddp = None
        self.filler: Batch | None = None
        self._warm = False
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(p for p in model.parameters() if p.requires_grad).device
            self._ddp = DistributedDataParallel(
                LossModule(model, precision),
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False,  # every LoRA weight is used in every forward
                forward_sync_buffers=False,  # no buffer is trained; rotary caches are the same everywhere
            )
        elif strategy == "fsdp":
            _shard_layers(model, dist)

    @property
    def pads_micro_batches(self) -> bool:
        """FSDP gathers each layer in every forward: all ranks must run as many micro-batches."""
        return self.strategy == "fsdp"

    def loss(self, batch: Batch) -> LossParts:
        if self._ddp is not None:
            return self._ddp(batch)
        return loss_of(self.model, batch, self.precision)

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally (the synchronising pass at the end of the step all-reduces them)."""
        if self._ddp is not None:
            with self._ddp.no_sync():
                yield
        elif self.strategy == "fsdp":
            root = causal_lm(self.model)
            root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                root.set_requires_gradient_sync(True)
        else:
            yield

    def warm_up(self) -> bool:
        """DDP rebuilds its gradient buckets once, in the first forward after the first synchronised
        backward, with a broadcast from rank 0: a collective inside a forward. Since processes may run
        different numbers of micro-batches, trigger it now, on every process at once, with two
        zero-weight passes (their gradients are zero and are cleared by the caller). True if it ran."""
        if self._warm:
            return False
        self._warm = True
        if self._ddp is not None:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):  # dropout draws here would shift a resumed run's
                self.zero_weight_pass()
                self.zero_weight_pass()
        return True

    def zero_weight_pass(self) -> None:
        """Forward and backward of :attr:`filler` (set by the stepper: a few tokens of this step's data)
        with its loss multiplied by zero: it adds nothing to the gradients, but runs every collective of a
        micro-batch. Outside :meth:`no_sync` it is the step's one synchronising backward."""
        (self.loss(self.filler).loss_sum * 0.0).backward()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor over the shards
            norm = norm.full_tensor()
        return float(norm)

    def check_replicas(self) -> dict:
        """DDP: every process must end with the same LoRA weights (a silent divergence would mean the
        saved adapter is one process's alone). Compared by checksum on rank 0; a mismatch fails the run."""
        if self.strategy != "ddp":
            return {}
        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        digests = self.dist.gather(h.hexdigest())
        if digests is None:
            return {}
        if len(set(digests)) != 1:
            raise TrainingError(
                f"the processes ended with different LoRA weights (checksums {', '.join(d[:12] for d in digests)})",
                hint="report this with train.log; train on one process meanwhile",
            )
        log.info("DDP: all %d processes hold the same LoRA weights (sha256 %s)", len(digests), digests[0][:12])
        return {"replica_checksum": digests[0]}

    def adapter_state_dict(self) -> dict | None:
        """The full LoRA state dict (collective under FSDP; None elsewhere: peft reads the module itself)."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)


def _shard_layers(model, dist: Dist) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = causal_lm(model)
    layers = getattr(getattr(lm, lm.base_model_prefix), "layers", None)
    if layers is None:
        raise TrainingError(f"train.distributed=fsdp: no decoder layers found in {type(lm).__name__}", hint="use ddp")
    device = next(lm.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    outside = {p for name, p in lm.named_parameters() if ".layers." not in f".{name}"}
    trained_outside = [p for p in outside if p.requires_grad]
    if trained_outside:
        raise TrainingError(
            "train.distributed=fsdp shards the decoder layers only, but LoRA also trains weights outside them "
            "(embeddings or LM head)",
            hint="drop those from lora.target_modules, or use train.distributed=ddp",
        )
    fully_shard(lm, mesh=mesh, ignored_params=outside)
    # lorasmith calls the decoder and the head directly (the loss applies the head to trained positions
    # only), not the root's forward: set the root up now so the layers know they are not roots.
    lm._get_fsdp_state()._lazy_init()
    log.info("FSDP2: %d decoder layers sharded over %d processes; embeddings and head replicated", len(layers), dist.world_size)
