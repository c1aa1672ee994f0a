"""Where a report named REPORT goes: REPORT.json (every figure) and REPORT.md (the tables)."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_SUFFIXES = (".json", ".md")


def report_file(report: Path, suffix: str) -> Path:
    """REPORT with ``suffix`` appended, so a dot in the name (``lr-0.1``) stays part of it.

    A name given with one of the report's own suffixes (``budget.md``) names the same report.
    """
    if report.suffix in REPORT_SUFFIXES:
        report = report.with_suffix("")
    return report.with_name(report.name + suffix)


def beside(checkpoint: Path, suffix: str) -> Path:
    """A file training writes beside its checkpoint: ``suffix`` in place of ``.pt``, or appended to a name
    without it, so that ``--out run/lr-0.1`` writes ``run/lr-0.1.summary.json``, not ``run/lr-0.summary.json``."""
    if checkpoint.suffix == ".pt":
        return checkpoint.with_suffix(suffix)
    return checkpoint.with_name(checkpoint.name + suffix)


def write_report(report: Path, figures: dict, markdown: str | None = None) -> None:
    """Write REPORT.json and, when given, REPORT.md, creating the folder."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report_file(report, ".json").write_text(json.dumps(figures, indent=2) + "\n")
    if markdown is not None:
        report_file(report, ".md").write_text(markdown)
