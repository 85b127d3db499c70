"""ONNX Runtime on-device training of one tier's artifacts, without importing torch.

``import onnxruntime.training.api`` normally imports torch through ``onnxruntime/training/__init__.py``
(about 1.5 s and 220 MB of resident memory on a device that never uses it). ``import_training_api`` loads
the ``api`` subpackage under a bare package object instead, so only ONNX Runtime's own core is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np


class BackendUnavailableError(RuntimeError):
    """ONNX Runtime's training API cannot be imported on this machine."""


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
            raise BackendUnavailableError(
                "onnxruntime is not installed (pip install 'fftmoe[edge]' on x86_64; on ARM use --backend torch)"
            )
        training_dir = Path(list(spec.submodule_search_locations)[0]) / "training"
        if not (training_dir / "api").is_dir():
            raise BackendUnavailableError(
                "this onnxruntime has no training API (install onnxruntime-training-cpu==1.19.2 on x86_64, "
                "or build ONNX Runtime with --enable_training_apis); plain onnxruntime only runs inference"
            )
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(training_dir)]
        package.__file__ = str(training_dir / "__init__.py")
        sys.modules["onnxruntime.training"] = package
        sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]  # "not installed"
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError as exc:
        raise BackendUnavailableError(f"cannot import onnxruntime.training.api: {exc}") from exc


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
