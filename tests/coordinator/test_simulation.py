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
