"""Measure this device (or read a board profile) and choose the largest tier that fits it.

The manifest holds, per tier, the ORT step time and resident memory measured on the exporting machine at a
reference batch, with the compute rate of that machine. A tier's figures on this device are scaled from those:

- memory: ``load + (peak - load) * (batch / ref_batch) * (seq_len / ref_seq_len)``, where ``load`` is the
  resident memory with the sessions loaded and ``peak - load`` the activations and gradients of a step, which grow
  with the tokens of a batch; ``seq_len`` is the longest row the device will feed (the bundle's maximum unless
  the device truncates shorter), so the estimate holds for the worst batch;
  with the PyTorch backend, the larger of that times ``TORCH_MEMORY_FACTOR`` (the benchmark's PyTorch/ORT peak
  ratio at the reference batch) and that plus ``TORCH_LIBRARY_MB`` (what torch, transformers and the eager model
  hold before a step, beyond ORT: a fixed cost that a ratio understates at small batches);
- step time: ``step * (ref_gflops / device_gflops) * (batch / ref_batch)``, with ``ref_gflops`` the median of the
  rates recorded with the tiers.

A tier fits when its expected memory is within the budget: the available memory (or ``--max-memory`` when
smaller) minus a safety margin of ``SAFETY_MARGIN`` of it (at least ``MIN_HEADROOM_MB``). The largest tier that
fits at the requested batch size wins; when none does, the batch is halved (down to ``MIN_BATCH``) and the
choice is tried again; when still none fits, the device is refused with the shortfall named.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from devices import DeviceProfile
from edge_runtime.bundle import Manifest

SAFETY_MARGIN = 0.15
MIN_HEADROOM_MB = 64.0
MIN_BATCH = 4
TORCH_MEMORY_FACTOR = 1.75
"""PyTorch-backend peak RSS over the ORT backend's: 1.75 / 1.66 / 1.60 for MiniLM tiers 2 / 4 / 8 (docs/exporter.md)."""
TORCH_LIBRARY_MB = 270.0
"""PyTorch-backend RSS with a MiniLM tier loaded, before a step, less ORT's: 266 / 243 / 232 MB for tiers 2 / 4 / 8
(2026-11-25, benchmarks/edge_bench.py, docs/raspberry-pi.md). It does not shrink with the batch, so at batch 4 the
ratio alone fell below the loaded PyTorch model's own size."""


class TierChoiceError(RuntimeError):
    """No tier of the bundle fits this device; the message names the shortfall."""


def measure_gflops(seconds: float = 1.0, n: int = 384) -> float:
    """Sustained fp32 matrix-multiply rate of this CPU (all cores, numpy's BLAS), in GFLOP/s.

    ``n`` = 384 is MiniLM's hidden size: the sizes the adapter and encoder actually multiply.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n * 4, n), dtype=np.float32)
    b = rng.standard_normal((n, n * 4), dtype=np.float32)
    a @ b  # warm up the BLAS threads
    flops, start = 0.0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        flops += 2.0 * (n * 4) * n * (n * 4)
    return flops / elapsed / 1e9


def measure_device(compute_seconds: float = 1.0) -> DeviceProfile:
    """This machine's memory (psutil), cores, frequency and a short compute measurement."""
    import psutil

    vm = psutil.virtual_memory()
    freq = psutil.cpu_freq()
    from edge_runtime.ort_backend import ort_build

    return DeviceProfile(
        name=platform.node() or "this-device",
        description=f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
        arch=platform.machine(),
        cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        max_freq_mhz=float(freq.max or freq.current) if freq else 0.0,
        memory_total_mb=vm.total / 2**20,
        memory_available_mb=vm.available / 2**20,
        compute_gflops=measure_gflops(compute_seconds),
        ort_training_wheel=ort_build().training_api,
        measured=True,
    )


@dataclass(frozen=True)
class TierEstimate:
    slots: int
    batch_size: int
    memory_mb: float | None  # None: the bundle holds no measurement for this tier
    step_time_s: float | None
    fits: bool
    reason: str


@dataclass(frozen=True)
class TierChoice:
    slots: int
    batch_size: int
    budget_mb: float
    backend: str
    estimates: list[TierEstimate]
    reason: str


def memory_budget(device: DeviceProfile, max_memory_mb: float | None) -> float:
    available = device.memory_available_mb if max_memory_mb is None else min(device.memory_available_mb, max_memory_mb)
    return available - max(available * SAFETY_MARGIN, MIN_HEADROOM_MB)


def reference_gflops(manifest: Manifest) -> float | None:
    """The exporting machine's compute rate: the median over the tiers' measurements (one noisy reading of a
    shared machine must not skew a tier's step-time estimate)."""
    rates = [t.measured.compute_gflops for t in manifest.tiers.values() if t.measured and t.measured.compute_gflops]
    return float(np.median(rates)) if rates else None


def estimate(
    manifest: Manifest, slots: int, device: DeviceProfile, backend: str, batch: int, budget_mb: float, seq_len: int | None = None
) -> TierEstimate:
    """Expected peak memory and step time of a tier on ``device`` at ``batch`` x ``seq_len`` tokens, and whether it
    fits. ``seq_len`` defaults to the bundle's maximum (the worst case: a batch holding one row that long)."""
    m = manifest.tier(slots).measured
    if m is None:
        return TierEstimate(slots, batch, None, None, False, "no measurement in the bundle (exported with --no-measure)")
    seq = seq_len or manifest.max_seq_len
    scale = (batch / m.batch_size) * (seq / m.seq_len if manifest.model.modality == "text" else 1.0)
    load = m.load_rss_mb if m.load_rss_mb is not None else m.peak_rss_mb
    memory = load + max(m.peak_rss_mb - load, 0.0) * scale
    if backend == "torch":
        memory = max(memory * TORCH_MEMORY_FACTOR, memory + TORCH_LIBRARY_MB)
    step = None
    ref_gflops = reference_gflops(manifest)
    if ref_gflops:
        step = m.step_time_s * (ref_gflops / device.compute_gflops) * scale
    fits = memory <= budget_mb
    reason = f"needs ~{memory:.0f} MB, budget {budget_mb:.0f} MB" + ("" if fits else f": short by {memory - budget_mb:.0f} MB")
    return TierEstimate(slots, batch, memory, step, fits, reason)


def choose_tier(
    manifest: Manifest,
    device: DeviceProfile,
    backend: str = "ort",
    batch_size: int = 16,
    max_memory_mb: float | None = None,
    tier: int | None = None,
    seq_len: int | None = None,
) -> TierChoice:
    """The largest tier that fits the device's memory budget (see the module docstring for the rule)."""
    budget = memory_budget(device, max_memory_mb)
    tiers = sorted(manifest.tiers, reverse=True)
    if tier is not None:
        manifest.tier(tier)  # names the tiers the bundle has when it lacks this one
        estimates = [estimate(manifest, t, device, backend, batch_size, budget, seq_len) for t in tiers]
        return TierChoice(tier, batch_size, budget, backend, estimates, f"tier {tier} set with --tier (no memory check)")
    batch = batch_size
    while True:
        estimates = [estimate(manifest, t, device, backend, batch, budget, seq_len) for t in tiers]
        for e in estimates:
            if e.fits:
                why = f"largest tier that fits: {e.reason}"
                if batch != batch_size:
                    why += f" (batch lowered from {batch_size} to {batch})"
                return TierChoice(e.slots, batch, budget, backend, estimates, why)
        if all(e.memory_mb is None for e in estimates):
            raise TierChoiceError("the bundle holds no measurements to choose a tier from; pass --tier N")
        if batch <= MIN_BATCH:
            break
        batch = max(MIN_BATCH, batch // 2)
    smallest = estimates[-1]
    raise TierChoiceError(
        f"no tier fits this device ({device.name}): the smallest, tier {smallest.slots}, needs ~{smallest.memory_mb:.0f} MB "
        f"at batch {batch} x {seq_len or manifest.max_seq_len} tokens with the {backend} backend, but the budget is {budget:.0f} MB "
        f"({'--max-memory' if max_memory_mb is not None and max_memory_mb < device.memory_available_mb else 'available memory'} "
        f"less a {SAFETY_MARGIN:.0%} safety margin): short by {smallest.memory_mb - budget:.0f} MB"
    )
