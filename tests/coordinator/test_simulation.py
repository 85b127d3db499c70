"""End to end as a user runs it: ``fftmoe-coordinator simulate`` starts a real Flower SuperLink in simulation mode,
whose Ray workers run the real ClientApp for four virtual devices of tiers 1, 2 and 4 on a tiny bundle; two rounds,
then Ctrl-C during a longer run (nothing left running) and the same command continues it (to round 4); then an IID run and ``fftmoe-coordinator compare``.

Checks every file the issue lists, and that each client's bytes up and down per round equal its tier's share
(computed from the shapes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import pytest

from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.update import manifest_id
from tests.conftest import tier_bytes, write_tiny_csv
from tests.coordinator.test_simulate import fixed_fleet

BIN = Path(sys.executable).parent
RUN_FILES = ("plan.json", "metrics.jsonl", "summary.json", "accuracy.png", "accuracy-vs-upload.png", "expert-usage.png", "memory.png",
             "partition.png", "run.log", "state/history.json")  # fmt: skip


def simulate_cmd(bundle: Path, data: Path, fleet: Path, out: Path, rounds: int, *extra: str) -> list[str]:
    """The command line of a four-client simulation with short rounds."""
    return [str(BIN / "fftmoe-coordinator"), "simulate", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "--clients", "4",
            "--fleet", str(fleet), "--rounds", str(rounds), "--local-steps", "2", "--batch-size", "8", "--lr", "0.01",
            "--min-partition-size", "5", "--parallel", "2", "--json", *extra]  # fmt: skip


def simulate(bundle: Path, data: Path, fleet: Path, out: Path, rounds: int, *extra: str) -> dict:
    res = subprocess.run(simulate_cmd(bundle, data, fleet, out, rounds, *extra), capture_output=True, text=True, timeout=1200)  # a deadline against hangs, not a speed check
    assert res.returncode == 0, f"simulate failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-5000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_run(summary: dict, run: Path, manifest, method: str) -> None:  # noqa: ANN001
    """A finished two-round, four-client run: every file, and per round each client's bytes up and down equal to its
    tier's share computed from the shapes, metrics in range, memory per tier."""
    assert summary["ok"] and summary["rounds"] == 2 and summary["clients"] == 4 and summary["method"] == method
    for name in RUN_FILES if method.startswith("fftmoe") else [f for f in RUN_FILES if f != "expert-usage.png"]:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and "global_accuracy" in rows[0]
    plan = json.loads((run / "plan.json").read_text())
    tiers = {n["name"]: n["tier"] for n in plan["nodes"]}
    for r in rows[1:]:
        assert sorted(r["clients"]) == sorted(tiers) and r["tiers"] == tiers and r["method"] == method
        for client, tier in tiers.items():
            down, up = tier_bytes(manifest, tier)
            assert (r["download_bytes"][client], r["upload_bytes"][client]) == (down, up)
        assert 0 <= r["global_accuracy"] <= 1 and 0 <= r["personal_accuracy"] <= 1
        assert 0 < r["expert_usage_entropy"] <= 1 if method.startswith("fftmoe") else r["expert_usage_entropy"] is None
        assert set(r["tier_peak_rss_mb"]) == {"1", "2", "4"} and all(v > 0 for v in r["tier_peak_rss_mb"].values())
    assert GlobalState.load(run / "state", manifest_id(manifest)).round == 2


def test_lora_baselines_run_in_the_same_harness_and_compare(tiny_fedit: Path, tiny_hetlora: Path, tmp_path: Path) -> None:
    """FedIT and HetLoRA through the same simulate command, edge runtime and coordinator, then one comparison."""
    data = write_tiny_csv(tmp_path / "data.csv", 240, 0)
    fleet = fixed_fleet(tmp_path / "fleet.json", [1, 2, 4])
    runs = []
    for name, bundle in (("fedit", tiny_fedit), ("hetlora", tiny_hetlora)):
        run = tmp_path / name
        check_run(simulate(bundle, data, fleet, run, 2, "--alpha", "0.5"), run, load_manifest(bundle), name)
        runs.append(run)
    res = subprocess.run([str(BIN / "fftmoe-coordinator"), "compare", *map(str, runs), "--plot", str(tmp_path / "cmp.png"), "--json"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [s["method"] for s in json.loads(res.stdout)["runs"]] == ["fedit", "hetlora"]


def test_simulate_four_clients_continue_and_compare(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    data = write_tiny_csv(tmp_path / "data.csv", 240, 0)
    fleet = fixed_fleet(tmp_path / "fleet.json", [1, 2, 4])
    a = tmp_path / "dirichlet"
    check_run(simulate(tiny_bundle, data, fleet, a, 2, "--alpha", "0.5"), a, manifest, "fftmoe")

    # Ctrl-C during a longer run: exit 130, nothing of it left running (Flower's SuperExec, the simulation process
    # and Ray's workers included), and the same command continues from the last completed round
    import psutil

    proc = subprocess.Popen(simulate_cmd(tiny_bundle, data, fleet, a, 4, "--alpha", "0.5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone, or a zombie
            return ""

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if any("ClientAppActor" in cmdline(c) for c in psutil.Process(proc.pid).children(recursive=True)):
            break
        time.sleep(1.0)
    time.sleep(3.0)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert any("flwr-simulation" in cmdline(c) for c in family), [cmdline(c)[:80] for c in family]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{proc.returncode}\n{out}\n{err[-3000:]}"
    psutil.wait_procs(family, timeout=30)
    assert not [c for c in family if running(c)], [cmdline(c)[:80] for c in family if running(c)]
    done = GlobalState.load(a / "state", manifest_id(manifest)).round
    assert 2 <= done < 4
    summary = simulate(tiny_bundle, data, fleet, a, 4, "--alpha", "0.5")
    assert summary["ok"] and summary["rounds"] == 4
    assert [json.loads(line)["round"] for line in (a / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]

    b = tmp_path / "iid"
    assert simulate(tiny_bundle, data, fleet, b, 1, "--partition", "iid")["ok"]
    res = subprocess.run([str(BIN / "fftmoe-coordinator"), "compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png"), "--json"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    compared = json.loads(res.stdout)
    assert [s["partition"] for s in compared["runs"]] == ["dirichlet", "iid"] and (tmp_path / "cmp.png").stat().st_size > 0
    table = subprocess.run([str(BIN / "fftmoe-coordinator"), "compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png")],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert table.returncode == 0 and "dirichlet" in table.stdout and "iid" in table.stdout
    md = subprocess.run([str(BIN / "fftmoe-coordinator"), "compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png"), "--markdown"],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    rows = [line.split(" | ") for line in md.stdout.strip().splitlines()]
    assert md.returncode == 0 and len(rows) == 4 and rows[0][0] == "| run" and rows[2][0] == f"| {a.name}" and rows[3][2] == "iid"
    assert all(len(r) == len(rows[0]) for r in rows[2:])


def _direct_ridge_head(run: Path, bundle: Path, ridge: float, scale: float, pool: dict | None = None) -> tuple:
    """The ridge head computed here from the clients' training files: PyTorch's pooled features of the bundle's
    initial model (every adapter starts at zero) or of the global model holding ``pool``, summed and solved with
    NumPy's lstsq (no fftmoe solver)."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from coordinator.global_model import build_global_model
    from edge_runtime.data import DataSpec, TextEncoder, encode_examples, load_examples

    manifest = load_manifest(bundle)
    model = build_global_model(bundle, manifest, pool if pool is not None else load_file(str(bundle / manifest.global_pool.path)))
    encoder = TextEncoder(bundle / Path(manifest.tokenizer_files[0].path).parent, manifest.max_seq_len)
    phi, labels = [], []
    for node in json.loads((run / "plan.json").read_text())["nodes"]:
        data = encode_examples(load_examples(Path(node["node_config"]["data"]), DataSpec(("text",), "label"), manifest.labels), encoder)
        with torch.no_grad():
            for ids, mask, y in data.batches(16):
                phi.append(model.features(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy().astype(np.float64))
                labels.append(y)
    x, y = np.concatenate(phi), np.concatenate(labels)
    d, c = x.shape[1], len(manifest.labels)
    lam = ridge * np.square(x).sum() / d
    z = np.hstack([x, np.ones((len(x), 1))])
    a = np.vstack([z, np.hstack([np.sqrt(lam) * np.eye(d), np.zeros((d, 1))])])
    sol, *_ = np.linalg.lstsq(a, np.vstack([np.eye(c)[y], np.zeros((d, c))]), rcond=None)
    return scale * sol[:d].T, scale * sol[d], len(y)


def test_a_ridge_head_solved_from_every_client_and_kept_frozen(tiny_bundle: Path, tiny_fedit: Path, tmp_path: Path) -> None:
    """``--head ridge-frozen`` end to end: before round 1 every client sends its statistics, the coordinator solves
    the head, and after two rounds of training the global head is still exactly that head, which equals a direct
    least-squares fit on the pooled features of all the clients' training rows; FedIT gets the same treatment."""
    import numpy as np

    data = write_tiny_csv(tmp_path / "data.csv", 240, 0)
    fleet = fixed_fleet(tmp_path / "fleet.json", [1, 2, 4])
    for name, bundle in (("fftmoe", tiny_bundle), ("fedit", tiny_fedit)):
        run = tmp_path / name
        keep = ("--keep-models",) if name == "fftmoe" else ()
        summary = simulate(bundle, data, fleet, run, 2, "--alpha", "0.5", "--head", "ridge-frozen", "--ridge", "0.01", "--ridge-scale", "4", *keep,
                           "--no-ridge-resolve")  # fmt: skip
        assert summary["ok"] and summary["rounds"] == 2
        if keep:  # every client's personalised model, scored on its own rows and on the global test rows
            saved = [json.loads((run / "models" / n["name"] / "evaluation.json").read_text()) for n in json.loads((run / "plan.json").read_text())["nodes"]]
            assert all(e["round"] == 2 and e["global_examples"] > 0 and (run / "models").is_dir() for e in saved)
            assert all((run / "models" / n / "model.onnx").is_file() for n in os.listdir(run / "models"))
            assert summary["final_personal_global_accuracy"] == pytest.approx(np.mean([e["global_accuracy"] for e in saved]))
        history = json.loads((run / "state" / "history.json").read_text())
        info = history[0]["ridge_head"]
        assert len(info["nodes"]) == 4 and info["rejected"] == {} and info["mode"] == "ridge-frozen"
        manifest = load_manifest(bundle)
        weight, bias, rows = _direct_ridge_head(run, bundle, 0.01, 4.0)
        assert info["examples"] == rows
        state = GlobalState.load(run / "state", manifest_id(manifest))
        assert state.round == 2 and history[-1]["round"] == 2
        np.testing.assert_allclose(state.pool["head.weight"], weight, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(state.pool["head.bias"], bias, rtol=1e-3, atol=1e-4)
        assert any("central" in h and h["round"] == 0 for h in history)  # the round-0 evaluation sees the solved head
        if name == "fftmoe":  # the same command again with --ridge-resolve: the head re-solved on the trained features
            again = simulate(bundle, data, fleet, run, 2, "--alpha", "0.5", "--head", "ridge-frozen", "--ridge", "0.01", "--ridge-scale", "4",
                             *keep, "--ridge-resolve")  # fmt: skip
            final = GlobalState.load(run / "state", manifest_id(manifest))
            entry = final.history[-1]
            assert final.round == 2 and entry["ridge_head"]["resolve"] and "central" in entry
            before = GlobalState.load(run / "state" / "before-resolve", manifest_id(manifest))  # the replaced state, kept
            assert before.round == 2 and before.history == state.history
            for key, value in state.pool.items():
                np.testing.assert_array_equal(before.pool[key], value, err_msg=key)
            assert again["final_global_accuracy"] == entry["central"]["accuracy"] and again["head_resolved"]["nodes"] == 4
            weight, bias, _ = _direct_ridge_head(run, bundle, 0.01, 4.0, pool=state.pool)  # every client, the global model's features
            np.testing.assert_allclose(final.pool["head.weight"], weight, rtol=2e-3, atol=2e-4)
            np.testing.assert_allclose(final.pool["head.bias"], bias, rtol=2e-3, atol=2e-4)
