"""``fftmoe-edge``: verify, profile, train (with Ctrl-C and --resume) and evaluate, as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_runtime.cli import EXIT_BAD_ARGS, EXIT_INVALID, EXIT_NO_FIT, app

runner = CliRunner()


def test_verify_reports_ok_then_names_the_tampered_file(tiny_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    ok = runner.invoke(app, ["verify", "--bundle", str(b), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout) == {"ok": True, "bundle": str(b), "tiers": [1, 2, 4]}
    with open(b / "tiers" / "t4" / "training_model.onnx", "ab") as fh:
        fh.write(b"\0")
    assert runner.invoke(app, ["verify", "--bundle", str(b), "--tier", "2"]).exit_code == 0
    bad = runner.invoke(app, ["verify", "--bundle", str(b), "--tier", "4", "--json"])
    assert bad.exit_code == EXIT_INVALID
    report = json.loads(bad.stdout)
    assert report["error"] == "integrity" and "t4/training_model.onnx" in report["message"]


# -- profile, train, evaluate -----------------------------------------------------------------------------------

WORDS = ["the", "news", "game", "market", "team", "stock", "win", "rise", "fall", "world"]
LABEL_MAP = "1=world,2=sports,3=business"


def tiny_csv(path: Path, n: int = 40, bad_line: bool = False) -> Path:
    import random

    rnd = random.Random(0)
    rows = ["label,title,description"]
    for i in range(n):
        rows.append(f"{1 + i % 3},{' '.join(rnd.choices(WORDS, k=3))},{' '.join(rnd.choices(WORDS, k=5))}")
    if bad_line:
        rows.insert(5, "2,only-two-fields")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_profile_measures_or_reads_a_board(tiny_bundle: Path) -> None:
    measured = runner.invoke(app, ["profile", "--json", "--compute-seconds", "0.2"])
    assert measured.exit_code == 0, measured.output
    out = json.loads(measured.stdout)
    dev = out["device"]
    assert dev["source"] == "measured" and dev["cores"] >= 1 and dev["compute_gflops"] > 0
    # the backend this device would train with, and why, without --bundle too (this environment has ORT training)
    assert out["backend"] == "ort" and out["backend_reason"].startswith("ONNX Runtime training API: onnxruntime-training")
    assert out["onnxruntime"].endswith("training API)")
    assert 0 < dev["memory_available_mb"] <= dev["memory_total_mb"]
    board_out = json.loads(runner.invoke(app, ["profile", "--json", "--device", "rpi-4-4gb"]).stdout)
    board = board_out["device"]
    assert board["source"] == "profile" and board["name"] == "rpi-4-4gb" and board["ort_training"] is False
    assert board_out["backend"] == "torch" and "no ONNX Runtime training wheel" in board_out["backend_reason"]
    # The tiny bundle was exported without measurements: no basis for a choice, and the reply says what to do.
    none = runner.invoke(app, ["profile", "--json", "--device", "rpi-4-4gb", "--bundle", str(tiny_bundle)])
    assert none.exit_code == EXIT_NO_FIT and "--tier" in json.loads(none.stdout)["message"]
    unknown = runner.invoke(app, ["profile", "--device", "no-such-board"])
    assert unknown.exit_code == EXIT_BAD_ARGS and "rpi-4-4gb" in unknown.output


def test_train_then_evaluate_the_run_and_its_update(tiny_bundle: Path, tmp_path: Path) -> None:
    data, out = tiny_csv(tmp_path / "d.csv"), tmp_path / "run"
    args = ["--bundle", str(tiny_bundle), "--data", str(data), "--text-column", "title", "--text-column", "description",
            "--label-map", LABEL_MAP]  # fmt: skip
    res = runner.invoke(app, ["train", *args, "--tier", "2", "--epochs", "2", "--batch-size", "8", "--lr", "0.01",
                              "--out", str(out), "--json", "--threads", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["finished"] and report["tier"] == 2 and report["backend"] == "ort"
    assert (report["train_examples"], report["eval_examples"]) == (37, 3)  # a stratified 10% hold-out: 1 of each label
    assert report["steps"] == 10 and [h["epoch"] for h in report["history"]] == [1, 2]
    for name in ("update.safetensors", "state.json", "history.png", "model/model.onnx"):
        assert (out / name).exists(), name
    (ckpt,) = out.glob("ckpt-*")
    assert {p.name for p in ckpt.iterdir()} == {"weights.safetensors", "optimizer.ckpt"}
    by_run = json.loads(runner.invoke(app, ["evaluate", *args, "--weights", str(out), "--json"]).stdout)
    by_update = json.loads(runner.invoke(app, ["evaluate", *args, "--weights", str(out / "update.safetensors"), "--json"]).stdout)
    initial = json.loads(runner.invoke(app, ["evaluate", *args, "--tier", "2", "--json"]).stdout)
    assert by_run["examples"] == 40 and by_run["tier"] == 2
    assert by_run["accuracy"] == by_update["accuracy"] and by_run["loss"] == pytest.approx(by_update["loss"], rel=1e-6)
    assert by_run["loss"] != pytest.approx(initial["loss"], rel=1e-6)  # the trained weights were used


def test_train_names_a_malformed_row_and_can_skip_it(tiny_bundle: Path, tmp_path: Path) -> None:
    data = tiny_csv(tmp_path / "d.csv", bad_line=True)
    args = ["train", "--bundle", str(tiny_bundle), "--data", str(data), "--text-column", "title", "--label-map", LABEL_MAP,
            "--tier", "1", "--max-steps", "1", "--out", str(tmp_path / "run"), "--json"]  # fmt: skip
    bad = runner.invoke(app, args)
    assert bad.exit_code == EXIT_BAD_ARGS
    assert f"{data}:6: 2 fields, the header has 3" in json.loads(bad.stdout)["message"]
    ok = runner.invoke(app, [*args, "--skip-bad-rows"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["skipped_rows"] == 1
    wrong = runner.invoke(app, [*[a if a != LABEL_MAP else "1=world" for a in args], "--skip-bad-rows"])
    assert wrong.exit_code == EXIT_BAD_ARGS and "bundle labels: ['world', 'sports', 'business']" in json.loads(wrong.stdout)["message"]


def test_torch_backend_trains_from_the_same_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    data = tiny_csv(tmp_path / "d.csv")
    res = runner.invoke(app, ["train", "--bundle", str(tiny_bundle), "--data", str(data), "--text-column", "title",
                              "--label-map", LABEL_MAP, "--tier", "2", "--max-steps", "2", "--backend", "torch",
                              "--out", str(tmp_path / "run"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["backend"] == "torch"
    from edge_runtime.bundle import load_manifest
    from edge_runtime.update import Update

    Update.load(tmp_path / "run" / "update.safetensors").validate(load_manifest(tiny_bundle))


def test_ctrl_c_saves_the_state_and_resume_finishes(tiny_bundle: Path, tmp_path: Path) -> None:
    """The real console script, interrupted with SIGINT as a user's Ctrl-C, then resumed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data, out = tiny_csv(tmp_path / "d.csv"), tmp_path / "run"
    exe = Path(sys.executable).parent / "fftmoe-edge"
    base = [str(exe), "train", "--bundle", str(tiny_bundle), "--data", str(data), "--text-column", "title",
            "--label-map", LABEL_MAP, "--tier", "2", "--batch-size", "4", "--out", str(out), "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen([*base, "--epochs", "500", "--save-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, COLUMNS="200"))  # fmt: skip
    deadline = time.time() + 300
    while not (out / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert (out / "state.json").exists(), proc.stderr.read() if proc.poll() is not None else "no state after 300 s"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "continue with --resume" in stderr
    state = json.loads((out / "state.json").read_text())
    assert not state["finished"] and state["step"] >= 1
    assert not (out / "update.safetensors").exists()
    finish = subprocess.run([*base, "--epochs", str(state["epoch"] + 1), "--resume", "--json"], capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    done = json.loads(finish.stdout)
    assert done["finished"] and done["steps"] > state["step"] and done["epochs_done"] == state["epoch"] + 1
    assert (out / "update.safetensors").exists()


@pytest.mark.parametrize("point", ["local.step@3", "checkpoint.written@2", "checkpoint.pointer-partial@2", "checkpoint.committed@2"])
def test_power_loss_mid_training_resumes_from_the_last_checkpoint(tiny_bundle: Path, tmp_path: Path, point: str) -> None:
    """SIGKILL (nothing flushed, no handler: a device losing power) between steps and at each step of a checkpoint
    save; ``--resume`` must load a complete checkpoint, hash-checked, and finish the run."""
    import os
    import subprocess
    import sys

    data, out = tiny_csv(tmp_path / "d.csv"), tmp_path / "run"
    exe = Path(sys.executable).parent / "fftmoe-edge"
    base = [str(exe), "train", "--bundle", str(tiny_bundle), "--data", str(data), "--text-column", "title", "--label-map", LABEL_MAP,
            "--tier", "2", "--batch-size", "4", "--out", str(out), "--threads", "1", "--epochs", "2", "--save-every", "1", "--json"]  # fmt: skip
    killed = subprocess.run(base, capture_output=True, text=True, env=dict(os.environ, FFTMOE_FAULT=f"kill:{point}"))
    assert killed.returncode == -9 and f"SIGKILL at {point.split('@')[0]}" in killed.stderr, killed.stderr[-2000:]
    state = json.loads((out / "state.json").read_text())
    assert not state["finished"] and state["step"] >= 1
    done = subprocess.run([*base, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["finished"] and result["epochs_done"] == 2 and (out / "update.safetensors").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".partial")] == []


def test_optimizer_state_is_saved_only_where_the_budget_has_room(tiny_bundle: Path) -> None:
    from edge_runtime.bundle import load_manifest
    from edge_runtime.cli import optimizer_state_fits
    from edge_runtime.profile import TierChoice, TierEstimate

    manifest = load_manifest(tiny_bundle)
    ckpt_mb = manifest.tier(2).files["checkpoint"].size / 1e6

    def choice(budget: float) -> TierChoice:
        return TierChoice(2, 16, budget, "ort", [TierEstimate(2, 16, 100.0, 1.0, True, "")], "")

    assert optimizer_state_fits(manifest, choice(100 + 2 * ckpt_mb + 1), "ort") == (True, "")
    fits, why = optimizer_state_fits(manifest, choice(100 + ckpt_mb), "ort")
    assert not fits and "--optimizer-state forces it" in why
    assert optimizer_state_fits(manifest, choice(1.0), "torch")[0]  # the PyTorch backend saves only the moments


def test_join_stops_a_supernode_that_gave_up_but_lingers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's SuperNode, after logging that it gave up reconnecting, was seen hanging in Python's thread shutdown
    for an hour (an emulated aarch64 board). ``join`` waits for it through ``_wait_supernode``: a process that logs
    Flower's line and then never exits is stopped after the grace period; one that exits is simply waited for."""
    import subprocess
    import sys
    import time

    import edge_runtime.cli as cli

    monkeypatch.setattr(cli, "GAVE_UP_GRACE_S", 1.0)
    log = tmp_path / "supernode.log"
    log.write_bytes(b"earlier run: Giving up reconnection after 60 s\n")  # before log_start: must not count
    start = log.stat().st_size
    script = ("import sys, time; f = open(sys.argv[1], 'a'); f.write('WARNING : Giving up reconnection after 60.00 seconds'); "
              "f.flush(); time.sleep(3600)")  # fmt: skip
    lingering = subprocess.Popen([sys.executable, "-c", script, str(log)], start_new_session=True)
    t0 = time.monotonic()
    code = cli._wait_supernode(lingering, log, start)
    assert lingering.poll() is not None and code != 0 and time.monotonic() - t0 < 30
    assert cli._gave_up(log, start) and not cli._gave_up(log, log.stat().st_size)
    quick = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert cli._wait_supernode(quick, log, log.stat().st_size) == 3


def test_join_restarts_a_supernode_that_keeps_connecting_past_retry_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator restarted with --resume several times in a row ends each SuperNode within seconds of its
    connection. Each start that got a node ID opens a fresh --retry-seconds window, however short it stayed (CI saw
    a device give up in the middle of such restarts); starts that never connect use up the window; Flower giving up
    ends at once."""
    import sys

    import edge_runtime.cli as cli

    monkeypatch.setattr(cli, "RESTART_PAUSE_S", 0.1)
    counter = tmp_path / "starts"
    # a stand-in SuperNode: connects (Flower's line) on its first 4 starts and exits at once; then never connects
    script = ("import sys, pathlib, time; c = pathlib.Path(sys.argv[1]); n = int(c.read_text()) + 1 if c.exists() else 1; "
              "c.write_text(str(n)); time.sleep(0.3); print('INFO : SuperNode ID: 7' if n <= 4 else 'WARNING : retrying', flush=True)")  # fmt: skip
    running: dict = {}
    code = cli._keep_supernode_running([sys.executable, "-c", script, str(counter)], tmp_path / "home", 0.2, lambda: False, running)
    assert code == 0 and int(counter.read_text()) == 5, counter.read_text()  # 4 connected starts, then one unconnected
    assert running["proc"].poll() is not None
    giving_up = "print('WARNING : Giving up reconnection after 600.00 seconds and 9 tries.', flush=True); raise SystemExit(1)"
    assert cli._keep_supernode_running([sys.executable, "-c", giving_up], tmp_path / "home2", 60.0, lambda: False, {}) == 1


def test_join_restarts_a_supernode_that_terminated_after_its_superexec_gave_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log of CI's failed fault test: a coordinator killed while a device trained left the SuperExec unanswered
    (it logged Flower's give-up line) and the restarted SuperLink answered the SuperNode's heartbeat 401 (it logged
    that it terminated). That start ended on the 401: join starts the SuperNode again; a real give-up still ends it."""
    import sys

    import edge_runtime.cli as cli

    monkeypatch.setattr(cli, "RESTART_PAUSE_S", 0.1)
    counter = tmp_path / "starts"
    lines = ["INFO : SuperNode ID: 7", "ERROR : Failed to push task output: Client error '401 Unauthorized'",
             "WARNING : Giving up reconnection after 16.26 seconds and 6 tries.", "INFO : SuperNode terminated gracefully."]  # fmt: skip
    script = ("import sys, pathlib; c = pathlib.Path(sys.argv[1]); n = int(c.read_text()) + 1 if c.exists() else 1; c.write_text(str(n)); "
              f"print(chr(10).join({lines!r}) if n == 1 else 'WARNING : retrying', flush=True)")  # fmt: skip
    code = cli._keep_supernode_running([sys.executable, "-c", script, str(counter)], tmp_path / "home", 0.5, lambda: False, {})
    assert code == 0 and int(counter.read_text()) >= 2, counter.read_text()  # started again after the terminated start
    log = tmp_path / "home2" / "supernode.log"
    log.parent.mkdir()
    log.write_bytes(b"INFO : SuperNode terminated gracefully.\nWARNING : Giving up reconnection after 600.00 seconds\n")
    assert cli._gave_up(log, 0)  # the give-up after the terminated line: the SuperNode's own, it ends join


def test_join_stops_a_supernode_that_terminated_but_lingers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restarted coordinator answers its heartbeat 401, Flower's SuperNode logs that it terminated; one that
    then hangs instead of exiting is stopped after the grace period, so that ``join`` can start it again."""
    import subprocess
    import sys
    import time

    import edge_runtime.cli as cli

    monkeypatch.setattr(cli, "GAVE_UP_GRACE_S", 1.0)
    log = tmp_path / "supernode.log"
    script = "import sys, time; f = open(sys.argv[1], 'a'); f.write('INFO : SuperNode terminated gracefully.'); f.flush(); time.sleep(3600)"
    lingering = subprocess.Popen([sys.executable, "-c", script, str(log)], start_new_session=True)
    t0 = time.monotonic()
    cli._wait_supernode(lingering, log, 0)
    assert lingering.poll() is not None and time.monotonic() - t0 < 30
