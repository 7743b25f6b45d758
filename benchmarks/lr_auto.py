"""Evidence for `train.lr: auto`: four generated tasks of different shapes, each trained at fixed rates
and with `auto`, on the embedded SmolLM2-135M-Instruct; held-out exact match and validation loss.

    .venv/bin/python benchmarks/lr_auto.py [--train 300] [--val 50] [--rates 1e-4,3e-4,1e-3,2e-3,auto]

Tasks (all from fixed seeds):
- extraction: the demo's order sentences -> one JSON line (a few two-turn conversations);
- labels: a support ticket -> `category=...; priority=...` under a triage system prompt (short answers);
- letter: an order -> a fixed-form confirmation letter of ~60 words (long free-form answers);
- running: three user turns adding items to a basket; the last answer is the basket's total (multi-turn).
Prints a markdown table; writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORIES = {
    "billing": ["I was charged twice for my {x}", "my invoice for the {x} is wrong", "refund for the {x} please"],
    "bug": ["the app crashes when I open the {x}", "the {x} page shows an error", "cannot save the {x}, it freezes"],
    "account": ["I cannot log in to see my {x}", "reset my password, the {x} is locked", "change the email on my {x}"],
    "shipping": ["my {x} has not arrived", "the {x} was delivered to the wrong address", "tracking for the {x} is stuck"],
}
URGENT = ["asap", "urgent", "today please", "this is blocking us"]
THINGS = ["subscription", "order", "laptop", "report", "dashboard", "parcel", "monitor", "plan"]
TRIAGE = "You triage support tickets. Answer exactly as category=<billing|bug|account|shipping>; priority=<low|high>."
PRICES = {"apple": 2, "bread": 3, "cheese": 7, "milk": 1, "coffee": 9, "tea": 4}


def labels(rng: random.Random) -> dict:
    category = rng.choice(list(CATEGORIES))
    text = rng.choice(CATEGORIES[category]).format(x=rng.choice(THINGS))
    high = rng.random() < 0.4
    if high:
        text += f", {rng.choice(URGENT)}"
    answer = f"category={category}; priority={'high' if high else 'low'}"
    return {
        "messages": [
            {"role": "system", "content": TRIAGE},
            {"role": "user", "content": text[0].upper() + text[1:] + "."},
            {"role": "assistant", "content": answer},
        ]
    }


def letter(rng: random.Random) -> dict:
    from lorasmith.data.demo import FIRST, LAST

    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    item, qty, day = rng.choice(THINGS), rng.randint(2, 9), rng.randint(1, 28)
    prompt = f"Write the confirmation letter for {name}: {qty} x {item}, delivery on day {day}."
    answer = (
        f"Dear {name},\n\nThank you for your order of {qty} {item}s. We confirm that your order has been received and "
        f"is being prepared by our team. Delivery is planned for day {day} of this month, and you will receive a "
        f"message on the morning of delivery. If anything about the {item}s is not right, reply to this letter and "
        "we will put it right at no cost.\n\nKind regards,\nThe Orders Team"
    )
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def running(rng: random.Random) -> dict:
    messages, total = [], 0
    for _ in range(3):
        item, qty = rng.choice(list(PRICES)), rng.randint(1, 5)
        total += qty * PRICES[item]
        messages.append({"role": "user", "content": f"Add {qty} {item} to my basket."})
        messages.append({"role": "assistant", "content": f"Added. Total: {total} euros."})
    messages.insert(0, {"role": "system", "content": f"Prices in euros: {json.dumps(PRICES)}. Keep a running total."})
    return {"messages": messages}


def write_task(name: str, folder: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    if name == "extraction":
        from lorasmith.data.demo import generate

        train, val = generate(n_train=n_train, n_val=n_val, seed=11)
    else:
        make = {"labels": labels, "letter": letter, "running": running}[name]
        rng = random.Random(f"lr-bench:{name}")
        rows = [make(rng) for _ in range(n_train + n_val)]
        train, val = rows[:n_train], rows[n_train:]
    paths = []
    for split, rows in (("train", train), ("val", val)):
        path = folder / f"{name}-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def run(task: str, rate: str, train: Path, val: Path, out: Path) -> dict:
    name = f"{task}-{rate}"
    cmd = [sys.executable, "-m", "lorasmith", "train", f"data.train={train}", f"data.val={val}", f"output.dir={out}"]
    cmd += [f"output.name={name}", f"train.lr={rate}", "eval.exact_match=-1", "eval.samples=0", "eval.max_new_tokens=128"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"task": task, "rate": rate, "error": proc.stderr.strip().splitlines()[-1]}
    after = json.loads((out / name / "eval_after.json").read_text())
    result = {
        "task": task,
        "rate": rate,
        "exact_match": after.get("exact_match"),
        "val_loss": after.get("loss"),
        "seconds": round(time.monotonic() - t0),
    }
    test = out / name / "lr_range_test.json"
    if test.is_file():
        found = json.loads(test.read_text())
        result.update(chosen=found["chosen"], test_seconds=found["seconds"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="extraction,labels,letter,running")
    ap.add_argument("--rates", default="1e-4,3e-4,1e-3,2e-3,auto")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=50)
    ap.add_argument("--out", default="bench-results/lr-auto")
    args = ap.parse_args()
    from lorasmith.models.probe import cpu_name

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            train, val = write_task(task, Path(tmp), args.train, args.val)
            for rate in args.rates.split(","):
                results.append(run(task, rate, train, val, out / "runs"))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"machine: {cpu_name()}; {args.train} train / {args.val} held-out conversations per task, 1 epoch, batch 8\n")
    rates = args.rates.split(",")
    print("| task | " + " | ".join(rates) + " |")
    print("|---" * (len(rates) + 1) + "|")
    for task in args.tasks.split(","):
        cells = []
        for rate in rates:
            r = next(x for x in results if x["task"] == task and x["rate"] == rate)
            if "error" in r:
                cells.append("error")
                continue
            chosen = f" (lr {r['chosen']:.2g}, test {r['test_seconds']:.0f} s)" if "chosen" in r else ""
            cells.append(f"{r['exact_match']:.0%} / {r['val_loss']:.3f}{chosen}")
        print(f"| {task} | " + " | ".join(cells) + " |")
    print("\nEach cell: held-out exact match / validation loss after training.")


if __name__ == "__main__":
    main()
