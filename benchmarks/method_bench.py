"""Per-step cost of each method's tiers, side by side: FFT-MoE's experts against the LoRA baselines (FedIT, HetLoRA),
trained by the same edge runtime (ONNX Runtime) on the same real AG News batches.

    python benchmarks/method_bench.py --bundle runs/minilm-bundle --bundle runs/hetlora-bundle --bundle runs/fedit-bundle \\
        --data ../shared/data/ag_news/ag_news_6000.csv --seq-len 64 --threads 1

Each (bundle, tier) is a child process of its own (benchmarks/children.py). The children run round-robin over all
(bundle, tier) pairs, ``--repeats`` times, so every pair sees the same spread of machine load; the table gives the
median step time, its ratio to the first bundle's smallest tier measured in the same repeat, the trainable
parameters and the peak RSS. A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import typer  # noqa: E402
from children import run_child  # noqa: E402

EDGE_BENCH = str(Path(__file__).with_name("edge_bench.py"))


def main(
    bundle: list[Path] = typer.Option(..., help="Bundles to compare (repeat the option); the first is the reference."),
    data: Path = typer.Option(..., help="AG News CSV (label,title,description)."),
    seq_len: int = typer.Option(64, help="Tokens per row (the simulations use --max-seq-len 64)."),
    batch: int = typer.Option(16, help="Batch size."),
    steps: int = typer.Option(8, help="Timed steps per child (median; one warm-up step before)."),
    threads: int = typer.Option(1, help="ORT threads per child (a simulation's virtual device uses 1)."),
    repeats: int = typer.Option(2, help="Round-robin passes over all (bundle, tier) pairs."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    from edge_runtime.bundle import load_manifest

    pairs = [(b, t) for b in bundle for t in sorted(load_manifest(b).tiers)]
    runs: dict[tuple[Path, int], list[dict]] = {p: [] for p in pairs}
    for i in range(repeats):
        for b, t in pairs:
            print(f"  pass {i + 1}/{repeats}: {b.name} tier {t}", file=sys.stderr)
            runs[(b, t)].append(run_child([EDGE_BENCH, "--bundle", str(b), "--data", str(data), "--child", f"train:ort:{t}",
                                           "--batch", str(batch), "--steps", str(steps), "--threads", str(threads),
                                           "--seq-len", str(seq_len)], threads))  # fmt: skip
    ref = pairs[0]
    rows = []
    for b, t in pairs:
        m = load_manifest(b)
        step = [r["step_time_s"] for r in runs[(b, t)]]
        ratios = [r["step_time_s"] / q["step_time_s"] for r, q in zip(runs[(b, t)], runs[ref])]
        rows.append({"bundle": b.name, "method": m.method, "tier": t, "rank": m.tier(t).rank,
                     "trainable_params": m.tier(t).trainable_params, "step_s": round(float(np.median(step)), 3),
                     "ratio_to_ref": round(float(np.median(ratios)), 2), "ratios_per_pass": [round(x, 2) for x in ratios],
                     "peak_rss_mb": round(float(np.median([r["peak_rss_mb"] for r in runs[(b, t)]])), 0)})  # fmt: skip
    result = {"batch": batch, "seq_len": seq_len, "steps": steps, "threads": threads, "repeats": repeats,
              "reference": f"{ref[0].name} tier {ref[1]}", "rows": rows}  # fmt: skip
    if json_out:
        print(json.dumps(result, indent=2))
        return
    print(f"batch {batch} x {seq_len} tokens of real AG News, ORT, {threads} thread(s), median of {steps} steps, {repeats} round-robin passes")
    print(f"{'bundle':<22} {'method':<8} {'tier':>4} {'rank':>4} {'params':>10} {'step s':>7} {'x ref':>6}  per pass      {'peak MB':>7}")
    for r in rows:
        print(f"{r['bundle']:<22} {r['method']:<8} {r['tier']:>4} {r['rank'] or '-':>4} {r['trainable_params']:>10,} {r['step_s']:>7.3f} "
              f"{r['ratio_to_ref']:>6.2f}  {str(r['ratios_per_pass']):<13} {r['peak_rss_mb']:>7.0f}")


if __name__ == "__main__":
    typer.run(main)
