"""The merged global model on the coordinator: all M experts and the full M-row routers, as in the bundle's
``inference/model.onnx``. Used for centralised evaluation and for ``fftmoe-coordinator export``.

It is rebuilt with PyTorch from the bundle's ``encoder/`` folder (the exporter's own model code), because the
bundle's inference graph has its experts constant-folded and cannot take new values by name. The coordinator's
host therefore needs the export extra (torch, transformers) for these two features only; rounds do not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import Manifest, verify_files
from edge_runtime.data import EncodedData


def build_global_model(bundle_dir: Path, manifest: Manifest, pool: dict[str, np.ndarray]) -> Any:
    """The global model holding the pool, in eval mode: an ``FFTMoEModel`` with M slots (slot e = expert e), the
    routers and the head; for a LoRA baseline the adapter at the largest rank and the head."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(
            "centralised evaluation and export of the global model need torch and transformers on the coordinator: "
            "pip install 'fftmoe[export]'"
        ) from exc
    from edge_runtime.backends import model_from_bundle

    verify_files(bundle_dir, list(manifest.encoder_files))
    model = model_from_bundle(bundle_dir, manifest, None)
    with torch.no_grad():
        model.load_global(pool)
    return model.eval()


def evaluate_global(model: Any, data: EncodedData, batch_size: int = 32) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the global model on encoded data."""
    import torch

    correct, ce_sum, n = 0, 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in data.batches(batch_size):
            logits, _ = model.logits(torch.from_numpy(ids), torch.from_numpy(mask))
            y = torch.from_numpy(labels)
            ce_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += len(labels)
    return {"accuracy": correct / n, "loss": ce_sum / n, "examples": float(n)}


def export_global(bundle_dir: Path, manifest: Manifest, pool: dict[str, np.ndarray], out_dir: Path, round_: int) -> Path:
    """Write the global model as an ONNX inference model (``logits``) with the bundle's config, tokenizer and
    labels beside it, into ``out_dir`` (replaced as a whole; a failed export leaves the old folder)."""
    from exporter.onnx_export import example_inputs, export_inference_model

    model = build_global_model(bundle_dir, manifest, pool)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_inference_model(model, example_inputs(model, 2, min(16, manifest.max_seq_len), manifest.model.image_size), tmp / "model.onnx")
    for entry in [*manifest.inference_files, *manifest.tokenizer_files]:
        src = Path(bundle_dir) / entry.path
        if not (tmp / src.name).exists():
            shutil.copy2(src, tmp / src.name)
    config_path = tmp / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["fftmoe"] = {**config.get("fftmoe", {}), "federated_rounds": round_}
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (tmp / "labels.json").write_text(json.dumps(manifest.labels) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
