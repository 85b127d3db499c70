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

from edge_runtime.ort_backend import OrtTierSession


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
        if self.modality == "text":
            ids = rng.integers(5, self.vocab_size, (self.batch_size, self.seq_len), dtype=np.int64)
            mask = np.ones((self.batch_size, self.seq_len), np.int64)
            return [ids, mask, labels, target]
        pixels = rng.standard_normal((self.batch_size, 3, self.image_size, self.image_size)).astype(np.float32)
        return [pixels, labels, target]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure_tier(files: dict[str, Path], spec: BatchSpec, threads: int, steps: int, warmup: int = 1) -> dict[str, float]:
    """Train ``warmup + steps`` steps on one synthetic batch; return median step time (s) and peak RSS (MB)."""
    session = OrtTierSession(files, threads=threads)
    batch = spec.make()
    for _ in range(warmup):
        session.train_step(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.train_step(batch)
        times.append(time.perf_counter() - start)
    return {"step_time_s": float(np.median(times)), "peak_rss_mb": peak_rss_mb()}


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
    files = {k: tier_dir / n for k, n in (
        ("training_model", "training_model.onnx"),
        ("eval_model", "eval_model.onnx"),
        ("optimizer_model", "optimizer_model.onnx"),
        ("checkpoint", "checkpoint"),
    )}
    spec = BatchSpec(modality, batch_size, seq_len, num_layers, slots, num_labels, vocab_size, image_size)
    result = measure_tier(files, spec, threads, steps)
    result.update(asdict(spec), threads=threads, steps=steps, machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                  torch_loaded="torch" in sys.modules)
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
