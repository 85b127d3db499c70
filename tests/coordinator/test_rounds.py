"""A round without Flower: plan, screen replies (bad ones named and never merged), apply to the global state."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.rounds import (
    NormBound,
    ReplyLimits,
    Screening,
    apply_round,
    check_merged,
    plan_round,
    reply_limits,
    screen_replies,
    seen_digests,
)
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


def _first_round(tiny_bundle: Path):  # noqa: ANN202
    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    state = GlobalState.initial(manifest_id(manifest), pool, manifest.num_layers, manifest.num_experts)
    return manifest, state, plan_round(state, manifest, {10: 2, 11: 2, 12: 4}, {"epochs": 1})


def test_norm_bound_clips_each_unit_against_numpy(tiny_bundle: Path) -> None:
    manifest, state, sent = _first_round(tiny_bundle)
    big = trained(sent[10], 10, 1)
    expert = "layers.1.experts.0"  # node 10 holds experts 0 and 1 in the first round
    for t in ("w1", "b1", "w2", "b2"):
        big.tensors[f"{expert}.{t}"] = sent[10].values[f"{expert}.{t}"] + 50.0  # a far larger change than the rest
    replies = {10: (big, 1), 11: (trained(sent[11], 10, 2), 1)}
    bound = 5.0
    screened = screen_replies(manifest, sent, replies, Screening(NormBound.parse(bound), "clip"))
    assert sorted(screened.accepted) == [10, 11] and list(screened.clipped[10]) == [expert]
    # The reference: every unit's change, measured and scaled directly.
    delta = np.concatenate([(big.tensors[f"{expert}.{t}"].astype(np.float64) - sent[10].values[f"{expert}.{t}"]).ravel() for t in ("w1", "b1", "w2", "b2")])
    assert screened.clipped[10][expert] == pytest.approx(np.linalg.norm(delta))
    for t in ("w1", "b1", "w2", "b2"):
        key = f"{expert}.{t}"
        want = sent[10].values[key] + (bound / np.linalg.norm(delta)) * (big.tensors[key].astype(np.float64) - sent[10].values[key])
        np.testing.assert_allclose(screened.accepted[10].tensors[key], want, rtol=1e-6, atol=1e-6)
    clipped_delta = np.concatenate([(screened.accepted[10].tensors[f"{expert}.{t}"].astype(np.float64) - sent[10].values[f"{expert}.{t}"]).ravel() for t in ("w1", "b1", "w2", "b2")])
    assert np.linalg.norm(clipped_delta) == pytest.approx(bound, rel=1e-5)
    other = "layers.1.experts.1.w1"  # within the bound: untouched, bit for bit
    np.testing.assert_array_equal(screened.accepted[10].tensors[other], big.tensors[other])
    assert screened.accepted[11] is replies[11][0]

    new = apply_round(state, manifest, screened)
    assert new.history[-1]["clipped"] == {"10": {expert: pytest.approx(np.linalg.norm(delta))}}

    rejected = screen_replies(manifest, sent, replies, Screening(NormBound.parse(bound), "reject"))
    assert sorted(rejected.accepted) == [11] and f"e.g. {expert} by" in rejected.rejected[10] and "--max-update-norm 5" in rejected.rejected[10]
    with pytest.raises(ValueError, match="norm_action"):
        Screening(NormBound.parse(bound), "drop")


def test_replayed_updates_are_refused_in_the_round_and_after(tiny_bundle: Path) -> None:
    manifest, state, sent = _first_round(tiny_bundle)
    sent[11] = replace(sent[10])  # two nodes given the same experts, as happens in later rounds
    a = trained(sent[10], 10, 1)
    copy = Update(a.manifest_id, a.tier, [list(ids) for ids in a.assignment], a.num_examples, {k: v.copy() for k, v in a.tensors.items()})
    screened = screen_replies(manifest, sent, {10: (a, 1), 11: (copy, 1), 12: (trained(sent[12], 10, 3), 1)})
    assert sorted(screened.accepted) == [10, 12] and "replayed update" in screened.rejected[11]
    new = apply_round(state, manifest, screened)
    assert set(new.history[-1]["digests"]) == {"10", "12"} and seen_digests(new) == set(screened.digests.values())

    # Next round: node 10's old update again, under the new round number (the round field is not signed).
    again = plan_round(new, manifest, {10: 2, 12: 4}, {"epochs": 1})
    again[10] = replace(again[10], assignment=a.assignment)  # the same experts, so only the replay check can refuse it
    later = screen_replies(manifest, again, {10: (a, 2), 12: (trained(again[12], 10, 4), 2)}, seen=seen_digests(new))
    assert "replayed update" in later.rejected[10] and sorted(later.accepted) == [12]
    fresh = screen_replies(manifest, again, {10: (trained(again[10], 10, 5), 2)}, seen=seen_digests(new))
    assert sorted(fresh.accepted) == [10]


def test_a_lora_update_for_another_tier_is_rejected_not_a_crash(tiny_hetlora: Path) -> None:
    """Issue 17, finding 2: a LoRA update's tier was never compared with the tier sent (every LoRA tier has the same
    assignment), and with a norm bound its other-rank tensors raised a broadcast ValueError that ended the run."""
    manifest = load_manifest(tiny_hetlora)
    state = GlobalState.initial(manifest_id(manifest), load_file(str(tiny_hetlora / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    sent = plan_round(state, manifest, {1: 1, 2: 4}, {"epochs": 1})
    other = plan_round(state, manifest, {1: 2}, {"epochs": 1})[1]  # what a tier-2 (rank 4) device would send
    wrong_tier = trained(other, 10, 1)
    screened = screen_replies(manifest, sent, {1: (wrong_tier, 1), 2: (trained(sent[2], 10, 2), 1)}, Screening(NormBound.parse("0.5")))
    assert sorted(screened.accepted) == [2] and screened.rejected[1] == "update is for tier 2, this node was sent tier 1"


def test_counts_are_capped_at_the_hello_figure_and_statistics_bounded_by_the_tokens(tiny_bundle: Path) -> None:
    """Issue 17, finding 3: the example count is capped at what the node's hello allows, and routing statistics
    that its examples cannot produce are refused."""
    manifest, state, sent = _first_round(tiny_bundle)
    train = {"epochs": 2, "batch_size": 8, "max_steps": 0, "max_seq_len": 16}
    limits = reply_limits(30, 16, train, manifest)
    assert (limits.max_examples, limits.max_steps, limits.tokens_per_example) == (60, 8, 16)  # 2 epochs x ceil(30 / 8)
    assert reply_limits(30, 4, {**train, "max_steps": 5}, manifest) == ReplyLimits(40, 5, 16)  # 5 steps x batch 8
    liar = trained(sent[10], 10**12, 1)
    heavy = trained(sent[11], 20, 2)
    heavy.tensors["stats.route_counts"][1, 0] = 20 * 16 * 2 + 100  # more top-2 assignments than 20 rows of 16 tokens hold
    screened = screen_replies(manifest, sent, {10: (liar, 1), 11: (heavy, 1), 12: (trained(sent[12], 5, 3), 1)},
                              limits={n: limits for n in sent})  # fmt: skip
    assert screened.accepted[10].num_examples == 60 and screened.capped == {10: 10**12}
    assert "route_counts of layer 1" in screened.rejected[11] and sorted(screened.accepted) == [10, 12]
    new = apply_round(state, manifest, screened)
    assert new.history[-1]["capped"] == {"10": 10**12}


def test_one_reply_that_breaks_the_screening_rejects_only_its_node(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong with one reply, even an error the checks did not foresee, rejects that node with the
    reason; the other nodes' replies are screened and merged as usual."""
    manifest, state, sent = _first_round(tiny_bundle)
    updates = {n: trained(sent[n], 10, n) for n in sent}
    honest_validate = Update.validate

    def validate(self, manifest, expected=None):  # noqa: ANN001, ANN202
        if self is updates[11]:
            raise RuntimeError("something nobody expected")
        return honest_validate(self, manifest, expected)

    monkeypatch.setattr(Update, "validate", validate)
    screened = screen_replies(manifest, sent, {n: (u, 1) for n, u in updates.items()})
    assert sorted(screened.accepted) == [10, 12]
    assert screened.rejected[11] == "the reply could not be screened (RuntimeError: something nobody expected)"


def test_a_merged_state_that_is_not_finite_or_moved_too_far_is_refused(tiny_bundle: Path) -> None:
    """Issue 17, finding 4: values of 3e38 with a huge count once made the committed pool Inf and NaN. The merge is
    checked before it is committed: not finite, or a unit moved further than any update carrying it was allowed."""
    manifest, state, sent = _first_round(tiny_bundle)
    ups = {n: trained(sent[n], 10, n) for n in sent}
    screened = screen_replies(manifest, sent, {n: (u, 1) for n, u in ups.items()}, Screening(NormBound.parse("auto"), learning_rate=1.0),
                              limits={n: ReplyLimits(10, 2, 16) for n in sent})  # fmt: skip
    assert sorted(screened.accepted) == [10, 11, 12] and screened.bounds[10]
    new = apply_round(state, manifest, screened)
    assert check_merged(state.pool, new.pool, manifest, screened) is None
    broken = dict(new.pool, **{"head.bias": np.full_like(new.pool["head.bias"], np.inf)})
    assert "head.bias holds" in check_merged(state.pool, broken, manifest, screened)
    key = "layers.0.experts.1.w2"
    moved = dict(new.pool, **{key: new.pool[key] + 100.0})
    assert "the merge moved layers.0.experts.1 by" in check_merged(state.pool, moved, manifest, screened)
    row = dict(new.pool, **{"layers.1.router.weight": new.pool["layers.1.router.weight"] + 0})
    row["layers.1.router.weight"][2] += 1e3
    assert "layers.1.router.2" in check_merged(state.pool, row, manifest, screened)


def test_norm_bound_settings() -> None:
    assert NormBound.parse("auto").kind == "auto" and NormBound.parse("off").active is False and NormBound.parse(0).kind == "off"
    assert NormBound.parse("2.5") == NormBound("fixed", 2.5) and NormBound.parse(2.5).for_unit(10**6, 1.0, 100) == 2.5
    assert NormBound("auto").for_unit(100, 1e-3, 1) == pytest.approx(10 * 1e-3, rel=1e-3)  # one step: lr per parameter
    for bad in ("-1", "inf", "nan", "big"):
        with pytest.raises(ValueError, match="--max-update-norm"):
            NormBound.parse(bad)
