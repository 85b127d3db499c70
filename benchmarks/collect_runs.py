"""Copy the figures of finished simulation runs into the repository (docs/results/<name>/<run>/).

Keeps what a reader needs to check a table (summary.json, metrics.jsonl, the references, the run settings and the
plan's partition summary) and leaves the bulky parts (client data, checkpoints, Flower's folders) behind.

    python benchmarks/collect_runs.py docs/results/2026-12-03-label-skew runs/skew/*-rf-la1-0.1-s*/
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT = ("summary.json", "metrics.jsonl", "reference-probe.json", "reference-central.json", "accuracy.png")
STATE_KEPT = ("run-settings.json",)


def collect(run: Path, dest: Path) -> list[str]:
    """Copy one run folder's kept files into ``dest``; return what was copied. A run without summary.json is refused."""
    if not (run / "summary.json").is_file():
        raise SystemExit(f"{run}: no summary.json (the run has not finished, or was not reported)")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in KEPT:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
            copied.append(name)
    for name in STATE_KEPT:
        if (run / "state" / name).is_file():
            shutil.copy2(run / "state" / name, dest / name)
            copied.append(name)
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    nodes = [{k: n.get(k) for k in ("name", "tier", "train_rows", "test_rows", "label_counts") if k in n} for n in plan["nodes"]]
    (dest / "partition.json").write_text(json.dumps({"settings": plan["settings"], "nodes": nodes}, indent=1) + "\n", encoding="utf-8")
    return [*copied, "partition.json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="docs/results/<name>")
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    args = parser.parse_args()
    for run in args.runs:
        print(run.name, ", ".join(collect(run, args.dest / run.name)))


if __name__ == "__main__":
    main()
