"""Experiment trackers as sinks of the run's MetricsLogger: TensorBoard, Weights & Biases and MLflow.

Each receives every metrics line (loss, lr, grad norm, tokens/s, evaluations) with its step, the
resolved config, and at the end the before/after answers and the adapter's path. Both work
offline: TensorBoard writes event files into ``runs/NAME/tensorboard/``; W&B runs in offline mode
(no login, files under ``runs/NAME/wandb/``, `wandb sync` uploads them later) unless ``WANDB_MODE``
or ``WANDB_API_KEY`` says otherwise. A resumed run continues the same W&B run (its id is kept in
the run folder) and appends to the same TensorBoard folder. MLflow logs to ``$MLFLOW_TRACKING_URI``
if set, else to a SQLite store in the run folder (``runs/NAME/mlflow.db``, artifacts beside it:
MLflow 3 refuses a bare file store and defaults to ``./mlflow.db`` in whatever the working folder
is), and a resumed run continues the same MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

from lorasmith.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(report_to: list[str]) -> None:
    """A missing tracker package is a clear error before any data is read or model loaded."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError(
            f"output.report_to names {', '.join(missing)}, which is not installed",
            hint=f"pip install 'lorasmith[trackers]' (or: pip install {' '.join(PACKAGES[m] for m in missing)})",
        )


def _numbers(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def write(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def table(self, name: str, rows: list[dict]) -> None:
        lines = [" | ".join(rows[0]), " | ".join("---" for _ in rows[0])] if rows else []
        lines += [" | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r.values()) for r in rows]
        self.writer.add_text(name, "\n".join(lines))

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(values, indent=2, default=str) + "\n```")

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, folder: Path, name: str, config: dict):
        import wandb

        id_file = folder / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        online = os.environ.get("WANDB_MODE") not in (None, "offline") or "WANDB_API_KEY" in os.environ
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lorasmith"),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(folder),
            config=config,
            mode=os.environ.get("WANDB_MODE", "online") if online else "offline",
        )
        id_file.write_text(run_id + "\n")

    def write(self, row: dict) -> None:
        self.run.log(_numbers(row), step=row["step"])

    def table(self, name: str, rows: list[dict]) -> None:
        import wandb

        if rows:
            self.run.log({name: wandb.Table(columns=list(rows[0]), data=[[str(v) for v in r.values()] for r in rows])})

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, folder: Path, name: str, config: dict):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        self.client = MlflowClient(uri, registry_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorasmith")
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifacts = (folder / "mlflow-artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        id_file = folder / "mlflow_run_id"
        if id_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            id_file.write_text(self.run_id + "\n")
            flat = _flatten(config)
            from mlflow.entities import Param

            params = [Param(k, str(v)[:500]) for k, v in flat.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(self.run_id, params=params[start : start + 100])
            self.client.log_dict(self.run_id, config, "config.json")
        self.uri = uri

    def write(self, row: dict) -> None:
        import time as _time

        from mlflow.entities import Metric

        now = int(_time.time() * 1000)
        metrics = [Metric(k, v, now, row["step"]) for k, v in _numbers(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def table(self, name: str, rows: list[dict]) -> None:
        self.client.log_dict(self.run_id, rows, f"{name.replace(' ', '_')}.json")

    def summary(self, values: dict) -> None:
        self.client.log_dict(self.run_id, values, "summary.json")
        for key, value in values.items():
            if isinstance(value, str):
                self.client.set_tag(self.run_id, key, value[:5000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def make_sinks(report_to: list[str], folder: Path, name: str, config: dict) -> list:
    sinks: list = []
    for tracker in report_to:
        if tracker == "tensorboard":
            sinks.append(TensorBoardSink(folder / "tensorboard", config))
        elif tracker == "wandb":
            sinks.append(WandbSink(folder, name, config))
        elif tracker == "mlflow":
            sinks.append(MlflowSink(folder, name, config))
    return sinks
