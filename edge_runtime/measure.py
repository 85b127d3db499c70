"""Measure a tier's ONNX Runtime training step time and peak resident memory on this machine.

Run as a child process (``python -m edge_runtime.measure``) so that the peak RSS it reports is that of a process
that does nothing but train the tier, as a device would: no torch, no exporter.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import typer

from edge_runtime.bundle import tier_file_paths
from edge_runtime.ort_backend import OrtTierSession, import_training_api


@dataclass(frozen=True)
class BatchSpec:
    """A synthetic batch of the reference shape: text (ids in [5, vocab)) or images of ``image_size``."""

    modality: str
    batch_size: int
    seq_len: int
    num_layers: int
    slots: int
    num_labels: int
    vocab_size: int = 0
    image_size: int = 0

    def make(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, self.num_labels, self.batch_size, dtype=np.int64)
        target = np.full((self.num_layers, self.slots), 1.0 / self.slots, np.float32)
        adjust = np.zeros(self.num_labels, np.float32)
        if self.modality == "text":
            ids = rng.integers(5, self.vocab_size, (self.batch_size, self.seq_len), dtype=np.int64)
            mask = np.ones((self.batch_size, self.seq_len), np.int64)
            return [ids, mask, labels, target, adjust]
        pixels = rng.standard_normal((self.batch_size, 3, self.image_size, self.image_size)).astype(np.float32)
        return [pixels, labels, target, adjust]


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space so far, in MB.

    On Linux this is ``VmHWM`` from /proc/self/status, not ``ru_maxrss``: ru_maxrss survives fork and exec, so a
    child started by a large parent (the exporter, holding torch and the model) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MB (from /proc on Linux, psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / (1024 * 1024)
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)


def measure_tier(files: dict[str, Path], spec: BatchSpec, threads: int, steps: int, warmup: int = 1) -> dict[str, float]:
    """Train ``warmup + steps`` steps on one synthetic batch.

    Returns the median step time (s), the peak RSS (MB) and the RSS at two stages, so that the peak can be
    attributed: after importing the runtime (``import_rss_mb``) and after loading the sessions (``load_rss_mb``).
    """
    import_training_api()
    import_rss = current_rss_mb()
    session = OrtTierSession(files, threads=threads)
    load_rss = current_rss_mb()
    batch = spec.make()
    for _ in range(warmup):
        session.train_step(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.train_step(batch)
        times.append(time.perf_counter() - start)
    return {"step_time_s": float(np.median(times)), "peak_rss_mb": peak_rss_mb(), "import_rss_mb": import_rss, "load_rss_mb": load_rss}


def main(
    tier_dir: Path = typer.Argument(..., help="Folder holding training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint."),
    modality: str = typer.Option("text", help="text or vision."),
    batch_size: int = typer.Option(16),
    seq_len: int = typer.Option(64),
    num_layers: int = typer.Option(...),
    slots: int = typer.Option(...),
    num_labels: int = typer.Option(...),
    vocab_size: int = typer.Option(0),
    image_size: int = typer.Option(0),
    threads: int = typer.Option(2),
    steps: int = typer.Option(5),
) -> None:
    """Print one JSON line: step_time_s, peak_rss_mb and the reference batch."""
    files = tier_file_paths(tier_dir)
    spec = BatchSpec(modality, batch_size, seq_len, num_layers, slots, num_labels, vocab_size, image_size)
    result = measure_tier(files, spec, threads, steps)
    from edge_runtime.profile import measure_gflops

    result["compute_gflops"] = measure_gflops(1.0)
    result.update(asdict(spec), threads=threads, steps=steps, machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                  torch_loaded="torch" in sys.modules)
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
