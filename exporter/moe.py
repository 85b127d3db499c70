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
    """sum_{j in top-k} g_j E_j(h) over ``slots`` experts; returns the delta and the routing tensors.

    The experts keep their own parameters (named per slot, as the checkpoint and the update format address them),
    but the forward pass runs all slots as two matrix products instead of 2t small ones:
        sum_j g_j (gelu(h w1_j + b1_j) w2_j + b2_j) = (gelu(h W1 + b1) * G) W2 + g B2
    with W1 = [w1_1 .. w1_t] (d x t*r), W2 the w2_j stacked (t*r x d), B2 the b2_j stacked (t x d) and G each
    gate repeated over its expert's r columns. Unselected slots have gate 0, so the result and the gradients are
    those of the per-expert sum; the saving is in kernel launches and in one larger, more efficient GEMM.
    """

    def __init__(self, hidden_size: int, slots: int, expert_dim: int, top_k: int) -> None:
        super().__init__()
        self.router = Router(hidden_size, slots, top_k)
        self.experts = nn.ModuleList(Expert(hidden_size, expert_dim) for _ in range(slots))
        # spread [t, t*r]: row j is 1 on expert j's r columns, so gates @ spread repeats each gate over its columns
        # (a constant matmul rather than a reshape or repeat_interleave, which export to dynamic shape arithmetic)
        self.register_buffer("spread", torch.repeat_interleave(torch.eye(slots), expert_dim, dim=1), persistent=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, S, d] -> (delta [B, S, d], probs [B, S, t], selected [B, S, t])."""
        probs, selected, gates = self.router(h)
        w1 = torch.cat([e.w1 for e in self.experts], dim=1)  # [d, t*r]
        b1 = torch.cat([e.b1 for e in self.experts], dim=0)  # [t*r]
        w2 = torch.cat([e.w2 for e in self.experts], dim=0)  # [t*r, d]
        b2 = torch.stack([e.b2 for e in self.experts], dim=0)  # [t, d]
        hidden = F.gelu(h @ w1 + b1)  # [B, S, t*r]
        delta = (hidden * (gates @ self.spread)) @ w2 + gates @ b2  # [B, S, t*r] * [B, S, t*r] -> [B, S, d]
        return delta, probs, selected


def routing_aux_losses(
    probs: torch.Tensor,
    selected: torch.Tensor,
    token_mask: torch.Tensor,
    target: torch.Tensor,
    top_k: int,
    balance_loss: str = "switch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer auxiliary losses and routing statistics over the real (unpadded) tokens.

    probs, selected: [B, S, t]; token_mask: [B, S] (1 for real tokens); target q: [t].
    Returns (L_bal, L_het, counts [t], prob_sum [t]) where
      f_j = (top-k assignments to j) / (tokens * k),  p_j = mean router probability of j,
      L_bal = t * sum_j f_j p_j (Switch),  L_het = KL(q || p) = sum_j q_j log(q_j / p_j).
    When every slot is active (k = t), f_j = 1/t for every j and Switch's term is the constant sum_j p_j = 1: no
    gradient reaches the router. ``balance_loss="switch-soft"`` uses the soft share there instead of the hard one,
    L_bal = t * sum_j p_j^2, whose gradient 2 t p_j pushes the mean router probability towards uniform (where it is
    1, as Switch's is at balance). Where k < t both rules are Switch's.
    """
    slots = probs.shape[-1]
    m = token_mask.to(probs.dtype).unsqueeze(-1)  # [B, S, 1]
    n_tokens = m.sum().clamp(min=1.0)
    counts = (selected * m).sum(dim=(0, 1))  # [t]
    prob_sum = (probs * m).sum(dim=(0, 1))  # [t]
    f = counts / (n_tokens * top_k)
    p = prob_sum / n_tokens
    if balance_loss == "switch-soft" and top_k == slots and slots > 1:
        balance = slots * (p * p).sum()
    else:
        balance = slots * (f * p).sum()
    q = target
    hetero = (q * torch.log(q.clamp(min=1e-12))).sum() - (q * torch.log(p.clamp(min=1e-12))).sum()
    return balance, hetero, counts, prob_sum
