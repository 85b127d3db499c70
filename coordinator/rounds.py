"""One federated round as pure functions (no Flower): plan what each node trains, screen the replies, apply the
accepted updates to the global state. The Flower strategy only moves messages between these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.merge import MergeReport, fleet_usage, merge_lora, merge_updates, update_usage
from coordinator.plan import assign_experts, preferences_from_stats, routing_target
from coordinator.state import GlobalState
from edge_runtime.bundle import Manifest
from edge_runtime.records import TrainInstruction
from edge_runtime.update import Update, UpdateError, default_assignment, tier_values_from_pool, tier_values_to_global

log = logging.getLogger(__name__)


@dataclass
class Screened:
    """The replies of a round, split into updates to merge and rejections with their reasons."""

    accepted: dict[int, Update] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def plan_round(state: GlobalState, manifest: Manifest, tiers: dict[int, int], train: dict[str, Any]) -> dict[int, TrainInstruction]:
    """Node id -> the instruction for round ``state.round + 1``: its experts, their current values, its target q."""
    if manifest.is_lora:  # one global adapter, which every node holds (truncated to its tier's rank)
        assignment = {node: default_assignment(manifest, slots) for node, slots in tiers.items()}
    else:
        assignment = assign_experts(tiers, manifest.num_experts, manifest.num_layers, state.preferences, state.usage)
    out = {}
    for node, slots in tiers.items():
        values = tier_values_from_pool(manifest, slots, state.pool, assignment[node])
        values_by_global = tier_values_to_global(manifest, slots, assignment[node], values)
        out[node] = TrainInstruction(state.manifest_id, state.round + 1, slots, assignment[node],
                                     routing_target(assignment[node], state.usage), values_by_global, dict(train))  # fmt: skip
    return out


def lora_modules(manifest: Manifest) -> list[str]:
    """The encoder modules that carry a LoRA adapter (the same in every tier)."""
    return sorted({p.module for tier in manifest.tiers.values() for p in tier.lora_params})


def lora_rule(manifest: Manifest) -> str:
    """How a LoRA bundle's updates merge: FedIT by FedAvg, HetLoRA by its sparsity-weighted, zero-padded mean."""
    return "hetlora" if manifest.method == "hetlora" else "fedavg"


def screen_replies(
    manifest: Manifest, sent: dict[int, TrainInstruction], replies: dict[int, tuple[Update, int] | str]
) -> Screened:
    """Validate each node's reply against the bundle and what was sent to that node.

    ``replies`` maps node id -> (update, the round it answers) or an error text (the node failed). Refused, with the
    node and reason logged: replies from nodes not sent anything this round, replies to another round (stale or
    replayed), and updates that fail ``Update.validate`` with the node's assignment.
    """
    out = Screened()
    round_now = next(iter(sent.values())).round if sent else None
    for node, reply in replies.items():
        if isinstance(reply, str):
            out.rejected[node] = f"node failed: {reply}"
        elif node not in sent:
            out.rejected[node] = "node was not sent an instruction this round"
        else:
            update, round_ = reply
            if round_ != sent[node].round:
                out.rejected[node] = f"reply answers round {round_}, this is round {sent[node].round}"
            else:
                try:
                    update.validate(manifest, sent[node].assignment)
                    out.accepted[node] = update
                except UpdateError as exc:
                    out.rejected[node] = str(exc)
        if node in out.rejected:
            log.warning("round %s: reply of node %s rejected: %s", round_now, node, out.rejected[node])
    return out


def apply_round(state: GlobalState, manifest: Manifest, screened: Screened, weighting: str = "examples",
                record: dict[str, Any] | None = None) -> GlobalState:  # fmt: skip
    """The next global state: merged pool, updated usage and preferences, round + 1, and a history record."""
    updates = [screened.accepted[n] for n in sorted(screened.accepted)]
    if manifest.is_lora:
        pool, lora_weights = merge_lora(state.pool, updates, lora_modules(manifest), lora_rule(manifest))
        record = {**(record or {}), "lora_weights": {str(n): float(np.mean([w[i] for w in lora_weights.values()]))
                                                     for i, n in enumerate(sorted(screened.accepted))}}  # fmt: skip
        report = MergeReport()
    else:
        pool, report = merge_updates(state.pool, updates, manifest.num_layers, manifest.num_experts, weighting)
    usage = update_usage(state.usage, fleet_usage(updates, manifest.num_layers, manifest.num_experts))
    preferences = dict(state.preferences)
    for node, u in screened.accepted.items():
        fresh = preferences_from_stats(u.assignment, u.route_counts, manifest.num_experts)
        old = preferences.get(node, np.zeros_like(fresh))
        held = np.zeros_like(fresh, dtype=bool)
        for layer, ids in enumerate(u.assignment):
            held[layer, ids] = True
        preferences[node] = np.where(held, fresh, old)  # what it held now replaces; the rest is remembered
    entry = {
        "round": state.round + 1, "accepted": sorted(screened.accepted), "rejected": {str(k): v for k, v in screened.rejected.items()},
        "experts_trained": len(report.experts), "experts_untouched": len(report.untouched), **(record or {}),
    }  # fmt: skip
    return GlobalState(state.manifest_id, pool, usage, state.round + 1, preferences, [*state.history, entry])
