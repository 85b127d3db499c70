"""The shipped systemd units (systemd/): valid for systemd, stopping with SIGTERM, and naming only real options.

What SIGTERM does to the processes themselves is tested end to end in tests/coordinator/test_fleet_gate.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
BIN = Path(sys.executable).parent


def unit_settings(path: Path) -> dict[str, str]:
    """Key -> value of a unit file (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))}


@pytest.mark.parametrize("name, command, subcommand", [("fftmoe-coordinator.service", "fftmoe-coordinator", "serve"),
                                                       ("fftmoe-edge.service", "fftmoe-edge", "join")])  # fmt: skip
def test_units_stop_with_sigterm_and_name_real_options(tmp_path: Path, name: str, command: str, subcommand: str) -> None:
    unit = UNITS / name
    settings = unit_settings(unit)
    assert settings["KillSignal"] == "SIGTERM" and settings["KillMode"] == "mixed" and "130" in settings["SuccessExitStatus"].split()
    start = settings["ExecStart"]
    assert f"/opt/fftmoe/venv/bin/{command} {subcommand}" in start
    helptext = subprocess.run([str(BIN / command), subcommand, "--help"], capture_output=True, text=True, timeout=120,
                              env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"}).stdout  # fmt: skip
    for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", start)):
        assert option in helptext, f"{name}: {option} is not an option of {command} {subcommand}"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    local = tmp_path / name  # the unit as installed on this machine: the venv where the package really is
    local.write_text(unit.read_text().replace("/opt/fftmoe/venv", str(BIN.parent)))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
