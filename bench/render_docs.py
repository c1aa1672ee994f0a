"""Fill the generated blocks of README.md and docs/*.md from the committed reports, never by hand.

    .venv/bin/python -m bench.render_docs          # rewrite the blocks
    .venv/bin/python -m bench.render_docs --check  # exit 1 if a page is out of date (the tests run this)

A generated block is everything between ``<!-- generated: SOURCE -->`` and ``<!-- /generated -->``.
SOURCE is a report file (``reports/benchmark.md``: its text without the title line) or one of the
tables built here from JSON reports: ``training-runs`` and ``presets`` (reports/training/*.json) and
``evaluation`` (reports/eval*/metrics.json). Every figure in a report carries its machine and date.
A block's headings are nested under the page's heading it sits in (a report's ``##`` becomes ``####`` below a
``###``), so a report reads the same on its own and inside any page.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
BLOCK = re.compile(r"(<!-- generated: (?P<source>\S+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)
HEADING = re.compile(r"^(#{1,6}) ")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def training_runs(reports: Path) -> str:
    """One row per training summary in reports/training/."""
    runs = [(p, json.loads(p.read_text())) for p in sorted((reports / "training").glob("*.json"))]
    if not runs:
        return "No training run recorded yet (reports/training/)."
    lines = [
        "| run | preset | variant | epochs | validation accuracy | wall time | machine | date |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for path, run in runs:
        date = str(run.get("date", ""))
        lines.append(
            f"| `{path.stem}` | {run.get('preset', '')} | {run.get('variant', '')} | {run.get('epochs', '')} "
            f"| {run['val_accuracy']:.2%} | {_duration(run['wall_time_s'])} | {run.get('machine', '')} | {date} |"
        )
    return "\n".join(lines)


def presets(reports: Path) -> str:
    """What each preset delivered: the range over its recorded runs, per machine."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted((reports / "training").glob("*.json")):
        run = json.loads(path.read_text())
        groups.setdefault((run.get("preset", "?"), run.get("machine", "?")), []).append(run)
    if not groups:
        return "No training run recorded yet (reports/training/)."
    lines = [
        "| preset | machine | runs | validation accuracy | wall time | epochs | dates |",
        "|---|---|---:|---:|---:|---:|---|",
    ]

    def span(values: list, fmt: Callable) -> str:
        low, high = min(values), max(values)
        return fmt(low) if low == high else f"{fmt(low)} – {fmt(high)}"

    for (preset, machine), runs in groups.items():
        dates = sorted({str(r.get("date", "?")) for r in runs})
        lines.append(
            f"| `{preset}` | {machine} | {len(runs)} | {span([r['val_accuracy'] for r in runs], '{:.2%}'.format)} "
            f"| {span([r['wall_time_s'] for r in runs], _duration)} | {span([r.get('epochs', 0) for r in runs], str)} "
            f"| {', '.join(dates)} |"
        )
    return "\n".join(lines)


def evaluation(reports: Path) -> str:
    """One block per evaluation report: reports/eval (the served checkpoint), then reports/eval-*."""
    folders = [f for f in [reports / "eval", *sorted(reports.glob("eval-*"))] if (f / "metrics.json").is_file()]
    if not folders:
        return "No evaluation report yet (reports/eval/)."
    blocks = []
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        where = folder.relative_to(reports.parent).as_posix()
        lines = [
            f"## `{where}`: {metrics.get('variant', '?')}, {metrics.get('dtype', '?')}",
            "",
            f"Accuracy **{metrics['accuracy']:.2%}** on {metrics['n']} images of `{metrics.get('data', '?')}`, "
            f"expected calibration error {metrics['ece']:.4f} (temperature {metrics['temperature']}); "
            f"engine {metrics.get('engine', 'torch')}, {metrics.get('machine', '?')}, {metrics.get('date', '?')}.",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in metrics["per_class"].items():
            lines.append(
                f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | {row['support']} |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


TABLES: dict[str, Callable[[Path], str]] = {
    "training-runs": training_runs,
    "presets": presets,
    "evaluation": evaluation,
}


def source_text(source: str, root: Path = ROOT) -> str:
    """What a block holds: a built table, or a report file without its title line."""
    if source in TABLES:
        return TABLES[source](root / "reports")
    path = root / source
    if not path.is_file():
        raise FileNotFoundError(f"generated block names {source}, which does not exist")
    lines = path.read_text().strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def markdown_headings(lines: list[str]) -> list[tuple[int, int]]:
    """(line index, level) of each Markdown heading, skipping fenced code (a shell comment is no heading)."""
    found, fenced = [], False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            found.append((index, len(match[1])))
    return found


def nest_headings(body: str, level: int) -> str:
    """``body`` with its headings shifted so that the shallowest is one below ``level`` (0: no heading above)."""
    lines = body.split("\n")
    found = markdown_headings(lines)
    if not found:
        return body
    shift = level + 1 - min(depth for _, depth in found)
    for index, depth in found:
        lines[index] = "#" * min(6, depth + shift) + lines[index][depth:]
    return "\n".join(lines)


def render(text: str, root: Path = ROOT) -> str:
    def fill(m: re.Match) -> str:
        above = markdown_headings(text[: m.start()].split("\n"))
        body = nest_headings(source_text(m["source"], root), above[-1][1] if above else 0)
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report pages that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        try:
            updated = render(text)
        except FileNotFoundError as exc:
            print(f"error: {page.relative_to(ROOT)}: {exc}", file=sys.stderr)
            return 2
        if updated != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(updated)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run .venv/bin/python -m bench.render_docs", file=sys.stderr)
        return 1
    if stale:
        print(f"rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
