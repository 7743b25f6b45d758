"""Training on several processes (torchrun, gloo on CPU): the same result as one process with the same
global batch, and runs that survive a killed or preempted process. Every launch is bounded by a timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import write_jsonl

from lorasmith.cli import main

ROOT = Path(__file__).parent.parent
STEPS = 6
TIMEOUT_S = 240  # a 2-process run of the tiny model takes ~10 s here


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, demo_rows):
    folder = tmp_path_factory.mktemp("data")
    train, val = demo_rows
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "val.jsonl", val)


def _args(model, data_files, out, name, *extra):
    train, val = data_files
    return [
        "train",
        f"model.name={model}",
        f"data.train={train}",
        f"data.val={val}",
        f"output.dir={out}",
        f"output.name={name}",
        "train.micro_batch_size=4",
        "train.lr=5e-3",
        "train.precision=fp32",
        f"train.max_steps={STEPS}",
        "train.save_every=2",
        "train.keep_checkpoints=10",
        "eval.samples=0",
        "eval.max_batches=1",
        *extra,
    ]


def _launch(args, *, crash: tuple[str, int] | None = None, crash_rank: int = 1):
    """``lorasmith ARGS --nproc 2``; with ``crash``, torchrun runs tests/crash.py, which injects the fault
    into one rank only."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CRASH_RANK": str(crash_rank)}
    if crash:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        cmd = [*launcher, str(ROOT / "tests" / "crash.py"), crash[0], str(crash[1]), "--", *args]
    else:
        cmd = [sys.executable, "-m", "lorasmith", *args, "--nproc", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT_S)


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _close(a, b, atol):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, data_files):
    """The reference: one process, the same global batches (no dropout, so RNG streams do not matter)."""
    out = tmp_path_factory.mktemp("one")
    runs = {}
    for mb in (4, 3):
        name = f"mb{mb}"
        assert main(_args(tiny_model_dir, data_files, out, name, "lora.dropout=0", f"train.micro_batch_size={mb}")) == 0
        runs[mb] = out / name
    return runs


# Tolerance: the processes sum the same per-sample gradients in another order, and rows padded to another
# width take other attention kernels: float32 noise that Adam's early steps amplify (measured 8e-7 with
# equal shares, 1.3e-5 with 2 + 1). A wrongly normalised or unsynchronised gradient moves weights by
# ~lr = 5e-3 per step.
ATOL = 1e-4


@pytest.mark.parametrize("mb", [4, 3])  # 3: the processes get 2 and 1 conversations of each micro-batch
def test_ddp_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, data_files, one_process, mb):
    args = _args(tiny_model_dir, data_files, tmp_path, "ddp", "lora.dropout=0", f"train.micro_batch_size={mb}")
    proc = _launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, ref = tmp_path / "ddp", one_process[mb]
    got, want = _losses(run), _losses(ref)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    assert _close(_adapter(run), _adapter(ref), ATOL)
    status = json.loads((run / "run.json").read_text())
    # Both ranks ended with the same LoRA weights: checked by the run itself (checksums gathered on rank 0).
    assert status["status"] == "complete" and status["processes"] == 2 and len(status["replica_checksum"]) == 64
    assert proc.stderr.count("before training:") == 1  # one voice: only rank 0 reports


def test_fsdp_on_two_processes_equals_one_process_and_resumes_on_one(tmp_path, tiny_model_dir, data_files, one_process):
    args = _args(tiny_model_dir, data_files, tmp_path, "fsdp", "lora.dropout=0", "train.distributed=fsdp")
    proc = _launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2: 2 decoder layers sharded over 2 processes" in proc.stderr
    assert _close(_adapter(tmp_path / "fsdp"), _adapter(one_process[4]), ATOL)
    # Checkpoints hold whole tensors keyed by name: a sharded run continues on one process.
    args = _args(tiny_model_dir, data_files, tmp_path, "fsdp", "lora.dropout=0")
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-0000002"
    assert main([*args, "--resume", str(ckpt)]) == 0
    assert _close(_adapter(tmp_path / "fsdp"), _adapter(one_process[4]), ATOL)


@pytest.fixture(scope="module")
def with_dropout(tmp_path_factory, tiny_model_dir, data_files):
    """Uninterrupted 2-process runs with dropout, by strategy, made once for the tests that resume one:
    exact resume then needs each process's own RNG state back."""
    runs = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"dropout-{strategy}")
            proc = _launch(_args(tiny_model_dir, data_files, out, "ref", "lora.dropout=0.1", f"train.distributed={strategy}"))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[strategy] = out / "ref"
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_process_stops_the_other_and_resume_is_exact(tmp_path, tiny_model_dir, data_files, with_dropout, strategy):
    ref = with_dropout(strategy)
    args = _args(tiny_model_dir, data_files, tmp_path, "killed", "lora.dropout=0.1", f"train.distributed={strategy}")
    proc = _launch(args, crash=("kill-before-step", 3))  # SIGKILL of rank 1 before step 4
    assert proc.returncode != 0
    # Rank 0 says so itself when its collective fails first; when torchrun's monitor is quicker, torchrun
    # stops it and names the rank that died. Either way within the launch's timeout, never a hang.
    said = "process 0 of 2 lost contact with the others" in proc.stderr and "--resume" in proc.stderr
    assert said or "Signal 9 (SIGKILL) received" in proc.stderr, proc.stderr[-3000:]
    run = tmp_path / "killed"
    assert not (run / "adapter").exists()
    proc = _launch([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == _losses(ref)
    assert _equal(_adapter(run), _adapter(ref))


def test_sigterm_on_one_process_stops_all_at_the_same_step(tmp_path, tiny_model_dir, data_files, with_dropout):
    """A preempted worker: the processes agree to stop after the same step, save once, exit 143."""
    ref = with_dropout("ddp")
    args = _args(tiny_model_dir, data_files, tmp_path, "termed", "lora.dropout=0.1", "train.distributed=ddp")
    proc = _launch(args, crash=("term-before-step", 3))
    assert proc.returncode != 0 and proc.stderr.count("stopped by SIGTERM after step 4") == 1, proc.stderr[-3000:]
    run = tmp_path / "termed"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 4 and "--nproc 2" in status["resume"]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())][-1] == "step-0000004"
    proc = _launch([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == _losses(ref)
    assert _equal(_adapter(run), _adapter(ref))


def test_an_oom_on_one_process_makes_all_split_the_same_way(tmp_path, tiny_model_dir, data_files, one_process):
    """Rank 1 runs out of memory at step 3: both processes retry that step in halves (the same gradients)."""
    args = _args(tiny_model_dir, data_files, tmp_path, "oom", "lora.dropout=0")
    proc = _launch(args, crash=("oom-at-step", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "oom" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("oom")] == [3]  # logged once, by rank 0, for rank 1's error
    assert all(r["micro_batch_size"] == 1 for r in rows if "loss" in r and r["step"] >= 3)  # 2 per rank, halved
    got, want = _losses(tmp_path / "oom"), _losses(one_process[4])
    assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    assert _close(_adapter(tmp_path / "oom"), _adapter(one_process[4]), ATOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, strategy):
    """The preference loss on the same loop: pairs shared out like conversations, the reference computed
    the same way on every process, one loss per pair normalised over the global batch."""
    from lorasmith.data.prefs_demo import generate

    train, val = generate(n_train=24, n_val=6, seed=2)
    files = write_jsonl(tmp_path / "t.jsonl", train), write_jsonl(tmp_path / "v.jsonl", val)
    dpo = ["lora.dropout=0", "train.objective=dpo", "train.lr=1e-3", f"train.distributed={strategy}"]
    assert main(_args(tiny_model_dir, files, tmp_path, "one", *dpo)) == 0
    proc = _launch(_args(tiny_model_dir, files, tmp_path, "two", *dpo))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-4) for k in want)
    assert _close(_adapter(tmp_path / "two"), _adapter(tmp_path / "one"), ATOL)
    after = json.loads((tmp_path / "two" / "eval_after.json").read_text())
    assert after["pairs"] == 6 and "reward_accuracy" in after


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(commands: list[list[str]], folder: Path) -> list[subprocess.CompletedProcess]:
    """Each command as one "node" on this machine, all at once (they meet at the rendezvous), bounded: on
    a timeout every node is killed and the test fails showing the end of each node's output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [folder / f"node{i}.log" for i in range(len(commands))]
    procs = []
    for c, log in zip(commands, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n".join(f"--- node {i} ---\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
        pytest.fail(f"the nodes did not finish within {TIMEOUT_S} s:\n{tails}")
    return [subprocess.CompletedProcess(c, p.returncode, "", log.read_text()) for c, p, log in zip(commands, procs, logs)]


def test_two_nodes_train_the_same_adapter_as_one_process(tmp_path, tiny_model_dir, data_files, one_process):
    """Two `lorasmith train --nnodes 2 --master ...` launches on 127.0.0.1 (one process each, gloo), the run
    folder on storage both see: the same global batch, so the same adapter as one process."""
    args = _args(tiny_model_dir, data_files, tmp_path, "nodes", "lora.dropout=0")
    node = [sys.executable, "-m", "lorasmith", *args, "--nnodes", "2", "--master", f"127.0.0.1:{_free_port()}"]
    for proc in _nodes([node, node], tmp_path):
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "nodes"
    got, want = _losses(run), _losses(one_process[4])
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    assert _close(_adapter(run), _adapter(one_process[4]), ATOL)
    assert json.loads((run / "run.json").read_text())["processes"] == 2


def test_a_node_killed_mid_run_stops_the_other_and_the_same_command_resumes_exactly(
    tmp_path, tiny_model_dir, data_files, one_process
):
    """One node's process is SIGKILLed before step 4: the other node's process stops too (it does not
    wait), and re-running the same command on both nodes (what a requeued Slurm job or a restarted pod
    does) resumes from the step-2 checkpoint and ends with the losses and adapter of one process."""
    args = _args(tiny_model_dir, data_files, tmp_path, "requeued", "lora.dropout=0")
    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-id=requeued"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]
    healthy = [*torchrun, "-m", "lorasmith", *args]
    killed = [*torchrun, str(ROOT / "tests" / "crash.py"), "kill-before-step", "3", "--", *args]
    first = _nodes([healthy, killed], tmp_path)
    assert all(p.returncode != 0 for p in first)
    assert "lost contact with the others at step 3" in first[0].stderr, first[0].stderr[-3000:]
    run = tmp_path / "requeued"
    assert not (run / "adapter").exists() and (run / "checkpoints" / "step-0000002" / "COMPLETE").is_file()

    again = [sys.executable, "-m", "lorasmith", *args, "--resume", "--nnodes", "2", "--master", f"127.0.0.1:{_free_port()}"]
    for proc in _nodes([again, again], tmp_path):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    got, want = _losses(run), _losses(one_process[4])
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    assert _close(_adapter(run), _adapter(one_process[4]), ATOL)


def test_the_cluster_examples_parse_and_name_the_same_run_on_every_node():
    script = ROOT / "examples" / "cluster" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--requeue" in text and "--resume" in text and "--nnodes" in text and "output.name=" in text
    import yaml

    job, claim = yaml.safe_load_all((ROOT / "examples" / "cluster" / "kubernetes.yaml").read_text())
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["command"][:3] == ["torchrun", "--nproc-per-node=8", "-m"] and "--resume" in worker["command"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The command the job runs is one lorasmith accepts (parsed, not run).
    from lorasmith.cli import build_parser

    build_parser().parse_args(worker["command"][4:])
