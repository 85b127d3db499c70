"""One federated round as pure functions (no Flower): plan what each node trains, screen the replies, apply the
accepted updates to the global state. The Flower strategy only moves messages between these.

Screening treats every reply as hostile until shown otherwise. Beyond ``Update.validate`` (format, bundle, experts,
shapes, dtypes, finite values) it checks what only the coordinator knows: the tier and round the node was sent, the
example count against the node's own hello figure (``ReplyLimits``), the routing statistics against the tokens those
examples can hold, replays, and how far the update moves each unit (``NormBound``). One node's reply, however
malformed, can only get that node rejected, with the reason: it never stops the round.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from coordinator.merge import MergeReport, fleet_usage, merge_lora, merge_updates, update_usage
from coordinator.plan import assign_experts, preferences_from_stats, routing_target
from coordinator.server_opt import ServerOptimizer, trained_weights
from coordinator.state import GlobalState
from edge_runtime.backends import ADAMW_BETAS
from edge_runtime.bundle import Manifest
from edge_runtime.records import TrainInstruction, printable
from edge_runtime.update import Update, UpdateError, default_assignment, tier_values_from_pool, tier_values_to_global

log = logging.getLogger(__name__)


NORM_ACTIONS = ("clip", "reject")


@functools.lru_cache(maxsize=256)
def adamw_reach(steps: int, betas: tuple[float, float] = ADAMW_BETAS) -> float:
    """The most one parameter can move in ``steps`` AdamW steps from fresh moments, in units of the learning rate.

    ONNX Runtime's AdamW (and ``backends.OrtAdamW``) moves a parameter at step t by lr * a_t * m_t / (sqrt(v_t) + eps)
    with a_t = sqrt(1 - b2^t) / (1 - b1^t), m_t = (1 - b1) sum_i b1^(t-i) g_i, v_t = (1 - b2) sum_i b2^(t-i) g_i^2.
    Writing b1^(t-i) g_i = (b1 / sqrt(b2))^(t-i) * sqrt(b2)^(t-i) g_i, Cauchy-Schwarz gives
    |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(S_t), S_t = sum_{j<t} (b1^2 / b2)^j, for ANY gradients. So one
    step moves it by at most lr * c_t, c_t = a_t (1 - b1) / sqrt(1 - b2) sqrt(S_t) (c_1 = 1; c_t grows towards 7.3),
    and ``steps`` steps by lr * sum_t c_t. Weight decay is 0 in the exported optimizer, and epsilon only shortens the
    step. The bound is tight: gradients growing in one direction reach it (within 3e-5 on ORT's own kernel), and a
    single step moves every parameter whose gradient is well above epsilon by almost exactly lr, so a one-step update
    sits just under it (0.988 of it measured on MiniLM's head). After 8 honest steps updates reach at most 0.67 of it
    (``benchmarks/update_bound_bench.py``). It holds only for fresh moments: every train message opens a new session.
    """
    b1, b2 = betas
    t = np.arange(1, max(0, int(steps)) + 1, dtype=np.float64)
    gamma = b1 * b1 / b2
    c = np.sqrt(1 - b2**t) / (1 - b1**t) * (1 - b1) / math.sqrt(1 - b2) * np.sqrt((1 - gamma**t) / (1 - gamma))
    return float(c.sum())


@dataclass(frozen=True)
class NormBound:
    """How far one update may move each unit (an expert, a layer's router rows, a LoRA module, the head), as an L2
    norm of the change from the values the node was sent (``--max-update-norm``).

    - ``auto`` (the default): the most AdamW could move the unit in the node's local steps at the run's learning rate,
      sqrt(parameters of the unit) * lr * ``adamw_reach(steps)``. An honest device can never exceed it; a hostile one
      can move each unit no further than training could have.
    - a number: that bound for every unit; ``off`` (or 0): no bound.
    """

    kind: str = "auto"
    value: float = 0.0

    KINDS = ("auto", "fixed", "off")

    @classmethod
    def parse(cls, text: str | float) -> NormBound:
        """``auto``, ``off`` / ``0``, or a positive number; ValueError naming --max-update-norm otherwise."""
        word = str(text).strip().lower()
        if word == "auto":
            return cls("auto")
        if word in ("off", "none", "0", "0.0"):
            return cls("off")
        try:
            value = float(word)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--max-update-norm must be auto, off or a positive number, got {text!r}")
        return cls("fixed", value)

    @property
    def active(self) -> bool:
        return self.kind != "off"

    def for_unit(self, numel: int, learning_rate: float, steps: int, value_norm: float = 0.0) -> float:
        """The bound of one unit of ``numel`` parameters, whose values had L2 norm ``value_norm`` when sent, for a
        node that took at most ``steps`` steps (inf: none).

        ``auto`` adds what float32 arithmetic can add: each step rounds every parameter to within half a float32
        spacing, at most 2^-24 |p|, so T steps add at most T 2^-24 (||p_0|| + the move) to the unit's norm (2^-23: a
        factor 2 for the kernel's several roundings per step)."""
        if self.kind == "off":
            return math.inf
        if self.kind == "fixed":
            return self.value
        move = math.sqrt(numel) * learning_rate * adamw_reach(steps)
        return move * (1 + 1e-4) + steps * 2.0**-23 * (value_norm + move)

    def __str__(self) -> str:
        return {"auto": "auto (AdamW's reach)", "off": "off"}.get(self.kind, f"{self.value:g}")


@dataclass(frozen=True)
class ReplyLimits:
    """What one node's honest update can hold this round, from its own hello figures and the round's settings."""

    max_examples: int
    """Examples it may claim: its training examples x epochs, and local steps x batch size when steps are limited."""
    max_steps: int
    """Local steps it can have taken (what ``NormBound`` auto assumes)."""
    tokens_per_example: int
    """The token limit per row (the routing statistics count at most this many tokens per example)."""


def reply_limits(train_examples: int, device_batch: int, train: dict[str, Any], manifest: Manifest) -> ReplyLimits:
    """The limits of a node with ``train_examples`` rows and a largest batch ``device_batch`` (its hello figures) under
    the round's ``train`` settings (``RunSettings.train_settings``). The device trains with batch
    min(--batch-size, its own), so it takes at most epochs x ceil(rows / batch) steps, capped by --local-steps."""
    epochs, batch = int(train.get("epochs", 1)), max(1, int(train.get("batch_size", 16)))
    max_steps = int(train.get("max_steps") or 0)
    steps = epochs * -(-train_examples // max(1, min(batch, device_batch)))
    examples = train_examples * epochs
    if max_steps:
        steps, examples = min(steps, max_steps), min(examples, max_steps * batch)
    return ReplyLimits(max(1, examples), max(1, steps), int(train.get("max_seq_len") or manifest.max_seq_len))


@dataclass
class Screened:
    """The replies of a round, split into updates to merge and rejections with their reasons."""

    accepted: dict[int, Update] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, dict[str, float]] = field(default_factory=dict)
    """Node -> unit -> the norm of its change before it was clipped to the bound (``--max-update-norm``)."""
    digests: dict[int, str] = field(default_factory=dict)
    """Node -> digest of the update it sent (accepted ones), so a later copy of it is refused as a replay."""
    capped: dict[int, int] = field(default_factory=dict)
    """Node -> the example count it claimed, where that was more than its limit (it is merged with the limit)."""
    bounds: dict[int, dict[str, float]] = field(default_factory=dict)
    """Node -> unit -> the norm bound its update was held to (with an active ``NormBound``), for ``check_merged``."""


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


def unit_sizes(values: dict[str, np.ndarray]) -> dict[str, int]:
    """Unit -> its number of parameters, over the tensors of ``values`` (what a node was sent)."""
    sizes: dict[str, int] = {}
    for key, value in values.items():
        unit = update_unit(key)
        if unit is not None:
            sizes[unit] = sizes.get(unit, 0) + int(np.size(value))
    return sizes


def unit_bounds(values: dict[str, np.ndarray], bound: NormBound, learning_rate: float, steps: int) -> dict[str, float]:
    """Unit -> the largest change ``bound`` allows a node sent ``values`` that took at most ``steps`` steps."""
    squares: dict[str, float] = {}
    for key, value in values.items():
        unit = update_unit(key)
        if unit is not None:
            squares[unit] = squares.get(unit, 0.0) + float(np.square(np.asarray(value, np.float64)).sum())
    return {unit: bound.for_unit(n, learning_rate, steps, math.sqrt(squares[unit])) for unit, n in unit_sizes(values).items()}


def clip_update(update: Update, sent: dict[str, np.ndarray], max_norm: float | dict[str, float]) -> tuple[Update, dict[str, float]]:
    """The update with each unit's change scaled down to its bound where it was larger (sent + c * change), and unit
    -> original norm of the units clipped. ``max_norm`` is one bound for every unit or unit -> bound. Units within
    their bound are returned unchanged, bit for bit."""
    norms = change_norms(update, sent)
    limit = (lambda unit: max_norm[unit]) if isinstance(max_norm, dict) else (lambda unit: max_norm)  # noqa: E731
    over = {unit: n for unit, n in norms.items() if n > limit(unit)}
    if not over:
        return update, {}
    tensors = dict(update.tensors)
    for key, value in update.tensors.items():
        unit = update_unit(key)
        if unit in over:
            scale = limit(unit) / over[unit]
            base = sent[key].astype(np.float64)
            tensors[key] = (base + scale * (value.astype(np.float64) - base)).astype(np.float32)
    return replace(update, tensors=tensors), over


def check_statistics(update: Update, limits: ReplyLimits, top_k: int) -> None:
    """Refuse routing statistics that no honest training of ``update.num_examples`` examples produces: per layer, at
    most examples x tokens per example x top-k assignments (``route_counts``) and that many tokens' probabilities
    (``route_prob_sum``, each token's summing to 1). They steer the fleet's usage and the ``tokens`` merge weight."""
    tokens = float(update.num_examples) * limits.tokens_per_example
    for name, values, most in (("route_counts", update.route_counts, tokens * top_k), ("route_prob_sum", update.route_prob_sum, tokens)):
        per_layer = np.asarray(values, np.float64).sum(axis=1)
        worst = int(per_layer.argmax())
        if per_layer[worst] > most * (1 + 1e-4) + 1:
            raise UpdateError(f"update statistic {name} of layer {worst} sums to {per_layer[worst]:.6g}, more than {most:.6g}: "
                              f"{update.num_examples} examples of at most {limits.tokens_per_example} tokens cannot produce it")  # fmt: skip


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


@dataclass(frozen=True)
class Screening:
    """How a round's replies are screened beyond validation: the norm bound, what an update over it gets (clip or
    reject), and the learning rate the ``auto`` bound assumes."""

    bound: NormBound = NormBound("off")
    action: str = "clip"
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.action not in NORM_ACTIONS:
            raise ValueError(f"norm_action must be one of {', '.join(NORM_ACTIONS)}, got {self.action!r}")


def screen_replies(
    manifest: Manifest,
    sent: dict[int, TrainInstruction],
    replies: dict[int, tuple[Update, int] | str],
    screening: Screening = Screening(),
    seen: set[str] | None = None,
    limits: dict[int, ReplyLimits] | None = None,
) -> Screened:
    """Validate each node's reply against the bundle and what was sent to that node.

    ``replies`` maps node id -> (update, the round it answers) or an error text (the node failed). Refused, with the
    node and reason logged: replies from nodes not sent anything this round, replies to another round (stale or
    replayed), updates for another tier than the one sent, updates that fail ``Update.validate`` with the node's
    assignment, routing statistics more than its examples can produce, and copies of an update already accepted
    (digest in ``seen``, from earlier rounds, or sent by another node this round). With ``limits`` (node -> its
    ``ReplyLimits``), a larger example count is lowered to the node's limit (recorded in ``capped``). With an active
    ``screening.bound``, a unit whose change is larger is clipped to it or, with action ``reject``, the whole update
    is refused. Each reply is screened on its own: whatever goes wrong with one rejects that node, not the round.
    """
    out = Screened()
    seen = set(seen or ())
    round_now = next(iter(sent.values())).round if sent else None
    for node, reply in sorted(replies.items(), key=lambda item: item[0]):
        try:
            verdict = _screen_one(manifest, sent, node, reply, screening, seen, (limits or {}).get(node))
        except Exception as exc:  # noqa: BLE001  # one node's reply, whatever is wrong with it, is that node's problem
            log.exception("round %s: screening the reply of node %s failed", round_now, node)
            verdict = f"the reply could not be screened ({type(exc).__name__}: {printable(exc)})"
        if isinstance(verdict, str):
            verdict = printable(verdict, 400)  # reasons quote what the device sent (ids, names): no escapes, no forged lines
            out.rejected[node] = verdict
            log.warning("round %s: reply of node %s rejected: %s", round_now, node, verdict)
            continue
        update, digest, over, capped, bounds = verdict
        if over:
            out.clipped[node] = over
            log.warning("round %s: node %s: %d unit(s) clipped to the update bound (largest change %.4g)", round_now, node, len(over),
                        max(over.values()))  # fmt: skip
        if capped:
            out.capped[node] = capped
            log.warning("round %s: node %s claimed %d examples; counted as %d, its limit", round_now, node, capped, update.num_examples)
        out.accepted[node] = update
        out.digests[node] = digest
        if bounds:
            out.bounds[node] = bounds
        seen.add(digest)
    return out


def _screen_one(manifest: Manifest, sent: dict[int, TrainInstruction], node: int, reply: tuple[Update, int] | str, screening: Screening,
                seen: set[str], limits: ReplyLimits | None) -> str | tuple[Update, str, dict[str, float], int, dict[str, float]]:  # fmt: skip
    """One reply: the reason it is refused, or (update to merge, its digest, units clipped, examples claimed if capped,
    unit -> its bound)."""
    if isinstance(reply, str):
        return f"node failed: {printable(reply)}"
    if node not in sent:
        return "node was not sent an instruction this round"
    ins = sent[node]
    update, round_ = reply
    if round_ != ins.round:
        return f"reply answers round {printable(round_, 40)}, this is round {ins.round}"
    if update.tier != ins.tier:
        return f"update is for tier {printable(update.tier, 40)}, this node was sent tier {ins.tier}"
    try:
        update.validate(manifest, ins.assignment)
    except UpdateError as exc:
        return str(exc)
    capped = 0
    if limits is not None and update.num_examples > limits.max_examples:
        capped, update = update.num_examples, replace(update, num_examples=limits.max_examples)
    if limits is not None:
        try:
            check_statistics(update, limits, 1 if manifest.is_lora else manifest.tier(ins.tier).top_k)
        except UpdateError as exc:
            return str(exc)
    digest = update_digest(update)
    if digest in seen:
        return f"replayed update: the same tensors (sha256 {digest[:12]}) were already accepted"
    over: dict[str, float] = {}
    bounds: dict[str, float] = {}
    if screening.bound.active:
        steps = limits.max_steps if limits is not None else int(ins.train.get("max_steps") or 1)
        bounds = unit_bounds(ins.values, screening.bound, screening.learning_rate, steps)
        clipped, over = clip_update(update, ins.values, bounds)
        if over and screening.action == "reject":
            worst = max(over, key=over.__getitem__)
            return f"{len(over)} unit(s) changed by more than --max-update-norm {screening.bound}, e.g. {worst} by {over[worst]:.4g} (bound {bounds[worst]:.4g})"
        update = clipped
    return update, digest, over, capped, bounds


def merged_unit(key: str) -> str | None:
    """The unit of a global pool tensor whose move ``check_merged`` bounds: an expert, one router row
    (``layers.l.router.e``, named per row: each row is merged over its own holders), the head, a LoRA module."""
    if ".router." in key:
        return None  # router tensors are [M, d]: checked row by row
    return update_unit(key)


def check_merged(old: dict[str, np.ndarray], new: dict[str, np.ndarray], manifest: Manifest, screened: Screened) -> str | None:
    """Why the merged pool ``new`` must not be committed, or None: a value that is not finite, or a unit moved further
    than any accepted update was allowed to move it (with an active bound). A merge is a convex combination of the
    updates, so it cannot move a unit beyond the largest bound of the nodes that carry it; HetLoRA's zero padding can
    also pull a module towards zero, by at most its old norm. Either finding means a bug or a corrupted merge, and
    the round is refused rather than committed."""
    for key, value in new.items():
        if not np.isfinite(value).all():
            return f"the merged {key} holds {int((~np.isfinite(value)).sum())} NaN or Inf value(s)"
    if not screened.bounds:
        return None
    largest: dict[str, float] = {}
    for node, bounds in screened.bounds.items():
        update = screened.accepted[node]
        for unit, b in bounds.items():
            if ".router_rows" in unit:  # the node's rows: row j is global expert assignment[layer][j]
                layer = int(unit.split(".")[1])
                names = [f"layers.{layer}.router.{e}" for e in update.assignment[layer]]
            else:
                names = [unit]
            for name in names:
                largest[name] = max(largest.get(name, 0.0), b)
    moves: dict[str, float] = {}
    old_norms: dict[str, float] = {}
    for key, value in new.items():
        before = old[key].astype(np.float64)
        delta = value.astype(np.float64) - before
        if ".router." in key:
            layer = key.split(".")[1]
            for e, row in enumerate(np.square(delta).reshape(delta.shape[0], -1).sum(axis=1)):
                name = f"layers.{layer}.router.{e}"
                moves[name] = moves.get(name, 0.0) + float(row)
            continue
        unit = merged_unit(key)
        if unit is not None:
            moves[unit] = moves.get(unit, 0.0) + float(np.square(delta).sum())
            old_norms[unit] = old_norms.get(unit, 0.0) + float(np.square(before).sum())
    slack = manifest.method == "hetlora"
    for unit, square in moves.items():
        move = math.sqrt(square)
        if move == 0.0:
            continue
        allowed = largest.get(unit)
        if allowed is None:
            return f"the merge moved {unit} by {move:.4g}, but no accepted update carries it"
        allowed += math.sqrt(old_norms.get(unit, 0.0)) if slack and unit.startswith("lora.") else 0.0
        if move > allowed * (1 + 1e-3) + 1e-6:
            return f"the merge moved {unit} by {move:.4g}, more than the {allowed:.4g} any update carrying it was allowed"
    return None


def seen_digests(state: GlobalState) -> set[str]:
    """Digests of every update accepted in the rounds of ``state``'s history (to refuse replays)."""
    return {d for entry in state.history for d in entry.get("digests", {}).values()}


def apply_round(state: GlobalState, manifest: Manifest, screened: Screened, weighting: str = "examples",
                record: dict[str, Any] | None = None, max_share: float = 1.0, keep_head: bool = False,
                optimizer: ServerOptimizer | None = None) -> GlobalState:  # fmt: skip
    """The next global state: merged pool (no node's share of any mean above ``max_share``), updated usage and
    preferences, round + 1, and a history record. ``keep_head``: the head stays as it was (a frozen head).
    ``optimizer``: a server optimiser's step on the merged units (``server_opt``; None or plain: the merge as it
    is). Check the pool with ``check_merged`` before committing it."""
    updates = [screened.accepted[n] for n in sorted(screened.accepted)]
    if manifest.is_lora:
        pool, lora_weights = merge_lora(state.pool, updates, lora_modules(manifest), lora_rule(manifest), max_share)
        record = {**(record or {}), "lora_weights": {str(n): float(np.mean([w[i] for w in lora_weights.values()]))
                                                     for i, n in enumerate(sorted(screened.accepted))}}  # fmt: skip
        report = MergeReport()
    else:
        pool, report = merge_updates(state.pool, updates, manifest.num_layers, manifest.num_experts, weighting, max_share)
    moments = state.moments
    if optimizer is not None and not optimizer.is_plain:
        trained = trained_weights(updates, manifest.num_layers, manifest.num_experts)
        pool, moments = optimizer.step(state.pool, pool, trained, state.moments)
    if keep_head:
        pool.update({k: v for k, v in state.pool.items() if k.startswith("head.")})
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
        "clipped": {str(n): units for n, units in sorted(screened.clipped.items())},
        "capped": {str(n): claimed for n, claimed in sorted(screened.capped.items())}, **(record or {}),
    }  # fmt: skip
    return GlobalState(state.manifest_id, pool, usage, state.round + 1, preferences, [*state.history, entry], moments)
