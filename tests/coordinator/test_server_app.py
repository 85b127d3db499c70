"""The strategy's pieces that need no running Flower: settings, sampling, aggregating replies, the round line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.plan import assign_experts, sample_nodes, spread_assignment
from coordinator.server_app import FFTMoEStrategy, RunSettings, round_line
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.records import DeviceInfo, update_to_record
from edge_runtime.update import manifest_id
from tests.coordinator.test_rounds import trained


def test_run_settings_name_the_bad_flag(tmp_path: Path) -> None:
    s = RunSettings.from_run_config({"bundle": "b", "state-dir": "s", "rounds": 4, "fraction": 0.5, "resume": True})
    assert (s.rounds, s.fraction, s.resume, s.min_clients) == (4, 0.5, True, 2)
    with pytest.raises(ValueError, match=r"unknown run config key\(s\) \['rouns'\]"):
        RunSettings.from_run_config({"bundle": "b", "state-dir": "s", "rouns": 4})
    for kwargs, flag in (({"rounds": 0}, "--rounds"), ({"fraction": 1.5}, "--fraction"), ({"weighting": "mean"}, "--weighting"),
                         ({"lr": float("nan")}, "--lr"), ({"min_clients": 0}, "--min-clients"),
                         ({"max_update_norm": -1.0}, "--max-update-norm"), ({"max_update_norm": float("inf")}, "--max-update-norm"),
                         ({"norm_action": "drop"}, "--norm-action")):  # fmt: skip
        with pytest.raises(ValueError, match=flag):
            RunSettings(bundle="b", state_dir="s", **kwargs)


def test_sampling_keeps_64_bit_node_ids_and_is_reproducible() -> None:
    nodes = [18446744073709551557, 12897264526954024830, 2884421546402408904, 11109927246728465053]
    a = sample_nodes(nodes, 0.5, 1, seed=3)
    assert a == sample_nodes(list(reversed(nodes)), 0.5, 1, seed=3) and len(a) == 2 and set(a) <= set(nodes)
    assert sample_nodes(nodes, 0.1, 3, seed=0) == sorted(sample_nodes(nodes, 0.1, 3, seed=0)) and len(sample_nodes(nodes, 0.1, 3, 0)) == 3
    assert sample_nodes(nodes, 1.0, 2, seed=9) == sorted(nodes)


def test_new_nodes_are_spread_over_the_least_used_experts_first() -> None:
    usage = np.array([[0.3, 0.3, 0.3, 0.05, 0.05]])
    assert spread_assignment({5: 2}, 1, 5) == {5: [[0, 1]]}  # uniform (first round): 0..M-1
    assert spread_assignment({5: 2}, 1, 5, usage) == {5: [[3, 4]]}
    assert assign_experts({5: 2, 6: 1}, 5, 1, None, usage) == {5: [[3, 4]], 6: [[0]]}


def test_aggregate_merges_valid_replies_and_refuses_a_short_round(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    strategy = FFTMoEStrategy(RunSettings(bundle=str(tiny_bundle), state_dir=str(tmp_path), min_clients=2))
    state = GlobalState.initial(manifest_id(manifest), load_file(str(tiny_bundle / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    from coordinator.rounds import plan_round

    sent = plan_round(state, manifest, {1: 1, 2: 2, 3: 4}, {"epochs": 1})
    strategy.devices = {n: DeviceInfo(sent[n].tier, 8, "ort", 40, 4, (), 0) for n in sent}  # what their hellos said
    ups = {n: trained(sent[n], 10 * n, n) for n in sent}
    for n, u in ups.items():
        u.metrics = {"train_loss": float(n)}
    bad = trained(sent[3], 5, 9)
    bad.tensors["head.weight"] = bad.tensors["head.weight"][:, :-1]
    reply = lambda u: SimpleNamespace(content=update_to_record(u, 1))  # noqa: E731
    new, screened, _ = strategy.aggregate_train(state, sent, {1: reply(ups[1]), 2: reply(ups[2]), 3: reply(bad)})
    assert new is not None and sorted(screened.accepted) == [1, 2] and "head.weight" in screened.rejected[3]
    entry = new.history[-1]
    assert entry["train_loss"] == pytest.approx((10 * 1 + 20 * 2) / 30)
    assert entry["sent_bytes"]["3"] == sum(v.nbytes for v in sent[3].values.values()) and "3" not in entry["received_bytes"]
    assert entry["received_bytes"]["2"] == sum(v.nbytes for v in ups[2].tensors.values())
    none, short, why = strategy.aggregate_train(state, sent, {1: reply(ups[1]), 2: "no reply within 60 s", 3: reply(bad)})
    assert none is None and sorted(short.rejected) == [2, 3] and why == "1 valid update(s), --min-clients is 2"
    line = round_line({**entry, "seconds": 12.0, "federated": {"accuracy": 0.5, "loss": 1.0}}, 5, 3)
    assert line.startswith("round 1/5: 2/3 node(s) merged, 1 rejected") and "federated accuracy 0.5000" in line


def test_run_settings_survive_the_flower_app_config(tmp_path: Path) -> None:
    """What serve/simulate set reaches the ServerApp unchanged through the app's pyproject.toml (every field)."""
    import tomllib

    from coordinator.deploy import write_app

    s = RunSettings(bundle='b "quoted" \\ back\'slash', state_dir="s\nwith a new line\t\u00e9", max_update_norm=2.5, norm_action="reject",
                    weighting="tokens", eval_every=5, eval_label_map='1="World",2=Sports', max_share=0.25, keep_checkpoints=4)
    app = write_app(tmp_path, s)
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_run_config(config) == s
