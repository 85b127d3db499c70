"""Fault injection on a real loopback federation (``fftmoe-coordinator serve`` and ``fftmoe-edge join`` processes,
a tiny bundle): the coordinator killed at points of a round and of its checkpoint write, then resumed; devices
killed at random moments of rounds, a straggler past the round timeout, and a device whose cached artifact was
tampered with. Figures of these runs are in docs/reliability.md."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from coordinator.deploy import free_port, stop
from coordinator.merge import merge_updates
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest, sha256_file, verify_files
from edge_runtime.update import Update, manifest_id
from tests.conftest import finish_serve, write_tiny_csv

BIN = Path(sys.executable).parent


def serve(bundle: Path, state: Path, port: int, rounds: int, resume: bool, fault: str = "", extra: tuple[str, ...] = (),
          fault_log: Path | None = None) -> subprocess.Popen:  # fmt: skip
    cmd = [str(BIN / "fftmoe-coordinator"), "serve", "--bundle", str(bundle), "--state-dir", str(state), "--rounds", str(rounds),
           "--min-clients", "2", "--insecure", "--port", str(port), "--local-steps", "1", "--batch-size", "4", "--eval-every", "0",
           "--round-timeout", "240", "--wait-seconds", "240", "--json", *extra]  # fmt: skip
    env = {**os.environ, "FFTMOE_FAULT": fault, "FFTMOE_FAULT_LOG": str(fault_log or "")}
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def join(port: int, data: Path, tier: int, cache: Path, fault: str = "") -> subprocess.Popen:
    """``fftmoe-edge join`` on loopback; its own messages go to CACHE/join.log (``device_logs`` shows them)."""
    cmd = [str(BIN / "fftmoe-edge"), "join", "--server", f"127.0.0.1:{port}", "--data", str(data), "--tier", str(tier), "--insecure",
           "--cache-dir", str(cache), "--eval-fraction", "0.25", "--threads", "1", "--retry-seconds", "600"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FFTMOE_FAULT")}
    env.update(TOKENIZERS_PARALLELISM="false", **({"FFTMOE_FAULT": fault} if fault else {}))
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "join.log", "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def device_logs(tmp_path: Path, tail: int = 3000) -> str:
    """The end of every device's join.log and SuperNode log under ``tmp_path``: what a failed assertion prints."""
    parts = []
    for log in sorted([*tmp_path.glob("cache*/join.log"), *tmp_path.glob("cache*/supernode-*/supernode.log")]):
        parts.append(f"--- {log.relative_to(tmp_path)}\n{log.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)


def kill_tree(proc: subprocess.Popen, port: int | None = None) -> None:
    """SIGKILL a process and all its descendants at once (a device or host losing power); with ``port``, wait until
    the killed coordinator's public port is free again, as a restarted host's would be."""
    from coordinator.deploy import port_in_use

    stop(proc, graceful=False)
    deadline = time.monotonic() + 60
    while port is not None and port_in_use("127.0.0.1", port):
        assert time.monotonic() < deadline, f"port {port} still open 60 s after the coordinator was killed"
        time.sleep(0.2)


# Points of a round at which the coordinator's ServerApp is killed, and the rounds its state must then hold: the
# round being worked on is lost before its checkpoint commits and kept after.
COORDINATOR_POINTS = [
    ("round.sent", 0), ("round.replies", 0), ("round.merged", 0), ("checkpoint.writing", 0), ("checkpoint.pointer-partial", 0),
    ("checkpoint.committed", 1), ("round.saved", 1), ("round.done", 1),
]  # fmt: skip


def test_coordinator_killed_at_each_point_resumes_from_the_last_committed_round(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    mid = manifest_id(manifest)
    port = free_port()
    state_dir = tmp_path / "state"
    nodes = [join(port, write_tiny_csv(tmp_path / f"d{i}.csv", 24, seed=i), tier, tmp_path / f"cache{i}") for i, tier in enumerate((1, 2))]
    try:
        code, result, err = finish_serve(serve(tiny_bundle, state_dir, port, 1, resume=False), 900)
        assert code == 0 and result["rounds_done"] == 1, (result, err[-4000:], (state_dir / "run.log").read_text(errors="replace")[-4000:])
        done = 1
        # a device's cached artifact damaged while the coordinator is down: found at the next hello and sent again
        entry = next(iter(manifest.tier(1).files.values()))
        damaged = tmp_path / "cache0" / mid / entry.path
        raw = bytearray(damaged.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        damaged.write_bytes(bytes(raw))
        fault_log = tmp_path / "faults.log"
        for point, kept in COORDINATOR_POINTS:
            before = GlobalState.load(state_dir, mid)
            proc = serve(tiny_bundle, state_dir, port, done + 1, resume=True, fault=f"kill:{point}", fault_log=fault_log)
            # the ServerApp kills itself at the point; the rest of the coordinator's host goes down with it at once
            deadline = time.monotonic() + 900
            while f"SIGKILL at {point}" not in (fault_log.read_text() if fault_log.exists() else "") and proc.poll() is None:
                assert time.monotonic() < deadline, f"{point} not reached in 900 s"
                time.sleep(0.2)
            kill_tree(proc, port)
            assert f"SIGKILL at {point}" in fault_log.read_text(), (point, proc.stdout.read()[-2000:], proc.stderr.read()[-3000:], device_logs(tmp_path))  # type: ignore[union-attr]
            state = GlobalState.load(state_dir, mid)  # loads, hashes verified: nothing half-written
            assert state.round == done + kept, (point, state.round, done)
            assert [h["round"] for h in state.history if "train_loss" in h] == list(range(1, state.round + 1))
            if not kept:  # exactly the last committed round's checkpoint, bit for bit
                assert state.history == before.history and state.pool.keys() == before.pool.keys()
                for key, value in before.pool.items():
                    np.testing.assert_array_equal(state.pool[key], value, err_msg=key)
            if point == COORDINATOR_POINTS[0][0]:
                assert sha256_file(damaged) == entry.sha256, "the damaged cached file was not sent again"
                assert "lacks 1 file(s)" in (state_dir / "run.log").read_text(errors="replace")
            done = state.round
        code, result, err = finish_serve(serve(tiny_bundle, state_dir, port, done + 1, resume=True), 900)
        assert code == 0 and result["ok"] and result["rounds_done"] == done + 1, (result, err[-4000:], (state_dir / "run.log").read_text(errors="replace")[-4000:], device_logs(tmp_path))
    finally:
        for p in nodes:
            stop(p, timeout=5)


def wait_for_line(path: Path, text: str, timeout: float, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while (path.read_text(errors="replace").count(text) if path.exists() else 0) < count:
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout} s"
        time.sleep(0.2)


def test_devices_killed_mid_round_and_a_straggler_leave_exactly_the_arrived_updates_merged(tiny_bundle: Path, tmp_path: Path) -> None:
    """Three devices train; in each of two rounds one of them (a third) loses power at a random moment after the
    round's instructions went out and boots again; a fourth device is a straggler that never answers in time.
    Every round must complete with the devices that replied, and the final global pool must equal the merge,
    round after round, of exactly the updates the coordinator kept as merged (--keep-updates)."""
    manifest = load_manifest(tiny_bundle)
    mid = manifest_id(manifest)
    port = free_port()
    state_dir = tmp_path / "state"
    rng = random.Random(1)
    rounds = 2
    # a device killed in one round is asked (hello) in the next and never answers: each round waits the timeout twice
    proc = serve(tiny_bundle, state_dir, port, rounds, resume=False,
                 extra=("--keep-updates", "--round-timeout", "60", "--max-failed-rounds", "4"))  # fmt: skip
    data = [write_tiny_csv(tmp_path / f"d{i}.csv", 24, seed=i) for i in range(4)]
    tiers = (1, 2, 4, 2)
    nodes = [join(port, data[i], tiers[i], tmp_path / f"cache{i}") for i in range(3)]
    straggler = join(port, data[3], tiers[3], tmp_path / "cache3", fault="sleep:client.train=3600")
    killed = []
    try:
        for r in range(1, rounds + 1):
            wait_for_line(state_dir / "run.log", f"round {r}/{rounds}: training on", 600)
            time.sleep(rng.uniform(0.0, 3.0))
            victim = rng.randrange(3)
            kill_tree(nodes[victim])
            killed.append(victim)
            nodes[victim] = join(port, data[victim], tiers[victim], tmp_path / f"cache{victim}")  # the device boots again
        code, result, err = finish_serve(proc, 900)
        assert code == 0 and result["ok"] and result["rounds_done"] == rounds, err[-4000:]
        state = GlobalState.load(state_dir, mid)
        pool = GlobalState.initial(mid, load_file_np(tiny_bundle / manifest.global_pool.path), manifest.num_layers, manifest.num_experts).pool
        for entry in [h for h in state.history if "train_loss" in h]:
            kept = sorted((state_dir / "updates" / f"round-{entry['round']:05d}").glob("node-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
            assert [int(p.stem.split("-")[1]) for p in kept] == sorted(entry["accepted"])
            # the straggler never answers in time; the device killed this round may have replied before it died
            assert 2 <= len(kept) <= 3 and len(entry["rejected"]) >= 1, entry["rejected"]
            assert all("no reply" in why or "error reply" in why for why in entry["rejected"].values()), entry["rejected"]
            updates = [Update.load(p).validate(manifest, entry["assignment"][p.stem.split("-")[1]]) for p in kept]
            pool, _ = merge_updates(pool, updates, manifest.num_layers, manifest.num_experts, max_share=0.5)  # serve's default --max-share
        for key, value in state.pool.items():
            np.testing.assert_array_equal(value, pool[key], err_msg=key)
        for i in range(3):  # the caches of devices that lost power still verify (a damaged file would be refetched)
            cached = tmp_path / f"cache{i}" / mid
            verify_files(cached, [e for e in manifest.all_files() if (cached / e.path).exists()])
        if os.environ.get("FFTMOE_FAULT_REPORT"):
            print(f"devices killed: {len(killed)} in {rounds} rounds; merged per round: "
                  f"{[len(h['accepted']) for h in state.history if 'train_loss' in h]}")  # fmt: skip
    finally:
        for p in [proc, *nodes, straggler]:
            stop(p, timeout=5)


def load_file_np(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
