"""The closed-form head: the ridge solution against numpy.linalg.lstsq, federated sums against the pooled rows,
the share cap, the scale screen, and the strategy's statistics round with hostile replies."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.ridge_head import combine_statistics, ridge_lambda, screen_statistics, solve_head
from coordinator.rounds import apply_round, plan_round
from coordinator.server_app import FFTMoEStrategy, RunSettings
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.head_stats import HeadStatistics
from edge_runtime.records import DeviceInfo, metrics_to_record, statistics_from_record, statistics_to_record
from edge_runtime.update import manifest_id
from tests.coordinator.test_rounds import trained


def rows(n: int, d: int, c: int, seed: int, labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(labels or list(range(c)), n)
    centres = np.random.default_rng(99).normal(size=(c, d))
    return (centres[y] + 0.8 * rng.normal(size=(n, d))).astype(np.float32), y


def sums(phi: np.ndarray, y: np.ndarray, c: int) -> HeadStatistics:
    s = HeadStatistics.zeros(phi.shape[1], c)
    s.add(phi, y)
    return s.symmetrised()


def lstsq_head(phi: np.ndarray, y: np.ndarray, c: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """min |Z X - Y|^2 + lam |W|^2 (bias free) as an augmented least-squares problem, solved by lstsq."""
    n, d = phi.shape
    z = np.hstack([phi.astype(np.float64), np.ones((n, 1))])
    penalty = np.hstack([np.sqrt(lam) * np.eye(d), np.zeros((d, 1))])
    x, *_ = np.linalg.lstsq(np.vstack([z, penalty]), np.vstack([np.eye(c)[y], np.zeros((d, c))]), rcond=None)
    return x[:d].T, x[d]


def test_the_ridge_head_is_the_least_squares_solution() -> None:
    phi, y = rows(300, 12, 4, 0)
    s = sums(phi, y, 4)
    lam = ridge_lambda(s.gram, 0.05)
    assert lam == pytest.approx(0.05 * np.square(phi.astype(np.float64)).sum() / 12)
    w, b = solve_head(s.gram, s.cross, 0.05, scale=1.0)
    w_ref, b_ref = lstsq_head(phi, y, 4, lam)
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-5)
    w8, b8 = solve_head(s.gram, s.cross, 0.05, scale=8.0)
    np.testing.assert_allclose(w8, 8 * w_ref, rtol=1e-4, atol=1e-4)
    assert ((phi @ w.T + b).argmax(1) == y).mean() > 0.9


def test_federated_sums_under_label_skew_give_the_centralised_head() -> None:
    """Ten devices, each holding one or two labels: the sum of their statistics is the statistics of all rows."""
    parts = [rows(20 + 7 * i, 12, 4, i, labels=[i % 4] if i % 3 else [i % 4, (i + 1) % 4]) for i in range(10)]
    combined = combine_statistics({i: sums(p, y, 4) for i, (p, y) in enumerate(parts)})
    phi, y = np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])
    central = sums(phi, y, 4)
    np.testing.assert_allclose(combined.gram, central.gram, rtol=1e-10)
    np.testing.assert_allclose(combined.cross, central.cross, rtol=1e-10)
    w, b = solve_head(combined.gram, combined.cross, 1e-3)
    w_ref, b_ref = lstsq_head(phi, y, 4, ridge_lambda(central.gram, 1e-3))
    np.testing.assert_allclose(w, w_ref, rtol=1e-3, atol=1e-4)
    assert combined.examples == len(y) and all(f == pytest.approx(n.examples / len(y)) for f, n in
                                               zip(combined.shares.values(), [sums(p, q, 4) for p, q in parts]))  # fmt: skip


def test_the_share_cap_weights_a_giant_down_to_max_share() -> None:
    a, b, giant = (sums(*rows(n, 5, 3, s), 3) for n, s in ((30, 1), (30, 2), (900, 3)))
    combined = combine_statistics({1: a, 2: b, 3: giant}, max_share=0.5)
    assert combined.shares[3] == pytest.approx(0.5) and combined.shares[1] == pytest.approx(0.25)
    f = 0.5 * 960 / 900  # the giant's rows weigh this much each, the others 0.25 * 960 / 30
    np.testing.assert_allclose(combined.gram, 8 * a.gram + 8 * b.gram + f * giant.gram, rtol=1e-12)
    plain = combine_statistics({1: a, 2: b, 3: giant}, max_share=1.0)
    np.testing.assert_array_equal(plain.gram, a.gram + b.gram + giant.gram)


def test_a_device_with_features_of_another_scale_is_left_out() -> None:
    honest = {n: sums(*rows(40, 5, 3, n), 3) for n in range(4)}
    phi, y = rows(40, 5, 3, 9)
    loud = sums(phi * 100, y, 3)  # consistent sums (every check passes), rows a hundred times larger
    loud.validate(5, 3, 40)
    out = screen_statistics({**honest, 7: loud})
    assert list(out) == [7] and "median" in out[7]
    assert screen_statistics({1: honest[1], 7: loud}) == {}  # fewer than three: no median to speak of


@pytest.fixture()
def strategy(tiny_bundle: Path, tmp_path: Path) -> tuple[FFTMoEStrategy, GlobalState, dict]:
    manifest = load_manifest(tiny_bundle)
    st = FFTMoEStrategy(RunSettings(bundle=str(tiny_bundle), state_dir=str(tmp_path), head="ridge-frozen", ridge=1e-2, ridge_scale=4.0))
    state = GlobalState.initial(manifest_id(manifest), load_file(str(tiny_bundle / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    d, c = manifest.hidden_size, len(manifest.labels)
    data = {n: rows(30 + n, d, c, n, labels=[n % c]) for n in range(1, 5)}
    st.devices = {n: DeviceInfo(2, 8, "ort", 30 + n, 5, (), 0) for n in data}
    return st, state, data


def reply(stats: HeadStatistics, round_: int = 0) -> SimpleNamespace:
    return SimpleNamespace(content=statistics_to_record(stats, round_))


def test_the_statistics_round_solves_the_head_and_names_each_hostile_reply(strategy: tuple[FFTMoEStrategy, GlobalState, dict]) -> None:
    st, state, data = strategy
    c = len(st.manifest.labels)
    good = {n: sums(p, y, c) for n, (p, y) in data.items()}
    nan = HeadStatistics(good[3].gram.copy(), good[3].cross, good[3].examples)
    nan.gram[0, 0] = np.nan
    asym = HeadStatistics(good[4].gram.copy(), good[4].cross, good[4].examples)
    asym.gram[0, 1] += 1.0
    wrong = HeadStatistics(good[2].gram[:-1, :-1].copy(), good[2].cross[:-1], good[2].examples)
    replies = {1: reply(good[1]), 2: reply(wrong), 3: reply(nan), 4: reply(asym), 5: reply(good[1]), 6: "no reply within 60 s",
               7: SimpleNamespace(content=metrics_to_record(0, {"accuracy": 1.0}))}  # fmt: skip
    st.devices[5] = DeviceInfo(2, 8, "ort", 10, 5, (), 0)  # node 5 said it holds 10 rows, and sends node 1's 31
    new, record = st.aggregate_statistics(state, replies)
    assert new is not None and record["ridge_head"]["nodes"] == [1]
    why = record["ridge_head"]["rejected"]
    assert "shape" in why["2"] and "NaN" in why["3"] and "symmetric" in why["4"] and "examples" in why["5"]
    assert "no reply" in why["6"] and "statistics" in why["7"]
    w_ref, b_ref = lstsq_head(*data[1], c, ridge_lambda(good[1].gram, 1e-2))
    np.testing.assert_allclose(new.pool["head.weight"], 4.0 * w_ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(new.pool["head.bias"], 4.0 * b_ref, rtol=1e-3, atol=1e-4)
    assert new.round == 0 and new.history[-1] is record and {k: v for k, v in new.pool.items() if not k.startswith("head.")}.keys() == \
        {k for k in state.pool if not k.startswith("head.")}  # fmt: skip
    none, rec = st.aggregate_statistics(state, {2: reply(wrong)})
    assert none is None and "2" in rec["ridge_head"]["rejected"]


def test_statistics_of_another_round_are_refused(strategy: tuple[FFTMoEStrategy, GlobalState, dict]) -> None:
    st, state, data = strategy
    stats = sums(*data[1], len(st.manifest.labels))
    _, record = st.aggregate_statistics(state, {1: reply(stats, round_=3)})
    assert "round" in record["ridge_head"]["rejected"]["1"]
    back, r = statistics_from_record(statistics_to_record(stats, 0), st.manifest, max_examples=31)
    np.testing.assert_array_equal(back.gram, stats.gram)
    np.testing.assert_array_equal(back.cross, stats.cross)
    assert r == 0 and back.examples == 31


def test_a_frozen_head_survives_the_merge_and_the_instruction_says_so(strategy: tuple[FFTMoEStrategy, GlobalState, dict]) -> None:
    st, state, _ = strategy
    assert st.settings.train_settings()["freeze_head"] is True
    assert RunSettings(bundle="b", state_dir="s").train_settings()["freeze_head"] is True  # the default head
    assert "freeze_head" not in RunSettings(bundle="b", state_dir="s", head="fedavg").train_settings()
    sent = plan_round(state, st.manifest, {1: 2, 2: 2}, st.settings.train_settings())
    screened = SimpleNamespace(accepted={n: trained(sent[n], 20, n) for n in sent}, rejected={}, digests={}, clipped={}, capped={})
    kept = apply_round(state, st.manifest, screened, keep_head=True)
    moved = apply_round(state, st.manifest, screened, keep_head=False)
    for k in ("head.weight", "head.bias"):
        np.testing.assert_array_equal(kept.pool[k], state.pool[k])
        assert not np.array_equal(moved.pool[k], state.pool[k])
    others = [k for k in state.pool if not k.startswith("head.")]
    assert all(np.array_equal(kept.pool[k], moved.pool[k]) for k in others)


def test_ridge_settings_name_the_flag() -> None:
    for kwargs, flag in (({"head": "lstsq"}, "--head"), ({"ridge": 0.0}, "--ridge"), ({"ridge_scale": float("nan")}, "--ridge-scale")):
        with pytest.raises(ValueError, match=flag):
            RunSettings(bundle="b", state_dir="s", **kwargs)


def test_resolved_at_is_per_round_so_an_extended_run_is_re_solved_again() -> None:
    from coordinator.ridge_head import resolved_at

    history = [{"round": 0, "ridge_head": {"mode": "ridge-frozen"}}, {"round": 2, "train_loss": 1.0},
               {"round": 2, "ridge_head": {"mode": "ridge-frozen", "resolve": True}}, {"round": 3, "train_loss": 0.9}]  # fmt: skip
    assert resolved_at(history, 2) and not resolved_at(history, 3) and not resolved_at(history, 0)
