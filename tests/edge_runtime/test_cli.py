"""``fftmoe-edge verify`` on an intact and a tampered bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from edge_runtime.cli import EXIT_INVALID, app

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
