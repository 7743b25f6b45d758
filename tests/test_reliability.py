"""Failure injection: NaN, OOM, SIGKILL at several points, SIGTERM, full disk, unwritable folder.

Each interrupted run, once resumed, must end with an adapter bit-identical to the uninterrupted
run and the same per-step losses; the user's data and earlier checkpoints are never damaged.
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import write_jsonl

from lorasmith.cli import main
from lorasmith.runs import RunFolder
from lorasmith.training import checkpoint, step

ROOT = Path(__file__).parent.parent
STEPS = 8


@pytest.fixture
def data_files(tmp_path, demo_rows):
    train, val = demo_rows
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", val)


def _args(tiny_model_dir, data_files, out, name="run", *extra):
    train, val = data_files
    return [
        "train",
        f"model.name={tiny_model_dir}",
        f"data.train={train}",
        f"data.val={val}",
        f"output.dir={out}",
        f"output.name={name}",
        "train.micro_batch_size=4",
        "train.lr=5e-3",
        "train.precision=fp32",
        "lora.dropout=0.1",
        f"train.max_steps={STEPS}",
        "train.save_every=2",
        "train.keep_checkpoints=10",
        "eval.samples=0",
        "eval.max_batches=1",
        *extra,
    ]


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _same_adapter(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def reference(tmp_path, tiny_model_dir, data_files):
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "ref")) == 0
    return out / "ref"


def _crash(mode, n, args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "crash.py"), mode, str(n), "--", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("mode", "n"),
    [("kill-before-step", 5), ("kill-before-step", 0), ("kill-in-checkpoint", 4), ("kill-in-adapter", 0)],
)
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir, data_files, reference, mode, n):
    out = tmp_path / "runs"
    data_hash = hashlib.sha256(data_files[0].read_bytes()).hexdigest()
    args = _args(tiny_model_dir, data_files, out, "killed")
    proc = _crash(mode, n, args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = out / "killed"
    assert not (run / "adapter").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # SIGKILL leaves no time to say more
    done = RunFolder(run).complete_checkpoints()
    if mode == "kill-in-checkpoint":
        assert [p.name for p in done] == ["step-0000002"]  # the half-written step-4 is not complete
    if n == 0 and mode == "kill-before-step":
        assert done == []  # killed before any checkpoint: --resume starts it again in the same folder
    assert RunFolder(run).read_status()["status"] == "interrupted"  # its process is gone: not shown as running
    assert main([*args, "--resume"]) == 0
    assert _losses(run) == _losses(reference)
    assert _same_adapter(_adapter(run), _adapter(reference))
    assert hashlib.sha256(data_files[0].read_bytes()).hexdigest() == data_hash


@pytest.mark.parametrize("n", [0, 5])  # killed before its first checkpoint, and after two
def test_resume_run_alone_reads_its_own_config(tmp_path, tiny_model_dir, data_files, reference, n, capsys):
    """`lorasmith train --resume runs/NAME`, the command every interrupted run prints, with no config:
    the run's own config.yaml, not the demo's, and the same adapter as an uninterrupted run."""
    out = tmp_path / "runs"
    proc = _crash("kill-before-step", n, _args(tiny_model_dir, data_files, out, "alone"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = out / "alone"
    saved = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "lora.r=4"]) == 2  # an override that changes the training
    assert "changes what this run trains" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == saved
    assert main(["train", "--resume", str(run), "eval.samples=0"]) == 0
    assert (run / "config.yaml").read_text() == saved
    assert _losses(run) == _losses(reference)
    assert _same_adapter(_adapter(run), _adapter(reference))


def test_resume_of_a_folder_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    assert main(["train", "--resume", str(tmp_path / "bare")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


def test_sigterm_checkpoints_and_exits_143(tmp_path, tiny_model_dir, data_files, reference):
    out = tmp_path / "runs"
    args = _args(tiny_model_dir, data_files, out, "termed")
    proc = _crash("term-before-step", 3, args)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "resume with" in proc.stderr and "--resume" in proc.stderr
    run = out / "termed"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 4  # the step in flight was finished
    assert RunFolder(run).latest_checkpoint().name == "step-0000004"
    assert main([*args, "--resume"]) == 0
    assert _losses(run) == _losses(reference)
    assert _same_adapter(_adapter(run), _adapter(reference))


def _inject_nan_at(monkeypatch, call):
    original = step.loss_of
    calls = {"n": 0}

    def nan_loss(model, batch, precision):
        calls["n"] += 1
        parts = original(model, batch, precision)
        if calls["n"] == call:
            parts.loss_sum = parts.loss_sum * float("nan")
        return parts

    monkeypatch.setattr(step, "loss_of", nan_loss)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, data_files, monkeypatch, capsys):
    _inject_nan_at(monkeypatch, 5)  # step 5 (one micro-batch per step)
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 5" in err and "on_nonfinite=skip" in err
    run = out / "run"
    assert [p.name for p in RunFolder(run).complete_checkpoints()] == ["step-0000002", "step-0000004"]
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("nonfinite") and r["step"] == 5 for r in rows)
    assert not (run / "adapter").exists()


def test_nan_skip_drops_that_update(tmp_path, tiny_model_dir, data_files, monkeypatch):
    _inject_nan_at(monkeypatch, 3)
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "run", "train.on_nonfinite=skip")) == 0
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    state = json.loads((RunFolder(out / "run").latest_checkpoint() / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["step"] == STEPS
    weights = _adapter(out / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.fixture
def reference_no_dropout(tmp_path, tiny_model_dir, data_files):
    """Splitting a batch changes dropout's random masks, so these comparisons run without dropout."""
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "ref0", "lora.dropout=0")) == 0
    return out / "ref0"


def test_oom_halves_the_micro_batch_and_keeps_the_result(tmp_path, tiny_model_dir, data_files, reference_no_dropout, monkeypatch):
    reference = reference_no_dropout
    original = step.loss_of

    def small_memory(model, batch, precision):
        if batch.input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(model, batch, precision)

    monkeypatch.setattr(step, "loss_of", small_memory)
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "oom", "lora.dropout=0")) == 0
    rows = [json.loads(line) for line in (out / "oom" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch_size"] for r in rows if r.get("oom")] == [2, 1]  # 4 -> 2 -> 1, once, at step 1
    assert all(r["micro_batch_size"] == 1 for r in rows if "loss" in r)
    ref, got = _losses(reference), _losses(out / "oom")
    assert got.keys() == ref.keys() and all(got[k] == pytest.approx(ref[k], rel=1e-4) for k in ref)
    a, b = _adapter(reference), _adapter(out / "oom")
    # Padded and unpadded rows take different attention kernels: float noise, not a different step
    # (a wrongly normalised gradient moves weights by ~lr = 5e-3 per step).
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_oom_at_micro_batch_one_is_a_clear_error(tmp_path, tiny_model_dir, data_files, monkeypatch, capsys):
    def no_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(step, "loss_of", no_memory)
    assert main(_args(tiny_model_dir, data_files, tmp_path / "runs")) == 1
    assert "even with one conversation per micro-batch" in capsys.readouterr().err


def test_auto_micro_batch_fits_the_budget_and_keeps_the_effective_batch(
    tmp_path, tiny_model_dir, data_files, reference_no_dropout, monkeypatch
):
    from lorasmith.training import memory

    reference = reference_no_dropout

    def fake_peak(fn, device):
        fn()
        return int(fake_peak.n_seen.pop(0) * 2**30)

    fake_peak.n_seen = [1, 2, 4]  # GiB used by micro-batches 1, 2, 4
    monkeypatch.setattr(memory, "peak_extra_memory", fake_peak)
    out = tmp_path / "runs"
    extra = ("train.micro_batch_size=auto", "train.effective_batch_size=4", "train.memory_budget_gb=2.5", "lora.dropout=0")
    assert main(_args(tiny_model_dir, data_files, out, "auto", *extra)) == 0
    rows = [json.loads(line) for line in (out / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert {r["micro_batch_size"] for r in rows if "loss" in r} == {2}
    ref, got = _losses(reference), _losses(out / "auto")
    assert all(got[k] == pytest.approx(ref[k], rel=1e-4) for k in ref)


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, data_files, monkeypatch, capsys):
    original = checkpoint.torch.save

    def full_disk(obj, path, *a, **k):
        if "step-0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "runs"
    args = _args(tiny_model_dir, data_files, out)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-0000002 is intact" in err and "--resume" in err
    run = out / "run"
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-0000002"]  # no half-written folder left behind
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(checkpoint.torch, "save", original)  # space freed
    assert main([*args, "--resume"]) == 0


def test_unwritable_output_fails_before_loading_the_model(tmp_path, tiny_model_dir, data_files, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    from lorasmith.training import trainee

    monkeypatch.setattr(trainee, "load_model", lambda *a, **k: pytest.fail("model loaded before the output check"))
    assert main(_args(tiny_model_dir, data_files, blocker / "runs")) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_sigterm_mid_step_with_a_short_grace_period_saves_the_state_before_it(tmp_path, tiny_model_dir, data_files, reference):
    """A preemption notice shorter than the step in flight: that step is abandoned (its half-accumulated
    gradients dropped) and the state before it checkpointed at once; resuming reproduces the run exactly."""
    out = tmp_path / "runs"
    args = _args(tiny_model_dir, data_files, out, "preempted", "train.grad_accum=2", "train.stop_grace_s=0.001")
    ref_args = _args(tiny_model_dir, data_files, out, "ref2", "train.grad_accum=2")
    assert main(ref_args) == 0
    proc = _crash("term-mid-step", 3, args)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "abandoning it" in proc.stderr
    run = out / "preempted"
    assert RunFolder(run).read_status()["step"] == 3 and RunFolder(run).latest_checkpoint().name == "step-0000003"
    assert main([*args, "--resume"]) == 0
    assert _losses(run) == _losses(out / "ref2")
    assert _same_adapter(_adapter(run), _adapter(out / "ref2"))


def test_resume_is_idempotent(tmp_path, tiny_model_dir, data_files, reference, capsys):
    """The same `--resume` command starts a run that does not exist yet, and on a complete run says so and
    trains nothing: a scheduler can re-run it until it exits 0."""
    out = tmp_path / "runs"
    args = _args(tiny_model_dir, data_files, out, "fresh")
    assert main([*args, "--resume"]) == 0  # no run yet: one is started
    assert _same_adapter(_adapter(out / "fresh"), _adapter(reference))
    metrics = (out / "fresh" / "metrics.jsonl").read_text()
    assert main([*args, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "fresh" / "metrics.jsonl").read_text() == metrics


def test_a_second_live_process_on_a_run_is_refused(tmp_path, tiny_model_dir, data_files, capsys):
    out = tmp_path / "runs"
    args = _args(tiny_model_dir, data_files, out, "busy")
    (out / "busy").mkdir(parents=True)
    holder = RunFolder(out / "busy").lock
    holder.acquire()  # another process training this run (a lock is per open file, so this stands in for one)
    try:
        assert main([*args, "--resume"]) == 2
        assert "is being trained right now by pid" in capsys.readouterr().err
    finally:
        holder.release()


def test_checkpoints_on_a_clock_keep_saving_under_two_percent():
    from types import SimpleNamespace

    from lorasmith.config import TrainConfig
    from lorasmith.training.loop import TrainLoop

    due = TrainLoop.checkpoint_due
    now = __import__("time").monotonic()
    run = SimpleNamespace(cfg=SimpleNamespace(train=TrainConfig()), checkpoint_s=0.5, last_save=now - 601)
    assert TrainConfig().save_every_minutes == 10 and due(run, 7)  # 10 minutes passed
    run.last_save = now - 500
    assert not due(run, 7)
    run.checkpoint_s, run.last_save = 20.0, now - 601  # a slow save stretches the interval to 50 of them
    assert not due(run, 7)
    run.last_save = now - 1001
    assert due(run, 7)
    run.cfg.train = TrainConfig(save_every=3, save_every_minutes=0)
    assert due(run, 6) and not due(run, 7)


def test_random_sigkills_then_rerunning_the_same_command_gives_the_uninterrupted_run(
    tmp_path, tiny_model_dir, data_files, reference
):
    """`until lorasmith train ... --resume; do :; done` with SIGKILLs at seeded random moments (set-up, model
    loading, evaluation, steps, checkpoint writes, the final adapter): it always ends with the same adapter."""
    import random
    import time

    out = tmp_path / "runs"
    args = _args(tiny_model_dir, data_files, out, "chaos", "--resume")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lorasmith", *args]
    started = time.monotonic()
    subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=300, check=True)  # how long one run takes
    whole = time.monotonic() - started
    shutil.rmtree(out / "chaos")
    rng = random.Random(1234)
    # A resumed run only has the steps after its checkpoint left, so a kill drawn late in `whole` can come
    # after it has finished: a round with fewer than two kills proves too little and is played again with
    # new moments (every round that completes is checked all the same).
    for _round in range(3):
        kills = 0
        for attempt in range(12):
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                rc = proc.wait(timeout=rng.uniform(0.1, 0.85) * whole if attempt < 4 else 300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                kills += 1
                continue
            assert rc == 0, proc.stderr.read()[-2000:]
            break
        else:
            pytest.fail("the run never completed")
        assert _losses(out / "chaos") == _losses(reference)
        assert _same_adapter(_adapter(out / "chaos"), _adapter(reference))
        if kills >= 2:
            break
        shutil.rmtree(out / "chaos")
    else:
        pytest.fail("three rounds of random kills each landed fewer than two kills")
