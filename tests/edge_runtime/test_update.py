"""The sparse update format: mapping slots to global experts, validation of every field, file round trip."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_runtime.bundle import global_expert_key, global_router_key, load_manifest
from edge_runtime.update import (
    Update,
    UpdateError,
    check_assignment,
    manifest_id,
    router_rows_key,
    tier_values_from_pool,
)


def make_update(bundle: Path, slots: int = 2, assignment=None) -> tuple[Update, dict]:
    manifest = load_manifest(bundle)
    pool = load_file(str(bundle / manifest.global_pool.path))
    assignment = assignment or [[3, 1], [0, 2]]
    values = tier_values_from_pool(manifest, slots, pool, assignment)
    rng = np.random.default_rng(0)
    trained = {k: (v + rng.standard_normal(v.shape).astype(np.float32)) for k, v in values.items()}
    counts = np.ones((manifest.num_layers, slots), np.float32)
    upd = Update.from_tier_values(manifest, slots, assignment, trained, 10, counts, counts * 0.5, {"loss": 1.0})
    return upd, {"manifest": manifest, "pool": pool, "trained": trained, "assignment": assignment}


def test_pool_values_follow_the_assignment(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    values = tier_values_from_pool(manifest, 2, pool, [[3, 1], [0, 2]])
    tier = manifest.tier(2)
    for p in tier.slot_params:
        expert = [[3, 1], [0, 2]][p.layer][p.slot]
        np.testing.assert_array_equal(values[p.name], pool[global_expert_key(p.layer, expert, p.tensor)])
    for p in tier.router_params:
        rows = pool[global_router_key(p.layer, p.tensor)][[[3, 1], [0, 2]][p.layer]]
        np.testing.assert_array_equal(values[p.name], rows)


def test_update_names_global_experts_and_round_trips(tiny_bundle: Path, tmp_path: Path) -> None:
    upd, ctx = make_update(tiny_bundle)
    manifest, trained = ctx["manifest"], ctx["trained"]
    upd.validate(manifest, expected_assignment=[[3, 1], [0, 2]])
    tier = manifest.tier(2)
    for p in tier.slot_params:  # slot j of layer l went to global expert assignment[l][j]
        key = global_expert_key(p.layer, ctx["assignment"][p.layer][p.slot], p.tensor)
        np.testing.assert_array_equal(upd.tensors[key], trained[p.name])
    for p in tier.router_params:
        np.testing.assert_array_equal(upd.tensors[router_rows_key(p.layer, p.tensor)], trained[p.name])
    assert global_expert_key(0, 0, "w1") not in upd.tensors  # expert 0 of layer 0 was not held
    assert sorted(upd.expert_tensors()) == [(0, 1), (0, 3), (1, 0), (1, 2)]
    path = upd.save(tmp_path / "u.safetensors")
    back = Update.load(path).validate(manifest)
    assert back.meta() == upd.meta()
    for k, v in upd.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)


def test_one_slot_update_has_no_router_rows(tiny_bundle: Path) -> None:
    upd, ctx = make_update(tiny_bundle, slots=1, assignment=[[2], [0]])
    upd.validate(ctx["manifest"])
    assert not any(".router_rows." in k for k in upd.tensors)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u: u.tensors.__setitem__("layers.0.experts.3.w1", u.tensors["layers.0.experts.3.w1"] * np.nan), "NaN or Inf"),
        (lambda u: u.tensors.__setitem__("layers.0.experts.3.b1", np.zeros(3, np.float32)), r"shape \[3\], expected \[8\]"),
        (lambda u: u.tensors.__setitem__("layers.0.experts.3.b2", u.tensors["layers.0.experts.3.b2"].astype(np.float64)), "must be float32"),
        (lambda u: u.tensors.__setitem__("layers.0.experts.0.w1", np.zeros((32, 8), np.float32)), "not assigned to this device"),
        (lambda u: u.tensors.pop("head.bias"), r"lacks tensor\(s\) \['head.bias'\]"),
        (lambda u: setattr(u, "manifest_id", "0" * 16), "made for bundle 0000"),
        (lambda u: setattr(u, "format_version", 99), "version 99"),
        (lambda u: setattr(u, "tier", 3), "tier 3; the bundle has tiers"),
        (lambda u: setattr(u, "assignment", [[1, 1], [0, 2]]), "2 distinct experts"),
        (lambda u: setattr(u, "num_examples", 0), "num_examples"),
        (lambda u: u.metrics.__setitem__("loss", float("nan")), "metric 'loss'"),
    ],
)
def test_validation_names_what_is_wrong(tiny_bundle: Path, mutate, message: str) -> None:
    upd, ctx = make_update(tiny_bundle)
    mutate(upd)
    with pytest.raises(UpdateError, match=message):
        upd.validate(ctx["manifest"])


def test_unexpected_assignment_is_rejected(tiny_bundle: Path) -> None:
    upd, ctx = make_update(tiny_bundle)
    with pytest.raises(UpdateError, match="was assigned"):
        upd.validate(ctx["manifest"], expected_assignment=[[0, 1], [0, 2]])


def test_damaged_update_file(tmp_path: Path, tiny_bundle: Path) -> None:
    (tmp_path / "u.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UpdateError, match="not a readable update file"):
        Update.load(tmp_path / "u.safetensors")
    manifest = load_manifest(tiny_bundle)
    with pytest.raises(UpdateError, match="layer 1"):
        check_assignment(manifest, 2, [[0, 1], [0, 9]])
    assert len(manifest_id(manifest)) == 16


def test_lora_update_round_trips_at_the_tier_rank_and_wrong_ranks_are_refused(tiny_hetlora: Path, tmp_path: Path) -> None:
    from edge_runtime.bundle import global_lora_key
    from edge_runtime.update import default_assignment

    manifest = load_manifest(tiny_hetlora)
    pool = load_file(str(tiny_hetlora / manifest.global_pool.path))
    assignment = default_assignment(manifest, 2)
    assert assignment == [[0], [0]]
    values = tier_values_from_pool(manifest, 2, pool, assignment)
    counts = np.full((manifest.num_layers, 1), 7.0, np.float32)
    upd = Update.from_tier_values(manifest, 2, assignment, values, 12, counts, counts, {"train_loss": 1.0})
    upd.validate(manifest, assignment)
    p = manifest.tier(2).lora_params[0]
    assert upd.tensors[global_lora_key(p.module, p.matrix)].shape == p.shape
    back = Update.load(upd.save(tmp_path / "u.safetensors")).validate(manifest)
    assert all(np.array_equal(back.tier_values(manifest)[k], v) for k, v in values.items())
    # a tier-2 device that sends its adapter at another rank (here the tier-4 rank) is refused by name
    key = global_lora_key(p.module, p.matrix)
    upd.tensors[key] = np.zeros((8, p.shape[1]) if p.matrix == "A" else (p.shape[0], 8), np.float32)
    with pytest.raises(UpdateError, match=re.escape(key) + ".*" + re.escape(f"expected {list(p.shape)}")):
        upd.validate(manifest)
    with pytest.raises(UpdateError, match="must name 1 distinct experts"):
        check_assignment(manifest, 2, [[0, 1], [0, 1]])
