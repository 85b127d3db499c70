"""Round planning, as pure functions (no Flower): which global experts each device's slots hold, and the per-slot
routing target q sent with them.

The rule (also in ``docs/algorithm.md``), per layer and independently of the other layers:

1. First round, or a node without reported statistics for any expert: the deterministic spread. Experts are
   ordered by fleet usage, least used first (ties by id: in the first round simply 0..M-1); nodes sorted by id;
   node i's slots take the experts at positions ``(o_i + j) mod M`` of that order, ``o_i`` the sum of the tiers of
   the nodes before it. When the fleet's slots add up to at least M, every expert is held by someone; when they do
   not, the experts left out are the most used, so a fleet of new nodes (after a restart) still reaches them.
2. Later rounds, coverage first: experts are taken in order of fleet usage, least used first, and each goes to the
   node with a free slot whose data prefers it most (its share of that node's routed tokens the last time the node
   held it); ties go to the node with more free slots, then the lower id. This continues until every expert is
   held once or no slot is free, so when the slots allow, every expert is trained by someone each round.
3. Then preference: each node's remaining slots take the experts its data prefers most among those it does not
   hold yet (ties: less used by the fleet, then lower id).

Preferences come from the routing statistics of a node's last update; an expert the node has never held counts
as preference 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PlanError(ValueError):
    """A node's tier or the fleet description cannot be planned; the message names the node."""


@dataclass(frozen=True)
class NodePlan:
    """What one node trains this round: ``assignment[l][j]`` is the global expert in slot j of layer l."""

    node_id: int
    tier: int
    assignment: list[list[int]]


def spread_assignment(
    tiers: dict[int, int], num_layers: int, num_experts: int, usage: np.ndarray | None = None
) -> dict[int, list[list[int]]]:
    """Rule 1: per layer, experts ordered by fleet usage (least used first, then id; uniform usage gives 0..M-1);
    node i (by id) takes the experts at positions (o_i + j) mod M of that order, o_i the sum of the tiers before it."""
    out: dict[int, list[list[int]]] = {n: [] for n in tiers}
    for layer in range(num_layers):
        order = list(range(num_experts)) if usage is None else sorted(range(num_experts), key=lambda e: (usage[layer, e], e))
        offset = 0
        for node in sorted(tiers):
            out[node].append([order[(offset + j) % num_experts] for j in range(tiers[node])])
            offset += tiers[node]
    return out


def assign_experts(
    tiers: dict[int, int],
    num_experts: int,
    num_layers: int,
    preferences: dict[int, np.ndarray] | None = None,
    usage: np.ndarray | None = None,
) -> dict[int, list[list[int]]]:
    """Assign global experts to every node's slots (the rule of the module docstring).

    tiers: node id -> slots per layer (1..M). preferences: node id -> [L, M] share of the node's routed tokens per
    global expert (missing nodes, or all-zero rows, have no statistics). usage: [L, M] fleet usage (default uniform).
    Returns node id -> [L][t] distinct expert ids.
    """
    for node, t in tiers.items():
        if not 1 <= t <= num_experts:
            raise PlanError(f"node {node} reports tier {t}, but the bundle's tiers hold 1..{num_experts} experts")
    preferences = preferences or {}
    if usage is None:
        usage = np.full((num_layers, num_experts), 1.0 / num_experts)
    if usage.shape != (num_layers, num_experts):
        raise PlanError(f"usage has shape {usage.shape}, expected {(num_layers, num_experts)}")
    spread = spread_assignment(tiers, num_layers, num_experts, usage)
    informed = {n for n in tiers if n in preferences and np.asarray(preferences[n]).sum() > 0}
    out: dict[int, list[list[int]]] = {n: [] for n in tiers}
    for layer in range(num_layers):
        held: dict[int, list[int]] = {n: [] for n in tiers}
        for n in tiers:  # rule 1 for nodes without statistics
            if n not in informed:
                held[n] = list(spread[n][layer])
        pref = {n: np.asarray(preferences[n], dtype=np.float64)[layer] for n in informed}
        free = {n: tiers[n] for n in informed}
        covered = {e for n in tiers if n not in informed for e in held[n]}
        # Rule 2: coverage, least-used experts first.
        for e in sorted(range(num_experts), key=lambda e: (usage[layer, e], e)):
            if e in covered:
                continue
            candidates = [n for n in informed if free[n] > 0]
            if not candidates:
                break
            best = min(candidates, key=lambda n: (-pref[n][e], -free[n], n))
            held[best].append(e)
            free[best] -= 1
            covered.add(e)
        # Rule 3: each node's remaining slots by its own preference.
        for n in sorted(informed):
            rest = [e for e in range(num_experts) if e not in held[n]]
            rest.sort(key=lambda e: (-pref[n][e], usage[layer, e], e))
            held[n].extend(rest[: free[n]])
        for n in tiers:
            out[n].append(sorted(held[n]))
    return out


def preferences_from_stats(assignment: list[list[int]], route_counts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, M] share of a node's routed tokens per global expert, from its update's per-slot counts [L, t]."""
    counts = np.asarray(route_counts, dtype=np.float64)
    out = np.zeros((len(assignment), num_experts))
    for layer, ids in enumerate(assignment):
        total = counts[layer].sum()
        if total > 0:
            out[layer, ids] = counts[layer] / total
    return out


def routing_target(assignment: list[list[int]], usage: np.ndarray) -> np.ndarray:
    """Per-slot target q [L, t] for the heterogeneity term: q_j proportional to 1 / (u_e + 1/M) over the node's
    slots, so experts the fleet under-uses get a larger share; uniform usage gives the uniform target."""
    usage = np.asarray(usage, dtype=np.float64)
    num_experts = usage.shape[1]
    rows = []
    for layer, ids in enumerate(assignment):
        w = 1.0 / (usage[layer, ids] + 1.0 / num_experts)
        rows.append(w / w.sum())
    return np.asarray(rows, dtype=np.float32)


def sample_nodes(nodes: list[int], fraction: float, min_nodes: int, seed: int) -> list[int]:
    """The nodes of one round: ``max(min_nodes, ceil(fraction * len(nodes)))`` of them, drawn with ``seed`` (the
    same connected nodes and seed give the same sample, also after a restart), sorted by id."""
    if not 0 < fraction <= 1:
        raise PlanError(f"--fraction must be in (0, 1], got {fraction}")
    want = min(len(nodes), max(min_nodes, int(np.ceil(fraction * len(nodes)))))
    rng = np.random.default_rng(seed)
    ordered = sorted(int(n) for n in nodes)  # Flower's node ids are unsigned 64-bit: pick indices, never the ids
    return sorted(ordered[i] for i in rng.choice(len(ordered), size=want, replace=False)) if want else []
