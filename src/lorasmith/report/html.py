"""`runs/NAME/report.html`: one self-contained page about a run (plots as embedded PNG, no script, no
network), written at the end of every run (complete, failed or interrupted) and by `lorasmith report RUN`.

It reads only the run folder: metrics.jsonl, eval_before/after.json, samples.json, data_stats.json,
config.yaml and run.json, so it can be rebuilt for any run, at any time, on any machine.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import platform
from importlib import metadata
from pathlib import Path

from lorasmith import atomic
from lorasmith.evaluation.scores import bootstrap
from lorasmith.runs import RunFolder
from lorasmith.runs.folder import DATA_STATS  # noqa: F401  (re-exported by the package)

REPORT = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2328;
  padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}
h2{font-size:1.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;vertical-align:top;text-align:left}
th{background:#f6f8fa} .status{display:inline-block;padding:.1rem .6rem;border-radius:1rem;color:#fff;font-weight:600}
.complete{background:#1a7f37} .failed{background:#cf222e} .interrupted,.running{background:#9a6700}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:1rem} .plots img{width:100%;border:1px solid #d0d7de}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem} .muted{color:#59636e} .ok{color:#1a7f37} .bad{color:#cf222e}
td.answer{max-width:330px;white-space:pre-wrap;word-break:break-word}
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _smooth(values: list[float], alpha: float = 0.2) -> list[float]:
    out, level = [], None
    for v in values:
        level = v if level is None else alpha * v + (1 - alpha) * level
        out.append(level)
    return out


def _plots(rows: list[dict], stats: dict | None) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["<p class=\"muted\">plots need matplotlib: pip install 'lorasmith[plots]'</p>"]
    out = []
    steps = [r for r in rows if "loss" in r and r.get("loss") is not None]
    evals = [r for r in rows if "eval_loss" in r]
    if steps or evals:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        if steps:
            x, y = [r["step"] for r in steps], [r["loss"] for r in steps]
            ax.plot(x, y, color="#9ecbff", lw=1, label="training loss")
            ax.plot(x, _smooth(y), color="#0969da", lw=2, label="smoothed")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#cf222e", label="validation loss")
        ax.set_xlabel("step")
        ax.set_title("loss")
        ax.legend()
        out.append(_png(fig))
    for key, title in (("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"), ("tokens_per_s", "tokens/s")):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            fig, ax = plt.subplots(figsize=(5.5, 3.2))
            ax.plot(*zip(*pts), color="#8250df")
            ax.set_xlabel("step")
            ax.set_title(title)
            out.append(_png(fig))
    if stats and stats.get("train_lengths"):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.hist(stats["train_lengths"], bins=40, color="#1a7f37")
        ax.set_xlabel("tokens per training conversation")
        ax.set_title("length histogram")
        out.append(_png(fig))
    return out


def _metrics_table(before: dict | None, after: dict | None) -> str:
    before, after = before or {}, after or {}
    tool_keys = tuple(f"tool_calls_{k}" for k in ("exact", "names", "valid_json", "missed_calls", "false_calls"))
    preference = ("reward_accuracy", "reward_margin", "preference_accuracy", "chosen_logp", "rejected_logp")
    shown = ("loss", "perplexity", "token_accuracy", "exact_match", *tool_keys, *preference)
    keys = [k for k in shown if k in before or k in after]
    if not keys:
        return '<p class="muted">no evaluation was recorded</p>'

    def cell(result: dict, key: str) -> str:
        if key not in result:
            return "-"
        value = result[key]
        if key == "exact_match" and result.get("exact_match_answers"):
            lo, hi = bootstrap([float(a["match"]) for a in result["exact_match_answers"]])
            return f"{value:.1%} <span class='muted'>[{lo:.1%}, {hi:.1%}] of {len(result['exact_match_answers'])}</span>"
        if (key.startswith("tool_calls_") or key in ("reward_accuracy", "preference_accuracy")) and isinstance(value, float):
            return f"{value:.1%}"
        return f"{value:.4f}" if isinstance(value, float) else _esc(value)

    lines = ["<table><tr><th>metric</th><th>before training</th><th>after training</th></tr>"]
    lines += [f"<tr><td>{_esc(k)}</td><td>{cell(before, k)}</td><td>{cell(after, k)}</td></tr>" for k in keys]
    lines.append("</table>")
    if "exact_match" in keys:
        lines.append("<p class='muted'>Exact match: bootstrap 95% interval (1000 seeded resamples).</p>")
    if "reward_accuracy" in keys:
        lines.append(
            "<p class='muted'>Preference pairs (held-out): loss = the objective's; reward accuracy = pairs whose chosen "
            "completion gets the higher implicit reward (0 before training: the policy is its reference); preference "
            "accuracy = pairs whose chosen completion has the higher mean token log-prob under the model alone.</p>"
        )
    if any(k.startswith("tool_calls_") for k in keys):
        lines.append(
            "<p class='muted'>Tool calls (held-out turns whose reference calls tools): exact = names and arguments equal as "
            "JSON; valid_json over answers that call; missed = no call where one was due; false = a call where none was.</p>"
        )
    return "\n".join(lines)


def _answers_table(samples: list | None) -> str:
    if not samples:
        return '<p class="muted">no sample answers were recorded</p>'
    lines = ["<table><tr><th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>"]
    for s in samples:
        lines.append(
            "<tr>"
            + "".join(f'<td class="answer">{_esc(s.get(k, ""))}</td>' for k in ("prompt", "reference", "before", "after"))
            + "</tr>"
        )
    return "\n".join([*lines, "</table>"])


def _environment(status: dict) -> str:
    versions = {"python": platform.python_version()}
    for pkg in ("lorasmith", "torch", "transformers", "peft", "accelerate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    from lorasmith.models.probe import cpu_name

    hardware = {
        "machine": f"{cpu_name()} ({platform.machine()})",
        "device": status.get("device", "?"),
        "precision": status.get("precision", "?"),
        "attention": status.get("attention", "?"),
        "processes": status.get("processes", 1),
    }
    items = {**hardware, **versions}
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items.items()) + "</table>"


def render(run: RunFolder) -> str:
    status = run.read_status()
    rows = _rows(run.metrics)
    before, after = _json(run.eval_before), _json(run.eval_after)
    samples, stats = _json(run.samples), _json(run.data_stats)
    state = status.get("status", "unknown")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>lorasmith run {_esc(run.path.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run {_esc(run.path.name)} <span class='status {_esc(state)}'>{_esc(state)}</span></h1>",
        f"<p class='muted'>{_esc(run.path.resolve())} &middot; updated {_esc(status.get('updated', '?'))}</p>",
    ]
    if status.get("error"):
        parts.append(f"<p class='bad'>error: {_esc(status['error'])}</p>")
    if status.get("resume"):
        parts.append(f"<p>resume with <code>{_esc(status['resume'])}</code></p>")
    for tip in status.get("advice") or []:
        parts.append(f"<p>advice: {_esc(tip.get('message', tip))}</p>")
    parts += ["<h2>Before and after</h2>", _metrics_table(before, after)]
    plots = _plots(rows, stats)
    lr_test, lr_png = _json(run.path / "lr_range_test.json"), run.path / "lr_range_test.png"
    if lr_png.is_file():
        encoded = base64.b64encode(lr_png.read_bytes()).decode()
        plots.append(f'<img alt="learning-rate range test" src="data:image/png;base64,{encoded}">')
    parts += ["<h2>Training</h2>", "<div class='plots'>", *plots, "</div>"]
    if lr_test:
        parts.append(f"<p>learning rate auto: {lr_test['chosen']:.2g} ({_esc(lr_test['rule'])}; {lr_test['seconds']:.0f} s)</p>")
    if stats:
        shown = {k: v for k, v in stats.items() if k != "train_lengths"}
        parts.append("<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in shown.items()) + "</table>")
    parts += ["<h2>Answers before and after</h2>", _answers_table(samples)]
    if status.get("seconds"):
        secs = status["seconds"]
        parts += ["<h2>Where the time went</h2>", "<table>"]
        parts += [f"<tr><th>{_esc(k)}</th><td>{v:.0f} s</td></tr>" for k, v in secs.items()]
        parts.append("</table>")
    parts += ["<h2>Environment</h2>", _environment(status)]
    if run.config.is_file():
        parts += ["<h2>Config</h2>", f"<pre>{_esc(run.config.read_text())}</pre>"]
    parts.append("<p class='muted'>Written by lorasmith; this file is self-contained.</p></body></html>")
    return "\n".join(parts)


def write_report(run: RunFolder) -> Path:
    target = run.path / REPORT
    atomic.write_text(target, render(run))
    return target
