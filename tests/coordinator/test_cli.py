"""``fftmoe-coordinator show`` on a bundle."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from coordinator.cli import app
from edge_runtime.bundle import load_manifest

runner = CliRunner()


def test_show_lists_each_tier(tiny_bundle: Path) -> None:
    result = runner.invoke(app, ["show", "--bundle", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert "M=4" in result.output and "world, sports, business" in result.output
    as_json = json.loads(runner.invoke(app, ["show", "--bundle", str(tiny_bundle), "--json"]).stdout)
    assert sorted(as_json["tiers"]) == ["1", "2", "4"]


def test_show_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    result = runner.invoke(app, ["show", "--bundle", str(tmp_path)])
    assert result.exit_code == 3 and "not an fftmoe bundle" in result.output


def test_export_writes_the_global_model_of_the_saved_state(tiny_bundle: Path, tmp_path: Path) -> None:
    """The exported model runs the saved pool: with the initial pool it equals the bundle's own inference model;
    a changed head bias shifts every logit by exactly that change."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from coordinator.state import GlobalState
    from edge_runtime.update import manifest_id

    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    state = GlobalState.initial(manifest_id(manifest), pool, manifest.num_layers, manifest.num_experts)
    state.save(tmp_path / "state")
    ids = np.array([[2, 31, 33, 3, 0], [2, 36, 3, 0, 0]], np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}

    def logits(model: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        return sess.run(["logits"], {i.name: feed[i.name] for i in sess.get_inputs()})[0]

    result = runner.invoke(app, ["export", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "m0")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(logits(tmp_path / "m0" / "model.onnx"), logits(tiny_bundle / manifest.inference_model.path), atol=1e-5)
    assert json.loads((tmp_path / "m0" / "labels.json").read_text()) == manifest.labels

    delta = np.array([0.5, -1.0, 2.0], np.float32)
    state.pool["head.bias"] = state.pool["head.bias"] + delta
    state.round = 1
    state.save(tmp_path / "state")
    assert runner.invoke(app, ["export", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "m1")]).exit_code == 0
    np.testing.assert_allclose(logits(tmp_path / "m1" / "model.onnx") - logits(tmp_path / "m0" / "model.onnx"), np.tile(delta, (2, 1)), atol=1e-5)
    bad = runner.invoke(app, ["export", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")])
    assert bad.exit_code == 3 and "no saved global state" in bad.output


def test_serve_refuses_bad_combinations_before_starting_anything(tiny_bundle: Path, tmp_path: Path) -> None:
    base = ["serve", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "s")]
    neither = runner.invoke(app, base)
    assert neither.exit_code == 2 and "--insecure" in neither.output
    auth = runner.invoke(app, [*base, "--insecure", "--authorized-key", str(tmp_path / "k.pub")])
    assert auth.exit_code == 2 and "needs TLS" in auth.output
    resume = runner.invoke(app, [*base, "--insecure", "--resume"])
    assert resume.exit_code == 3 and "no saved global state" in resume.output
    bad = runner.invoke(app, [*base, "--insecure", "--fraction", "2"])
    assert bad.exit_code == 2 and "--fraction" in bad.output
    for flag, value in (("--max-update-norm", "huge"), ("--max-share", "0"), ("--keep-checkpoints", "1")):
        refused = runner.invoke(app, [*base, "--insecure", flag, value])
        assert refused.exit_code == 2 and flag in refused.output, (flag, refused.output)
    early = runner.invoke(app, [*base, "--insecure", "--resume-round", "2"])
    assert early.exit_code == 2 and "--resume-round needs --resume" in early.output
    import socket

    with socket.socket() as busy:  # a port another process listens on: refused by name, nothing started or written
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = runner.invoke(app, [*base, "--insecure", "--port", str(port)])
    assert taken.exit_code == 2 and f"127.0.0.1:{port} is already in use" in taken.output, taken.output
    assert not (tmp_path / "s").exists()


def test_checkpoints_lists_the_kept_rounds_and_serve_can_go_back_to_one(tiny_bundle: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from coordinator.state import GlobalState
    from edge_runtime.update import manifest_id

    manifest = load_manifest(tiny_bundle)
    state = GlobalState.initial(manifest_id(manifest), load_file(str(tiny_bundle / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    folder = tmp_path / "state"
    for r in range(4):
        state.round = r
        state.save(folder)
    listed = json.loads(runner.invoke(app, ["checkpoints", "--state-dir", str(folder), "--json"]).stdout)
    assert [(c["round"], c["ok"]) for c in listed["checkpoints"]] == [(3, True), (2, True), (1, True)]
    table = runner.invoke(app, ["checkpoints", "--state-dir", str(folder)])
    assert table.exit_code == 0 and "(latest)" in table.output
    base = ["serve", "--bundle", str(tiny_bundle), "--state-dir", str(folder), "--insecure", "--resume"]
    gone = runner.invoke(app, [*base, "--resume-round", "-1"])
    assert gone.exit_code == 2 and "--resume-round" in gone.output
    missing = runner.invoke(app, [*base, "--resume-round", "0", "--rounds", "3"])
    assert missing.exit_code == 2 and "already holds 3 completed round(s)" in missing.output
    kept_one = runner.invoke(app, [*base, "--resume-round", "1", "--rounds", "1"])
    assert kept_one.exit_code == 2 and "already holds 1 completed round(s)" in kept_one.output  # round 1 was found and read
    none = runner.invoke(app, ["checkpoints", "--state-dir", str(tmp_path / "nothing")])
    assert none.exit_code == 3 and "no committed checkpoint" in none.output
