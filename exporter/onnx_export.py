"""PyTorch -> ONNX -> ONNX Runtime training artifacts for one tier, and the inference model.

The recipe (see ``docs/exporter.md``): TorchScript exporter, opset 16, TRAINING mode, dropout p = 0 and no
constant folding. Exporting in EVAL mode merges initializers with equal values (for example all the zero expert
biases) into one tensor: the artifacts still generate and the loss still falls, but the gradients are wrong.
``check_trainable_initializers`` refuses such a graph.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from edge_runtime.bundle import OUTPUTS, TIER_FILES, tier_file_paths
from exporter.model import AdaptedEncoder

OPSET = 16

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The ONNX export produced a graph that cannot train correctly."""


def example_inputs(model: AdaptedEncoder, batch: int, seq_len: int, image_size: int | None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A deterministic batch in the training graph's input order (used for tracing, checks and measurements)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.head.out_features, (batch,), generator=g)
    target = torch.full((model.num_layers, model.route_width), 1.0 / model.route_width)
    adjust = torch.zeros(model.head.out_features)
    if model.arch.modality == "text":
        vocab = model.encoder.config.vocab_size
        ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        if seq_len > 2:
            mask[0, seq_len // 2 :] = 0  # one padded row, so masking is part of every check
        return ids, mask, labels, target, adjust
    if image_size is None:
        raise ValueError("a vision model needs image_size for its example batch")
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    return pixels, labels, target, adjust


def input_names(model: AdaptedEncoder) -> list[str]:
    return (["input_ids", "attention_mask"] if model.arch.modality == "text" else ["pixel_values"]) + [
        "labels",
        "routing_target",
        "logit_adjustment",
    ]


def _dynamic_axes(model: AdaptedEncoder) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {"labels": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}}
    if model.arch.modality == "text":
        axes["input_ids"] = {0: "batch", 1: "sequence"}
        axes["attention_mask"] = {0: "batch", 1: "sequence"}
    else:
        axes["pixel_values"] = {0: "batch"}
    return axes


def export_training_graph(model: AdaptedEncoder, inputs: tuple[torch.Tensor, ...], path: Path) -> onnx.ModelProto:
    """Export the forward graph (loss first) in TRAINING mode and check that no trainable tensor was merged."""
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            input_names=input_names(model),
            output_names=list(OUTPUTS),
            dynamic_axes=_dynamic_axes(model),
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    check_trainable_initializers(proto, [n for n, _ in model.trainable_named_parameters()])
    return proto


def check_trainable_initializers(proto: onnx.ModelProto, trainable: list[str]) -> None:
    """Every trainable parameter must be its own initializer of the graph, or its gradient cannot be right."""
    names = {init.name for init in proto.graph.initializer}
    missing = [n for n in trainable if n not in names]
    if missing:
        raise ExportError(
            f"{len(missing)} trainable tensors are not initializers of the exported graph (first: {missing[0]!r}); "
            "they were merged or folded away and their gradients would be wrong. Export in TRAINING mode "
            "with do_constant_folding=False."
        )


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Hide the native INFO log that ORT's gradient builder writes to fd 2; replay it if the block fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            tail = sink.read()[-4000:].decode(errors="replace")
            log.error("native log of the failed step (last 4000 bytes):\n%s", tail)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate_tier_artifacts(model: AdaptedEncoder, inputs: tuple[torch.Tensor, ...], out_dir: Path) -> dict[str, Path]:
    """Write the training, eval and optimizer (AdamW) models and the checkpoint of one tier into ``out_dir``."""
    import onnxruntime.training.artifacts as artifacts

    out_dir.mkdir(parents=True, exist_ok=True)
    forward_path = out_dir / "forward.onnx"
    proto = export_training_graph(model, inputs, forward_path)
    trainable = [n for n, _ in model.trainable_named_parameters()]
    frozen = [init.name for init in proto.graph.initializer if init.name not in set(trainable)]
    with _quiet_native_stderr():
        artifacts.generate_artifacts(
            proto,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=None,  # the graph's first output is already the full loss (CE + alpha L_bal + beta L_het)
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
        )
    forward_path.unlink()
    files = tier_file_paths(out_dir)
    for key in TIER_FILES:
        if not files[key].is_file():
            raise ExportError(f"generate_artifacts did not write {files[key]}")
    return files


class _InferenceGraph(torch.nn.Module):
    """Model inputs -> logits, for the inference model (what optimum's ORTModelFor* runs)."""

    def __init__(self, model: AdaptedEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model.logits(*inputs)
        self.model.clear_routing()
        return logits


def export_inference_model(model: AdaptedEncoder, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    """Export ``logits = f(inputs)`` in eval mode (constant folding on: nothing trains from this graph)."""
    model.eval()
    names = list(model.model_input_names)
    axes = {k: v for k, v in _dynamic_axes(model).items() if k in names or k == "logits"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _InferenceGraph(model),
            inputs[: len(names)],
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
