"""Per-rule job times and peak memory of a workflow run, from Snakemake's benchmark files.

Every costly rule writes ``results/<cohort>/benchmarks/<rule>[/<case>].tsv`` (Snakemake's ``benchmark:``
directive: wall seconds, peak resident memory in MiB, CPU seconds). This sums them per rule: what a
cluster user sets ``runtime`` and ``mem_mb`` from, and what the README's job times are measured with.

Example:
    python benchmarks/job_times.py results/demo/benchmarks --out benchmarks/results/job_times_demo.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def read_benchmarks(root: Path) -> dict[str, list[dict[str, float]]]:
    """``{rule: [row, ...]}`` from every ``*.tsv`` under ``root`` (rule = the first folder or the file's stem)."""
    by_rule: dict[str, list[dict[str, float]]] = {}
    for path in sorted(root.rglob("*.tsv")):
        rule = path.relative_to(root).parts[0].removesuffix(".tsv")
        with path.open() as f:
            for row in csv.DictReader(f, delimiter="\t"):
                by_rule.setdefault(rule, []).append(
                    {"s": float(row["s"]), "max_rss_mib": _number(row.get("max_rss")), "cpu_s": _number(row.get("cpu_time"))}
                )
    return by_rule


def _number(text: str | None) -> float:
    # Snakemake writes "-" where it could not measure (a job too short to sample).
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def summarise(by_rule: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Jobs, median and maximum wall seconds, total minutes and the largest peak memory, per rule."""
    summary = {}
    for rule, rows in sorted(by_rule.items()):
        seconds = [r["s"] for r in rows]
        rss = [r["max_rss_mib"] for r in rows if r["max_rss_mib"] == r["max_rss_mib"]]
        summary[rule] = {
            "jobs": len(rows),
            "median_s": round(statistics.median(seconds), 1),
            "max_s": round(max(seconds), 1),
            "total_min": round(sum(seconds) / 60, 1),
            "max_rss_mib": round(max(rss), 1) if rss else None,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a cohort's benchmarks folder: results/<cohort>/benchmarks")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    if not args.root.is_dir():
        parser.error(f"{args.root}: no such folder (a run of this version of the workflow writes it)")
    summary = summarise(read_benchmarks(args.root))
    print(f"{'rule':24s} {'jobs':>5s} {'median s':>9s} {'max s':>8s} {'total min':>10s} {'peak MiB':>9s}")
    for rule, s in summary.items():
        rss = "-" if s["max_rss_mib"] is None else f"{s['max_rss_mib']:.0f}"
        print(f"{rule:24s} {s['jobs']:5d} {s['median_s']:9.1f} {s['max_s']:8.1f} {s['total_min']:10.1f} {rss:>9s}")
    if args.out:
        args.out.write_text(json.dumps({"root": str(args.root), "rules": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
