"""A round without Flower: plan, screen replies (bad ones named and never merged), apply to the global state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from coordinator.rounds import apply_round, plan_round, screen_replies
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.update import Update, manifest_id


def trained(ins, examples: int, seed: int) -> Update:  # noqa: ANN001
    """What a device would send back: its values moved a little, and routing statistics."""
    rng = np.random.default_rng(seed)
    tensors = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in ins.values.items()}
    L, t = ins.routing_target.shape
    tensors["stats.route_counts"] = rng.integers(1, 20, size=(L, t)).astype(np.float32)
    tensors["stats.route_prob_sum"] = np.ones((L, t), np.float32)
    return Update(ins.manifest_id, ins.tier, ins.assignment, examples, tensors)


def test_round_merges_exactly_the_valid_replies(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    state = GlobalState.initial(manifest_id(manifest), pool, manifest.num_layers, manifest.num_experts)
    sent = plan_round(state, manifest, {10: 2, 11: 2, 12: 1, 13: 4, 14: 2}, {"epochs": 1})
    assert {n: ins.round for n, ins in sent.items()} == {10: 1, 11: 1, 12: 1, 13: 1, 14: 1}
    assert sent[10].assignment[0] == [0, 1] and sent[11].assignment[0] == [2, 3]  # the first-round spread
    good_a, good_b = trained(sent[10], 30, 1), trained(sent[13], 10, 2)
    nan = trained(sent[11], 5, 3)
    nan.tensors[next(k for k in nan.tensors if ".experts." in k)][0] = np.nan
    other = trained(sent[12], 5, 4)
    other.assignment = [[3]] * manifest.num_layers  # trained an expert it was not given
    replies = {10: (good_a, 1), 13: (good_b, 1), 11: (nan, 1), 12: (other, 1), 14: (trained(sent[14], 5, 5), 0), 99: (good_a, 1)}
    screened = screen_replies(manifest, sent, replies)
    assert sorted(screened.accepted) == [10, 13]
    assert "NaN or Inf" in screened.rejected[11]
    assert "was assigned" in screened.rejected[12]
    assert "answers round 0, this is round 1" in screened.rejected[14]
    assert "not sent an instruction" in screened.rejected[99]
    failed = screen_replies(manifest, sent, {10: "Node Unavailable"})
    assert failed.rejected == {10: "node failed: Node Unavailable"} and not failed.accepted

    new = apply_round(state, manifest, screened)
    assert new.round == 1 and new.history[-1]["accepted"] == [10, 13] and "11" in new.history[-1]["rejected"]
    key = "layers.0.experts.1.w1"  # held by 10 (spread: 0, 1) and 13 (all four); not by the rejected nodes
    want = (30 * good_a.tensors[key].astype(np.float64) + 10 * good_b.tensors[key]) / 40
    np.testing.assert_allclose(new.pool[key], want, rtol=1e-6, atol=1e-8)
    key3 = "layers.0.experts.3.w2"  # held by 11 (rejected) and 13: 13's values alone
    np.testing.assert_array_equal(new.pool[key3], good_b.tensors[key3])
    assert set(new.preferences) == {10, 13}
    assert not np.allclose(new.usage, state.usage)
    np.testing.assert_array_equal(state.pool[key], pool[key])  # the old state is untouched
    second = plan_round(new, manifest, {10: 2, 13: 4}, {"epochs": 1})
    assert second[10].round == 2
    assert sorted(set(second[10].assignment[0]) | set(second[13].assignment[0])) == [0, 1, 2, 3]
