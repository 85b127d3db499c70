"""The MoE adapter as small composable modules: Router, Expert, MoEAdapter (MegaBlocks-style, no global state).

Shapes: B batch, S sequence, d hidden size, r expert width, t slots (experts held by this tier), k active experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Linear d -> t, softmax, top-k with renormalised gates.

    A one-slot router is the constant 1 (a softmax over one slot has no gradient): it has no parameters, and the
    graph has no softmax or top-k over a size-1 axis (ONNX Runtime's training graph builder mis-computes that case).
    """

    def __init__(self, hidden_size: int, slots: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= slots:
            raise ValueError(f"top_k={top_k} must be in 1..slots={slots}")
        self.slots = slots
        self.top_k = top_k
        if slots > 1:
            self.weight = nn.Parameter(torch.zeros(slots, hidden_size))  # [t, d]
            self.bias = nn.Parameter(torch.zeros(slots))  # [t]

    @property
    def trainable(self) -> bool:
        return self.slots > 1

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (probs, selected, gates), each [B, S, t]; ``selected`` is 1.0 on the top-k slots of a token."""
        if self.slots == 1:
            ones = torch.ones_like(h[..., :1])  # [B, S, 1]
            return ones, ones, ones
        probs = torch.softmax(F.linear(h, self.weight, self.bias), dim=-1)  # [B, S, t]
        kth = torch.topk(probs, self.top_k, dim=-1).values[..., -1:]  # [B, S, 1]
        selected = (probs >= kth).to(probs.dtype)  # [B, S, t]; no gradient flows through the choice
        masked = probs * selected
        gates = masked / masked.sum(dim=-1, keepdim=True)  # renormalised over the chosen slots
        return probs, selected, gates


class Expert(nn.Module):
    """A two-layer FFN d -> r -> d: E(h) = gelu(h w1 + b1) w2 + b2."""

    def __init__(self, hidden_size: int, expert_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(hidden_size, expert_dim))  # [d, r]
        self.b1 = nn.Parameter(torch.zeros(expert_dim))  # [r]
        self.w2 = nn.Parameter(torch.zeros(expert_dim, hidden_size))  # [r, d]
        self.b2 = nn.Parameter(torch.zeros(hidden_size))  # [d]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h @ self.w1 + self.b1) @ self.w2 + self.b2  # [B, S, d]


class MoEAdapter(nn.Module):
    """sum_{j in top-k} g_j E_j(h) over ``slots`` experts; returns the delta and the routing tensors."""

    def __init__(self, hidden_size: int, slots: int, expert_dim: int, top_k: int) -> None:
        super().__init__()
        self.router = Router(hidden_size, slots, top_k)
        self.experts = nn.ModuleList(Expert(hidden_size, expert_dim) for _ in range(slots))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, S, d] -> (delta [B, S, d], probs [B, S, t], selected [B, S, t])."""
        probs, selected, gates = self.router(h)
        # Dense over the slots and masked by the gates (zero for unselected slots): simple, exact, and
        # differentiable in every exporter; the sparse kernel is an edge-runtime optimisation.
        delta = torch.zeros_like(h)
        for j, expert in enumerate(self.experts):
            delta = delta + gates[..., j : j + 1] * expert(h)
        return delta, probs, selected


def routing_aux_losses(
    probs: torch.Tensor, selected: torch.Tensor, token_mask: torch.Tensor, target: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer auxiliary losses and routing statistics over the real (unpadded) tokens.

    probs, selected: [B, S, t]; token_mask: [B, S] (1 for real tokens); target q: [t].
    Returns (L_bal, L_het, counts [t], prob_sum [t]) where
      f_j = (top-k assignments to j) / (tokens * k),  p_j = mean router probability of j,
      L_bal = t * sum_j f_j p_j,  L_het = KL(q || p) = sum_j q_j log(q_j / p_j).
    """
    slots = probs.shape[-1]
    m = token_mask.to(probs.dtype).unsqueeze(-1)  # [B, S, 1]
    n_tokens = m.sum().clamp(min=1.0)
    counts = (selected * m).sum(dim=(0, 1))  # [t]
    prob_sum = (probs * m).sum(dim=(0, 1))  # [t]
    f = counts / (n_tokens * top_k)
    p = prob_sum / n_tokens
    balance = slots * (f * p).sum()
    q = target
    hetero = (q * torch.log(q.clamp(min=1e-12))).sum() - (q * torch.log(p.clamp(min=1e-12))).sum()
    return balance, hetero, counts, prob_sum
