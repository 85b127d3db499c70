"""The simulation's set-up (plan, client files, tiers from the fleet) and its report (metrics, summary), without
Flower. The whole simulation, run as a user runs it, is tested in tests/coordinator/test_simulation.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from coordinator.partition import dirichlet_partition, train_test_split
from coordinator.report import metrics_rows, summarize, usage_entropy
from coordinator.simulate import SimSettings, SimulationError, load_rows, prepare, run_settings
from edge_runtime.bundle import load_manifest
from tests.conftest import write_tiny_csv


def fixed_fleet(path: Path, tiers: list[int]) -> Path:
    devices = [{"profile": "rpi-4-2gb", "share": 1, "tier": t} for t in tiers]
    path.write_text(json.dumps({"format": "fftmoe-fleet", "format_version": 1, "name": "fixed", "devices": devices}))
    return path


def read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))[1:]


def test_plan_partitions_the_rows_as_flwr_datasets_convention_and_fixes_tiers(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    data = write_tiny_csv(tmp_path / "d.csv", 300, 0)
    s = SimSettings(bundle=tiny_bundle, data=str(data), out=tmp_path / "run", clients=5, fleet=str(fixed_fleet(tmp_path / "f.json", [1, 2, 4])),
                    alpha=0.3, min_partition_size=5, seed=3)  # fmt: skip
    plan = prepare(s)
    assert len(plan["nodes"]) == 5 and plan["rows"] == 300 and plan["global_test_rows"] == 30
    assert sorted(n["tier"] for n in plan["nodes"]) == [1, 1, 2, 2, 4]  # 5 over three equal shares, largest remainder
    # the same hold-out and Dirichlet partition, recomputed independently from the labels
    _, y, _ = load_rows(s, manifest.labels)
    pool, held = train_test_split(np.arange(300), 0.1, 3)
    parts = dirichlet_partition(y[pool], 5, 0.3, 3, 5)
    for node, part in zip(plan["nodes"], parts):
        assert node["label_counts"] == np.bincount(y[pool[part]], minlength=3).tolist()
        train = read_csv(Path(node["node_config"]["data"]))
        test = read_csv(Path(node["node_config"]["eval-data"]))
        assert len(train) + len(test) == len(part) == node["train_rows"] + node["test_rows"]
        assert len(test) == math.ceil(0.2 * len(part))
        assert node["node_config"]["tier"] == node["tier"] and node["node_config"]["threads"] == 1
    assert len(read_csv(Path(plan["global_test"]))) == len(held) == 30
    # running again with the same settings reuses the plan; other data settings are refused
    assert prepare(s) == plan
    with pytest.raises(SimulationError, match="other data, fleet or bundle settings"):
        prepare(SimSettings(**{**s.__dict__, "alpha": 0.9}))
    rs = run_settings(s, plan, resume=False)
    assert rs.sim_plan.endswith("plan.json") and rs.eval_data == plan["global_test"] and not rs.serve_artifacts


def test_tiers_chosen_by_the_boards_need_a_measured_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    data = write_tiny_csv(tmp_path / "d.csv", 100, 0)
    with pytest.raises(SimulationError, match="fleet member .*: the bundle holds no measurements .*give each fleet entry a .tier."):
        prepare(SimSettings(bundle=tiny_bundle, data=str(data), out=tmp_path / "run", clients=3, fleet="mixed-edge", min_partition_size=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"clients": 1}, "--clients must be >= 2"), ({"alpha": 0.0}, "--alpha must be a positive"), ({"partition": "shards"}, "--partition must be"),
     ({"test_fraction": 1.0}, r"--test-fraction must be in \[0, 1\)")],
)  # fmt: skip
def test_bad_settings_name_the_option(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SimulationError, match=match):
        SimSettings(bundle=tmp_path, data="x.csv", out=tmp_path, **kwargs)


def test_missing_data_and_offline_hub_give_clear_errors(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = load_manifest(tiny_bundle).labels
    with pytest.raises(SimulationError, match="no such file .* or one of: ag_news"):
        load_rows(SimSettings(bundle=tiny_bundle, data=str(tmp_path / "none.csv"), out=tmp_path), labels)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SimulationError, match="--data ag_news: the Hugging Face hub is not reachable"):
        load_rows(SimSettings(bundle=tiny_bundle, data="ag_news", out=tmp_path), labels)


def test_metrics_and_summary_against_a_direct_computation(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    history = [
        {"round": 0, "central": {"accuracy": 0.3, "loss": 1.1}},
        {"round": 1, "tiers": {"11": 2, "22": 4}, "names": {"11": "client-00 rpi-4-2gb", "22": "client-01 laptop"},
         "sent_bytes": {"11": 100, "22": 200}, "received_bytes": {"11": 110, "22": 210}, "train_loss": 0.9,
         "client_metrics": {"11": {"seconds": 2.0, "peak_rss_mb": 300.0}, "22": {"seconds": 4.0, "peak_rss_mb": 500.0}},
         "expert_tokens": {"11": [10.0, 30.0, 0.0, 0.0], "22": [0.0, 10.0, 25.0, 25.0]}, "seconds": 7.0,
         "central": {"accuracy": 0.7, "loss": 0.8}, "federated": {"accuracy": 0.6, "loss": 0.9, "per_node": {"11": {"accuracy": 0.5, "loss": 1, "examples": 4}}}},
        {"round": 2, "tiers": {"11": 2}, "names": {"11": "client-00 rpi-4-2gb"}, "sent_bytes": {"11": 100}, "received_bytes": {"11": 110},
         "train_loss": 0.5, "client_metrics": {"11": {"seconds": 1.0, "peak_rss_mb": 320.0}}, "expert_tokens": {"11": [5.0, 5.0, 5.0, 5.0]},
         "seconds": 3.0, "central": {"accuracy": 0.85, "loss": 0.4}},
    ]  # fmt: skip
    rows = metrics_rows(history)
    assert [r["round"] for r in rows] == [0, 1, 2]
    r1 = rows[1]
    assert r1["upload_bytes"] == {"client-00": 110.0, "client-01": 210.0} and r1["download_bytes"]["client-01"] == 200.0
    assert r1["upload_mb_per_client"] == pytest.approx(160e-6) and rows[2]["cumulative_upload_mb"] == pytest.approx(430e-6)
    p = np.array([10, 40, 25, 25]) / 100
    assert r1["expert_usage_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert rows[2]["expert_usage_entropy"] == pytest.approx(1.0) and usage_entropy(np.array([0.0, 7.0])) == pytest.approx(0.0)
    assert r1["tier_peak_rss_mb"] == {"2": 300.0, "4": 500.0} and r1["tier_seconds"] == {"2": 2.0, "4": 4.0}
    assert r1["personal_accuracy"] == 0.6 and r1["personal_accuracy_by_client"] == {"client-00": 0.5}
    s = summarize(rows, None, manifest)
    assert s["rounds"] == 2 and s["initial_global_accuracy"] == 0.3 and s["final_global_accuracy"] == 0.85
    assert s["rounds_to_target"] == 2 and s["peak_rss_mb_by_tier"] == {"2": 320.0, "4": 500.0} and s["wall_seconds"] == 10.0
    assert s["upload_mb_per_client_round"] == pytest.approx((160e-6 + 110e-6) / 2) and s["method"] == "fftmoe"
    assert s["final_global_accuracy_before_resolve"] is None
    resolved = [*history, {"round": 2, "ridge_head": {"mode": "ridge-frozen", "resolve": True, "nodes": ["11"]},
                           "central": {"accuracy": 0.9, "loss": 0.3}}]  # fmt: skip
    s = summarize(metrics_rows(resolved), None, manifest, history=resolved)
    assert s["final_global_accuracy"] == 0.9 and s["final_global_accuracy_before_resolve"] == 0.85
    assert s["head_resolved"] == {"nodes": 1, "global_accuracy": 0.9}


def test_paired_seeds_against_a_direct_computation() -> None:
    from coordinator.report import paired_seeds

    runs = [{"method": "fftmoe", "head": "ridge-frozen", "partition": "dirichlet", "alpha": 0.1, "seed": s, "final_global_accuracy": a}
            for s, a in ((0, 0.88), (3, 0.86), (4, 0.90))]  # fmt: skip
    runs += [{"method": "fedit", "head": "fedavg", "partition": "dirichlet", "alpha": 0.1, "seed": s, "final_global_accuracy": a}
             for s, a in ((0, 0.84), (3, 0.88), (5, 0.80))]  # fmt: skip
    out = paired_seeds(runs)
    assert out["labels"] == ["fftmoe (ridge-frozen)", "fedit"] and out["against"] == "fftmoe (ridge-frozen)"
    d = out["differences"]["fedit"]
    assert d["seeds"] == 2 and d["every_seed"] == pytest.approx([-0.04, 0.02])
    assert d["mean"] == pytest.approx(-0.01) and d["sd"] == pytest.approx(np.std([-0.04, 0.02], ddof=1))
    assert out["means"]["fedit"]["mean"] == pytest.approx(np.mean([0.84, 0.88, 0.80])) and out["means"]["fedit"]["seeds"] == 3
    with pytest.raises(ValueError, match="partition and alpha"):
        paired_seeds([*runs, {**runs[0], "alpha": 0.5}])


def test_run_label_names_every_setting_off_its_default() -> None:
    from types import SimpleNamespace

    from coordinator.report import run_label, run_variant

    manifest = SimpleNamespace(pooling="mean-l2", balance_loss="switch-soft", adapter_placement="post-ln")
    run = {"logit_adjust": 1.0, "ridge_resolve": True, "server_opt": "fedavgm", "server_momentum": 0.9, "lr": 0.5}
    settings = run_variant(manifest, run)
    assert "lr" not in settings and settings["adapter_placement"] == "post-ln"
    label = run_label({"method": "fftmoe", "head": "ridge-frozen", "settings": settings})
    assert label == "fftmoe (ridge-frozen, pooling=mean-l2, balance_loss=switch-soft, logit_adjust=1, ridge_resolve, server_momentum=0.9)"
    assert run_label({"method": "fedit", "head": "fedavg", "settings": run_variant(SimpleNamespace(pooling="cls"), None)}) == "fedit"


@pytest.mark.parametrize("damaged", ["state/history.json", "plan.json", "state/run-settings.json"])
def test_write_report_names_a_damaged_run_file(tiny_bundle: Path, tmp_path: Path, damaged: str) -> None:
    from coordinator.report import ReportError, write_report

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "history.json").write_text("[]")
    (tmp_path / "plan.json").write_text(json.dumps({"nodes": []}))
    (tmp_path / "state" / "run-settings.json").write_text("{}")
    (tmp_path / damaged).write_text('{"cut off": ')
    with pytest.raises(ReportError, match=damaged.split("/")[-1] + ": damaged"):
        write_report(tmp_path, load_manifest(tiny_bundle), plots=False)
    assert not (tmp_path / "summary.json").exists()


def test_write_report_without_history_says_the_run_has_not_completed_a_round(tiny_bundle: Path, tmp_path: Path) -> None:
    from coordinator.report import ReportError, write_report

    with pytest.raises(ReportError, match="has not completed a round"):
        write_report(tmp_path, load_manifest(tiny_bundle), plots=False)
