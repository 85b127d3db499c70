"""Expert assignment and the routing target (pure functions; the rule is in docs/algorithm.md)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.plan import PlanError, assign_experts, preferences_from_stats, routing_target, spread_assignment


def test_first_round_spread_covers_every_expert_when_slots_allow() -> None:
    plan = spread_assignment({7: 2, 3: 4, 9: 8}, num_layers=2, num_experts=8)
    assert plan[3] == [[0, 1, 2, 3]] * 2 and plan[7] == [[4, 5]] * 2  # by node id: 3 first, then 7, then 9
    assert sorted(plan[9][0]) == list(range(8))
    small = spread_assignment({1: 2, 2: 2, 3: 2, 4: 2}, 1, 8)
    assert sorted(e for ids in small.values() for e in ids[0]) == list(range(8))


def test_preferences_decide_once_every_expert_is_covered() -> None:
    M = 4
    prefs = {
        1: np.array([[0.7, 0.3, 0.0, 0.0]]),  # node 1's data likes expert 0
        2: np.array([[0.6, 0.0, 0.0, 0.4]]),
    }
    plan = assign_experts({1: 2, 2: 2}, M, 1, prefs)
    held = sorted(e for n in plan for e in plan[n][0])
    assert held == [0, 1, 2, 3]  # 4 slots, 4 experts: each held once
    assert 0 in plan[1][0] and 3 in plan[2][0]
    roomy = assign_experts({1: 3, 2: 3}, M, 1, prefs)  # 6 slots: coverage, then each node's own favourites
    assert set(roomy[1][0]) | set(roomy[2][0]) == {0, 1, 2, 3}
    assert 0 in roomy[1][0] and 0 in roomy[2][0]


def test_node_without_statistics_gets_the_spread_and_tier_is_checked() -> None:
    plan = assign_experts({1: 2, 2: 2}, 4, 2, {2: np.zeros((2, 4))})
    assert plan == spread_assignment({1: 2, 2: 2}, 2, 4)
    with pytest.raises(PlanError, match="node 5 reports tier 9"):
        assign_experts({5: 9}, 8, 1)


def test_assignments_are_distinct_and_full() -> None:
    rng = np.random.default_rng(0)
    tiers = {n: int(rng.choice([1, 2, 4, 8])) for n in range(10)}
    prefs = {n: rng.dirichlet(np.ones(8), size=3) for n in range(0, 10, 2)}
    plan = assign_experts(tiers, 8, 3, prefs, usage=rng.dirichlet(np.ones(8), size=3))
    for n, rows in plan.items():
        assert len(rows) == 3
        for ids in rows:
            assert len(ids) == tiers[n] == len(set(ids)) and all(0 <= e < 8 for e in ids)
    for layer in range(3):
        assert {e for rows in plan.values() for e in rows[layer]} == set(range(8))


def test_preferences_and_target() -> None:
    p = preferences_from_stats([[2, 0], [1, 3]], np.array([[3.0, 1.0], [0.0, 0.0]]), 4)
    np.testing.assert_allclose(p, [[0.25, 0, 0.75, 0], [0, 0, 0, 0]])
    q = routing_target([[0, 1], [2, 3]], np.array([[0.25] * 4, [0.0, 0.0, 0.0, 0.5]]))
    np.testing.assert_allclose(q[0], [0.5, 0.5])
    assert q[1, 0] > q[1, 1] and q[1].sum() == pytest.approx(1.0)  # the unused expert 2 gets the larger share
