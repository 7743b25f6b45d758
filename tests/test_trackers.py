"""Trackers behind the metrics seam: what TensorBoard, W&B and MLflow hold, read back with their own
readers and formats, equals metrics.jsonl."""

import json
import struct

import pytest
from tests.conftest import train_args

from lorasmith.cli import main


@pytest.fixture
def args(tmp_path, tiny_model_dir, demo_rows, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train, val = demo_rows
    return [
        *train_args(tmp_path, tiny_model_dir, train, val),
        f"output.dir={tmp_path / 'runs'}",
        "output.name=tracked",
        "output.report_to=[tensorboard, wandb, mlflow]",
        "train.max_steps=4",
        "train.save_every=2",
        "train.micro_batch_size=4",
        "train.precision=fp32",
        "eval.samples=2",
        "eval.max_new_tokens=4",
    ]


def jsonl_losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def wandb_records(path):
    """The records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks, chunks of
    crc32c(4) length(2) type(1)) of wandb's own protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_tensorboard_wandb_and_mlflow_hold_what_metrics_jsonl_holds(args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(args) == 0
    run = tmp_path / "runs" / "tracked"
    want = jsonl_losses(run)
    assert sorted(want) == [1, 2, 3, 4]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    got = {e.step: e.value for e in events.Scalars("loss")}
    assert got == pytest.approx(want, rel=1e-6)  # TensorBoard stores float32
    assert {"lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(events.Tags()["scalars"])

    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "loss" in items:
                history[items["_step"]] = items["loss"]
    assert history == pytest.approx(want, rel=1e-12)

    run_id, client = mlflow_run(run)
    got = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert got == pytest.approx(want, rel=1e-12)
    assert client.get_run(run_id).data.params["train.max_steps"] == "4"
    assert client.get_run(run_id).info.status == "FINISHED"


def mlflow_run(run):
    from mlflow import MlflowClient

    uri = f"sqlite:///{run / 'mlflow.db'}"
    return (run / "mlflow_run_id").read_text().strip(), MlflowClient(uri, registry_uri=uri)


def test_a_missing_tracker_is_a_clear_error_before_the_model_loads(args, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    from lorasmith.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(args) == 2
    assert "output.report_to names wandb, which is not installed" in capsys.readouterr().err


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(args, tmp_path):
    import shutil

    assert main(args) == 0
    run = tmp_path / "runs" / "tracked"
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**status, "status": "interrupted"}))
    assert main([*args, "--resume"]) == 0
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    run_id, client = mlflow_run(run)
    (experiment,) = [e for e in client.search_experiments() if e.name == "lorasmith"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # one MLflow run
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == [1, 2, 3, 4]
