"""``fftmoe-coordinator show`` on a bundle."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from coordinator.cli import app

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
