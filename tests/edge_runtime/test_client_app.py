"""The ClientApp's handlers without a running Flower: node settings, a train message on the tiny bundle, the
artifact download with its hash check. (The real SuperNode path is tested in tests/coordinator/test_federation.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.rounds import plan_round
from coordinator.state import GlobalState
from edge_runtime.bundle import IntegrityError, load_manifest
from edge_runtime.bundle import needed_files
from edge_runtime.client_app import _CACHE, NodeSettings, _run, bundle_dir_for, missing_files
from edge_runtime.records import instruction_to_record, metrics_from_record, update_from_record
from edge_runtime.update import manifest_id
from tests.conftest import write_tiny_csv


def test_node_settings_survive_flowers_node_config_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    node = NodeSettings(data=tmp_path / "my data.csv", cache_dir=tmp_path / "c", text_columns=("title", "description"),
                        label_map="1=World,2=Sports", tier=4, max_memory=350.0, threads=2, skip_bad_rows=True)  # fmt: skip
    parsed = parse_config_args([node.to_node_config()])
    assert NodeSettings.from_node_config(parsed) == node
    auto = NodeSettings.from_node_config(parse_config_args([NodeSettings(data=tmp_path / "d.csv", cache_dir=tmp_path).to_node_config()]))
    assert auto.tier is None and auto.bundle is None and auto.max_memory is None
    with pytest.raises(ValueError, match="lacks 'data'"):
        NodeSettings.from_node_config({})


@pytest.mark.parametrize("text", ['a "quoted" name', "both ' and \"", "back\\slash\\", "new\nline\ttab\x00nul", "x=y z=w", "\u00e9t\u00e9 \U0001f600", "'", '"'])
def test_any_string_survives_flowers_node_config_parser(tmp_path: Path, text: str) -> None:
    """Flower cuts --node-config at the next double quote: a quote in a path or option once broke the device's
    settings. Every string must come back unchanged through Flower's own parser."""
    from flwr.common.config import parse_config_args

    node = NodeSettings(data=tmp_path / f"d {text}.csv", cache_dir=tmp_path / text.replace("\x00", ""), label_map=text, name=text,
                        label_column=text, text_columns=(text, "b"))  # fmt: skip
    assert NodeSettings.from_node_config(parse_config_args([node.to_node_config()])) == node


def test_train_and_evaluate_messages_on_the_tiny_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    state = GlobalState.initial(manifest_id(manifest), pool, manifest.num_layers, manifest.num_experts)
    ins = plan_round(state, manifest, {7: 2}, {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "max_steps": 2, "seed": 0})[7]
    node = NodeSettings(data=write_tiny_csv(tmp_path / "d.csv", 20, 0), cache_dir=tmp_path, bundle=tiny_bundle, tier=2,
                        eval_fraction=0.25, backend="ort", threads=1)  # fmt: skip
    from flwr.common.config import parse_config_args

    node = NodeSettings.from_node_config(parse_config_args([node.to_node_config()]))
    update, round_ = update_from_record(_run(instruction_to_record(ins), node, training=True))
    update.validate(manifest, ins.assignment)
    assert round_ == 1 and update.num_examples == 8 and update.metrics["steps"] == 2  # 2 steps of 4 of the 15 training rows
    changed = [k for k in ins.values if not np.array_equal(update.tensors[k], ins.values[k])]
    assert set(changed) == set(ins.values)  # every tensor it was sent, trained (the second layer of w2 starts at 0)
    assert set(update.tensors) - set(ins.values) == {"stats.route_counts", "stats.route_prob_sum"}
    assert update.route_counts.sum() > 0
    assert update.metrics["peak_rss_mb"] >= update.metrics["rss_mb"] > 0 and update.metrics["seconds"] >= update.metrics["train_seconds"]
    metrics, r = metrics_from_record(_run(instruction_to_record(ins), node, training=False))
    assert r == 1 and metrics["examples"] == 5 and 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0
    # a long-lived process (a simulation's) trains each message from a fresh optimizer: the same message twice gives
    # the same update, although the process has trained before
    again, _ = update_from_record(_run(instruction_to_record(ins), node, training=True))
    for k in ins.values:
        np.testing.assert_array_equal(again.tensors[k], update.tensors[k])
    metrics2, _ = metrics_from_record(_run(instruction_to_record(ins), node, training=False))  # the reused eval session
    assert metrics2["accuracy"] == metrics["accuracy"] and metrics2["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    # at most one cached evaluation session (the last tier's), and none once a train message comes
    eval_keys = lambda: [k for k in _CACHE if isinstance(k, tuple) and k[0] == "eval-session"]  # noqa: E731
    assert [k[3] for k in eval_keys()] == [2]
    ins4 = plan_round(state, manifest, {7: 4}, {"epochs": 1, "batch_size": 4, "max_steps": 1})[7]
    metrics_from_record(_run(instruction_to_record(ins4), node, training=False))
    assert [k[3] for k in eval_keys()] == [4]
    _run(instruction_to_record(ins), node, training=True)
    assert eval_keys() == []


def test_a_virtual_node_reads_its_settings_from_the_simulation_plan(tmp_path: Path) -> None:
    import json

    nodes = [NodeSettings(data=tmp_path / f"c{i}.csv", cache_dir=tmp_path, tier=2 * (i + 1), eval_data=tmp_path / f"t{i}.csv",
                          name=f"client-{i}") for i in range(2)]  # fmt: skip
    from flwr.common.config import parse_config_args

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"nodes": [{"node_config": parse_config_args([n.to_node_config()])} for n in nodes]}))
    assert NodeSettings.from_context({"partition-id": 1, "num-partitions": 2}, {"sim-plan": str(plan)}) == nodes[1]
    with pytest.raises(ValueError, match="no partition 5"):
        NodeSettings.from_context({"partition-id": 5, "num-partitions": 6}, {"sim-plan": str(plan)})
    # a real SuperNode's node config is used as it is
    assert NodeSettings.from_context(parse_config_args([nodes[0].to_node_config()]), {}) == nodes[0]


def test_a_damaged_download_is_discarded_and_named(tiny_bundle: Path, tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from edge_runtime.client_app import write_chunks

    manifest = load_manifest(tiny_bundle)
    mid = manifest_id(manifest)
    node = NodeSettings(data=tmp_path / "d.csv", cache_dir=tmp_path / "cache", tier=1)
    folder = bundle_dir_for(NodeSettings.from_node_config(parse_config_args([node.to_node_config()])), manifest, mid)
    entries = needed_files(manifest, 1, "ort")
    assert [e.path for e in missing_files(folder, entries)] == [e.path for e in entries]
    entry = entries[0]
    data = (tiny_bundle / entry.path).read_bytes()
    half = len(data) // 2
    assert write_chunks(folder, mid, [{"path": entry.path, "offset": 0, "key": "a"}], {"a": data[:half]}) == []
    assert write_chunks(folder, mid, [{"path": entry.path, "offset": half, "key": "b"}], {"b": data[half:]}) == [entry.path]
    assert entry.path not in [e.path for e in missing_files(folder, entries)]
    target = entries[1]
    payload = (tiny_bundle / target.path).read_bytes()
    with pytest.raises(IntegrityError, match=f"received {target.path}: sha256"):
        write_chunks(folder, mid, [{"path": target.path, "offset": 0, "key": "c"}], {"c": payload[:-1] + bytes([payload[-1] ^ 1])})
    assert not (folder / target.path).exists() and not (folder / (target.path + ".part")).exists()


def test_hostile_artifact_messages_are_refused_before_anything_is_written(tiny_bundle: Path, tmp_path: Path) -> None:
    """A coordinator's artifacts message names a cache folder (its bundle id) and pieces of files: an id that is not
    16 hex digits, a piece beyond the file's size, and a symbolic link planted where a piece is written are refused,
    and nothing is written outside the cache."""
    from edge_runtime.client_app import write_chunks
    from edge_runtime.records import MessageError, artifacts_from_record, artifacts_to_record

    manifest = load_manifest(tiny_bundle)
    mid = manifest_id(manifest)
    node = NodeSettings(data=tmp_path / "d.csv", cache_dir=tmp_path / "cache", tier=1)
    for bad in ("../../outside", "/etc", mid.upper(), mid + "0", ""):
        with pytest.raises(MessageError, match="16 lowercase hex digits"):
            bundle_dir_for(node, manifest, bad)
        with pytest.raises(MessageError, match="16 lowercase hex digits"):
            artifacts_from_record(artifacts_to_record(bad, [("manifest.json", 0, b"x")]))
    assert not (tmp_path / "outside").exists()
    folder = bundle_dir_for(node, manifest, mid)
    entry = needed_files(manifest, 1, "ort")[0]
    with pytest.raises(MessageError, match="does not fit"):
        write_chunks(folder, mid, [{"path": entry.path, "offset": entry.size, "key": "a"}], {"a": b"x"})
    with pytest.raises(MessageError, match="does not fit"):
        write_chunks(folder, mid, [{"path": entry.path, "offset": 0, "key": "a"}], {"a": b"x" * (entry.size + 1)})
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("keep me")
    part = folder / (entry.path + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.symlink_to(secret)
    with pytest.raises(IntegrityError, match="symbolic link"):
        write_chunks(folder, mid, [{"path": entry.path, "offset": 0, "key": "a"}], {"a": b"overwritten"})
    assert secret.read_text() == "keep me"
    part.unlink()
    (folder / "tiers" / "t1").rename(folder / "tiers" / "real")
    (folder / "tiers" / "t1").symlink_to(tmp_path)  # a linked folder on the way to the file
    with pytest.raises(IntegrityError, match="symbolic link"):
        write_chunks(folder, mid, [{"path": entry.path, "offset": 0, "key": "a"}], {"a": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "elsewhere.txt"]


def test_peak_memory_window_starts_at_each_message() -> None:
    """A worker that once held 300 MB more reports, after a reset, the peak of the new window, not its lifetime peak."""
    import numpy as np

    from edge_runtime.client_app import _memory, reset_peak_rss
    from edge_runtime.measure import peak_rss_mb

    big = np.ones(300 * 2**20 // 8)  # 300 MB, touched
    lifetime = peak_rss_mb()
    del big
    assert reset_peak_rss(), "Linux allows a process to reset its own VmHWM"
    window = _memory(True)
    assert window["peak_scope"] == 1.0 and window["peak_rss_mb"] < lifetime - 200, (window, lifetime)
    assert _memory(False)["peak_scope"] == 0.0 and _memory(False)["peak_rss_mb"] >= window["rss_mb"] - 1


def test_a_kept_personal_model_loads_with_optimum_and_scores_as_the_device_did(tiny_bundle: Path, tmp_path: Path) -> None:
    """``keep-model``: each evaluation writes the device's personalised model (its tier with the values it was sent);
    optimum's logits on the global test rows give the ``global_accuracy`` the device reported."""
    import json

    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    from edge_runtime.data import DataSpec, load_examples

    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    state = GlobalState.initial(manifest_id(manifest), pool, manifest.num_layers, manifest.num_experts)
    ins = plan_round(state, manifest, {7: 2}, {"epochs": 1, "batch_size": 4, "learning_rate": 5e-2, "max_steps": 3, "seed": 0})[7]
    node = NodeSettings(data=write_tiny_csv(tmp_path / "d.csv", 20, 0), cache_dir=tmp_path, bundle=tiny_bundle, tier=2, eval_fraction=0.25,
                        backend="ort", threads=1, keep_model=tmp_path / "mine", global_eval_data=write_tiny_csv(tmp_path / "g.csv", 30, 9))  # fmt: skip
    update, _ = update_from_record(_run(instruction_to_record(ins), node, training=True))
    ins.values = {k: update.tensors[k] for k in ins.values}  # the device's own trained values, as a personalised model
    ins.train = {**ins.train, "global_eval": True}
    metrics, _ = metrics_from_record(_run(instruction_to_record(ins), node, training=False))
    assert metrics["global_examples"] == 30 and 0 <= metrics["global_accuracy"] <= 1
    saved = json.loads((tmp_path / "mine" / "evaluation.json").read_text())
    assert saved["round"] == 1 and saved["global_accuracy"] == metrics["global_accuracy"]
    assert not (tmp_path / "mine.partial").exists()

    model = ORTModelForSequenceClassification.from_pretrained(tmp_path / "mine")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "mine")
    rows = load_examples(tmp_path / "g.csv", DataSpec(("text",), "label"), manifest.labels)
    with torch.no_grad():
        logits = model(**tokenizer(list(rows.texts), return_tensors="pt", padding=True)).logits.numpy()
    accuracy = float(np.mean(logits.argmax(-1) == np.asarray(rows.labels)))
    assert accuracy == pytest.approx(metrics["global_accuracy"], abs=1e-9)
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(np.asarray(rows.labels))))
    assert loss == pytest.approx(metrics["global_loss"], rel=1e-4)  # the trained values, not the bundle's initial ones
    # without global_eval in the instruction the device scores only its own rows
    ins.train = {k: v for k, v in ins.train.items() if k != "global_eval"}
    plain, _ = metrics_from_record(_run(instruction_to_record(ins), node, training=False))
    assert "global_accuracy" not in plain
