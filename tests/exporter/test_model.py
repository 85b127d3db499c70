"""Injection of MoE adapters into Hugging Face encoders, parameter roles and the global pool mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.bundle import EXPERT_TENSORS, global_expert_key, global_router_key
from exporter.config import MoEAdapterConfig
from exporter.model import (
    SUPPORTED,
    FFTMoEModel,
    MoELayer,
    ModelLoadError,
    UnsupportedArchitectureError,
    init_global_pool,
    load_encoder,
)
from tests.conftest import make_tiny_bert


def _model(source: Path, slots: int = 3, experts: int = 4) -> FFTMoEModel:
    encoder, _, arch, _ = load_encoder(str(source))
    return FFTMoEModel(encoder, arch, MoEAdapterConfig(num_experts=experts, expert_dim=8), slots, 3)


def test_adapters_wrap_each_block_ffn_output_and_only_they_and_head_train(tiny_bert_dir: Path) -> None:
    model = _model(tiny_bert_dir)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 2 and all(type(layer.base_layer).__name__ == "BertOutput" for layer in layers)
    trainable = [n for n, _ in model.trainable_named_parameters()]
    assert all(".moe." in n or n.startswith("head.") for n in trainable)
    # 2 layers x (router weight+bias + 3 slots x 4 tensors) + head weight+bias
    assert len(trainable) == 2 * (2 + 3 * 4) + 2
    assert len(model.slot_params()) == 2 * 3 * len(EXPERT_TENSORS)


def test_forward_outputs_and_zero_adapter_preserves_encoder(tiny_bert_dir: Path) -> None:
    model = _model(tiny_bert_dir)
    pristine, _, _, _ = load_encoder(str(tiny_bert_dir))
    model.load_global(init_global_pool(model.config, 32, 2, 3))  # expert output layers start at zero
    ids = torch.randint(5, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    out = model(ids, mask, torch.tensor([0, 2]), torch.full((2, 3), 1 / 3))
    loss, logits, ce, bal, het, counts, psum, features = out
    assert logits.shape == (2, 3) and counts.shape == (2, 3) and psum.shape == (2, 3)
    torch.testing.assert_close(logits, model.head(features))  # the features are what the head reads
    torch.testing.assert_close(features, model.features(ids, mask)[0])
    assert torch.allclose(loss, ce + 0.01 * bal + 0.01 * het)
    # each real token picks top_k = 2 slots in each layer
    assert torch.equal(counts.sum(dim=1), torch.full((2,), 2.0 * 14))
    with torch.no_grad():
        want = pristine(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want)


def test_tier_with_fewer_slots_than_top_k_uses_all_slots(tiny_bert_dir: Path) -> None:
    model = _model(tiny_bert_dir, slots=1)
    assert model.top_k == 1


def test_load_global_fills_slots_from_assigned_experts(tiny_bert_dir: Path) -> None:
    model = _model(tiny_bert_dir, slots=2)
    pool = init_global_pool(MoEAdapterConfig(num_experts=4, expert_dim=8), 32, 2, 3)
    pool = {k: np.random.default_rng(len(k)).normal(size=v.shape).astype(np.float32) for k, v in pool.items()}
    model.load_global(pool, assignment=[[3, 1], [0, 2]])
    layer1 = model.adapters[1].moe
    np.testing.assert_array_equal(layer1.experts[1].w2.detach().numpy(), pool[global_expert_key(1, 2, "w2")])
    np.testing.assert_array_equal(model.adapters[0].moe.experts[0].b1.detach().numpy(), pool[global_expert_key(0, 3, "b1")])
    np.testing.assert_array_equal(layer1.router.weight.detach().numpy(), pool[global_router_key(1, "weight")][[0, 2]])
    with pytest.raises(ValueError, match="distinct"):
        model.load_global(pool, assignment=[[1, 1], [0, 2]])


@pytest.mark.parametrize("model_type", ["roberta"])
def test_other_text_architectures_are_wrapped(tmp_path: Path, model_type: str) -> None:
    model = _model(make_tiny_bert(tmp_path / model_type, model_type))
    assert model.arch.model_type == model_type
    out = model(torch.randint(5, 40, (2, 5)), torch.ones(2, 5, dtype=torch.int64), torch.tensor([0, 1]), torch.full((2, 3), 1 / 3))
    assert torch.isfinite(out[0])


def test_vit_is_wrapped_with_cls_pooling(tiny_vit_dir: Path) -> None:
    model = _model(tiny_vit_dir)
    assert model.arch.modality == "vision" and model.arch.pooling == "cls"
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.full((2, 3), 1 / 3))
    assert out[1].shape == (2, 3)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    import transformers

    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_encoder(str(tmp_path))
    assert "'gpt2'" in str(info.value)
    for name in SUPPORTED:
        assert name in str(info.value)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_encoder(str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_encoder(str(tmp_path / "nowhere" / "model"))


def test_a_pickled_bin_checkpoint_is_never_loaded(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A bundle's encoder/ comes from the coordinator: a pytorch_model.bin (a pickle, which runs code when loaded) in
    place of model.safetensors is refused with a message that names the fix, and the pickle never runs."""
    import pickle
    import shutil

    folder = tmp_path / "encoder"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (marker.write_text, ("the pickle ran",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_encoder(str(folder))
    assert not marker.exists()


def test_pre_ln_adapter_is_a_parallel_branch_inside_the_residual(tiny_bert_dir: Path) -> None:
    """--adapter-placement pre-ln: LN(dropout(dense(x)) + a + MoE(a)), checked against Hugging Face's own BertOutput
    modules called directly, and the frozen encoder exactly while the experts' output layers are zero."""
    encoder, _, arch, _ = load_encoder(str(tiny_bert_dir))
    pristine, _, _, _ = load_encoder(str(tiny_bert_dir))
    config = MoEAdapterConfig(num_experts=4, expert_dim=8, placement="pre-ln")
    model = FFTMoEModel(encoder, arch, config, 2, 3)
    model.load_global(init_global_pool(config, 32, 2, 3))
    ids, mask = torch.randint(5, 40, (2, 7)), torch.ones(2, 7, dtype=torch.int64)
    with torch.no_grad():
        want = pristine(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, want)
        layer = model.adapters[0]
        for p in layer.moe.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        layer.eval()
        x, a = torch.randn(2, 7, 64), torch.randn(2, 7, 32)
        base = layer.base_layer
        delta, _, _ = layer.moe(a)
        direct = torch.nn.functional.layer_norm(
            x @ base.dense.weight.T + base.dense.bias + a + delta, (32,), base.LayerNorm.weight, base.LayerNorm.bias,
            base.LayerNorm.eps,
        )  # fmt: skip
        torch.testing.assert_close(layer(x, a), direct)
        torch.testing.assert_close(layer(hidden_states=x, input_tensor=a), direct)
        post = MoELayer(base, 32, 2, 8, 2)  # post-ln: h + MoE(h) with h the block's own output
        post.moe.load_state_dict(layer.moe.state_dict())
        h = base(x, a)
        torch.testing.assert_close(post(x, a), h + post.moe(h)[0])


def test_pre_ln_is_refused_for_a_block_without_a_layernorm_after_its_residual(tiny_vit_dir: Path) -> None:
    encoder, _, arch, _ = load_encoder(str(tiny_vit_dir))
    with pytest.raises(UnsupportedArchitectureError, match="--adapter-placement post-ln"):
        FFTMoEModel(encoder, arch, MoEAdapterConfig(num_experts=2, expert_dim=4, placement="pre-ln"), 2, 3)


def test_unknown_adapter_rules_are_refused_by_flag() -> None:
    from exporter.config import ConfigError

    with pytest.raises(ConfigError, match="--balance-loss 'aux'"):
        MoEAdapterConfig(balance_loss="aux")
    with pytest.raises(ConfigError, match="--adapter-placement 'middle'"):
        MoEAdapterConfig(placement="middle")
