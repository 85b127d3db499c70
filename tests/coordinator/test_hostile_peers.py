"""Hostile devices against a real coordinator on loopback (issue 17, findings 2, 3, 4 and 6).

A real ``fftmoe-coordinator serve`` (Fleet gate, SuperLink) and five real ``fftmoe-edge join`` devices. Two are
honest. Three run fftmoe's own ClientApp with its replies rewritten on the way out (a ``sitecustomize`` module on the
device's PYTHONPATH replaces the reply builders of ``edge_runtime.records`` before the ClientApp imports them), as a
modified device would send them:

- **amplifier**: its hello lists the one file it lacks 1,000 times, plus files of another tier and the global pool;
  its update claims ``num_examples = 10**309`` (once an OverflowError in the weighting);
- **liar**: its hello's ``missing_bytes`` is not a number (once a TypeError);
- **giant**: its update sets every tensor to 3e38 (finite) and claims 10**12 examples (once 0.9999999997 of the
  weight and a pool of Inf and NaN, committed); its evaluation reply has no ``accuracy`` (once a KeyError).

Before the fixes each of these made ``serve`` exit 1. Now the run completes; each hostile device is named with its
reason in the run's log and in ``history.json``; the giant's update is merged clipped to what AdamW could have moved,
with its count capped and its share at most ``--max-share``; the merged pool is finite; and the amplifier was sent its
tier's files once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from coordinator.deploy import free_port, stop
from coordinator.rounds import NormBound, reply_limits
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.update import manifest_id
from tests.conftest import finish_serve, write_tiny_csv
from tests.coordinator.test_federation import BIN

SITECUSTOMIZE = r'''
"""Test-only: rewrite this device's replies as a hostile device would (FFTMOE_TEST_HOSTILE names the attack)."""
import os

ATTACK = os.environ.get("FFTMOE_TEST_HOSTILE", "")
if ATTACK:
    import json

    import numpy as np
    from edge_runtime import records

    honest_hello, honest_update, honest_metrics = records.hello_reply_to_record, records.update_to_record, records.metrics_to_record

    def hello_reply_to_record(reply):
        if "tier" in reply and ATTACK == "amplifier":
            reply = {**reply, "missing": reply["missing"] * 1000 + ["tiers/t4/checkpoint", "tiers/t4/training_model.onnx", "global_pool.safetensors"]}
        if "tier" in reply and ATTACK == "liar":
            reply = {**reply, "missing_bytes": "lots"}
        return honest_hello(reply)

    def update_to_record(update, round_):
        content = honest_update(update, round_)
        meta = json.loads(content.config_records["fftmoe"]["json"])
        if ATTACK == "amplifier":
            meta["update"]["num_examples"] = 10**309
        if ATTACK == "giant":
            meta["update"]["num_examples"] = 10**12
            from flwr.app import Array
            for key in list(content.array_records["update"].keys()):
                if not key.startswith("stats."):
                    value = content.array_records["update"][key].numpy()
                    content.array_records["update"][key] = Array(np.full(value.shape, 3e38, np.float32))
        from flwr.app import ConfigRecord
        content["fftmoe"] = ConfigRecord({"json": json.dumps(meta)})
        return content

    def metrics_to_record(round_, metrics):
        if ATTACK == "giant" and metrics.get("examples", 0) > 0:
            metrics = {k: v for k, v in metrics.items() if k != "accuracy"}
        return honest_metrics(round_, metrics)

    records.hello_reply_to_record, records.update_to_record, records.metrics_to_record = hello_reply_to_record, update_to_record, metrics_to_record
'''

DEVICES = (("honest-1", 1, None), ("honest-4", 4, None), ("amplifier", 2, "amplifier"), ("liar", 2, "liar"), ("giant", 2, "giant"))


def test_hostile_replies_reject_their_device_and_never_the_run(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    mid = manifest_id(manifest)
    hostile_path = tmp_path / "hostile-site"
    hostile_path.mkdir()
    (hostile_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    port = free_port()
    state_dir = tmp_path / "state"
    serve = [str(BIN / "fftmoe-coordinator"), "serve", "--bundle", str(tiny_bundle), "--state-dir", str(state_dir), "--rounds", "1",
             "--min-clients", "3", "--insecure", "--port", str(port), "--local-steps", "3", "--batch-size", "4", "--lr", "0.01",
             "--round-timeout", "300", "--wait-seconds", "300", "--json",
             "--head", "fedavg"]  # fmt: skip  # the head merged as the experts are: the giant's clipped head is checked below
    coordinator = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    joins = []
    try:
        for i, (name, tier, attack) in enumerate(DEVICES):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            if attack:
                env.update(FFTMOE_TEST_HOSTILE=attack, PYTHONPATH=os.pathsep.join([str(hostile_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
            data = write_tiny_csv(tmp_path / f"{name}.csv", 30, seed=i)
            cmd = [str(BIN / "fftmoe-edge"), "join", "--server", f"127.0.0.1:{port}", "--data", str(data), "--tier", str(tier), "--insecure",
                   "--cache-dir", str(tmp_path / f"cache-{name}"), "--eval-fraction", "0.2", "--threads", "1", "--retry-seconds", "600",
                   "--name", name]  # fmt: skip
            if attack != "amplifier":
                cmd += ["--bundle", str(tiny_bundle)]  # pre-provisioned: only the amplifier fetches its tier's files
            joins.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        code, result, err = finish_serve(coordinator, 1200)
        assert code == 0 and result.get("ok") and result["rounds_done"] == 1, f"{code} {result}\n{err[-4000:]}"
    finally:
        for p in [coordinator, *joins]:
            stop(p, timeout=5)

    history = json.loads((state_dir / "history.json").read_text())
    entry = [h for h in history if "names" in h][-1]  # round 1 (the head's records around it have no names)
    node = {name: int(n) for n, name in entry["names"].items()}
    assert sorted(node) == ["amplifier", "giant", "honest-1", "honest-4"]
    log = (state_dir / "run.log").read_text()

    # the liar never joined: named, with the field, in the log and the history
    (liar,) = entry["refused"]
    assert "missing_bytes" in entry["refused"][liar] and f"node {liar} did not join" in log and "missing_bytes" in log
    # the amplifier: its 10**309 examples rejected its update
    amp = node["amplifier"]
    assert "num_examples" in entry["rejected"][str(amp)] and f"reply of node {amp} rejected" in log
    # ... and it was sent exactly its tier's files, once, whatever it listed
    cached = tmp_path / "cache-amplifier" / mid
    got = sorted(str(p.relative_to(cached)) for p in cached.rglob("*") if p.is_file() and p.name not in ("manifest.json", "tier-choice.json"))
    want = sorted([*(f.path for f in manifest.tier(2).files.values()), *(f.path for f in manifest.tokenizer_files)])
    assert got == want and "ignored 3 listed file(s)" in log
    # the giant: merged, but with its count capped at what its hello allows, and every unit clipped to AdamW's reach
    giant = str(node["giant"])
    assert sorted(entry["accepted"]) == sorted([node["honest-1"], node["honest-4"], node["giant"]])
    assert entry["capped"][giant] == 10**12
    limits = reply_limits(24, 4, {"epochs": 1, "batch_size": 4, "max_steps": 3, "max_seq_len": 0}, manifest)  # 30 rows, 0.2 held out
    assert entry["examples"][giant] == limits.max_examples == 12
    state = GlobalState.load(state_dir, mid)
    assert all(np.isfinite(v).all() for v in state.pool.values())
    assert len(entry["clipped"][giant]) > 0 and all(n > 1e30 for n in entry["clipped"][giant].values())
    # ... and its evaluation without accuracy was left out of the federated figures, named
    assert "accuracy" in entry["federated"]["rejected"][giant] and f"evaluation of node {giant} rejected" in log
    assert giant not in entry["federated"]["per_node"] and entry["federated"]["nodes"] == 2.0
    before = load_file(str(tiny_bundle / manifest.global_pool.path))
    head = "head.weight"
    move = float(np.linalg.norm(state.pool[head].astype(np.float64) - before[head]))
    numel = state.pool[head].size + state.pool["head.bias"].size
    assert move <= NormBound("auto").for_unit(numel, 0.01, limits.max_steps) * 1.001  # the head moved no more than honest training could
    assert math.isfinite(entry["train_loss"])
