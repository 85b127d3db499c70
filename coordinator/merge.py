"""The sparse per-expert merge, as pure functions over the global pool (no Flower).

Stock FedAvg cannot do this: it refuses replies whose keys differ and divides by the weight of every reply. Here
each global expert is the weighted mean over only the nodes that trained it this round; experts nobody trained
keep their values; router rows likewise per global expert, over the nodes that held them (a one-slot tier has no
router); the head over every node. Weights: the number of training examples (default) or, per expert, the tokens
the node routed to it (``weighting="tokens"``; an expert whose holders routed no tokens to it keeps its value).

``max_share`` bounds any one node's share of each mean (``cap_shares``): the counts behind the weights are the
devices' own claims, and without a bound one device claiming a huge count would own the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_runtime.bundle import (
    EXPERT_TENSORS,
    HEAD_TENSORS,
    ROUTER_TENSORS,
    global_expert_key,
    global_head_key,
    global_lora_key,
    global_router_key,
)
from edge_runtime.update import Update, router_rows_key

WEIGHTINGS = ("examples", "tokens")


def cap_shares(weights: list[float] | np.ndarray, max_share: float = 1.0) -> np.ndarray:
    """Normalised weights (summing to 1) in which no entry exceeds max(``max_share``, 1/n): the weights above the
    cap are set to it and the rest is shared among the others in proportion to their weights, repeatedly, until
    none is over (water-filling). With n entries a cap below 1/n cannot hold, so 1/n (equal weights) is the floor.
    ``max_share`` 1 returns the plain normalisation w / sum(w). Raises ValueError when the weights sum to 0."""
    w = np.asarray(weights, np.float64)
    total = w.sum()
    if not (total > 0) or not np.isfinite(total) or (w < 0).any():
        raise ValueError(f"merge weights must be finite, >= 0 and not all 0, got {w.tolist()[:8]}")
    shares = w / total
    if max_share >= 1.0:
        return shares
    cap = max(max_share, 1.0 / len(w))
    fixed = np.zeros(len(w), bool)
    for _ in range(len(w)):
        over = (shares > cap * (1 + 1e-12)) & ~fixed
        if not over.any():
            break
        fixed |= over
        shares[fixed] = cap
        free = ~fixed
        rest = 1.0 - cap * fixed.sum()
        shares[free] = w[free] / w[free].sum() * rest if w[free].sum() > 0 else rest / max(1, free.sum())
    return shares


@dataclass
class MergeReport:
    """What a merge changed: (layer, expert) -> the nodes' weights, in the order of the updates given."""

    experts: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    untouched: list[tuple[int, int]] = field(default_factory=list)
    head_weight: float = 0.0


def _weight(update: Update, layer: int, slot: int, weighting: str) -> float:
    if weighting == "examples":
        return float(update.num_examples)
    return float(update.route_counts[layer, slot])


def merge_updates(
    pool: dict[str, np.ndarray], updates: list[Update], num_layers: int, num_experts: int, weighting: str = "examples",
    max_share: float = 1.0,
) -> tuple[dict[str, np.ndarray], MergeReport]:
    """A new pool: ``pool`` with every expert, router row and the head replaced by the weighted mean of the
    updates that carry it, no update's share above ``max_share`` (``cap_shares``). The updates must already be
    validated (``Update.validate``); ``pool`` is not modified."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    new = {k: v.copy() for k, v in pool.items()}
    report = MergeReport()
    if not updates:
        report.untouched = [(l, e) for l in range(num_layers) for e in range(num_experts)]
        return new, report
    for layer in range(num_layers):
        router = {t: new[global_router_key(layer, t)] for t in ROUTER_TENSORS}
        for e in range(num_experts):
            holders = [(u, u.assignment[layer].index(e)) for u in updates if e in u.assignment[layer]]
            weights = [_weight(u, layer, slot, weighting) for u, slot in holders]
            total = sum(weights)
            if not holders or total <= 0:
                report.untouched.append((layer, e))
                continue
            report.experts[(layer, e)] = weights
            shares = cap_shares(weights, max_share) if max_share < 1.0 else None
            for t in EXPERT_TENSORS:
                key = global_expert_key(layer, e, t)
                if shares is None:  # today's rule, kept bit for bit when shares are not bounded
                    new[key] = sum(w * u.tensors[key].astype(np.float64) for w, (u, _) in zip(weights, holders)) / total
                else:
                    new[key] = sum(c * u.tensors[key].astype(np.float64) for c, (u, _) in zip(shares, holders))
                new[key] = new[key].astype(np.float32)
            rows = [(w, u, slot) for w, (u, slot) in zip(weights, holders) if router_rows_key(layer, "weight") in u.tensors]
            row_total = sum(w for w, _, _ in rows)
            if rows and row_total > 0:
                row_shares = cap_shares([w for w, _, _ in rows], max_share) if max_share < 1.0 else [w / row_total for w, _, _ in rows]
                for t in ROUTER_TENSORS:
                    if max_share >= 1.0:
                        merged = sum(w * u.tensors[router_rows_key(layer, t)][slot].astype(np.float64) for w, u, slot in rows) / row_total
                    else:
                        merged = sum(c * u.tensors[router_rows_key(layer, t)][slot].astype(np.float64) for c, (_, u, slot) in zip(row_shares, rows))
                    router[t][e] = merged.astype(np.float32)
    report.head_weight = _merge_head(new, updates, max_share)
    return new, report


def _merge_head(new: dict[str, np.ndarray], updates: list[Update], max_share: float = 1.0) -> float:
    """Replace the head in ``new`` by the example-weighted mean over every update (no share above ``max_share``);
    return the total weight."""
    head_total = float(sum(u.num_examples for u in updates))
    shares = cap_shares([u.num_examples for u in updates], max_share) if max_share < 1.0 else None
    for t in HEAD_TENSORS:
        key = global_head_key(t)
        if shares is None:
            new[key] = (sum(u.num_examples * u.tensors[key].astype(np.float64) for u in updates) / head_total).astype(np.float32)
        else:
            new[key] = sum(c * u.tensors[key].astype(np.float64) for c, u in zip(shares, updates)).astype(np.float32)
    return head_total


LORA_RULES = ("fedavg", "hetlora")


def pad_lora(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad a rank-r adapter (A [r, in], B [out, r]) to ``rank``: A gets zero rows, B zero columns (B A unchanged)."""
    r = a.shape[0]
    if b.shape[1] != r or r > rank:
        raise ValueError(f"adapter of rank {r} (A {list(a.shape)}, B {list(b.shape)}) cannot be padded to rank {rank}")
    a_pad = np.zeros((rank, a.shape[1]), np.float64)
    b_pad = np.zeros((b.shape[0], rank), np.float64)
    a_pad[:r], b_pad[:, :r] = a, b
    return a_pad, b_pad


def merge_lora(
    pool: dict[str, np.ndarray], updates: list[Update], modules: list[str], rule: str, max_share: float = 1.0
) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """A new pool for the LoRA baselines; ``pool`` holds the global adapter at the largest rank R.

    - ``fedavg`` (FedIT): each module's A and B are the example-weighted means of the clients' A and B (FedIT's
      rule; the clients' ranks are then all R).
    - ``hetlora`` (HetLoRA): each client's A and B are zero-padded to R, then averaged with sparsity weights
      p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F, per module; a client of rank r only contributes to the first r
      components (the others get its zeros, as in the paper). The tiers then take the first r_t components back
      (``tier_values_from_pool``). When every norm is 0 (nobody moved B off zero) the example weights are used.

    The head is the example-weighted mean in both. No client's share of a module or of the head exceeds
    ``max_share`` (``cap_shares``). Updates must be validated first. Returns (pool, module -> the clients' weights,
    normalised, in the order of ``updates``).
    """
    if rule not in LORA_RULES:
        raise ValueError(f"the LoRA merge rule must be one of {', '.join(LORA_RULES)}, got {rule!r}")
    new = {k: v.copy() for k, v in pool.items()}
    weights_used: dict[str, list[float]] = {}
    if not updates:
        return new, weights_used
    examples = np.array([float(u.num_examples) for u in updates])
    for module in modules:
        ka, kb = global_lora_key(module, "A"), global_lora_key(module, "B")
        rank = pool[ka].shape[0]
        padded = [pad_lora(u.tensors[ka], u.tensors[kb], rank) for u in updates]
        w = examples
        if rule == "hetlora":
            norms = np.array([np.linalg.norm(u.tensors[kb].astype(np.float64) @ u.tensors[ka].astype(np.float64)) for u in updates])
            w = norms if norms.sum() > 0 else examples
        w = w / w.sum() if max_share >= 1.0 else cap_shares(w, max_share)
        weights_used[module] = [float(x) for x in w]
        new[ka] = sum(wk * a for wk, (a, _) in zip(w, padded)).astype(np.float32)
        new[kb] = sum(wk * b for wk, (_, b) in zip(w, padded)).astype(np.float32)
    _merge_head(new, updates, max_share)
    return new, weights_used


def fleet_usage(updates: list[Update], num_layers: int, num_experts: int) -> np.ndarray | None:
    """[L, M] share of the round's routed tokens per global expert over all updates; None when no tokens."""
    counts = np.zeros((num_layers, num_experts))
    for u in updates:
        rc = u.route_counts
        for layer, ids in enumerate(u.assignment):
            counts[layer, ids] += rc[layer]
    totals = counts.sum(axis=1, keepdims=True)
    if not (totals > 0).all():
        return None
    return counts / totals


def update_usage(previous: np.ndarray, round_usage: np.ndarray | None, momentum: float = 0.7) -> np.ndarray:
    """Moving average of fleet usage: ``momentum * previous + (1 - momentum) * round_usage`` (unchanged if None)."""
    if round_usage is None:
        return previous
    return momentum * previous + (1.0 - momentum) * round_usage
