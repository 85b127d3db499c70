"""Choosing the training backend at run time: which ONNX Runtime is installed, where it came from, and the fallback.

The installs a user meets are laid out for real in a child process: this environment's ONNX Runtime training
package under another distribution's metadata (a wheel built from source and installed from disk, as on a
Raspberry Pi), and the same package without its ``training`` folder (plain ``onnxruntime``, inference only, which
is all PyPI has for aarch64). Only the ``*.dist-info`` metadata is written by the test; the code is ORT's own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.backends import resolve_backend
from edge_runtime.ort_backend import import_training_api, ort_build

PROBE = """
import json
from edge_runtime.backends import resolve_backend
from edge_runtime.ort_backend import BackendUnavailableError, ort_build
b = ort_build()
out = {"build": b.__dict__, "describe": b.describe(), "auto": resolve_backend("auto")}
try:
    out["ort"] = resolve_backend("ort")
except BackendUnavailableError as exc:
    out["ort_error"] = str(exc)
print(json.dumps(out))
"""


def real_ort_dir() -> Path:
    import_training_api()
    import onnxruntime

    return Path(onnxruntime.__file__).parent


def dist_info(site: Path, name: str, version: str, wheel_url: str | None) -> None:
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "top_level.txt").write_text("onnxruntime\n")
    (d / "RECORD").write_text("")
    if wheel_url:
        (d / "direct_url.json").write_text(json.dumps({"url": wheel_url, "archive_info": {}}))


def probe(site: Path) -> dict:
    """``ort_build`` and ``resolve_backend`` in a fresh interpreter that finds ``site`` before this environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parents[2])])}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="this environment's ORT is the PyPI x86_64 wheel")
def test_the_pypi_training_wheel_is_detected_and_chosen() -> None:
    build = ort_build()
    assert build.training_api and build.distribution == "onnxruntime-training-cpu" and build.origin == "pypi"
    backend, why = resolve_backend("auto")
    assert backend == "ort" and "onnxruntime-training-cpu 1.19.2 (PyPI wheel; training API)" in why
    assert resolve_backend("torch") == ("torch", "PyTorch backend (asked for with --backend torch)")
    with pytest.raises(ValueError, match="--backend must be one of auto, ort, torch"):
        resolve_backend("onnx")


def test_a_training_build_installed_from_a_local_wheel_is_detected_as_a_source_build(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "onnxruntime").symlink_to(real_ort_dir(), target_is_directory=True)
    dist_info(site, "onnxruntime-training", "1.19.2",
              "file:///home/pi/onnxruntime/build/Linux/Release/dist/onnxruntime_training-1.19.2-cp311-cp311-linux_aarch64.whl")
    out = probe(site)
    b = out["build"]
    assert b["training_api"] and b["distribution"] == "onnxruntime-training" and b["origin"] == "local-wheel", out
    backend, why = out["auto"]
    assert backend == "ort" and "onnxruntime-training 1.19.2 (built from source, installed from a local wheel; training API)" in why
    assert out["ort"][0] == "ort"


def test_inference_only_onnxruntime_falls_back_to_pytorch_and_says_why(tmp_path: Path) -> None:
    """Plain ``onnxruntime`` (what pip installs on aarch64) has no training API: auto picks PyTorch and the reason
    names the machine and what is missing; ``--backend ort`` is refused with the same reason."""
    site = tmp_path / "site"
    pkg = site / "onnxruntime"
    pkg.mkdir(parents=True)
    for entry in real_ort_dir().iterdir():
        if entry.name != "training":
            (pkg / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    dist_info(site, "onnxruntime", "1.19.2", None)
    out = probe(site)
    b = out["build"]
    assert not b["training_api"] and b["distribution"] == "onnxruntime", out
    assert out["describe"] == "onnxruntime 1.19.2 (PyPI wheel; no training API)"
    backend, why = out["auto"]
    assert backend == "torch"
    assert why.startswith(f"ONNX Runtime training is not available on this {platform.machine()} machine: "
                          "this onnxruntime has no training API, it only runs inference; ")
    assert why.endswith("Using PyTorch")
    assert "no training API" in out["ort_error"]
