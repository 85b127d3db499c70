"""The sparse merge against a direct NumPy computation, on synthetic updates (no bundle, no Flower)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.merge import fleet_usage, merge_updates, update_usage
from edge_runtime.update import Update

L, M, D, R, C = 2, 4, 3, 2, 2  # layers, global experts, hidden, expert width, labels
SHAPES = {"w1": (D, R), "b1": (R,), "w2": (R, D), "b2": (D,)}


def make_pool(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = {f"layers.{l}.experts.{e}.{t}": rng.normal(size=s).astype(np.float32) for l in range(L) for e in range(M) for t, s in SHAPES.items()}
    for l in range(L):
        pool[f"layers.{l}.router.weight"] = rng.normal(size=(M, D)).astype(np.float32)
        pool[f"layers.{l}.router.bias"] = rng.normal(size=(M,)).astype(np.float32)
    pool["head.weight"] = rng.normal(size=(C, D)).astype(np.float32)
    pool["head.bias"] = rng.normal(size=(C,)).astype(np.float32)
    return pool


def make_update(assignment: list[list[int]], examples: int, seed: int, counts: np.ndarray | None = None) -> Update:
    rng = np.random.default_rng(seed)
    t = len(assignment[0])
    tensors = {f"layers.{l}.experts.{e}.{n}": rng.normal(size=s).astype(np.float32)
               for l, ids in enumerate(assignment) for e in ids for n, s in SHAPES.items()}  # fmt: skip
    if t > 1:
        for l in range(L):
            tensors[f"layers.{l}.router_rows.weight"] = rng.normal(size=(t, D)).astype(np.float32)
            tensors[f"layers.{l}.router_rows.bias"] = rng.normal(size=(t,)).astype(np.float32)
    tensors["head.weight"] = rng.normal(size=(C, D)).astype(np.float32)
    tensors["head.bias"] = rng.normal(size=(C,)).astype(np.float32)
    tensors["stats.route_counts"] = (np.ones((L, t)) if counts is None else counts).astype(np.float32)
    tensors["stats.route_prob_sum"] = np.ones((L, t), np.float32)
    return Update("0" * 16, t, assignment, examples, tensors)


def key(l: int, e: int, t: str) -> str:
    return f"layers.{l}.experts.{e}.{t}"


def test_expert_trained_by_one_of_three_takes_only_its_values() -> None:
    pool = make_pool()
    a = make_update([[0, 1], [0, 1]], 10, 1)
    b = make_update([[0, 2], [1, 2]], 30, 2)
    c = make_update([[0, 1], [1, 2]], 60, 3)  # noqa: E501  expert 3 of every layer: nobody
    new, report = merge_updates(pool, [a, b, c], L, M)
    # Layer 0, expert 2: only b trained it -> exactly b's values (not divided by all replies' weight).
    for t in SHAPES:
        np.testing.assert_array_equal(new[key(0, 2, t)], b.tensors[key(0, 2, t)])
        np.testing.assert_array_equal(new[key(0, 3, t)], pool[key(0, 3, t)])  # untrained: unchanged
        np.testing.assert_array_equal(new[key(1, 0, t)], a.tensors[key(1, 0, t)])
    assert (0, 3) in report.untouched and (1, 3) in report.untouched
    # Layer 0, expert 1: a (10) and c (60), normalised over those two only.
    for t in SHAPES:
        want = (10 * a.tensors[key(0, 1, t)].astype(np.float64) + 60 * c.tensors[key(0, 1, t)]) / 70
        np.testing.assert_allclose(new[key(0, 1, t)], want, rtol=1e-6)
    # Layer 0, expert 0: all three.
    want = (10 * a.tensors[key(0, 0, "w1")].astype(np.float64) + 30 * b.tensors[key(0, 0, "w1")] + 60 * c.tensors[key(0, 0, "w1")]) / 100
    np.testing.assert_allclose(new[key(0, 0, "w1")], want, rtol=1e-6)
    # Router rows go to the holder's global rows: layer 1, expert 2 is b's slot 1 and c's slot 1.
    want_row = (30 * b.tensors["layers.1.router_rows.weight"][1].astype(np.float64) + 60 * c.tensors["layers.1.router_rows.weight"][1]) / 90
    np.testing.assert_allclose(new["layers.1.router.weight"][2], want_row, rtol=1e-6)
    np.testing.assert_array_equal(new["layers.1.router.weight"][3], pool["layers.1.router.weight"][3])
    # Head: everyone, by examples.
    want_head = (10 * a.tensors["head.bias"].astype(np.float64) + 30 * b.tensors["head.bias"] + 60 * c.tensors["head.bias"]) / 100
    np.testing.assert_allclose(new["head.bias"], want_head, rtol=1e-6)
    assert report.experts[(0, 1)] == [10.0, 60.0]


def test_pool_is_not_modified_and_no_update_changes_nothing() -> None:
    pool = make_pool()
    before = {k: v.copy() for k, v in pool.items()}
    merge_updates(pool, [make_update([[0, 1], [2, 3]], 5, 1)], L, M)
    new, report = merge_updates(pool, [], L, M)
    for k in pool:
        np.testing.assert_array_equal(pool[k], before[k])
        np.testing.assert_array_equal(new[k], before[k])
    assert len(report.untouched) == L * M


def test_token_weighting_uses_each_holders_routed_tokens() -> None:
    pool = make_pool()
    a = make_update([[0, 1], [0, 1]], 10, 1, counts=np.array([[3.0, 0.0], [1.0, 1.0]]))
    b = make_update([[0, 1], [0, 1]], 90, 2, counts=np.array([[1.0, 0.0], [1.0, 1.0]]))
    new, report = merge_updates(pool, [a, b], L, M, weighting="tokens")
    want = (3 * a.tensors[key(0, 0, "b2")].astype(np.float64) + 1 * b.tensors[key(0, 0, "b2")]) / 4
    np.testing.assert_allclose(new[key(0, 0, "b2")], want, rtol=1e-6)
    np.testing.assert_array_equal(new[key(0, 1, "b2")], pool[key(0, 1, "b2")])  # no tokens routed to it: kept
    assert (0, 1) in report.untouched
    with pytest.raises(ValueError, match="weighting"):
        merge_updates(pool, [a], L, M, weighting="bytes")


def test_one_slot_tier_leaves_router_rows_to_others() -> None:
    pool = make_pool()
    solo = make_update([[2], [2]], 50, 1)
    new, _ = merge_updates(pool, [solo], L, M)
    np.testing.assert_array_equal(new["layers.0.router.weight"], pool["layers.0.router.weight"])
    np.testing.assert_array_equal(new[key(0, 2, "w2")], solo.tensors[key(0, 2, "w2")])


def test_fleet_usage_and_its_moving_average() -> None:
    a = make_update([[0, 1], [0, 1]], 1, 1, counts=np.array([[3.0, 1.0], [2.0, 2.0]]))
    b = make_update([[1, 2], [2, 3]], 1, 2, counts=np.array([[2.0, 2.0], [0.0, 4.0]]))
    usage = fleet_usage([a, b], L, M)
    np.testing.assert_allclose(usage[0], [3 / 8, 3 / 8, 2 / 8, 0])
    np.testing.assert_allclose(usage[1], [2 / 8, 2 / 8, 0, 4 / 8])
    prev = np.full((L, M), 0.25)
    np.testing.assert_allclose(update_usage(prev, usage, 0.5), 0.5 * prev + 0.5 * usage)
    assert update_usage(prev, None) is prev


# -- the LoRA baselines ---------------------------------------------------------------------------------------

LORA_MODULES = {"enc.q": (3, 5), "enc.ffn": (5, 3)}  # module -> (in, out)
RMAX = 4


def lora_tensors(rank: int, seed: int) -> dict[str, np.ndarray]:
    """Random A [rank, in] and B [out, rank] of every module, and a head."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for m, (i, o) in LORA_MODULES.items():
        tensors[f"lora.{m}.A"] = rng.normal(size=(rank, i)).astype(np.float32)
        tensors[f"lora.{m}.B"] = rng.normal(size=(o, rank)).astype(np.float32)
    tensors["head.weight"] = rng.normal(size=(C, D)).astype(np.float32)
    tensors["head.bias"] = rng.normal(size=(C,)).astype(np.float32)
    return tensors


def lora_pool(seed: int = 0) -> dict[str, np.ndarray]:
    return lora_tensors(RMAX, seed)


def lora_update(rank: int, examples: int, seed: int) -> Update:
    tensors = lora_tensors(rank, seed)
    tensors["stats.route_counts"] = np.ones((L, 1), np.float32)
    tensors["stats.route_prob_sum"] = np.ones((L, 1), np.float32)
    return Update("0" * 16, rank, [[0]] * L, examples, tensors)


def test_fedit_is_fedavg_of_a_and_b() -> None:
    from coordinator.merge import merge_lora

    pool = lora_pool()
    ups = [lora_update(RMAX, n, s) for n, s in ((10, 1), (30, 2), (60, 3))]
    new, weights = merge_lora(pool, ups, sorted(LORA_MODULES), "fedavg")
    w = np.array([10, 30, 60]) / 100
    for m in LORA_MODULES:
        for x in "AB":
            want = sum(wk * u.tensors[f"lora.{m}.{x}"].astype(np.float64) for wk, u in zip(w, ups))
            np.testing.assert_allclose(new[f"lora.{m}.{x}"], want, rtol=1e-6)
        assert weights[m] == pytest.approx(list(w))
    np.testing.assert_allclose(new["head.bias"], sum(wk * u.tensors["head.bias"] for wk, u in zip(w, ups)), rtol=1e-6)
    assert not np.shares_memory(new["lora.enc.q.A"], pool["lora.enc.q.A"])


def test_hetlora_zero_pads_and_weights_by_the_frobenius_norm_of_b_a() -> None:
    from coordinator.merge import merge_lora, pad_lora

    pool = lora_pool()
    ups = [lora_update(r, n, s) for r, n, s in ((1, 50, 1), (2, 10, 2), (4, 5, 3))]
    new, weights = merge_lora(pool, ups, sorted(LORA_MODULES), "hetlora")
    for m, (i, o) in LORA_MODULES.items():
        # the paper's rule, written out directly: zero-pad to RMAX, p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F
        norms = np.array([np.sqrt(((u.tensors[f"lora.{m}.B"].astype(np.float64) @ u.tensors[f"lora.{m}.A"]) ** 2).sum()) for u in ups])
        p = norms / norms.sum()
        want_a, want_b = np.zeros((RMAX, i)), np.zeros((o, RMAX))
        for pk, u in zip(p, ups):
            r = u.tier
            want_a[:r] += pk * u.tensors[f"lora.{m}.A"]
            want_b[:, :r] += pk * u.tensors[f"lora.{m}.B"]
        np.testing.assert_allclose(new[f"lora.{m}.A"], want_a, rtol=1e-5)
        np.testing.assert_allclose(new[f"lora.{m}.B"], want_b, rtol=1e-5)
        assert weights[m] == pytest.approx(list(p))
        # the rank-1 client contributes nothing beyond its first component
        assert np.allclose(new[f"lora.{m}.A"][3], p[2] * ups[2].tensors[f"lora.{m}.A"][3])
    a, b = pad_lora(np.ones((2, 3), np.float32), np.ones((5, 2), np.float32), 4)
    np.testing.assert_array_equal(b @ a, np.full((5, 3), 2.0))
    with pytest.raises(ValueError, match="cannot be padded"):
        pad_lora(np.ones((5, 3)), np.ones((5, 5)), 4)


def test_hetlora_falls_back_to_examples_when_every_b_is_zero_and_rejects_unknown_rules() -> None:
    from coordinator.merge import merge_lora

    ups = [lora_update(2, n, s) for n, s in ((10, 1), (30, 2))]
    for u in ups:
        for k in u.tensors:
            if k.endswith(".B"):
                u.tensors[k][:] = 0
    _, weights = merge_lora(lora_pool(), ups, sorted(LORA_MODULES), "hetlora")
    assert weights["enc.q"] == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="fedavg, hetlora"):
        merge_lora(lora_pool(), ups, sorted(LORA_MODULES), "mean")


def test_one_device_claiming_a_huge_count_no_longer_owns_the_merge() -> None:
    """Issue 17, finding 3: 10**12 examples against three honest devices at 100 gave the claimant 0.9999999997 of
    the weight. With --max-share 0.5 it gets exactly half, and the honest three share the rest as their counts say."""
    from coordinator.merge import cap_shares

    claims = [10**12, 100, 100, 100]
    assert cap_shares(claims, 1.0)[0] == pytest.approx(0.9999999997, abs=1e-10)
    np.testing.assert_allclose(cap_shares(claims, 0.5), [0.5, 1 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(cap_shares([10**12, 300, 100], 0.5), [0.5, 0.375, 0.125])  # the rest in proportion
    np.testing.assert_allclose(cap_shares([10**12, 1], 0.25), [0.5, 0.5])  # two holders: never below 1/n
    np.testing.assert_allclose(cap_shares([3, 1], 0.9), [0.75, 0.25])  # under the cap: the plain normalisation
    rng = np.random.default_rng(0)
    for _ in range(200):  # against the definition: sums to 1, none over the cap, uncapped ones keep their ratios
        w = rng.pareto(0.7, size=rng.integers(1, 9)) + 1e-3
        cap = float(rng.uniform(0.05, 1.0))
        s = cap_shares(w, cap)
        limit = max(cap, 1 / len(w))
        assert s.sum() == pytest.approx(1.0) and (s <= limit + 1e-12).all()
        free = s < limit - 1e-12
        if free.sum() > 1:
            np.testing.assert_allclose(s[free] / s[free].sum(), w[free] / w[free].sum(), rtol=1e-9)
    with pytest.raises(ValueError, match="not all 0"):
        cap_shares([0.0, 0.0], 0.5)


def test_the_share_bound_holds_in_every_mean_of_the_merge() -> None:
    """Experts, router rows and head: the claimant's share is at most --max-share, checked against NumPy."""
    pool = make_pool()
    big = make_update([[0, 1], [0, 1]], 10**12, 1)
    small = [make_update([[0, 1], [0, 1]], 100, s) for s in (2, 3, 4)]
    new, _ = merge_updates(pool, [big, *small], L, M, max_share=0.5)
    for k in (key(0, 0, "w1"), "head.weight"):
        want = 0.5 * big.tensors[k].astype(np.float64) + sum(u.tensors[k].astype(np.float64) for u in small) / 6
        np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-7)
    want = 0.5 * big.tensors["layers.1.router_rows.bias"][1].astype(np.float64) + sum(u.tensors["layers.1.router_rows.bias"][1] for u in small) / 6
    np.testing.assert_allclose(new["layers.1.router.bias"][1], want, rtol=1e-6)
