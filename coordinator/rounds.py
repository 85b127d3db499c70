"""One federated round as pure functions (no Flower): plan what each node trains, screen the replies, apply the
accepted updates to the global state. The Flower strategy only moves messages between these.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from coordinator.merge import MergeReport, fleet_usage, merge_lora, merge_updates, update_usage
from coordinator.plan import assign_experts, preferences_from_stats, routing_target
from coordinator.state import GlobalState
from edge_runtime.bundle import Manifest
from edge_runtime.records import TrainInstruction
from edge_runtime.update import Update, UpdateError, default_assignment, tier_values_from_pool, tier_values_to_global

log = logging.getLogger(__name__)


NORM_ACTIONS = ("clip", "reject")


@dataclass
class Screened:
    """The replies of a round, split into updates to merge and rejections with their reasons."""

    accepted: dict[int, Update] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, dict[str, float]] = field(default_factory=dict)
    """Node -> unit -> the norm of its change before it was clipped to the bound (``--max-update-norm``)."""
    digests: dict[int, str] = field(default_factory=dict)
    """Node -> digest of the update it sent (accepted ones), so a later copy of it is refused as a replay."""


def update_digest(update: Update) -> str:
    """sha256 over the update's tensors (names, dtypes, shapes, bytes), in name order: equal digests, equal updates."""
    h = hashlib.sha256()
    for name in sorted(update.tensors):
        value = np.ascontiguousarray(update.tensors[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def update_unit(key: str) -> str | None:
    """The unit a tensor's norm is bounded over: one expert (``layers.0.experts.3``), a layer's router rows, one LoRA
    module, the head. None for the routing statistics, which are counts, not parameters."""
    return None if key.startswith("stats.") else key.rsplit(".", 1)[0]


def change_norms(update: Update, sent: dict[str, np.ndarray]) -> dict[str, float]:
    """Unit -> L2 norm of what the update changed against the values the node was sent (float64)."""
    squares: dict[str, float] = {}
    for key, value in update.tensors.items():
        unit = update_unit(key)
        if unit is not None:
            delta = value.astype(np.float64) - sent[key].astype(np.float64)
            squares[unit] = squares.get(unit, 0.0) + float(np.square(delta).sum())
    return {unit: float(np.sqrt(s)) for unit, s in squares.items()}


def clip_update(update: Update, sent: dict[str, np.ndarray], max_norm: float) -> tuple[Update, dict[str, float]]:
    """The update with each unit's change scaled down to norm ``max_norm`` where it was larger (sent + c * change),
    and unit -> original norm of the units clipped. Units within the bound are returned unchanged, bit for bit."""
    norms = change_norms(update, sent)
    over = {unit: n for unit, n in norms.items() if n > max_norm}
    if not over:
        return update, {}
    tensors = dict(update.tensors)
    for key, value in update.tensors.items():
        unit = update_unit(key)
        if unit in over:
            scale = max_norm / over[unit]
            base = sent[key].astype(np.float64)
            tensors[key] = (base + scale * (value.astype(np.float64) - base)).astype(np.float32)
    return replace(update, tensors=tensors), over


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
    manifest: Manifest,
    sent: dict[int, TrainInstruction],
    replies: dict[int, tuple[Update, int] | str],
    max_norm: float = 0.0,
    norm_action: str = "clip",
    seen: set[str] | None = None,
) -> Screened:
    """Validate each node's reply against the bundle and what was sent to that node.

    ``replies`` maps node id -> (update, the round it answers) or an error text (the node failed). Refused, with the
    node and reason logged: replies from nodes not sent anything this round, replies to another round (stale or
    replayed), updates that fail ``Update.validate`` with the node's assignment, and copies of an update already
    accepted (digest in ``seen``, from earlier rounds, or sent by another node this round). With ``max_norm`` > 0,
    a unit (expert, router rows, LoRA module, head) whose change is larger is clipped to it or, with
    ``norm_action="reject"``, the whole update is refused.
    """
    if norm_action not in NORM_ACTIONS:
        raise ValueError(f"norm_action must be one of {', '.join(NORM_ACTIONS)}, got {norm_action!r}")
    out = Screened()
    seen = set(seen or ())
    round_now = next(iter(sent.values())).round if sent else None
    for node, reply in sorted(replies.items(), key=lambda item: item[0]):
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
                except UpdateError as exc:
                    out.rejected[node] = str(exc)
            if node not in out.rejected:
                digest = update_digest(update)
                if digest in seen:
                    out.rejected[node] = f"replayed update: the same tensors (sha256 {digest[:12]}) were already accepted"
            if node not in out.rejected and max_norm > 0:
                clipped, over = clip_update(update, sent[node].values, max_norm)
                if over and norm_action == "reject":
                    worst = max(over, key=over.__getitem__)
                    out.rejected[node] = (f"{len(over)} unit(s) changed by more than --max-update-norm {max_norm:g}, "
                                          f"e.g. {worst} by {over[worst]:.4g}")  # fmt: skip
                elif over:
                    out.clipped[node] = over
                    log.warning("round %s: node %s: %d unit(s) clipped to norm %g (largest %.4g)", round_now, node, len(over), max_norm, max(over.values()))
                    update = clipped
            if node not in out.rejected:
                out.accepted[node] = update
                out.digests[node] = digest
                seen.add(digest)
        if node in out.rejected:
            log.warning("round %s: reply of node %s rejected: %s", round_now, node, out.rejected[node])
    return out


def seen_digests(state: GlobalState) -> set[str]:
    """Digests of every update accepted in the rounds of ``state``'s history (to refuse replays)."""
    return {d for entry in state.history for d in entry.get("digests", {}).values()}


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
        "experts_trained": len(report.experts), "experts_untouched": len(report.untouched),
        "digests": {str(n): d for n, d in sorted(screened.digests.items())},
        "clipped": {str(n): units for n, units in sorted(screened.clipped.items())}, **(record or {}),
    }  # fmt: skip
    return GlobalState(state.manifest_id, pool, usage, state.round + 1, preferences, [*state.history, entry])
