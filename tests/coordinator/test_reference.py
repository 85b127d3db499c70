"""The two centralised references of a simulation run (coordinator/reference.py), on a tiny random BERT bundle and a
learnable synthetic task (the label is a keyword): the linear probe, checked against a direct numpy computation of
its objective; the centralised MoE; the files, the loader and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.reference import (
    REFERENCE_FILES,
    ReferenceError,
    centralised_moe,
    fit_logistic_regression,
    frozen_encoder,
    linear_probe,
    load_references,
    load_run_data,
    pooled_embeddings,
)
from coordinator.simulate import SimSettings, prepare
from tests.conftest import write_tiny_csv
from tests.coordinator.test_simulate import fixed_fleet

runner = CliRunner()


def make_run(bundle: Path, folder: Path, rows: int = 400) -> Path:
    """A simulation run folder (plan and client files, no rounds run): 3 IID clients of tiers 1, 2, 4."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_tiny_csv(folder / "all.csv", rows, 0)
    fleet = fixed_fleet(folder / "fleet.json", [1, 2, 4])
    prepare(SimSettings(bundle=bundle, data=str(data), out=folder / "run", clients=3, fleet=str(fleet), partition="iid"))
    return folder / "run"


@pytest.fixture(scope="module")
def run_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tiny_bundle, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def references(run_dir: Path) -> tuple[dict, dict]:
    probe = linear_probe(run_dir, progress=False)
    central = centralised_moe(run_dir, epochs=3, lr=3e-3, progress=False)
    return probe, central


# -- the logistic regression, against numpy ------------------------------------------------------------------------


def numpy_objective_and_gradient(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, c: float) -> tuple[float, np.ndarray, np.ndarray]:
    """mean CE + |W|^2 / (2 C n) on standardised x (population std), and its gradient, written out directly."""
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    n = len(y)
    logits = z @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(w.shape[1])[y]
    lam = 1.0 / (c * n)
    obj = -np.log(p[np.arange(n), y]).mean() + 0.5 * lam * (w**2).sum()
    return float(obj), z.T @ (p - onehot) / n + lam * w, (p - onehot).mean(axis=0)


def test_the_fitted_probe_is_the_optimum_of_the_objective_computed_directly() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * rng.uniform(0.1, 10.0, 6) + rng.normal(size=6)  # scales and offsets: standardising matters
    y = (x[:, 0] / 10 + rng.normal(size=300) > 0).astype(np.int64) + (x[:, 1] > x[:, 1].mean()).astype(np.int64)  # 3 overlapping classes
    model = fit_logistic_regression(x, y, 3, c=0.5)
    obj, gw, gb = numpy_objective_and_gradient(x, y, model.weight, model.bias, 0.5)
    assert model.converged and model.iterations > 0
    assert abs(obj - model.objective) < 1e-9 and np.abs(gw).max() < 1e-5 and np.abs(gb).max() < 1e-5
    for _ in range(5):  # convex: any nearby point is worse
        assert numpy_objective_and_gradient(x, y, model.weight + 1e-2 * rng.normal(size=model.weight.shape), model.bias, 0.5)[0] > obj
    assert np.array_equal(model.logits(x).argmax(axis=1), ((x - x.mean(0)) / x.std(0) @ model.weight + model.bias).argmax(axis=1))


def test_the_probe_separates_separable_classes() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    y = rng.integers(0, 3, 200)
    model = fit_logistic_regression(centres[y] + rng.normal(size=(200, 3)), y, 3)
    y_new = rng.integers(0, 3, 100)
    assert (model.logits(centres[y_new] + rng.normal(size=(100, 3))).argmax(axis=1) == y_new).mean() > 0.97


# -- the references on a run folder ---------------------------------------------------------------------------------


def test_probe_learns_the_keyword_task_on_the_runs_rows(run_dir: Path, references: tuple[dict, dict]) -> None:
    probe, _ = references
    plan = json.loads((run_dir / "plan.json").read_text())
    assert probe["rows_trained"] == sum(n["train_rows"] for n in plan["nodes"]) and probe["rows_tested"] == plan["global_test_rows"] == 40
    assert probe["accuracy"] > 0.8 and probe["train_accuracy"] > 0.8  # chance is about 1/3
    assert probe["fit"]["converged"] and probe["settings"]["max_seq_len"] == 16 and probe["settings"]["max_seq_len_from"] == "default"
    written = json.loads((run_dir / REFERENCE_FILES["probe"]).read_text())
    assert written["format"] == "fftmoe-reference" and written["kind"] == "probe" and written["accuracy"] == probe["accuracy"]
    assert written["data_digest"] == plan["data_digest"] and written["seconds"] > 0


def test_probe_features_are_what_the_bundles_model_pools(run_dir: Path) -> None:
    """The frozen encoder's pooled features equal the global model's pooling with the initial pool (whose experts
    add exactly zero) and the head taken off."""
    import torch
    from safetensors.numpy import load_file

    from coordinator.global_model import build_global_model

    data = load_run_data(run_dir)
    _, test = data.encode(16)
    features = pooled_embeddings(*frozen_encoder(data.bundle_dir, data.manifest), test, batch_size=7)
    model = build_global_model(data.bundle_dir, data.manifest, load_file(str(data.bundle_dir / data.manifest.global_pool.path)))
    model.head = torch.nn.Identity()
    with torch.no_grad():
        pooled = np.concatenate([model.logits(torch.from_numpy(i), torch.from_numpy(m))[0].numpy() for i, m, _ in test.batches(13)])
    assert features.shape == (40, data.manifest.hidden_size) and np.allclose(features, pooled, atol=1e-5)


def test_central_reference_trains_and_is_evaluated_as_the_federated_global_model(run_dir: Path, references: tuple[dict, dict]) -> None:
    from safetensors.numpy import load_file

    from coordinator.global_model import build_global_model, evaluate_global

    _, central = references
    epochs = central["per_epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3] and central["steps"] == 3 * -(-central["rows_trained"] // 16)
    assert epochs[3]["train_loss"] < epochs[1]["train_loss"] and central["loss"] < central["initial_loss"] - 0.1
    assert central["accuracy"] > 0.8 and central["settings"]["batch_size"] == 16 and central["settings"]["lr"] == 3e-3
    # epoch 0 is the initial global model, evaluated as the ServerApp evaluates round 0
    data = load_run_data(run_dir)
    initial = evaluate_global(build_global_model(data.bundle_dir, data.manifest, load_file(str(data.bundle_dir / "global_pool.safetensors"))), data.encode(16)[1])
    assert epochs[0]["accuracy"] == initial["accuracy"] and abs(epochs[0]["loss"] - initial["loss"]) < 1e-9
    assert json.loads((run_dir / REFERENCE_FILES["central"]).read_text())["per_epoch"] == epochs


def test_settings_default_to_the_runs_config_and_max_steps_stops(tiny_bundle: Path, tmp_path: Path) -> None:
    run = make_run(tiny_bundle, tmp_path, rows=120)
    (run / "flower" / "fftmoe-app").mkdir(parents=True)
    (run / "flower" / "fftmoe-app" / "pyproject.toml").write_text('[tool.flwr.app.config]\nbatch-size = 8\nlr = 0.002\nmax-seq-len = 8\n')
    central = centralised_moe(run, epochs=5, max_steps=3, progress=False)
    s = central["settings"]
    assert (s["batch_size"], s["batch_size_from"], s["lr"], s["max_seq_len"], s["max_seq_len_from"]) == (8, "run config", 0.002, 8, "run config")
    assert central["steps"] == 3 and central["epochs_done"] == 1 and len(central["per_epoch"]) == 2
    assert centralised_moe(run, max_steps=1, batch_size=4, progress=False, write=False)["settings"]["batch_size_from"] == "option"


def test_load_references_reads_both_and_refuses_stale_or_damaged_files(run_dir: Path, references: tuple[dict, dict], tmp_path: Path) -> None:
    probe, central = references
    assert load_references(run_dir) == {"probe": probe["accuracy"], "central": central["accuracy"]}
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data"))
    (copy / REFERENCE_FILES["central"]).unlink()
    assert load_references(copy) == {"probe": probe["accuracy"]}
    plan = json.loads((copy / "plan.json").read_text())
    (copy / "plan.json").write_text(json.dumps({**plan, "data_digest": "other"}))
    with pytest.raises(ReferenceError, match="reference-probe.json: computed on other data"):
        load_references(copy)
    (copy / REFERENCE_FILES["probe"]).write_text("{not json")
    with pytest.raises(ReferenceError, match="reference-probe.json: damaged"):
        load_references(copy)


# -- errors and the command -----------------------------------------------------------------------------------------


def test_errors_name_the_missing_plan_or_data_file(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ReferenceError, match=r"plan.json: no simulation plan"):
        linear_probe(tmp_path, progress=False)
    plan = json.loads((run_dir / "plan.json").read_text())
    plan["nodes"][1]["node_config"]["data"] = str(tmp_path / "gone.csv")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ReferenceError, match=r"gone.csv: no such file \(listed in .*plan.json\)"):
        centralised_moe(tmp_path, progress=False)
    with pytest.raises(ReferenceError, match="--epochs must be >= 1"):
        centralised_moe(run_dir, epochs=0, progress=False)


def test_command_writes_json_and_exits_2_on_a_bad_run_folder(run_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["reference", "--out", str(run_dir), "--kind", "probe", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] and [r["kind"] for r in out["references"]] == ["probe"] and out["references"][0]["accuracy"] > 0.8
    table = runner.invoke(app, ["reference", "--out", str(run_dir), "--kind", "central", "--max-steps", "2"])
    assert table.exit_code == 0 and "centralised MoE" in table.stdout and "2 steps" in table.stdout, table.output
    bad = runner.invoke(app, ["reference", "--out", str(tmp_path), "--json"])
    assert bad.exit_code == 2 and json.loads(bad.stdout)["error"] == "reference" and "plan.json" in bad.stdout
    assert runner.invoke(app, ["reference", "--out", str(run_dir), "--kind", "neither"]).exit_code == 2
