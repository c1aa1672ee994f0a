"""Where a measurement script's report goes: REPORT.json (every figure) and REPORT.md (the tables)."""

from __future__ import annotations

from pathlib import Path

from training.reporting import write_report as write_files


def write_report(path: Path, report: dict, markdown: str) -> None:
    """Write ``path``.json and ``path``.md (creating the folder) and print the markdown."""
    write_files(path, report, markdown)
    print(markdown)
