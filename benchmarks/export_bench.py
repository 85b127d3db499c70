"""Exporter benchmark: per tier, export time, artifact sizes, ORT vs PyTorch eager training step, peak RSS.

    python benchmarks/export_bench.py --tiers 2,4,8            # MiniLM, batch 16 x 64, 2 threads
    python benchmarks/export_bench.py --model DIR --json

Each training measurement runs in its own child process, so peak RSS is that of a process doing only that: the ORT
child never imports torch (as on a device), the PyTorch child trains the same tier (same weights, batch and AdamW)
in eager mode. ORT and PyTorch children alternate per tier, in one run, and the figures are reported as ratios.
A further child per tier alternates ORT and PyTorch steps inside one process and reports the median of the
per-round ratios: on a shared machine whose speed swings by 2-3x within minutes, that is the ratio to quote.
This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import typer  # noqa: E402
from children import run_child  # noqa: E402  (benchmarks/children.py, beside this script)


def torch_step(bundle: Path, slots: int, batch: int, seq_len: int, threads: int, steps: int) -> None:
    """Child: PyTorch eager AdamW steps of one tier; prints step time and peak RSS as JSON."""
    import torch

    from edge_runtime.bundle import load_manifest
    from edge_runtime.measure import BatchSpec, current_rss_mb, peak_rss_mb
    from exporter.check import torch_model

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  # part of what the PyTorch path imports; counted in import_rss_mb

    import_rss = current_rss_mb()
    manifest = load_manifest(bundle)
    model = torch_model(bundle, manifest, slots).train()
    load_rss = current_rss_mb()
    spec = BatchSpec("text", batch, seq_len, manifest.num_layers, slots, len(manifest.labels), model.encoder.config.vocab_size)
    inputs = [torch.from_numpy(x) for x in spec.make()]
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-3)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad()
        model(*inputs)[0].backward()
        opt.step()
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    print(json.dumps({"step_time_s": float(np.median(times)), "torch_loaded": True, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": import_rss, "load_rss_mb": load_rss}))


def interleaved_step(bundle: Path, slots: int, batch: int, seq_len: int, threads: int, steps: int) -> None:
    """Child: ORT and PyTorch steps of one tier alternating in one process (the order swapped every round), so that
    each ratio compares two steps taken seconds apart under the same machine load; prints medians as JSON.

    Neither runtime's idle threads may busy-wait here (ORT's allow_spinning off, OMP_WAIT_POLICY=PASSIVE), or the
    one that just ran would take cores from the other: that alone made PyTorch steps 2-3x slower in this child.
    """
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads its OpenMP runtime
    import torch

    from edge_runtime.bundle import load_manifest, tier_file_paths
    from edge_runtime.measure import BatchSpec
    from edge_runtime.ort_backend import OrtTierSession
    from exporter.check import torch_model

    torch.set_num_threads(threads)
    manifest = load_manifest(bundle)
    model = torch_model(bundle, manifest, slots).train()
    spec = BatchSpec("text", batch, seq_len, manifest.num_layers, slots, len(manifest.labels), model.encoder.config.vocab_size)
    batch_np = spec.make()
    batch_pt = [torch.from_numpy(x) for x in batch_np]
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-3)
    ort = OrtTierSession(tier_file_paths(bundle / "tiers" / f"t{slots}"), threads=threads, spinning=False)

    def pt_step() -> None:
        opt.zero_grad()
        model(*batch_pt)[0].backward()
        opt.step()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    ort_t, pt_t = [], []
    for i in range(steps + 1):
        if i % 2 == 0:
            o, p = timed(lambda: ort.train_step(batch_np)), timed(pt_step)
        else:
            p, o = timed(pt_step), timed(lambda: ort.train_step(batch_np))
        if i:  # round 0 is warm-up
            ort_t.append(o)
            pt_t.append(p)
    ratios = np.array(ort_t) / np.array(pt_t)
    print(json.dumps({"ort_step_s": float(np.median(ort_t)), "torch_step_s": float(np.median(pt_t)),
                      "ratio_median": float(np.median(ratios)), "ratio_q1": float(np.quantile(ratios, 0.25)),
                      "ratio_q3": float(np.quantile(ratios, 0.75))}))  # fmt: skip


def main(
    tiers: str = typer.Option("2,4,8", help="Tiers to export and measure."),
    model: str = typer.Option(None, help="Encoder folder or hub id (default: the offline MiniLM)."),
    batch: int = typer.Option(16, help="Reference batch size."),
    seq_len: int = typer.Option(64, help="Reference sequence length."),
    threads: int = typer.Option(2, help="Threads for both backends."),
    steps: int = typer.Option(10, help="Timed steps per measurement (median reported; one warm-up step before)."),
    out: Path = typer.Option(None, help="Bundle folder (default: a temporary folder, deleted afterwards)."),
    bundle_in: Path = typer.Option(None, "--bundle", help="Measure this existing bundle instead of exporting one."),
    repeats: int = typer.Option(2, help="ORT and PyTorch children per tier, alternating (ORT, PyTorch, ORT, ...); medians reported."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    torch_child: str = typer.Option(None, hidden=True),
    interleaved_child: str = typer.Option(None, hidden=True),
) -> None:
    """Per tier: export time, artifact sizes, ORT vs PyTorch training step and peak RSS (see the module docstring)."""
    if torch_child:
        bundle, slots = torch_child.rsplit(":", 1)
        return torch_step(Path(bundle), int(slots), batch, seq_len, threads, steps)
    if interleaved_child:
        bundle, slots = interleaved_child.rsplit(":", 1)
        return interleaved_step(Path(bundle), int(slots), batch, seq_len, threads, steps)

    from exporter.config import MoEAdapterConfig, parse_tiers
    from exporter.export import ExportOptions, export_bundle

    tier_list = parse_tiers(tiers, 8)
    tmp = None if (out or bundle_in) else tempfile.TemporaryDirectory(prefix="fftmoe-bench-")
    bundle = bundle_in or out or Path(tmp.name) / "bundle"

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr)

    export_s: dict[int, float | None] = {t: None for t in tier_list}
    total_export = None
    if bundle_in is None:
        opts = ExportOptions(
            out=bundle, tiers=tier_list, adapter=MoEAdapterConfig(), model=model, num_labels=4, max_seq_len=max(seq_len, 64),
            force=True, measure=True, measure_batch=batch, measure_seq_len=seq_len, measure_threads=threads, measure_steps=steps,
        )  # fmt: skip
        start = time.perf_counter()
        _, reports = export_bundle(opts, progress)
        total_export = round(time.perf_counter() - start, 1)
        export_s = {r.slots: round(r.export_s, 1) for r in reports}
    from edge_runtime.bundle import load_manifest
    from exporter.check import gradient_check
    from exporter.model import load_encoder

    manifest = load_manifest(bundle)
    encoder = load_encoder(model or (manifest.model.source if bundle_in else None))[0]
    rows = []
    for slots in tier_list:
        tier = manifest.tier(slots)
        print(f"  tier {slots}: gradients against PyTorch autograd", file=sys.stderr)
        grad = gradient_check(bundle, slots, encoder=encoder, batch=4, seq_len=24)
        ort_runs, pt_runs = [], []
        for i in range(repeats):  # alternate, so that both backends see the same machine load
            print(f"  tier {slots}: ORT child {i + 1}/{repeats}, PyTorch child {i + 1}/{repeats}", file=sys.stderr)
            ort_runs.append(run_child(["-m", "edge_runtime.measure", str(bundle / Path(tier.files["checkpoint"].path).parent),
                                    "--batch-size", str(batch), "--seq-len", str(seq_len), "--num-layers", str(manifest.num_layers),
                                    "--slots", str(slots), "--num-labels", str(len(manifest.labels)),
                                    "--vocab-size", str(encoder.config.vocab_size), "--threads", str(threads),
                                    "--steps", str(steps)], threads))  # fmt: skip
            pt_runs.append(run_child([__file__, "--torch-child", f"{bundle}:{slots}", "--batch", str(batch), "--seq-len", str(seq_len),
                                   "--threads", str(threads), "--steps", str(steps)], threads))  # fmt: skip

        print(f"  tier {slots}: ORT and PyTorch steps interleaved in one child", file=sys.stderr)
        inter = run_child([__file__, "--interleaved-child", f"{bundle}:{slots}", "--batch", str(batch), "--seq-len", str(seq_len),
                           "--threads", str(threads), "--steps", str(steps)], threads)  # fmt: skip

        def med(runs: list[dict], key: str) -> float:
            return float(np.median([r[key] for r in runs]))

        o_step, p_step = med(ort_runs, "step_time_s"), med(pt_runs, "step_time_s")
        o_rss, p_rss = med(ort_runs, "peak_rss_mb"), med(pt_runs, "peak_rss_mb")
        rows.append({
            "tier": slots, "trainable_params": tier.trainable_params, "export_s": export_s.get(slots),
            "artifact_mb": {k: round(f.size / 1e6, 2) for k, f in tier.files.items()},
            "ort_step_s": round(o_step, 4), "torch_step_s": round(p_step, 4),
            "step_ratio_ort_over_torch": round(o_step / p_step, 3),
            "step_ratios_per_pair": [round(a["step_time_s"] / b["step_time_s"], 3) for a, b in zip(ort_runs, pt_runs)],
            "interleaved": {k: round(v, 3) for k, v in inter.items()},
            "ort_peak_rss_mb": round(o_rss, 1), "torch_peak_rss_mb": round(p_rss, 1),
            "rss_ratio_ort_over_torch": round(o_rss / p_rss, 3),
            "ort_rss_stages_mb": {k: round(med(ort_runs, f"{k}_rss_mb"), 1) for k in ("import", "load", "peak")},
            "torch_rss_stages_mb": {k: round(med(pt_runs, f"{k}_rss_mb"), 1) for k in ("import", "load", "peak")},
            "ort_child_loaded_torch": any(r["torch_loaded"] for r in ort_runs),
            "worst_relative_gradient_error": float(f"{grad.worst_error:.2e}"),
        })  # fmt: skip
    result = {
        "model": manifest.model.source, "batch": batch, "seq_len": seq_len, "threads": threads, "steps": steps,
        "total_export_s": total_export, "repeats": repeats, "tiers": rows,
    }  # fmt: skip
    if tmp:
        tmp.cleanup()
    if json_out:
        print(json.dumps(result, indent=2))
        return
    print(f"\nmodel {result['model']}, batch {batch} x {seq_len}, {threads} threads, median of {steps} steps")
    print("ORT/PT (sep.): ratio of the medians of separate children; ORT/PT (int.): median of per-round ratios with")
    print("both backends alternating in one process, [quartiles] -- the one less exposed to the machine's load swings")
    print("tier  params     export_s  ckpt_MB  train_MB  ORT_step  PT_step  ORT/PT (sep.)  ORT/PT (int.)       ORT_RSS  PT_RSS  RSS ORT/PT  grad_err")
    for r in rows:
        a, i = r["artifact_mb"], r["interleaved"]
        print(
            f"{r['tier']:>4}  {r['trainable_params']:>9,}  {'-' if r['export_s'] is None else r['export_s']:>8}  {a['checkpoint']:>7}  {a['training_model']:>8}  "
            f"{r['ort_step_s']:>8.3f}  {r['torch_step_s']:>7.3f}  {r['step_ratio_ort_over_torch']:>13.2f}  "
            f"{i['ratio_median']:>5.2f} [{i['ratio_q1']:.2f}, {i['ratio_q3']:.2f}]  "
            f"{r['ort_peak_rss_mb']:>7.0f}  {r['torch_peak_rss_mb']:>6.0f}  {r['rss_ratio_ort_over_torch']:>10.2f}  "
            f"{r['worst_relative_gradient_error']:.1e}"
        )
    print("\nresident memory by stage, MB (import = runtime imported, load = model/sessions loaded, peak = after training)")
    for r in rows:
        o, t = r["ort_rss_stages_mb"], r["torch_rss_stages_mb"]
        print(f"tier {r['tier']}: ORT {o['import']:.0f} / {o['load']:.0f} / {o['peak']:.0f}   "
              f"PyTorch {t['import']:.0f} / {t['load']:.0f} / {t['peak']:.0f}   ORT child loaded torch: {r['ort_child_loaded_torch']}")


if __name__ == "__main__":
    typer.run(main)
