"""End to end on loopback: a real Flower SuperLink (``fftmoe-coordinator serve``) and three real SuperNodes
(``fftmoe-edge join``) with tiers 2, 4 and 8 on a tiny bundle; one round, then a restart with --resume for a second.

Checks what the issue asks: each node received and sent only its tier's share of the tensors (bytes computed from
the tier's shapes), the global state changed only where someone trained, two devices fetched and verified their
tier's files while the third used a pre-provisioned bundle, and --resume continued from the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from coordinator.deploy import free_port, stop
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.update import manifest_id
from tests.conftest import finish_serve, tier_bytes, write_tiny_csv

BIN = Path(sys.executable).parent
TIERS = (2, 4, 8)


def changed_experts(before: dict, after: dict, manifest) -> set[tuple[int, int]]:  # noqa: ANN001
    """(layer, expert) whose w2 or b2 differ (w1 and b1 get no gradient while w2 is still at its zero start)."""
    return {(l, e) for l in range(manifest.num_layers) for e in range(manifest.num_experts)
            if any(not np.array_equal(before[f"layers.{l}.experts.{e}.{t}"], after[f"layers.{l}.experts.{e}.{t}"]) for t in ("w2", "b2"))}  # fmt: skip


def serve(bundle: Path, state: Path, port: int, rounds: int, resume: bool, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [str(BIN / "fftmoe-coordinator"), "serve", "--bundle", str(bundle), "--state-dir", str(state), "--rounds", str(rounds),
           "--min-clients", "3", "--insecure", "--port", str(port), "--local-steps", "2", "--batch-size", "8",
           "--round-timeout", "240", "--wait-seconds", "240", "--json"]  # fmt: skip
    return subprocess.Popen(cmd + (["--resume"] if resume else []) + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float) -> dict:
    code, result, err = finish_serve(proc, timeout)
    assert code == 0 and result, f"serve failed ({code}):\n{result}\n{err[-6000:]}"
    return result


def test_three_tiers_two_rounds_and_resume(tiny_bundle16: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle16)
    initial = load_file(str(tiny_bundle16 / manifest.global_pool.path))
    port = free_port()
    state_dir = tmp_path / "state"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    held_out = write_tiny_csv(tmp_path / "central.csv", 12, seed=7)  # centralised evaluation on the coordinator
    coordinator = serve(tiny_bundle16, state_dir, port, 1, resume=False, extra=("--eval-data", str(held_out), "--ridge-resolve"))
    nodes = []
    try:
        for i, tier in enumerate(TIERS):
            data = write_tiny_csv(tmp_path / f"data{i}.csv", 40, seed=i)
            cmd = [str(BIN / "fftmoe-edge"), "join", "--server", f"127.0.0.1:{port}", "--data", str(data), "--tier", str(tier),
                   "--insecure", "--cache-dir", str(tmp_path / f"cache{i}"), "--eval-fraction", "0.25", "--threads", "1",
                   "--retry-seconds", "600"]  # fmt: skip
            if i == 2:
                cmd += ["--bundle", str(tiny_bundle16)]  # pre-provisioned: fetches nothing
            nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        first = finish(coordinator, 1200)  # a deadline against hangs, not a speed check: a loaded 2-core machine needs ~600 s
        assert first["ok"] and first["rounds_done"] == 1, first

        after1 = GlobalState.load(state_dir, manifest_id(manifest))
        (entry,) = [h for h in after1.history if h["round"] == 1 and "train_loss" in h]  # the round, not the head's records
        assert sorted(entry["tiers"].values()) == list(TIERS) and len(entry["accepted"]) == 3
        for node, tier in entry["tiers"].items():  # each node got and returned exactly its tier's share
            assert (entry["sent_bytes"][node], entry["received_bytes"][node]) == tier_bytes(manifest, tier)
        trained = {(l, e) for a in entry["assignment"].values() for l, ids in enumerate(a) for e in ids}
        assert len(trained) == manifest.num_layers * 14  # 2 + 4 + 8 distinct slots per layer: the first-round spread
        changed = changed_experts(initial, after1.pool, manifest)
        # an expert held but routed no token in two local steps may keep its values; one nobody held must
        assert changed <= trained and len(changed) >= len(trained) // 2, (sorted(trained - changed), sorted(changed - trained))
        assert "federated" in entry and 0 <= entry["federated"]["accuracy"] <= 1
        (round0,) = [h for h in after1.history if h["round"] == 0 and "central" in h]  # after the ridge head's record
        assert round0["central"]["examples"] == 12 and "central" in entry
        assert after1.history[0]["ridge_head"]["mode"] == "ridge-frozen" and len(after1.history[0]["ridge_head"]["nodes"]) == 3  # the defaults
        assert after1.history[-1]["round"] == 1 and after1.history[-1]["ridge_head"]["resolve"]
        for i in (0, 1):  # fetched and verified only their tier's files; the pre-provisioned node fetched nothing
            cached = tmp_path / f"cache{i}" / manifest_id(manifest) / "tiers"
            assert sorted(p.name for p in cached.iterdir()) == [f"t{TIERS[i]}"]
        assert not (tmp_path / "cache2" / manifest_id(manifest)).exists()

        # restart: the SuperNodes reconnect to the new SuperLink; the run continues from round 1's checkpoint
        second = finish(serve(tiny_bundle16, state_dir, port, 2, resume=True, extra=("--ridge-resolve",)), 1200)
        assert second["ok"] and second["rounds_done"] == 2, second
        after2 = GlobalState.load(state_dir, manifest_id(manifest))
        assert [h["round"] for h in after2.history if "train_loss" in h] == [1, 2]
        entry2 = [h for h in after2.history if "train_loss" in h][-1]
        assert after2.history[-1]["round"] == 2 and after2.history[-1]["ridge_head"]["resolve"]  # extended: re-solved again
        trained2 = {(l, e) for a in entry2["assignment"].values() for l, ids in enumerate(a) for e in ids}
        changed2 = changed_experts(after1.pool, after2.pool, manifest)
        assert changed2 <= trained2 and len(changed2) >= len(trained2) // 2
        untrained_in_1 = {(l, e) for l in range(manifest.num_layers) for e in range(manifest.num_experts)} - trained
        assert untrained_in_1 <= trained2  # coverage: round 2 trains the experts nobody held in round 1
        assert (state_dir / "progress.png").is_file() and json.loads((state_dir / "history.json").read_text())[-1]["round"] == 2
    finally:
        for p in [coordinator, *nodes]:
            stop(p, timeout=5)
        time.sleep(0.5)
