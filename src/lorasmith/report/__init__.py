"""The run report: one self-contained HTML page per run (`html.py`)."""

from lorasmith.report.html import DATA_STATS, REPORT, render, write_report

__all__ = ["DATA_STATS", "REPORT", "render", "write_report"]
