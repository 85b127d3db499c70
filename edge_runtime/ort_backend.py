"""ONNX Runtime on-device training of one tier's artifacts, without importing torch.

``import onnxruntime.training.api`` normally imports torch through ``onnxruntime/training/__init__.py``
(about 1.5 s and 220 MB of resident memory on a device that never uses it). ``import_training_api`` loads
the ``api`` subpackage under a bare package object instead, so only ONNX Runtime's own core is loaded.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.onnx_guard import check_tier_files


class BackendUnavailableError(RuntimeError):
    """ONNX Runtime's training API cannot be imported on this machine."""


def _install_hint() -> str:
    """How to get ONNX Runtime's training API on this machine."""
    if platform.machine() in PYPI_TRAINING_ARCHES:
        return "pip install 'fftmoe[edge]' (onnxruntime-training-cpu==1.19.2)"
    return (f"PyPI has no ONNX Runtime training wheel for {platform.machine()}: build one from source with --enable_training "
            "(docs/raspberry-pi.md)")


def import_training_api() -> types.ModuleType:
    """Return ``onnxruntime.training.api`` without importing torch.

    In the training wheel, both ``onnxruntime/__init__`` (through its build validation, which tries
    ``onnxruntime.training.ortmodule``) and ``onnxruntime/training/__init__`` import torch. When onnxruntime is
    not imported yet, a bare package object stands in for ``onnxruntime.training`` and ORTModule is marked
    absent, so only ONNX Runtime's core and the small ``api`` subpackage load.
    """
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    if "onnxruntime" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailableError(f"onnxruntime is not installed; {_install_hint()}")
        training_dir = Path(list(spec.submodule_search_locations)[0]) / "training"
        if not (training_dir / "api").is_dir():
            raise BackendUnavailableError(f"this onnxruntime has no training API, it only runs inference; {_install_hint()}")
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(training_dir)]
        package.__file__ = str(training_dir / "__init__.py")
        sys.modules["onnxruntime.training"] = package
        sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]  # "not installed"
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError as exc:
        raise BackendUnavailableError(f"cannot import onnxruntime.training.api: {exc}") from exc


PYPI_TRAINING_ARCHES = ("x86_64", "AMD64")
"""Machines for which PyPI has an ``onnxruntime-training(-cpu)`` wheel that runs fftmoe's artifacts (Linux/Windows
x86_64); anywhere else a working training API was built from source."""


@dataclass(frozen=True)
class OrtBuild:
    """Which ONNX Runtime this Python would import, and whether its training API is there."""

    training_api: bool
    distribution: str | None  # the installed distribution that owns the imported ``onnxruntime`` folder
    version: str | None
    origin: str  # "pypi", "local-wheel" (pip installed a wheel file: a source build), "source", "unknown" or "none"
    why_not: str  # why the training API cannot be used ("" when it can)

    def describe(self) -> str:
        """One line for logs and ``profile``: what is installed and where it came from."""
        if self.distribution is None and self.origin == "none":
            return "onnxruntime not installed"
        name = f"{self.distribution or 'onnxruntime'} {self.version or '(version unknown)'}"
        where = {
            "pypi": "PyPI wheel",
            "local-wheel": "built from source, installed from a local wheel",
            "source": f"built from source: PyPI has no training wheel for {platform.machine()}",
            "unknown": "not installed by pip",
        }.get(self.origin, self.origin)
        api = "training API" if self.training_api else "no training API"
        return f"{name} ({where}; {api})"


def _owning_distribution(init_file: Path) -> importlib.metadata.Distribution | None:
    """The installed distribution whose files include ``init_file`` (the ``onnxruntime/__init__.py`` that would be
    imported); with two ORT distributions installed, the one on the path first is the one that counts."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if "onnxruntime" not in name and "onnxruntime" not in (dist.read_text("top_level.txt") or "").split():
            continue
        try:
            if Path(dist.locate_file("onnxruntime/__init__.py")) == init_file:
                return dist
        except (OSError, TypeError):
            continue
    return None


@functools.cache
def ort_build() -> OrtBuild:
    """Detect ONNX Runtime at run time: the training API, the owning distribution, and whether it came from PyPI or
    a source build (a wheel file installed from disk, or any training build on a machine PyPI has none for).

    Only metadata is read and the training API is imported torch-free (``import_training_api``). Computed once per
    process (it scans every installed distribution's metadata; what is installed does not change while running).
    """
    try:
        import_training_api()
        available, why = True, ""
    except BackendUnavailableError as exc:
        available, why = False, str(exc)
    spec = importlib.util.find_spec("onnxruntime") if "onnxruntime" not in sys.modules else sys.modules["onnxruntime"].__spec__
    if spec is None or not spec.submodule_search_locations:
        return OrtBuild(False, None, None, "none", why)
    init_file = Path(list(spec.submodule_search_locations)[0]) / "__init__.py"
    dist = _owning_distribution(init_file)
    if dist is None:  # on the path, but not installed by pip (for example a build folder on PYTHONPATH)
        return OrtBuild(available, None, None, "source" if available else "unknown", why)
    name, version = dist.metadata["Name"], dist.version
    direct = dist.read_text("direct_url.json")
    origin = "pypi"
    if direct:
        try:
            url = json.loads(direct).get("url", "")
        except ValueError:
            url = ""
        if url.startswith("file:"):
            origin = "local-wheel"
    if origin == "pypi" and available and platform.machine() not in PYPI_TRAINING_ARCHES:
        origin = "source"
    return OrtBuild(available, name, version, origin, why)


def session_options(threads: int | None, spinning: bool = True) -> Any:
    """Session options; ``spinning=False`` makes idle ORT threads sleep at once instead of busy-waiting (for
    measurements that share the cores with another runtime)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the training graph's unused-initializer warnings are expected
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class OrtTierSession:
    """One tier's training artifacts loaded with ONNX Runtime's training API.

    ``files`` maps ``training_model``, ``eval_model``, ``optimizer_model`` and ``checkpoint`` to paths.
    Inputs are numpy arrays in the manifest's input order; outputs come back in ``bundle.OUTPUTS`` order.
    """

    def __init__(self, files: dict[str, Path], threads: int | None = None, with_optimizer: bool = True, spinning: bool = True) -> None:
        check_tier_files(files)  # before any ORT object: no external data from outside the tier folder (onnx_guard)
        api = import_training_api()
        self.state = api.CheckpointState.load_checkpoint(str(files["checkpoint"]))
        # The Module must exist before any parameter of the state is written (writing first segfaults).
        self.module = api.Module(
            str(files["training_model"]), self.state, str(files["eval_model"]), session_options=session_options(threads, spinning)
        )
        self.optimizer = api.Optimizer(str(files["optimizer_model"]), self.module) if with_optimizer else None

    @property
    def trainable_names(self) -> list[str]:
        return [name for name, p in self.state.parameters if p.requires_grad]

    def get(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data)

    def set(self, name: str, value: np.ndarray) -> None:
        self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def set_learning_rate(self, lr: float) -> None:
        if self.optimizer is None:
            raise RuntimeError("this session was opened without an optimizer")
        self.optimizer.set_learning_rate(lr)

    def forward_backward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Compute the outputs and the gradients of the loss (readable with ``grad``), without an update."""
        self.module.train()
        self.module.lazy_reset_grad()
        return list(self.module(*inputs))

    def grad(self, name: str) -> np.ndarray:
        g = self.state.parameters[name].grad
        if g is None:
            raise RuntimeError(f"parameter {name!r} has no gradient: it is frozen or no step was run")
        return np.array(g)

    def train_step(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """One optimizer step on a batch; returns the outputs of the forward pass before the update."""
        if self.optimizer is None:
            raise RuntimeError("this session was opened without an optimizer")
        outputs = self.forward_backward(inputs)
        self.optimizer.step()
        return outputs

    def evaluate(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.module.eval()
        return list(self.module(*inputs))
