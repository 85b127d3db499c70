"""Edge runtime benchmark: what importing the ORT training API costs with and without torch, and, per tier, the
ORT backend against the PyTorch backend training the same tier on the same real batches.

    python benchmarks/edge_bench.py --bundle runs/minilm-bundle --data ../shared/data/ag_news/ag_news_6000.csv
    python benchmarks/edge_bench.py --bundle B --data F --tiers 2,8 --steps 20 --repeats 2 --json

Every measurement is its own child process (peak RSS = VmHWM of that process alone). ORT and PyTorch children
alternate per tier (ORT, PyTorch, ORT, PyTorch, ...) so both see the same machine load; medians and per-pair ratios
are reported. This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import typer  # noqa: E402
from children import run_child  # noqa: E402  (benchmarks/children.py, beside this script)

AG_NEWS = dict(text_columns=("title", "description"), label_map={"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"})


def import_child(kind: str) -> None:
    """Child: import the ORT training API the stock way or fftmoe's way; print time, RSS and whether torch loaded."""
    from edge_runtime.measure import current_rss_mb

    start = time.perf_counter()
    if kind == "stock":
        import onnxruntime.training.api  # noqa: F401
    else:
        from edge_runtime.ort_backend import import_training_api

        import_training_api()
    print(json.dumps({"import_s": time.perf_counter() - start, "rss_mb": current_rss_mb(), "torch_loaded": "torch" in sys.modules}))


def train_child(bundle: Path, data: Path, backend: str, slots: int, batch: int, steps: int, threads: int, seq_len: int = 0) -> None:
    """Child: open a TierSession on ``backend`` and train ``steps`` steps on real batches; print step time and RSS."""
    from safetensors.numpy import load_file

    from edge_runtime.bundle import load_manifest
    from edge_runtime.data import DataSpec, TextEncoder, encode_examples, load_examples
    from edge_runtime.measure import current_rss_mb, peak_rss_mb
    from edge_runtime.session import TierSession
    from edge_runtime.update import default_assignment

    manifest = load_manifest(bundle)
    examples = load_examples(data, DataSpec(AG_NEWS["text_columns"], "label", AG_NEWS["label_map"]), manifest.labels)
    encoded = encode_examples(examples, TextEncoder(bundle / "tokenizer", seq_len or manifest.max_seq_len))
    session = TierSession(bundle, manifest, slots, backend, threads, verify=False)
    session.load(load_file(str(bundle / manifest.global_pool.path)), default_assignment(manifest, slots))
    load_rss = current_rss_mb()
    session.backend.set_learning_rate(1e-3)
    batches = encoded.batches(batch, shuffle=True, seed=0)
    times = []
    for i in range(steps + 1):
        inputs = session.inputs(next(batches))
        start = time.perf_counter()
        session.backend.train_step(inputs)
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    print(json.dumps({"step_time_s": float(np.median(times)), "load_rss_mb": load_rss, "peak_rss_mb": peak_rss_mb(),
                      "torch_loaded": "torch" in sys.modules}))  # fmt: skip


def main(
    bundle: Path = typer.Option(..., help="A bundle written by fftmoe-export (with labels World,Sports,Business,Sci/Tech)."),
    data: Path = typer.Option(..., help="AG News CSV (label,title,description)."),
    tiers: str = typer.Option("2,4,8", help="Tiers to measure."),
    batch: int = typer.Option(16, help="Batch size."),
    steps: int = typer.Option(10, help="Timed steps per child (median reported; one warm-up step before)."),
    threads: int = typer.Option(2, help="Threads for both backends."),
    repeats: int = typer.Option(2, help="ORT/PyTorch child pairs per tier."),
    seq_len: int = typer.Option(0, help="Tokens per row (0: the bundle's maximum)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    child: str = typer.Option(None, hidden=True),
) -> None:
    if child:
        kind, *rest = child.split(":")
        if kind == "import":
            return import_child(rest[0])
        return train_child(bundle, data, rest[0], int(rest[1]), batch, steps, threads, seq_len)
    imports = {k: [run_child([__file__, "--bundle", str(bundle), "--data", str(data), "--child", f"import:{k}"], threads)
                   for _ in range(repeats)] for k in ("stock", "fftmoe")}  # fmt: skip
    rows = []
    for slots in [int(t) for t in tiers.split(",")]:
        runs: dict[str, list[dict]] = {"ort": [], "torch": []}
        for i in range(repeats):
            for backend in ("ort", "torch"):
                print(f"  tier {slots}: {backend} child {i + 1}/{repeats}", file=sys.stderr)
                runs[backend].append(run_child([__file__, "--bundle", str(bundle), "--data", str(data), "--child",
                                             f"train:{backend}:{slots}", "--batch", str(batch), "--steps", str(steps),
                                             "--threads", str(threads)], threads))  # fmt: skip

        def med(b: str, key: str) -> float:
            return float(np.median([r[key] for r in runs[b]]))

        rows.append({
            "tier": slots, "ort_step_s": round(med("ort", "step_time_s"), 4), "torch_step_s": round(med("torch", "step_time_s"), 4),
            "step_ratio_ort_over_torch": round(med("ort", "step_time_s") / med("torch", "step_time_s"), 3),
            "step_ratios_per_pair": [round(a["step_time_s"] / b["step_time_s"], 3) for a, b in zip(runs["ort"], runs["torch"])],
            "ort_peak_rss_mb": round(med("ort", "peak_rss_mb"), 1), "torch_peak_rss_mb": round(med("torch", "peak_rss_mb"), 1),
            "ort_load_rss_mb": round(med("ort", "load_rss_mb"), 1), "torch_load_rss_mb": round(med("torch", "load_rss_mb"), 1),
            "ort_loaded_torch": any(r["torch_loaded"] for r in runs["ort"]),
        })  # fmt: skip
    result = {
        "bundle": str(bundle), "batch": batch, "steps": steps, "threads": threads, "repeats": repeats,
        "import": {k: {"import_s": round(float(np.median([r["import_s"] for r in v])), 2),
                       "rss_mb": round(float(np.median([r["rss_mb"] for r in v])), 1),
                       "torch_loaded": v[0]["torch_loaded"]} for k, v in imports.items()},
        "tiers": rows,
    }  # fmt: skip
    if json_out:
        print(json.dumps(result, indent=2))
        return
    imp = result["import"]
    print(f"\nimport onnxruntime.training.api: stock {imp['stock']['rss_mb']:.0f} MB, {imp['stock']['import_s']:.1f} s "
          f"(torch loaded: {imp['stock']['torch_loaded']}); fftmoe {imp['fftmoe']['rss_mb']:.0f} MB, "
          f"{imp['fftmoe']['import_s']:.1f} s (torch loaded: {imp['fftmoe']['torch_loaded']})")  # fmt: skip
    print(f"batch {batch}, real AG News rows, {threads} threads, median of {steps} steps, {repeats} alternating pairs")
    print("tier  ORT_step  PT_step  ORT/PT (pairs)          ORT_RSS  PT_RSS")
    for r in rows:
        print(f"{r['tier']:>4}  {r['ort_step_s']:>8.3f}  {r['torch_step_s']:>7.3f}  {r['step_ratio_ort_over_torch']:>6.2f} "
              f"{str(r['step_ratios_per_pair']):<16}  {r['ort_peak_rss_mb']:>7.0f}  {r['torch_peak_rss_mb']:>6.0f}")


if __name__ == "__main__":
    typer.run(main)
