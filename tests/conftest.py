"""Shared fixtures: tiny randomly initialised encoders (made on the fly, no download) and one tiny bundle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    "the", "news", "game", "market", "team", "stock", "win", "rise", "fall", "world", "##s", "##ed",
]  # fmt: skip

TINY_LABELS = ["world", "sports", "business"]


def make_tiny_bert(out: Path, model_type: str = "bert") -> Path:
    """A 2-layer, d=32 BERT (or RoBERTa) with a WordPiece tokenizer, saved like a hub checkpoint."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    tokenizer.save_pretrained(out)
    cls = {"bert": (transformers.BertConfig, transformers.BertModel), "roberta": (transformers.RobertaConfig, transformers.RobertaModel)}
    config_cls, model_cls = cls[model_type]
    config = config_cls(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=72, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    return out


def make_tiny_vit(out: Path) -> Path:
    """A 2-layer, d=32 ViT on 16x16 images with its image processor."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(out)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit")


def export_tiny(bert_dir: Path, out: Path, tiers: list[int], num_experts: int, pooling: str = "", **adapter: Any) -> Path:
    """Export the tiny BERT with experts of width 8 (alpha = beta = 0.1), three labels, no measurement; ``adapter``:
    further ``MoEAdapterConfig`` fields (balance_loss, placement)."""
    from exporter.config import MoEAdapterConfig
    from exporter.export import ExportOptions, export_bundle

    opts = ExportOptions(
        out=out, tiers=tiers, adapter=MoEAdapterConfig(num_experts=num_experts, expert_dim=8, aux_alpha=0.1, aux_beta=0.1, **adapter),
        model=str(bert_dir), labels=TINY_LABELS, max_seq_len=16, measure=False, pooling=pooling,
    )  # fmt: skip
    export_bundle(opts)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tiny BERT: M=4 experts of width 8, tiers 1, 2 and 4, three labels, no measurement."""
    return export_tiny(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "tiny", [1, 2, 4], 4)


@pytest.fixture(scope="session")
def tiny_l2(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's shape with L2-normalised mean pooling (--pooling mean-l2): M=4, tiers 2 and 4."""
    return export_tiny(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "tiny-l2", [2, 4], 4, pooling="mean-l2")


@pytest.fixture(scope="session")
def tiny_variant(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's shape with the non-default adapter rules: the soft balance term where k = t
    (--balance-loss switch-soft) and the adapter inside the residual (--adapter-placement pre-ln); M=4, tiers 2, 4."""
    return export_tiny(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "tiny-variant", [2, 4], 4,
                       balance_loss="switch-soft", placement="pre-ln")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bundle16(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation's tiny bundle: M=16 experts, tiers 2, 4 and 8 (a fleet of one each has 14 slots, so two
    experts per layer stay untrained in the first round)."""
    return export_tiny(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "tiny16", [2, 4, 8], 16)


def write_tiny_csv(path: Path, rows: int, seed: int) -> Path:
    """A small labelled CSV in the tiny vocabulary (label words make the task learnable)."""
    import csv
    import random

    words = {"world": "the world news", "sports": "game team win", "business": "market stock rise fall"}
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for _ in range(rows):
            label = rng.choice(TINY_LABELS)
            w.writerow([f"{words[label]} {rng.choice('abcxyz')}", label])
    return path


def finish_serve(proc, timeout: float) -> tuple[int, dict, str]:  # noqa: ANN001
    """Wait for a ``fftmoe-coordinator serve --json`` process: (exit code, its JSON summary or {}, stderr). A serve
    still running after ``timeout`` is stopped and the test fails with the end of its log (a deadline against hangs)."""
    import json
    import subprocess

    from coordinator.deploy import stop

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"serve did not finish in {timeout} s:\n{err[-4000:]}")
    lines = out.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), err


def tier_bytes(manifest, tier: int) -> tuple[int, int]:  # noqa: ANN001
    """(bytes a node of this tier is sent, bytes of its update): its experts, router rows (none for one slot: it
    routes everything to it) and head; plus statistics. For a LoRA baseline: A [r, in] and B [out, r] of every
    linear layer of the tiny BERT's blocks (q, k, v, attention out: d x d; FFN in: d x 2d; FFN out: 2d x d)."""
    d, r, L, labels = manifest.hidden_size, manifest.expert_dim, manifest.num_layers, len(manifest.labels)
    if manifest.is_lora:
        rank, inter = manifest.tier(tier).rank, 2 * d
        per_layer = rank * (4 * (d + d) + (d + inter) + (inter + d))
        sent = 4 * (L * per_layer + labels * d + labels)
        return sent, sent + 4 * 2 * L
    expert = d * r + r + r * d + d
    router = tier * d + tier if tier > 1 else 0
    sent = 4 * (L * tier * expert + L * router + labels * d + labels)
    return sent, sent + 4 * 2 * L * tier


def export_tiny_lora(bert_dir: Path, out: Path, method: str, ranks: dict[int, int]) -> Path:
    """Export the tiny BERT as a LoRA baseline (PEFT LoRA on every linear layer), three labels, no measurement."""
    from exporter.config import LoraAdapterConfig
    from exporter.export import ExportOptions, export_bundle

    opts = ExportOptions(
        out=out, tiers=sorted(ranks), lora=LoraAdapterConfig(method=method, ranks=ranks), model=str(bert_dir),
        labels=TINY_LABELS, max_seq_len=16, measure=False,
    )  # fmt: skip
    export_bundle(opts)
    return out


@pytest.fixture(scope="session")
def tiny_hetlora(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HetLoRA on the tiny BERT: tiers 1, 2 and 4 train ranks 2, 4 and 8 (the tiers of ``tiny_bundle``)."""
    return export_tiny_lora(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "hetlora", "hetlora", {1: 2, 2: 4, 4: 8})


@pytest.fixture(scope="session")
def tiny_fedit(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FedIT on the tiny BERT: tiers 1, 2 and 4 all train rank 4."""
    return export_tiny_lora(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "fedit", "fedit", {1: 4, 2: 4, 4: 4})
