"""The closed-form head (Fed3R, arXiv 2406.01116): combine the devices' statistics, screen them, solve the ridge system.

With ``z = [phi; 1]`` and one-hot labels ``Y``, the head ``X = [W^T; b]`` [d + 1, C] minimises

    sum_i |z_i^T X - onehot(y_i)|^2 + lambda |W|^2          (the bias is not penalised)

whose solution is ``X = (G + lambda P)^-1 B`` with ``G = sum_i z_i z_i^T``, ``B = sum_i z_i onehot(y_i)^T`` and
``P = diag(1, .., 1, 0)``. G and B are sums over rows, so the devices' statistics add up to the statistics of all
their rows: the federated solution equals the centralised one, whatever the label skew. The head's logits are
``scale * (W phi + b)``: least squares on one-hot targets gives values near 0 and 1, and ``scale`` turns them into
logits whose softmax is as confident as the head is right (cross-entropy is what the devices train with after it).

``lambda`` is relative: ``ridge * trace(G_phi) / d``, a fraction of the mean eigenvalue of the features' Gram matrix,
so the same ``--ridge`` suits any feature scale and any number of rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.merge import cap_shares
from edge_runtime.bundle import global_head_key
from edge_runtime.head_stats import HeadStatistics

log = logging.getLogger(__name__)

HEAD_MODES = ("fedavg", "ridge", "ridge-frozen")
"""How the head is set: ``fedavg`` (the bundle's random head, trained by the devices, merged by example-weighted
FedAvg); ``ridge`` (solved in closed form before round 1, then trained and merged as with fedavg); ``ridge-frozen``
(solved before round 1 and kept: the devices train their adapters against it and the merge leaves it)."""
DEFAULT_HEAD = "ridge-frozen"
DEFAULT_LOGIT_ADJUST = 1.0
"""The defaults of ``serve``, ``simulate`` and ``RunSettings`` (issue 18): the head solved before round 1 and kept,
and the devices' logit-adjusted loss at tau 1. Under label skew (alpha 0.1) a FedAvg head collapsed (FFT-MoE 0.700
at one seed); with these and the re-solve both methods ended at 0.89 (docs/benchmarks.md)."""
DEFAULT_RESOLVE_SIMULATE = True
DEFAULT_RESOLVE_SERVE = False
"""--ridge-resolve: on in ``simulate`` (every client holds the whole bundle), off in ``serve`` and ``RunSettings``: the
re-solve runs every device through tier M, and a device that fetched only its own tier's files cannot, so it would
be left out and the head fitted to the tier-M devices' label mix (0.732 against 0.860 at alpha 0.1, seed 0). Turn
it on in a deployment whose devices are provisioned with the whole bundle (``join --bundle``)."""
SCALE_LIMIT = 10.0
"""A device whose mean squared feature norm is more than this many times the median over the devices (or less than
its inverse) is left out: the encoder is frozen, so honest devices see features of one scale."""


@dataclass
class Combined:
    """The fleet's statistics: their weighted sums, the devices used with their shares, and those left out."""

    gram: np.ndarray
    cross: np.ndarray
    examples: int
    shares: dict[int, float] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def global_view_tiers(manifest: Any) -> set[int]:
    """The tiers whose eval model computes the global model's own features once adapters have trained: an FFT-MoE
    tier holding all M experts (top-k over the same router rows is permutation-invariant), every FedIT tier (one
    rank), HetLoRA's largest rank. Empty when no tier does (an FFT-MoE bundle without a tier M). The re-solved head
    (``--ridge-resolve``) asks every device for its sums through one of these tiers: from only the devices that
    train one, the head would learn their label mix (measured: 0.73 against 0.86, docs/benchmarks.md)."""
    if manifest.is_lora:
        return set(manifest.tiers) if manifest.method == "fedit" else {max(manifest.tiers)}
    return {t for t in manifest.tiers if t == manifest.num_experts}


def screen_statistics(stats: dict[int, HeadStatistics], limit: float = SCALE_LIMIT) -> dict[int, str]:
    """Node -> why its (already validated) statistics are left out: a feature scale ``limit`` times off the median of
    at least three devices. Rows of a device's own choosing that pass this cannot be told from honest ones; their
    weight is bounded by ``combine_statistics``'s share cap."""
    if len(stats) < 3:
        return {}
    norms = {n: s.mean_square_norm for n, s in stats.items()}
    median = float(np.median(list(norms.values())))
    out = {}
    for n, v in norms.items():
        if not (median / limit <= v <= median * limit):
            out[n] = f"head statistics: mean squared feature norm {v:.4g} is more than {limit:g} times off the fleet's median {median:.4g}"
    return out


def combine_statistics(stats: dict[int, HeadStatistics], max_share: float = 1.0) -> Combined:
    """The sums over the devices, each weighted so that no device holds more than ``max_share`` of the rows
    (``merge.cap_shares``; with the cap not reached every weight is exactly 1 and the sums are the plain sums)."""
    if not stats:
        raise ValueError("no head statistics to combine")
    nodes = sorted(stats)
    counts = np.array([stats[n].examples for n in nodes], np.float64)
    shares = cap_shares(counts, max_share)
    factors = shares * counts.sum() / counts
    factors[np.abs(factors - 1.0) < 1e-12] = 1.0  # uncapped: the plain sum, bit for bit
    first = stats[nodes[0]]
    gram, cross = np.zeros_like(first.gram), np.zeros_like(first.cross)
    for n, f in zip(nodes, factors):
        gram += f * stats[n].gram
        cross += f * stats[n].cross
    return Combined(gram, cross, int(counts.sum()), {n: float(s) for n, s in zip(nodes, shares)})


def ridge_lambda(gram: np.ndarray, ridge: float) -> float:
    """``ridge`` times the mean diagonal entry of the features' Gram matrix (its mean eigenvalue)."""
    d = gram.shape[0] - 1
    return float(ridge * np.trace(gram[:d, :d]) / d)


def solve_head(gram: np.ndarray, cross: np.ndarray, ridge: float, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(weight [C, d], bias [C]) of the ridge head, logits scaled by ``scale``; the bias is not penalised."""
    if not (ridge > 0 and np.isfinite(ridge)) or not (scale > 0 and np.isfinite(scale)):
        raise ValueError(f"--ridge and --ridge-scale must be positive numbers, got {ridge} and {scale}")
    d = gram.shape[0] - 1
    a = gram.astype(np.float64, copy=True)
    a[np.arange(d), np.arange(d)] += ridge_lambda(gram, ridge)
    x = np.linalg.solve(a, cross.astype(np.float64))  # [d + 1, C]
    return (scale * x[:d].T).astype(np.float32), (scale * x[d]).astype(np.float32)


def head_values(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """The head under its global-pool names."""
    return {global_head_key("weight"): weight, global_head_key("bias"): bias}


def resolved_at(history: list[dict[str, Any]], round_: int) -> bool:
    """Whether the head was re-solved after round ``round_`` (--ridge-resolve). A run extended past its last round
    (``--rounds`` raised on ``--resume``) is re-solved again after its new last round."""
    return any(h.get("round") == round_ and h.get("ridge_head", {}).get("resolve") for h in history)
