"""The HTML run report: written for complete and failed runs, self-contained, and rendered by a real browser."""

import json
import re
import shutil
import subprocess

import pytest
from tests.conftest import train_args

from lorasmith.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, demo_rows):
    folder = tmp_path_factory.mktemp("report")
    train, val = demo_rows
    (folder / "mine.py").write_text("def length(preds, refs):\n    return {'answer_chars': sum(map(len, preds)) / len(preds)}\n")
    args = [
        *train_args(folder, tiny_model_dir, train, val),
        f"output.dir={folder}",
        "output.name=reported",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.precision=fp32",
        "eval.samples=2",
        "eval.exact_match=4",
        "eval.max_new_tokens=4",
        f"eval.metrics=[chrf, {folder / 'mine.py'}:length]",
    ]
    assert main(args) == 0
    return folder / "reported"


def test_a_complete_run_has_a_self_contained_report(run):
    page = (run / "report.html").read_text()
    assert "complete" in page and "Before and after" in page and "exact_match" in page and "of 4" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 5  # loss, lr, grad norm, tokens/s, lengths
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing to fetch
    samples = json.loads((run / "samples.json").read_text())
    assert all(s["prompt"][:30] in page.replace("&#x27;", "'").replace("&quot;", '"') for s in samples)


def test_a_failed_run_gets_a_report_and_report_rebuilds_it(tmp_path, tiny_model_dir, demo_rows, monkeypatch, capsys):
    from lorasmith.training import step

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(step, "accumulate_gradients", boom)
    train, _ = demo_rows
    args = train_args(tmp_path, tiny_model_dir, train)
    with pytest.raises(RuntimeError):
        main([*args, f"output.dir={tmp_path}", "output.name=failed", "eval.samples=0"])
    page = (tmp_path / "failed" / "report.html").read_text()
    assert "failed" in page and "disk on fire" in page
    (tmp_path / "failed" / "report.html").unlink()
    assert main(["report", str(tmp_path / "failed")]) == 0
    assert (tmp_path / "failed" / "report.html").is_file()
    assert main(["report", str(tmp_path)]) == 2 and "not a run folder" in capsys.readouterr().err


def test_chromium_renders_the_report(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt install chromium; .ci/run installs it)")
    import numpy as np
    from PIL import Image

    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1800"]
    cmd += ["--enable-logging=stderr", "--v=0", f"--screenshot={shot}", (run / "report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no script errors, no failed loads reported to the console
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    non_white = float((pixels.sum(axis=1) < 720).mean())
    colours = len({tuple(p) for p in pixels[::7]})
    assert non_white > 0.03 and colours > 50  # text, tables and plots, not a blank page


def test_eval_metrics_are_logged_before_during_and_after_training(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "eval_chrf" in r]
    assert steps == [0, 2, 4]  # before, at train.eval_every=2, after
    assert all("eval_answer_chars" in r for r in rows if "eval_chrf" in r)  # the user's own metric
    after = json.loads((run / "eval_after.json").read_text())
    assert set(after["scores"]) == {"chrf", "answer_chars"} and len(after["scores"]["chrf"]["ci95"]) == 2
