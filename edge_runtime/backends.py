"""Training backends for one tier: ONNX Runtime's on-device training API (default) and PyTorch (fallback).

Both expose the same small interface over the tier's trainable tensors, named as in the manifest (the ONNX
parameter names, which are also the PyTorch parameter names), and both run the same math: the training
model's loss (cross-entropy + alpha L_bal + beta L_het) and ONNX Runtime's AdamW (``OrtAdamW`` reproduces it in PyTorch).

The backend is chosen once, when the session is opened (``open_backend``); nothing switches later.
"""

from __future__ import annotations

import gc
import platform
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_runtime.bundle import BundleError, Manifest
from edge_runtime.ort_backend import BackendUnavailableError, OrtTierSession, import_training_api, ort_build

# AdamW as ``onnxruntime.training.artifacts.generate_artifacts(optimizer=OptimType.AdamW)`` builds it
# (onnxblock.optim.AdamW defaults, ``adam_mode=1``: the Hugging Face formulation); the PyTorch backend runs the same.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-6
ADAMW_WEIGHT_DECAY = 0.0


class OrtAdamW:
    """ONNX Runtime's AdamW, mode 1 (``AdamWOptimizer`` kernel): bias correction folded into the learning rate,
    epsilon added to sqrt(v) before that correction, weight decay after the update.

    ``torch.optim.AdamW`` adds epsilon after the correction instead; for gradients near epsilon the two steps
    differ by most of the learning rate, so the PyTorch backend uses this to train exactly as ORT does.
    """

    def __init__(self, params: list, lr: float = 1e-3) -> None:
        import torch

        self.params = params
        self.lr = lr
        self.step_count = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        b1, b2 = ADAMW_BETAS
        self.step_count += 1
        lr_corrected = self.lr * (1.0 - b2**self.step_count) ** 0.5 / (1.0 - b1**self.step_count)
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
                p.sub_(lr_corrected * m / (v.sqrt() + ADAMW_EPS))
                if ADAMW_WEIGHT_DECAY:
                    p.sub_(self.lr * ADAMW_WEIGHT_DECAY * p)
BACKENDS = ("auto", "ort", "torch")


class TierBackend(Protocol):
    """What a training session needs from a backend."""

    name: str

    def trainable_names(self) -> list[str]: ...
    def get(self, name: str) -> np.ndarray: ...
    def set(self, name: str, value: np.ndarray) -> None: ...
    def set_learning_rate(self, lr: float) -> None: ...
    def train_step(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...
    def evaluate(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...
    def loss_only(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...
    optimizer_file: str  # file name of the optimizer state in a saved run
    def save_optimizer(self, path: Path) -> None: ...
    def load_optimizer(self, path: Path) -> None: ...
    def export_inference(self, path: Path) -> None: ...


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps it resident otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class OrtBackend:
    """ONNX Runtime training API on the tier's artifacts; never imports torch."""

    name = "ort"
    optimizer_file = "optimizer.ckpt"  # an ORT checkpoint: all parameters and AdamW's moments and step

    def __init__(self, bundle_dir: Path, manifest: Manifest, slots: int, threads: int | None = None) -> None:
        self.files = {k: Path(bundle_dir) / f.path for k, f in manifest.tier(slots).files.items()}
        self.threads = threads
        self.session = OrtTierSession(self.files, threads=threads)

    def trainable_names(self) -> list[str]:
        return self.session.trainable_names

    def get(self, name: str) -> np.ndarray:
        return self.session.get(name)

    def set(self, name: str, value: np.ndarray) -> None:
        self.session.set(name, value)

    def set_learning_rate(self, lr: float) -> None:
        self.session.set_learning_rate(lr)

    def train_step(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.train_step(inputs)

    def evaluate(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.evaluate(inputs)

    def loss_only(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The training model's outputs on a batch, without an optimizer step."""
        return self.session.forward_backward(inputs)

    def save_optimizer(self, path: Path) -> None:
        """Save the session's state with the optimizer's (ORT's own checkpoint format).

        ORT serialises the whole state, frozen encoder included, and briefly needs about twice the checkpoint's
        size on top of what training holds (measured on MiniLM tier 8: 669 -> 815 MB). Releasing the sessions
        first does not help: the state's gradient buffers keep their memory arena alive. Callers decide whether
        the device can afford it (``TrainConfig.save_optimizer``).
        """
        import_training_api().CheckpointState.save_checkpoint(self.session.state, str(path), include_optimizer_state=True)

    def load_optimizer(self, path: Path) -> None:
        """Reopen the sessions from a checkpoint written by ``save_optimizer``: AdamW continues with its moments."""
        self._release()
        self.session = OrtTierSession({**self.files, "checkpoint": Path(path)}, threads=self.threads)

    def export_inference(self, path: Path) -> None:
        """Write the trained tier as an ONNX inference model (output ``logits``).

        ORT's export holds several copies of the model while it serialises, so the sessions and state (with their
        activation memory) are released first and a session without optimizer, loaded from the bundle and given
        the trained values, does the export: the process peaks at the larger of training and export, not their sum.
        The training session is reopened afterwards with the trained values; AdamW's moments start afresh.
        """
        values = {name: self.get(name) for name in self.trainable_names()}
        self._release()
        light = OrtTierSession(self.files, threads=self.threads, with_optimizer=False)
        for name, value in values.items():
            light.set(name, value)
        light.module.export_model_for_inferencing(str(path), ["logits"])
        del light
        self._release()
        self.session = OrtTierSession(self.files, threads=self.threads)
        for name, value in values.items():
            self.session.set(name, value)

    def _release(self) -> None:
        """Drop the sessions and the state, and return the freed memory to the OS now."""
        self.session = None  # type: ignore[assignment]
        gc.collect()
        trim_heap()


def model_from_bundle(bundle_dir: Path, manifest: Manifest, slots: int | None) -> Any:
    """The PyTorch model of one tier of a bundle (``slots``), or with ``None`` the global model (all M experts and
    the M-row routers; for a LoRA baseline the largest rank), built from the bundle's ``encoder/`` folder (whose
    weights must hash to the manifest's ``model.sha256``); the adapters are not filled yet."""
    if not manifest.encoder_files:
        raise BundleError(f"{bundle_dir}: the bundle has no encoder/ folder, which PyTorch needs; re-export it with this fftmoe")
    from exporter.model import build_model, load_encoder, weights_sha256

    encoder_dir = Path(bundle_dir) / Path(manifest.encoder_files[0].path).parts[0]
    encoder, _, _, _ = load_encoder(str(encoder_dir))
    if weights_sha256(encoder) != manifest.model.sha256:
        raise BundleError(f"{encoder_dir}: the encoder's weights differ from the manifest's model.sha256")
    return build_model(encoder, manifest, slots)


class TorchBackend:
    """PyTorch eager training of the same tier, built from the bundle's ``encoder/`` folder and its manifest."""

    name = "torch"
    optimizer_file = "optimizer.safetensors"  # AdamW's moments per trainable tensor; step and lr in the metadata

    def __init__(self, bundle_dir: Path, manifest: Manifest, slots: int, threads: int | None = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                "the PyTorch backend needs torch and transformers: pip install 'fftmoe[edge-torch]' "
                "(on a Raspberry Pi with -c constraints-aarch64.txt, which pins torch 2.9.1: docs/raspberry-pi.md)"
            ) from exc
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = model_from_bundle(bundle_dir, manifest, slots)
        self.params = dict(self.model.trainable_named_parameters())
        expected = set(manifest.tier(slots).trainable_names)
        if set(self.params) != expected:
            raise BundleError(
                f"the PyTorch model's trainable tensors differ from the manifest's tier {slots}: "
                f"{sorted(set(self.params) ^ expected)[:5]}"
            )
        self.optimizer = OrtAdamW(list(self.params.values()))
        self.image_size = manifest.model.image_size

    def trainable_names(self) -> list[str]:
        return list(self.params)

    def get(self, name: str) -> np.ndarray:
        return self.params[name].detach().numpy().copy()

    def set(self, name: str, value: np.ndarray) -> None:
        param = self.params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"parameter {name!r}: shape {list(value.shape)} does not match {list(param.shape)}")
        with self.torch.no_grad():
            param.copy_(self.torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.lr = lr

    def _run(self, inputs: list[np.ndarray]) -> tuple:
        return self.model(*[self.torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])

    def train_step(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.model.train()
        self.optimizer.zero_grad()
        outputs = self._run(inputs)
        outputs[0].backward()
        self.optimizer.step()
        return [o.detach().numpy() for o in outputs]

    def evaluate(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.model.eval()
        with self.torch.no_grad():
            return [o.numpy() for o in self._run(inputs)]

    def loss_only(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.model.train()
        with self.torch.no_grad():
            return [o.numpy() for o in self._run(inputs)]

    def save_optimizer(self, path: Path) -> None:
        from safetensors.torch import save_file

        opt = self.optimizer
        tensors = {f"{kind}/{name}": t.contiguous() for name, m, v in zip(self.params, opt.m, opt.v) for kind, t in (("m", m), ("v", v))}
        save_file(tensors, str(path), metadata={"step": str(opt.step_count), "lr": repr(opt.lr)})

    def load_optimizer(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            expected = {f"{kind}/{name}" for name in self.params for kind in ("m", "v")}
            if set(f.keys()) != expected or "step" not in meta:
                raise BundleError(f"{path}: not this tier's optimizer state (its tensors differ from the tier's)")
            with self.torch.no_grad():
                for i, name in enumerate(self.params):
                    self.optimizer.m[i].copy_(f.get_tensor(f"m/{name}"))
                    self.optimizer.v[i].copy_(f.get_tensor(f"v/{name}"))
            self.optimizer.step_count = int(meta["step"])

    def export_inference(self, path: Path) -> None:
        from exporter.onnx_export import example_inputs, export_inference_model

        with self.torch.no_grad():
            export_inference_model(self.model, example_inputs(self.model, 2, 16, self.image_size), Path(path))


def resolve_backend(requested: str) -> tuple[str, str]:
    """``auto`` -> ``ort`` where its training API imports (a PyPI wheel on x86_64, or a source build on ARM), else
    ``torch``; returns (backend, a sentence saying why, naming the ONNX Runtime found)."""
    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch", "PyTorch backend (asked for with --backend torch)"
    build = ort_build()
    if build.training_api:
        return "ort", f"ONNX Runtime training API: {build.describe()}"
    if requested == "ort":
        raise BackendUnavailableError(build.why_not)
    return "torch", f"ONNX Runtime training is not available on this {platform.machine()} machine: {build.why_not}. Using PyTorch"


def open_backend(name: str, bundle_dir: Path, manifest: Manifest, slots: int, threads: int | None = None) -> TierBackend:
    if name == "ort":
        return OrtBackend(bundle_dir, manifest, slots, threads)
    if name == "torch":
        return TorchBackend(bundle_dir, manifest, slots, threads)
    raise ValueError(f"unknown backend {name!r}")
