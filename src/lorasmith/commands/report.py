"""`lorasmith report RUN`: (re)write the run's self-contained HTML report."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write runs/NAME/report.html: plots, before/after metrics and answers, data, environment (no network)",
    )
    p.add_argument("run", help="a run folder (runs/NAME)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorasmith.errors import LorasmithError
    from lorasmith.report import write_report
    from lorasmith.runs import RunFolder

    folder = RunFolder(Path(args.run))
    if not folder.status_file.is_file():
        raise LorasmithError(f"{args.run} is not a run folder (no run.json)", hint="give a folder under runs/")
    print(write_report(folder))
    return 0
