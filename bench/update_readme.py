"""Rewrite the README's "Measured results" block from the committed reports, never by hand.

    .venv/bin/python bench/update_readme.py          # rewrite README.md
    .venv/bin/python bench/update_readme.py --check  # exit 1 if README.md is out of date

Sources: reports/training/*.json (training summaries), reports/eval*/metrics.json,
reports/benchmark.json and reports/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def training_section(reports: Path) -> list[str]:
    runs = [json.loads(p.read_text()) for p in sorted((reports / "training").glob("*.json"))]
    if not runs:
        return ["No training run recorded yet (reports/training/)."]
    lines = [
        "| preset | variant | epochs | validation accuracy | wall time | machine | run |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for run in runs:
        lines.append(f"| {run['preset']} | {run['variant']} | {run.get('epochs', '')} | {run['val_accuracy']:.2%} "
                     f"| {_duration(run['wall_time_s'])} | {run.get('machine', '')} "
                     f"| {run.get('note', '')} |")  # fmt: skip
    return lines


def eval_section(reports: Path) -> list[str]:
    """One block per evaluation report: reports/eval (the served checkpoint), then reports/eval-*."""
    folders = [f for f in [reports / "eval", *sorted(reports.glob("eval-*"))] if (f / "metrics.json").is_file()]
    if not folders:
        return ["No evaluation report yet (reports/eval/)."]
    lines: list[str] = []
    for folder in folders:
        metrics = _load(folder / "metrics.json")
        where = folder.relative_to(reports.parent).as_posix()
        lines += [
            f"#### `{where}`: {metrics.get('variant', '?')}, {metrics.get('dtype', '?')}",
            "",
            f"Accuracy **{metrics['accuracy']:.2%}** on {metrics['n']} images of `{metrics.get('data', '?')}`, "
            f"expected calibration error {metrics['ece']:.4f} (temperature {metrics['temperature']}).",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in metrics["per_class"].items():
            lines.append(
                f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | {row['support']} |"
            )
        lines += ["", f"![Confusion matrix]({where}/confusion_matrix.png)", ""]
    return lines[:-1]


def benchmark_section(reports: Path) -> list[str]:
    paths = [reports / "benchmark.json", *sorted(reports.glob("benchmark-*/benchmark.json"))]
    benches = [bench for bench in map(_load, paths) if bench]
    if not benches:
        return ["No benchmark report yet (reports/benchmark.json)."]
    lines = []
    for path, bench in zip(paths, benches):
        lines += [f"#### `{path.relative_to(reports.parent)}`", "", *one_benchmark(bench), ""]
    return lines[:-1]


def one_benchmark(bench: dict) -> list[str]:
    ip = bench["in_process"]
    lines = [
        f"Model `{ip['variant']}` from `{Path(bench['checkpoint']).name}`, {ip['dtype']}. "
        f"Machine: {bench['machine']['cpu']}, {bench['machine']['cores']} cores, {bench['date']}. "
        f"Machine's limit: **{ip['limit']['images_per_s']} img/s** ({ip['limit']['from']}); "
        f"batch-1 forward {ip['batch1_forward_p50_ms']} ms.",
        "",
        f"With {ip.get('worker_threads', ip['threads'])} torch thread(s), as each worker runs: "
        + ", ".join(f"batch {b}: {r} img/s" for b, r in ip.get("images_per_s_by_batch_worker_threads", {}).items())
        + f". Server: {bench['server_settings']}."
        + (
            f" This layout, compute only ({side['processes']} x {side['threads']} thread(s) at batch {side['batch']}"
            f" side by side, no server): {side['images_per_s']} img/s."
            if (side := ip.get("side_by_side"))
            else ""
        ),
        "",
        "| concurrency | images/s | p50 ms | p90 ms | p99 ms | errors | cores busy: frontend / workers / client |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in bench["served"]:
        cores = " / ".join(str(r.get("cpu_cores", {}).get(k, "?")) for k in ("frontend", "workers", "client"))
        lines.append(f"| {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} "
                     f"| {r['errors']} | {cores} |")  # fmt: skip
    floor = bench["worker_round_trip"]
    lines += ["", f"TorchServe's round trip with no model work (describe through a worker, c=1): "
                  f"p50 {floor['p50_ms']} ms, p99 {floor['p99_ms']} ms."]  # fmt: skip
    lines += ["", "| target | wanted | measured | met | best any server could measure here |", "|---|---|---|---|---|"]
    for c in bench["checks"]:
        lines.append(f"| {c['check']} | {c['target']} | {c['measured']} | {'yes' if c['met'] else 'no'} "
                     f"| {c.get('bound') or ''} |")  # fmt: skip
    return lines


def render(reports: Path = ROOT / "reports") -> str:
    parts = [START, "", "### Training", "", *training_section(reports), "", "### Evaluation", "",
             *eval_section(reports), "", "### Serving benchmark (`bench/benchmark.py`)", "",
             *benchmark_section(reports), "", "### Reliability (`bench/reliability.py`)", ""]  # fmt: skip
    reliability = reports / "reliability.md"
    if reliability.is_file():
        body = reliability.read_text().strip().splitlines()
        parts += [line for line in body if not line.startswith("# ")]
    else:
        parts.append("No reliability report yet (reports/reliability.md).")
    return "\n".join([*parts, "", END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"error: README.md lacks the {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    updated = head + render() + rest.split(END, 1)[1]
    if args.check:
        if updated != text:
            print("README.md results are out of date: run .venv/bin/python bench/update_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
