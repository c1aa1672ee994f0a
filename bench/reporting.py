"""Where a measurement script's report goes: REPORT.json (every figure) and REPORT.md (the tables)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(path: Path, report: dict, markdown: str) -> None:
    """Write ``path``.json and ``path``.md (creating the folder) and print the markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
