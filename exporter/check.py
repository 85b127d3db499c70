"""Check a bundle's ONNX Runtime artifacts against PyTorch on the same weights and batch (the independent reference).

Used by the tests and the benchmark: gradients of every trainable tensor against autograd, and the inference model's
logits against the PyTorch model's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from edge_runtime.bundle import Manifest, load_manifest
from edge_runtime.ort_backend import OrtTierSession
from exporter.model import AdaptedEncoder, build_model, load_encoder
from exporter.onnx_export import example_inputs


def tier_files(bundle_dir: Path, manifest: Manifest, slots: int) -> dict[str, Path]:
    return {k: bundle_dir / f.path for k, f in manifest.tier(slots).files.items()}


def torch_model(bundle_dir: Path, manifest: Manifest, slots: int, encoder: torch.nn.Module | None = None) -> AdaptedEncoder:
    """The PyTorch model of a tier with the bundle's initial global pool (slot j <- expert j; LoRA: truncated).

    ``encoder`` is a pristine encoder loaded earlier with ``load_encoder`` (copied, not modified); None loads it
    from ``manifest.model.source``.
    """
    if encoder is None:
        encoder, _, _, _ = load_encoder(manifest.model.source)
    else:
        encoder = copy.deepcopy(encoder)
    model = build_model(encoder, manifest, slots)
    model.load_global(load_file(str(bundle_dir / manifest.global_pool.path)))
    return model


@dataclass
class GradientReport:
    loss_ort: float
    loss_torch: float
    worst_name: str
    worst_error: float  # max |g_ort - g_torch| / max |g_torch| over the tensor, worst tensor
    errors: dict[str, float]


def randomize_trainable(model: AdaptedEncoder, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Give every trainable tensor distinct random values (zeros make many gradients vanish or coincide)."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, p in model.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            values[name] = p.detach().numpy().copy()
    return values


def gradient_check(
    bundle_dir: Path, slots: int, encoder=None, batch: int = 4, seq_len: int = 12, seed: int = 0
) -> GradientReport:
    """Loss and gradients of ORT's training model against PyTorch autograd on the same random weights and batch."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    model = torch_model(bundle_dir, manifest, slots, encoder)
    values = randomize_trainable(model, seed)
    inputs = example_inputs(model, batch, min(seq_len, manifest.max_seq_len), manifest.model.image_size, seed=seed)
    target = torch.rand(model.num_layers, model.route_width, generator=torch.Generator().manual_seed(seed + 1)) + 0.1
    adjust = torch.log(torch.rand(model.head.out_features, generator=torch.Generator().manual_seed(seed + 2)) + 0.05)
    # a non-uniform q exercises L_het fully, a non-zero logit adjustment the adjusted cross-entropy
    inputs = (*inputs[:-2], target / target.sum(dim=1, keepdim=True), adjust)

    session = OrtTierSession(tier_files(bundle_dir, manifest, slots), with_optimizer=False)
    for name, value in values.items():
        session.set(name, value)
    ort_out = session.forward_backward([t.numpy() for t in inputs])

    model.train()
    model.zero_grad()
    torch_out = model(*inputs)
    torch_out[0].backward()
    errors = {}
    for name, p in model.trainable_named_parameters():
        ref = p.grad.numpy()
        got = session.grad(name)
        errors[name] = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    worst = max(errors, key=errors.get)
    return GradientReport(float(ort_out[0]), float(torch_out[0].detach()), worst, errors[worst], errors)
