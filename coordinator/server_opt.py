"""A server optimiser on the sparse merge (Reddi et al., "Adaptive Federated Optimization", arXiv 2003.00295).

The merge (``coordinator/merge.py``) gives each trained unit (an expert's tensor, a router row, the head, a LoRA
matrix) its weighted mean ``m`` over the nodes that trained it. The server treats ``delta = d * (m - x)`` as a
pseudo-gradient step, ``x`` the unit's value before the round, with the damping factor of the sparse merge

    d = W_holders / (W_holders + lambda * W_others)

(``W_holders``: the example weights of the nodes that trained the unit, ``W_others``: of the round's other nodes):
an expert trained by few nodes moves less when ``lambda`` > 0. Then, per unit and only for units trained this round
(an expert nobody trained keeps its value and its moments):

- ``fedavgm``: ``v <- beta v + delta``; ``x <- x + eta v``;
- ``fedadam``: ``m1 <- beta m1 + (1 - beta) delta``; ``m2 <- beta2 m2 + (1 - beta2) delta^2``;
  ``x <- x + eta m1 / (sqrt(m2) + tau)``.

``fedavgm`` with beta 0, eta 1 and lambda 0 is today's merge bit for bit: ``x + (m - x)`` computed in float64 from
the float32 values is ``m`` exactly (tested). The moments live in the global state beside the pool
(``optimizer.safetensors`` of each checkpoint), so ``--resume`` continues them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.bundle import EXPERT_TENSORS, global_expert_key, global_router_key
from edge_runtime.update import Update, router_rows_key

SERVER_OPTIMIZERS = ("fedavgm", "fedadam")


@dataclass(frozen=True)
class ServerOptimizer:
    """Settings of the server's step; every field is a flag of ``serve`` and ``simulate``."""

    kind: str = "fedavgm"
    """fedavgm (momentum; beta 0, eta 1, lambda 0 is plain FedAvg) or fedadam (--server-opt)."""
    lr: float = 1.0
    """eta, the server learning rate (--server-lr)."""
    momentum: float = 0.0
    """beta: FedAvgM's momentum, FedAdam's first-moment decay (--server-momentum)."""
    damping: float = 0.0
    """lambda of the damped sparse merge: the weight of the nodes that did not train a unit (--server-damping)."""
    beta2: float = 0.99
    """FedAdam's second-moment decay."""
    tau: float = 1e-3
    """FedAdam's adaptivity floor (Reddi et al.'s tau)."""

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"--server-opt must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.kind!r}")
        checks = [(math.isfinite(self.lr) and self.lr > 0, f"--server-lr must be a positive number, got {self.lr}"),
                  (0 <= self.momentum < 1, f"--server-momentum must be in [0, 1), got {self.momentum}"),
                  (math.isfinite(self.damping) and self.damping >= 0, f"--server-damping must be >= 0, got {self.damping}"),
                  (0 <= self.beta2 < 1 and self.tau > 0, "FedAdam needs beta2 in [0, 1) and tau > 0")]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_plain(self) -> bool:
        """The plain merge (FedAvg): nothing to keep between rounds."""
        return self.kind == "fedavgm" and self.lr == 1.0 and self.momentum == 0.0 and self.damping == 0.0

    def step(
        self, old: dict[str, np.ndarray], merged: dict[str, np.ndarray], trained: dict[str, tuple[Any, Any]], moments: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(new pool, new moments). ``trained``: pool key -> (W_holders, W_others), scalars or arrays broadcastable to
        the tensor (a router's rows each have their holders); entries with W_holders 0 were not trained and keep
        their value and moments, as does every key not in ``trained``. Moments are ``m1/<key>`` and ``m2/<key>``."""
        new, out = dict(merged), dict(moments)
        for key, (held, others) in trained.items():
            x = old[key].astype(np.float64)
            held, others = np.broadcast_to(np.asarray(held, np.float64), x.shape), np.broadcast_to(np.asarray(others, np.float64), x.shape)
            mask = held > 0
            factor = np.where(mask, held / np.where(mask, held + self.damping * others, 1.0), 0.0) if self.damping else mask.astype(np.float64)
            delta = factor * (merged[key].astype(np.float64) - x)
            m1_old = out.get(f"m1/{key}", np.zeros_like(old[key])).astype(np.float64)
            if self.kind == "fedavgm":
                v = np.where(mask, self.momentum * m1_old + delta, m1_old)
                if self.momentum:
                    out[f"m1/{key}"] = v.astype(np.float32)
                step = self.lr * v
            else:
                m2_old = out.get(f"m2/{key}", np.zeros_like(old[key])).astype(np.float64)
                m1 = np.where(mask, self.momentum * m1_old + (1 - self.momentum) * delta, m1_old)
                m2 = np.where(mask, self.beta2 * m2_old + (1 - self.beta2) * delta**2, m2_old)
                out[f"m1/{key}"], out[f"m2/{key}"] = m1.astype(np.float32), m2.astype(np.float32)
                step = self.lr * m1 / (np.sqrt(m2) + self.tau)
            new[key] = np.where(mask, x + step, x).astype(np.float32)
        return new, out


def trained_weights(updates: list[Update], num_layers: int, num_experts: int) -> dict[str, tuple[Any, Any]]:
    """Pool key -> (W_holders, W_others) of a round's validated updates, by example counts: each expert's tensors,
    each router's rows (arrays over the M rows), the head (every node holds it) and each LoRA matrix."""
    total = float(sum(u.num_examples for u in updates))
    out: dict[str, tuple[Any, Any]] = {}
    for layer in range(num_layers):
        rows = np.zeros(num_experts)
        for e in range(num_experts):
            holders = [u for u in updates if u.assignment and layer < len(u.assignment) and e in u.assignment[layer]]
            held = float(sum(u.num_examples for u in holders))
            if held <= 0:
                continue
            for t in EXPERT_TENSORS:
                out[global_expert_key(layer, e, t)] = (held, total - held)
            rows[e] = float(sum(u.num_examples for u in holders if router_rows_key(layer, "weight") in u.tensors))
        if rows.any():
            out[global_router_key(layer, "weight")] = (rows[:, None], total - rows[:, None])
            out[global_router_key(layer, "bias")] = (rows, total - rows)
    for key in {k for u in updates for k in u.tensors if k.startswith("lora.") or k.startswith("head.")}:
        held = float(sum(u.num_examples for u in updates if key in u.tensors))
        out[key] = (held, total - held)
    return out
