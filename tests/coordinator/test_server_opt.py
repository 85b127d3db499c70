"""The server optimiser: the identity case against today's merge bit for bit, FedAvgM, FedAdam and the damped rule
against a direct NumPy computation, untrained units untouched, and moments that survive a checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.rounds import apply_round, plan_round
from coordinator.server_opt import ServerOptimizer, trained_weights
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.update import manifest_id
from tests.coordinator.test_rounds import trained


def round_of(bundle: Path, seed: int = 0, tiers: dict[int, int] | None = None) -> tuple:
    manifest = load_manifest(bundle)
    state = GlobalState.initial(manifest_id(manifest), load_file(str(bundle / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    sent = plan_round(state, manifest, tiers or {1: 1, 2: 2, 3: 2}, {"epochs": 1})
    ups = {n: trained(sent[n], 10 * n + seed, n + seed) for n in sent}
    return manifest, state, SimpleNamespace(accepted=ups, rejected={}, digests={}, clipped={}, capped={})


def test_plain_fedavgm_is_todays_merge_bit_for_bit(tiny_bundle: Path) -> None:
    manifest, state, screened = round_of(tiny_bundle)
    plain = apply_round(state, manifest, screened)
    # not short-circuited: the same step as any other setting, with beta 0, eta 1, lambda 0
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0, damping=0.0)
    new, moments = opt.step(state.pool, plain.pool, trained_weights(list(screened.accepted.values()), manifest.num_layers, manifest.num_experts), {})
    for k in plain.pool:
        assert np.array_equal(new[k], plain.pool[k]), k
    assert moments == {} and apply_round(state, manifest, screened, optimizer=opt).moments == {}


def test_fedavgm_and_damping_against_numpy(tiny_bundle: Path) -> None:
    manifest, state, screened = round_of(tiny_bundle)
    ups = list(screened.accepted.values())
    plain = apply_round(state, manifest, screened).pool
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9, damping=2.0)
    first = apply_round(state, manifest, screened, optimizer=opt)
    total = sum(u.num_examples for u in ups)
    for key in plain:
        if not key.startswith("layers.") or ".experts." not in key:
            continue
        layer, expert = int(key.split(".")[1]), int(key.split(".")[3])
        held = sum(u.num_examples for u in ups if expert in u.assignment[layer])
        old = state.pool[key].astype(np.float64)
        if held == 0:
            assert np.array_equal(first.pool[key], state.pool[key]) and f"m1/{key}" not in first.moments
            continue
        delta = held / (held + 2.0 * (total - held)) * (plain[key].astype(np.float64) - old)
        np.testing.assert_allclose(first.pool[key], old + 0.5 * delta, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(first.moments[f"m1/{key}"], delta, rtol=1e-6, atol=1e-7)
    # a second round: v <- 0.9 v + delta
    _, _, screened2 = round_of(tiny_bundle, seed=5)
    second = apply_round(first, manifest, screened2, optimizer=opt)
    plain2 = apply_round(first, manifest, screened2).pool
    key = next(k for k in first.moments if ".experts." in k)[3:]
    layer, expert = int(key.split(".")[1]), int(key.split(".")[3])
    ups2 = list(screened2.accepted.values())
    held = sum(u.num_examples for u in ups2 if expert in u.assignment[layer])
    total2 = sum(u.num_examples for u in ups2)
    x = first.pool[key].astype(np.float64)
    delta2 = held / (held + 2.0 * (total2 - held)) * (plain2[key].astype(np.float64) - x) if held else 0.0
    v = 0.9 * first.moments[f"m1/{key}"].astype(np.float64) + delta2 if held else first.moments[f"m1/{key}"].astype(np.float64)
    np.testing.assert_allclose(second.pool[key], x + 0.5 * v if held else x, rtol=1e-5, atol=1e-6)


def test_fedadam_against_numpy_and_router_rows_only_where_trained(tiny_bundle: Path) -> None:
    manifest, state, screened = round_of(tiny_bundle, tiers={1: 1, 2: 2})
    plain = apply_round(state, manifest, screened).pool
    opt = ServerOptimizer("fedadam", lr=0.01, momentum=0.9, beta2=0.99, tau=1e-3)
    new = apply_round(state, manifest, screened, optimizer=opt)
    for key in ("head.weight", "layers.0.router.weight"):
        delta = plain[key].astype(np.float64) - state.pool[key].astype(np.float64)
        m1, m2 = 0.1 * delta, 0.01 * delta**2
        want = state.pool[key].astype(np.float64) + 0.01 * m1 / (np.sqrt(m2) + 1e-3)
        tw = trained_weights(list(screened.accepted.values()), manifest.num_layers, manifest.num_experts)
        if key in tw and np.ndim(tw[key][0]):
            rows = np.asarray(tw[key][0]).reshape(-1) > 0
            want[~rows] = state.pool[key][~rows]
            assert (~rows).any(), "the test needs a router row nobody trained"
        np.testing.assert_allclose(new.pool[key], want, rtol=1e-5, atol=1e-7)


def test_moments_survive_a_checkpoint(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest, state, screened = round_of(tiny_bundle)
    new = apply_round(state, manifest, screened, optimizer=ServerOptimizer("fedavgm", momentum=0.9))
    assert new.moments
    new.save(tmp_path)
    back = GlobalState.load(tmp_path, manifest_id(manifest))
    assert back.moments.keys() == new.moments.keys() and all(np.array_equal(back.moments[k], new.moments[k]) for k in new.moments)


@pytest.mark.parametrize(("kwargs", "flag"), [({"kind": "sgd"}, "--server-opt"), ({"lr": 0.0}, "--server-lr"),
                                              ({"momentum": 1.0}, "--server-momentum"), ({"damping": -1.0}, "--server-damping")])  # fmt: skip
def test_bad_settings_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ServerOptimizer(**kwargs)
