"""Run `lorasmith` in a subprocess with a fault injected at a chosen point (used by test_reliability).

    python tests/crash.py MODE N -- lorasmith-args...

MODE: kill-before-step (SIGKILL before step N+1), term-before-step (SIGTERM before step N+1),
term-mid-step (SIGTERM between two micro-batches of step N+1), oom-at-step (an out-of-memory error
in the first micro-batch of step N+1), kill-in-checkpoint (SIGKILL while
checkpoint N is half written), kill-in-adapter (SIGKILL while the final adapter is half written).
Under torchrun (`torchrun ... tests/crash.py ...`) only the rank in CRASH_RANK (default: all) is hit, and
(kill/term-before-step) only on the job's first start, not after torchrun restarted it.
"""

import os
import signal
import sys

import torch

from lorasmith import atomic
from lorasmith.training import checkpoint, step

mode, n = sys.argv[1], int(sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1 :]

if mode in ("kill-before-step", "term-before-step"):
    original_step = step.Stepper.step
    sig = signal.SIGKILL if mode == "kill-before-step" else signal.SIGTERM

    def patched_step(self, state, on_oom=None):
        first_start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"  # a restarted job is not hit again
        rank = os.environ.get("RANK", "0")
        if state.step == n and first_start and os.environ.get("CRASH_RANK", rank) == rank:
            os.kill(os.getpid(), sig)
        return original_step(self, state, on_oom)

    step.Stepper.step = patched_step
elif mode == "term-mid-step":
    original_accumulate = step.accumulate_gradients
    calls = []

    def patched_accumulate(model, batches, *a, **k):
        calls.append(1)
        if len(calls) == n + 1:  # the (N+1)-th step: its gradients are half accumulated when SIGTERM lands
            original_accumulate(model, batches[:1], *a, **k)
            os.kill(os.getpid(), signal.SIGTERM)
        return original_accumulate(model, batches, *a, **k)

    step.accumulate_gradients = patched_accumulate
elif mode == "oom-at-step":  # one out-of-memory error in the first micro-batch of step N+1 (on CRASH_RANK)
    from lorasmith.training import parallel

    original_step, original_loss, now, fired = step.Stepper.step, parallel.loss_of, [0], []

    def recording_step(self, state, on_oom=None):
        now[0] = state.step
        return original_step(self, state, on_oom)

    def oom_once(model, batch, precision):
        mine = os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
        if mine and now[0] == n and not fired and batch.input_ids.shape[1] > 8:  # a real micro-batch, not the sync pass
            fired.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original_loss(model, batch, precision)

    step.Stepper.step = recording_step
    parallel.loss_of = oom_once
elif mode == "kill-in-checkpoint":
    original_save = torch.save

    def patched_save(obj, path, *a, **k):
        original_save(obj, path, *a, **k)
        if f"step-{n:07d}" in str(path) and str(path).endswith("scheduler.pt"):
            os.kill(os.getpid(), signal.SIGKILL)  # optimizer and scheduler written, RNG and marker not

    checkpoint.torch.save = patched_save
elif mode == "kill-in-adapter":
    original_folder = atomic.folder

    class KillingFolder:
        def __init__(self, path):
            self.path, self.inner = path, original_folder(path)

        def __enter__(self):
            return self.inner.__enter__()

        def __exit__(self, *exc):
            if self.path.name == "adapter":
                os.kill(os.getpid(), signal.SIGKILL)
            return self.inner.__exit__(*exc)

    atomic.folder = KillingFolder
else:
    raise SystemExit(f"unknown mode {mode}")

from lorasmith.cli import main  # noqa: E402

sys.exit(main(args))
