"""The real all-MiniLM-L6-v2 (offline package): every default tier's artifacts against PyTorch. Slow (minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.bundle import load_manifest, verify_bundle
from edge_runtime.ort_backend import OrtTierSession
from exporter.check import gradient_check, tier_files, torch_model
from exporter.config import MoEAdapterConfig
from exporter.export import ExportOptions, export_bundle
from exporter.model import load_encoder
from exporter.onnx_export import example_inputs

pytestmark = pytest.mark.slow
TIERS = [2, 4, 8]


@pytest.fixture(scope="module")
def minilm():
    encoder, _, _, _ = load_encoder(None)
    return encoder


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "bundle"
    opts = ExportOptions(
        out=out, tiers=TIERS, adapter=MoEAdapterConfig(), labels=["World", "Sports", "Business", "Sci/Tech"],
        max_seq_len=64, measure=False,
    )  # fmt: skip
    export_bundle(opts)
    return out


def test_bundle_describes_minilm(minilm_bundle: Path) -> None:
    manifest = verify_bundle(minilm_bundle)
    assert manifest.model.model_type == "bert" and manifest.hidden_size == 384 and manifest.num_layers == 6
    # 6 layers x (8 x (384*64 + 64 + 64*384 + 384) + router 8 x 385) + head 4 x 385
    assert manifest.tier(8).trainable_params == 6 * (8 * (2 * 384 * 64 + 64 + 384) + 8 * 385) + 4 * 385


@pytest.mark.parametrize("slots", TIERS)
def test_minilm_gradients_match_pytorch(minilm_bundle: Path, minilm, slots: int) -> None:
    report = gradient_check(minilm_bundle, slots, encoder=minilm, batch=4, seq_len=24)
    assert abs(report.loss_ort - report.loss_torch) <= 1e-4 * max(1.0, abs(report.loss_torch))
    assert report.worst_error <= 1e-3, f"{report.worst_name}: relative gradient error {report.worst_error:.2e}"


def test_minilm_training_lowers_loss_and_keeps_backbone_frozen(minilm_bundle: Path, minilm) -> None:
    manifest = load_manifest(minilm_bundle)
    session = OrtTierSession(tier_files(minilm_bundle, manifest, 2), threads=2)
    trainable = set(manifest.tier(2).trainable_names)
    frozen = {n: p.data.copy() for n, p in session.state.parameters if n not in trainable}
    model = torch_model(minilm_bundle, manifest, 2, encoder=minilm)
    batch = [t.numpy() for t in example_inputs(model, 8, 32, None, seed=1)]
    session.set_learning_rate(1e-3)
    losses = [float(session.train_step(batch)[0]) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    for name, before in frozen.items():
        np.testing.assert_array_equal(session.get(name), before, err_msg=name)


def test_minilm_inference_model_matches_pytorch(minilm_bundle: Path, minilm) -> None:
    import onnxruntime

    manifest = load_manifest(minilm_bundle)
    model = torch_model(minilm_bundle, manifest, manifest.num_experts, encoder=minilm).eval()
    ids, mask, *_ = example_inputs(model, 3, 20, None, seed=2)
    with torch.no_grad():
        want, _ = model.logits(ids, mask)
    sess = onnxruntime.InferenceSession(str(minilm_bundle / manifest.inference_model.path))
    (got,) = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)
