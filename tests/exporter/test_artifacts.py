"""Per-tier ONNX Runtime training artifacts of the tiny bundle against PyTorch (the independent reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file

from edge_runtime.bundle import global_expert_key, global_head_key, global_router_key, load_manifest
from edge_runtime.ort_backend import OrtTierSession
from exporter.check import gradient_check, randomize_trainable, tier_files, torch_model
from exporter.onnx_export import ExportError, check_trainable_initializers, example_inputs, input_names

TIERS = [1, 2, 4]
# Gradients: max |g_ort - g_torch| <= 1e-4 * max |g_torch|, per trainable tensor (float32 on both sides).
GRAD_RTOL = 1e-4


@pytest.mark.parametrize("slots", TIERS)
def test_gradients_match_pytorch_autograd(tiny_bundle: Path, slots: int) -> None:
    report = gradient_check(tiny_bundle, slots)
    assert abs(report.loss_ort - report.loss_torch) <= 1e-5 * max(1.0, abs(report.loss_torch))
    assert len(report.errors) == len(load_manifest(tiny_bundle).tier(slots).trainable_names)
    assert report.worst_error <= GRAD_RTOL, f"{report.worst_name}: relative gradient error {report.worst_error:.2e}"


@pytest.mark.parametrize("slots", [2, 4])
def test_l2_pooling_gradients_match_pytorch_and_features_have_unit_norm(tiny_l2: Path, slots: int) -> None:
    """--pooling mean-l2: the training graph's gradients against autograd, and its ``features`` output at norm 1."""
    manifest = load_manifest(tiny_l2)
    assert manifest.pooling == "mean-l2"
    report = gradient_check(tiny_l2, slots)
    assert abs(report.loss_ort - report.loss_torch) <= 1e-5 * max(1.0, abs(report.loss_torch))
    assert report.worst_error <= GRAD_RTOL, f"{report.worst_name}: relative gradient error {report.worst_error:.2e}"
    from edge_runtime.bundle import OUTPUTS

    session = OrtTierSession(tier_files(tiny_l2, manifest, slots), with_optimizer=False)
    batch = [t.numpy() for t in example_inputs(torch_model(tiny_l2, manifest, slots), 4, 12, None, seed=5)]
    features = session.evaluate(batch)[OUTPUTS.index("features")]
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("slots", [2, 4])
def test_soft_balance_and_pre_ln_adapter_gradients_match_pytorch(tiny_variant: Path, slots: int) -> None:
    """--balance-loss switch-soft with --adapter-placement pre-ln: the training graph against autograd (tier 2 is
    the k = t case that uses the soft term), and the manifest carries both rules."""
    manifest = load_manifest(tiny_variant)
    assert (manifest.balance_loss, manifest.adapter_placement) == ("switch-soft", "pre-ln")
    report = gradient_check(tiny_variant, slots)
    assert abs(report.loss_ort - report.loss_torch) <= 1e-5 * max(1.0, abs(report.loss_torch))
    assert report.worst_error <= GRAD_RTOL, f"{report.worst_name}: relative gradient error {report.worst_error:.2e}"
    if slots == 2:  # L_bal alone (output 3) reaches the router on the tier where every slot is active
        model = torch_model(tiny_variant, manifest, slots)
        randomize_trainable(model, 1)
        outputs = model(*example_inputs(model, 4, 12, None, seed=1))
        router = [p for n, p in model.trainable_named_parameters() if ".router." in n]
        grads = torch.autograd.grad(outputs[3], router, allow_unused=True)
        assert any(g is not None and float(g.abs().max()) > 0 for g in grads), "no gradient from L_bal on tier 2"


def test_the_default_rules_leave_the_manifest_as_before(tiny_bundle: Path, tiny_variant: Path) -> None:
    import json

    plain = json.loads((tiny_bundle / "manifest.json").read_text())
    assert "balance_loss" not in plain and "adapter_placement" not in plain
    assert load_manifest(tiny_bundle).balance_loss == "switch" and load_manifest(tiny_bundle).adapter_placement == "post-ln"
    variant = json.loads((tiny_variant / "manifest.json").read_text())
    assert (variant["balance_loss"], variant["adapter_placement"]) == ("switch-soft", "pre-ln")


@pytest.mark.parametrize(
    ("field", "value"), [("balance_loss", "aux"), ("adapter_placement", 3), ("pooling", "max"), ("pooling", None)]
)
def test_a_manifest_with_an_unknown_rule_is_refused_by_field(tiny_variant: Path, field: str, value: object) -> None:
    import json

    from edge_runtime.bundle import Manifest, ManifestError

    d = json.loads((tiny_variant / "manifest.json").read_text())
    if value is None:
        del d[field]  # pooling is required: no default to fall back on
    else:
        d[field] = value
    with pytest.raises(ManifestError, match=field):
        Manifest.from_dict(d)


def test_an_unknown_pooling_is_refused_by_name(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from exporter.config import ConfigError
    from tests.conftest import export_tiny

    with pytest.raises(ConfigError, match="--pooling 'max'"):
        export_tiny(tiny_bert_dir, tmp_path / "b", [2], 4, pooling="max")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("slots", TIERS)
def test_training_lowers_loss_and_changes_only_trainable_tensors(tiny_bundle: Path, slots: int) -> None:
    manifest = load_manifest(tiny_bundle)
    session = OrtTierSession(tier_files(tiny_bundle, manifest, slots))
    trainable = set(manifest.tier(slots).trainable_names)
    assert set(session.trainable_names) == trainable
    frozen_before = {n: p.data.copy() for n, p in session.state.parameters if n not in trainable}
    trainable_before = {n: session.get(n) for n in trainable}
    model = torch_model(tiny_bundle, manifest, slots)
    batch = [t.numpy() for t in example_inputs(model, 8, 12, None, seed=3)]
    session.set_learning_rate(1e-2)
    losses = [float(session.train_step(batch)[0]) for _ in range(12)]
    assert losses[-1] < losses[0] - 0.05, losses
    for name, before in frozen_before.items():
        np.testing.assert_array_equal(session.get(name), before, err_msg=f"frozen tensor {name} changed")
    changed = [n for n in trainable if not np.array_equal(session.get(n), trainable_before[n])]
    assert "head.weight" in changed and len(changed) > len(trainable) // 2


def test_checkpoint_holds_the_global_pool_in_slot_order(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    pool = load_file(str(tiny_bundle / manifest.global_pool.path))
    tier = manifest.tier(2)
    session = OrtTierSession(tier_files(tiny_bundle, manifest, 2), with_optimizer=False)
    for p in tier.slot_params:
        np.testing.assert_array_equal(session.get(p.name), pool[global_expert_key(p.layer, p.slot, p.tensor)])
    for p in tier.router_params:
        np.testing.assert_array_equal(session.get(p.name), pool[global_router_key(p.layer, p.tensor)][:2])
    for p in tier.head_params:
        np.testing.assert_array_equal(session.get(p.name), pool[global_head_key(p.tensor)])


def test_eval_model_matches_training_outputs(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    session = OrtTierSession(tier_files(tiny_bundle, manifest, 4), with_optimizer=False)
    model = torch_model(tiny_bundle, manifest, 4)
    batch = [t.numpy() for t in example_inputs(model, 4, 10, None, seed=5)]
    with torch.no_grad():
        want = model(*[torch.from_numpy(x) for x in batch])
    got = session.evaluate(batch)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


def test_inference_model_matches_pytorch_logits(tiny_bundle: Path) -> None:
    import onnxruntime

    manifest = load_manifest(tiny_bundle)
    model = torch_model(tiny_bundle, manifest, manifest.num_experts)  # the global model: all M experts
    model.eval()
    inputs = example_inputs(model, 3, 11, None, seed=7)
    with torch.no_grad():
        want, _ = model.logits(*inputs[:2])
    sess = onnxruntime.InferenceSession(str(tiny_bundle / manifest.inference_model.path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()})
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_eval_mode_export_trap_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """The silent wrong-gradient trap: an EVAL-mode export merges equal (zero) initializers; it must not pass."""
    manifest = load_manifest(tiny_bundle)
    model = torch_model(tiny_bundle, manifest, 2)  # zero expert biases and output layers, as exported
    model.eval()
    path = tmp_path / "eval.onnx"
    torch.onnx.export(
        model, example_inputs(model, 2, 8, None), str(path), input_names=input_names(model),
        opset_version=16, training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True, dynamo=False,
    )  # fmt: skip
    with pytest.raises(ExportError, match="merged or folded"):
        check_trainable_initializers(onnx.load(str(path)), [n for n, _ in model.trainable_named_parameters()])


def test_vision_bundle_trains_like_pytorch(tiny_vit_dir: Path, tmp_path: Path) -> None:
    """A ViT bundle: pixel_values in, CLS pooling; gradients and inference logits against PyTorch."""
    import onnxruntime

    from exporter.config import MoEAdapterConfig
    from exporter.export import ExportOptions, export_bundle

    out = tmp_path / "vit"
    export_bundle(ExportOptions(out=out, tiers=[2], adapter=MoEAdapterConfig(num_experts=2, expert_dim=4), model=str(tiny_vit_dir),
                                num_labels=3, measure=True, measure_steps=1, measure_batch=2))  # fmt: skip
    manifest = load_manifest(out)
    assert manifest.input_names == ("pixel_values", "labels", "routing_target", "logit_adjustment") and manifest.model.image_size == 16
    assert manifest.tier(2).measured is not None
    report = gradient_check(out, 2)
    assert report.worst_error <= GRAD_RTOL, f"{report.worst_name}: {report.worst_error:.2e}"
    model = torch_model(out, manifest, 2).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want, _ = model.logits(pixels)
    sess = onnxruntime.InferenceSession(str(out / manifest.inference_model.path))
    np.testing.assert_allclose(sess.run(["logits"], {"pixel_values": pixels.numpy()})[0], want.numpy(), rtol=1e-4, atol=1e-5)
