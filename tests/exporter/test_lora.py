"""The LoRA baselines' bundles (PEFT LoRA, FedIT and HetLoRA) against PyTorch autograd and the manifest's own claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from edge_runtime.bundle import global_head_key, global_lora_key, load_manifest, verify_bundle
from edge_runtime.ort_backend import OrtTierSession
from edge_runtime.update import default_assignment, tier_values_from_pool
from exporter.check import gradient_check, tier_files, torch_model
from exporter.cli import EXIT_BAD_ARGS, app
from exporter.onnx_export import example_inputs
from tests.conftest import tier_bytes

GRAD_RTOL = 1e-4
HET_RANKS = {1: 2, 2: 4, 4: 8}


@pytest.mark.parametrize("slots", sorted(HET_RANKS))
def test_gradients_match_pytorch_autograd(tiny_hetlora: Path, slots: int) -> None:
    report = gradient_check(tiny_hetlora, slots)
    assert abs(report.loss_ort - report.loss_torch) <= 1e-5 * max(1.0, abs(report.loss_torch))
    assert len(report.errors) == len(load_manifest(tiny_hetlora).tier(slots).trainable_names)
    assert report.worst_error <= GRAD_RTOL, f"{report.worst_name}: relative gradient error {report.worst_error:.2e}"


def test_manifest_states_ranks_params_and_bytes(tiny_hetlora: Path, tiny_fedit: Path) -> None:
    het, fedit = verify_bundle(tiny_hetlora), verify_bundle(tiny_fedit)
    assert (het.method, fedit.method) == ("hetlora", "fedit") and het.is_lora and het.num_experts == 1
    assert het.lora.max_rank == 8 and fedit.lora.max_rank == 4 and het.lora.scale == 2.0
    for manifest, ranks in ((het, HET_RANKS), (fedit, {1: 4, 2: 4, 4: 4})):
        for slots, rank in ranks.items():
            tier = manifest.tier(slots)
            assert tier.rank == rank and not tier.slot_params and not tier.router_params
            # 6 adapted linear layers per block: q, k, v, attention out (32 -> 32), FFN in (32 -> 64), FFN out (64 -> 32)
            assert len(tier.lora_params) == 2 * 6 * 2
            assert tier.trainable_params == 2 * rank * (4 * 64 + 96 + 96) + 3 * 33
            assert tier.trainable_bytes == 4 * tier.trainable_params == tier_bytes(manifest, slots)[0]
            for p in tier.lora_params:
                assert p.shape[0 if p.matrix == "A" else 1] == rank


def test_tier_gets_the_global_adapter_truncated_to_its_rank(tiny_hetlora: Path) -> None:
    manifest = load_manifest(tiny_hetlora)
    pool = load_file(str(tiny_hetlora / manifest.global_pool.path))
    for slots, rank in HET_RANKS.items():
        session = OrtTierSession(tier_files(tiny_hetlora, manifest, slots), with_optimizer=False)
        values = tier_values_from_pool(manifest, slots, pool, default_assignment(manifest, slots))
        for p in manifest.tier(slots).lora_params:
            full = pool[global_lora_key(p.module, p.matrix)]
            want = full[:rank] if p.matrix == "A" else full[:, :rank]
            np.testing.assert_array_equal(session.get(p.name), want)  # the exported checkpoint
            np.testing.assert_array_equal(values[p.name], want)  # what the coordinator sends
        np.testing.assert_array_equal(session.get("head.weight"), pool[global_head_key("weight")])
    assert not any(pool[k].any() for k in pool if k.endswith(".B")), "B starts at zero: the model starts as the encoder"


def test_training_lowers_loss_and_changes_only_the_adapters_and_head(tiny_hetlora: Path) -> None:
    manifest = load_manifest(tiny_hetlora)
    session = OrtTierSession(tier_files(tiny_hetlora, manifest, 2))
    trainable = set(manifest.tier(2).trainable_names)
    frozen_before = {n: p.data.copy() for n, p in session.state.parameters if n not in trainable}
    model = torch_model(tiny_hetlora, manifest, 2)
    batch = [t.numpy() for t in example_inputs(model, 8, 12, None, seed=3)]
    session.set_learning_rate(1e-2)
    outs = [session.train_step(batch) for _ in range(12)]
    losses = [float(o[0]) for o in outs]
    assert losses[-1] < losses[0] - 0.05, losses
    for name, before in frozen_before.items():
        np.testing.assert_array_equal(session.get(name), before, err_msg=f"frozen tensor {name} changed")
    # one routing "slot" per layer: counts and probability sums are the real tokens; the loss is the cross-entropy
    tokens = float(batch[1].sum())
    np.testing.assert_array_equal(outs[0][5], np.full((2, 1), tokens)) and np.testing.assert_array_equal(outs[0][6], np.full((2, 1), tokens))
    assert float(outs[0][0]) == pytest.approx(float(outs[0][2]))


def test_inference_model_is_the_global_adapter_at_the_largest_rank(tiny_hetlora: Path) -> None:
    import onnxruntime

    from exporter.lora import LoraModel, lora_config_from_manifest
    from exporter.model import SUPPORTED, load_encoder

    manifest = load_manifest(tiny_hetlora)
    pool = load_file(str(tiny_hetlora / manifest.global_pool.path))
    pool = {k: (v + 0.05 if k.endswith(".B") else v) for k, v in pool.items()}  # a non-zero B, so the adapters count
    encoder, _, _, _ = load_encoder(manifest.model.source)
    model = LoraModel(encoder, SUPPORTED["bert"], lora_config_from_manifest(manifest), 8, 3)
    model.load_global(pool)
    model.eval()
    inputs = example_inputs(model, 3, 11, None, seed=7)
    with torch.no_grad():
        moved, _ = model.logits(*inputs[:2])
        model.load_global(load_file(str(tiny_hetlora / manifest.global_pool.path)))
        want, _ = model.logits(*inputs[:2])
    sess = onnxruntime.InferenceSession(str(tiny_hetlora / manifest.inference_model.path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()})
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(moved.numpy() - want.numpy()).max() > 1e-3
    assert json.loads((tiny_hetlora / "inference" / "config.json").read_text())["fftmoe"]["method"] == "hetlora"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "hetlora"], "needs --ranks"),
        (["--method", "fedit", "--ranks", "2,4"], "one rank on every tier"),
        (["--method", "hetlora", "--ranks", "2,4,8"], "gives 3 ranks for 2 tiers"),
        (["--method", "hetlora", "--ranks", "2,x"], "integers"),
        (["--ranks", "4"], "--method fedit or --method hetlora"),
        (["--method", "lora", "--ranks", "4"], "choose fftmoe, fedit or hetlora"),
        (["--method", "fedit", "--ranks", "4", "--lora-targets", "nothing_like_this"], "no module of the encoder matches"),
    ],
)
def test_bad_lora_settings_exit_with_a_message_naming_the_flag(tiny_bert_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["--model", str(tiny_bert_dir), "--out", str(tmp_path / "b"), "--tiers", "2,4", "--max-seq-len", "8",
                                      "--no-measure", *extra])  # fmt: skip
    assert result.exit_code == EXIT_BAD_ARGS and message in result.output, result.output
    assert not (tmp_path / "b").exists()
