"""Build a bundle: per-tier ONNX Runtime training artifacts, the global pool, the inference model, the manifest.

Everything is written into a fresh folder next to the destination and moved into place only when complete, so a
failure half-way never leaves a half-written bundle (and ``--force`` never loses the old bundle before the new
one is whole).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from edge_runtime.bundle import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Measurement,
    ModelInfo,
    Tier,
)
from exporter.config import ConfigError, LoraAdapterConfig, MoEAdapterConfig
from exporter.model import POOLINGS, AdaptedEncoder, FFTMoEModel, encoder_blocks, init_global_pool, load_encoder, weights_sha256
from exporter.onnx_export import OPSET, example_inputs, export_inference_model, generate_tier_artifacts

GLOBAL_POOL_FILE = "global_pool.safetensors"
INFERENCE_DIR = "inference"
TOKENIZER_DIR = "tokenizer"
ENCODER_DIR = "encoder"


class OutputExistsError(FileExistsError):
    """The output folder already holds something and --force was not given."""


@dataclass
class ExportOptions:
    """What ``fftmoe-export`` was asked to build."""

    out: Path
    tiers: list[int]
    adapter: MoEAdapterConfig = field(default_factory=MoEAdapterConfig)
    lora: LoraAdapterConfig | None = None
    """Set for the LoRA baselines (--method fedit|hetlora): the tiers then train PEFT LoRA of these ranks."""
    model: str | None = None
    labels: list[str] | None = None
    num_labels: int | None = None
    max_seq_len: int = 128
    pooling: str = ""
    """The head's pooling, one of ``model.POOLINGS`` (--pooling); empty: the architecture's own (mean for text, cls
    for images)."""
    force: bool = False
    measure: bool = True
    measure_batch: int = 16
    measure_seq_len: int = 64
    measure_threads: int = 2
    measure_steps: int = 5

    def resolved_labels(self) -> list[str]:
        if self.labels is not None and self.num_labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(f"--labels gives {len(self.labels)} labels but --num-labels is {self.num_labels}; give one of them")
        if self.labels is not None:
            labels = [x.strip() for x in self.labels]
            if len(labels) < 2 or "" in labels or len(set(labels)) != len(labels):
                raise ConfigError(f"--labels {','.join(self.labels)!r}: give at least 2 distinct, non-empty labels")
            return labels
        n = 2 if self.num_labels is None else self.num_labels
        if n < 2:
            raise ConfigError(f"--num-labels must be >= 2, got {n}")
        return [str(i) for i in range(n)]


@dataclass
class TierReport:
    """One row of the final table."""

    slots: int
    top_k: int
    trainable_params: int
    artifact_mb: float
    rank: int | None
    export_s: float
    step_time_s: float | None
    peak_rss_mb: float | None


Progress = Callable[[str], None]


def check_output(out: Path, force: bool) -> None:
    """Refuse an output folder that already holds a bundle or other files, unless ``force``."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "a bundle" if (out / MANIFEST_NAME).exists() else "files"
        raise OutputExistsError(f"--out {out}: already holds {what}; pass --force to replace it, or choose another folder")


def _version() -> str:
    try:
        return metadata.version("fftmoe")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _save_pool(pool: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(pool, str(path), metadata={"format": "fftmoe-global-pool", "format_version": "1"})


def _measure(tier_dir: Path, opts: ExportOptions, model: AdaptedEncoder, image_size: int | None) -> Measurement:
    """Run a few ORT training steps in a child process (no torch loaded) and read its step time and peak RSS."""
    cmd = [
        sys.executable, "-m", "edge_runtime.measure", str(tier_dir),
        "--modality", model.arch.modality,
        "--batch-size", str(opts.measure_batch),
        "--seq-len", str(min(opts.measure_seq_len, opts.max_seq_len)),
        "--num-layers", str(model.num_layers),
        "--slots", str(model.route_width),
        "--num-labels", str(model.head.out_features),
        "--vocab-size", str(getattr(model.encoder.config, "vocab_size", 0)),
        "--image-size", str(image_size or 0),
        "--threads", str(opts.measure_threads),
        "--steps", str(opts.measure_steps),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring a tier ({tier_dir.name}) failed:\n{proc.stderr.strip()[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return Measurement(
        batch_size=r["batch_size"], seq_len=r["seq_len"], threads=r["threads"], steps=r["steps"],
        step_time_s=round(r["step_time_s"], 4), peak_rss_mb=round(r["peak_rss_mb"], 1), machine=r["machine"],
        import_rss_mb=round(r["import_rss_mb"], 1), load_rss_mb=round(r["load_rss_mb"], 1), torch_loaded=r["torch_loaded"],
        compute_gflops=round(r["compute_gflops"], 2),
    )  # fmt: skip


def _write_inference(
    stage: Path, encoder, preprocessor, arch, opts: ExportOptions, labels: list[str], pool: dict[str, np.ndarray], image_size
) -> list[FileEntry]:
    """The initial global model (all M experts, global router) as ONNX + config + preprocessor, for optimum."""
    inf_dir = stage / INFERENCE_DIR
    inf_dir.mkdir()
    model = _model(encoder, arch, opts, None, len(labels))
    model.load_global(pool)
    inputs = example_inputs(model, 2, min(16, opts.max_seq_len), image_size)
    export_inference_model(model, inputs, inf_dir / "model.onnx")
    config = copy.deepcopy(encoder.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.architectures = None
    if opts.lora is not None:
        config.fftmoe = {"method": opts.lora.method, "rank": opts.lora.max_rank, "pooling": arch.pooling}
    else:
        config.fftmoe = {"num_experts": opts.adapter.num_experts, "top_k": opts.adapter.top_k, "pooling": arch.pooling}
    config.save_pretrained(inf_dir)
    preprocessor.save_pretrained(inf_dir)
    return [FileEntry.of(stage, p.relative_to(stage).as_posix()) for p in sorted(inf_dir.iterdir()) if p.name != "model.onnx"]


def _model(encoder, arch, opts: ExportOptions, slots: int | None, num_labels: int) -> AdaptedEncoder:
    """A fresh copy of the encoder with one tier's adapters (``slots``), or the global ones (None)."""
    if opts.lora is not None:
        from exporter.lora import LoraModel

        rank = opts.lora.max_rank if slots is None else opts.lora.ranks[slots]
        return LoraModel(copy.deepcopy(encoder), arch, opts.lora, rank, num_labels)
    return FFTMoEModel(copy.deepcopy(encoder), arch, opts.adapter, opts.adapter.num_experts if slots is None else slots, num_labels)


def export_bundle(opts: ExportOptions, progress: Progress = lambda _msg: None) -> tuple[Manifest, list[TierReport]]:
    """Build the bundle described by ``opts`` at ``opts.out``; return its manifest and a report per tier."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    labels = opts.resolved_labels()
    if not opts.tiers:
        raise ConfigError("--tiers is empty; e.g. --tiers 2,4,8")
    out = opts.out.expanduser().resolve()
    check_output(out, opts.force)
    progress(f"loading encoder {opts.model or 'all-MiniLM-L6-v2 (offline default)'}")
    encoder, preprocessor, arch, source = load_encoder(opts.model)
    if opts.pooling:
        if opts.pooling not in POOLINGS:
            raise ConfigError(f"--pooling {opts.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if opts.pooling.startswith("mean") and arch.modality != "text":
            raise ConfigError(f"--pooling {opts.pooling}: mean pooling is over a text's real tokens; use cls for an image model")
        arch = dataclasses.replace(arch, pooling=opts.pooling)
    if opts.lora is None and opts.adapter.placement == "pre-ln" and arch.modality != "text":
        raise ConfigError(
            f"--adapter-placement pre-ln: {encoder.config.model_type}'s blocks are pre-LN (no LayerNorm after the FFN's residual), "
            "so the adapter is inside the residual already; use --adapter-placement post-ln"
        )
    cfg = encoder.config
    image_size = getattr(cfg, "image_size", None) if arch.modality == "vision" else None
    if arch.modality == "text":
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and opts.max_seq_len > limit:
            raise ConfigError(f"--max-seq-len {opts.max_seq_len} exceeds the model's {limit} positions; use --max-seq-len {limit} or less")
    if opts.max_seq_len < 2:
        raise ConfigError(f"--max-seq-len must be >= 2, got {opts.max_seq_len}")
    num_layers = len(encoder_blocks(encoder, arch))
    model_info = ModelInfo(
        source=source, model_type=cfg.model_type, modality=arch.modality, hidden_size=cfg.hidden_size,
        num_layers=num_layers, sha256=weights_sha256(encoder), image_size=image_size,
    )  # fmt: skip

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        if opts.lora is not None:
            from exporter.lora import init_lora_pool

            missing = [t for t in opts.tiers if t not in opts.lora.ranks]
            if missing:
                raise ConfigError(f"--ranks gives no rank for tier(s) {missing}")
            pool = init_lora_pool(opts.lora, _model(encoder, arch, opts, None, len(labels)))
        else:
            pool = init_global_pool(opts.adapter, cfg.hidden_size, num_layers, len(labels))
        _save_pool(pool, stage / GLOBAL_POOL_FILE)
        (stage / TOKENIZER_DIR).mkdir()
        preprocessor.save_pretrained(stage / TOKENIZER_DIR)
        tokenizer_files = [FileEntry.of(stage, p.relative_to(stage).as_posix()) for p in sorted((stage / TOKENIZER_DIR).iterdir())]
        # The frozen encoder as a Hugging Face folder: what the PyTorch backend (ARM boards without ORT training) loads.
        encoder.save_pretrained(stage / ENCODER_DIR, safe_serialization=True)
        preprocessor.save_pretrained(stage / ENCODER_DIR)
        encoder_files = [FileEntry.of(stage, p.relative_to(stage).as_posix()) for p in sorted((stage / ENCODER_DIR).iterdir())]

        tiers: dict[int, Tier] = {}
        reports: list[TierReport] = []
        for slots in opts.tiers:
            progress(f"tier {slots}: exporting training artifacts")
            start = time.perf_counter()
            model = _model(encoder, arch, opts, slots, len(labels))
            model.load_global(pool)
            tier_rel = f"tiers/t{slots}"
            inputs = example_inputs(model, 2, min(16, opts.max_seq_len), image_size)
            paths = generate_tier_artifacts(model, inputs, stage / tier_rel)
            export_s = time.perf_counter() - start
            measured = None
            if opts.measure:
                progress(f"tier {slots}: measuring step time and peak memory")
                measured = _measure(stage / tier_rel, opts, model, image_size)
            n_params = sum(p.numel() for _, p in model.trainable_named_parameters())
            files = {k: FileEntry.of(stage, p.relative_to(stage).as_posix()) for k, p in paths.items()}
            is_moe = isinstance(model, FFTMoEModel)
            rank = None if is_moe else model.rank
            tiers[slots] = Tier(
                slots=slots, top_k=model.top_k if is_moe else 1, files=files,
                slot_params=model.slot_params() if is_moe else [], router_params=model.router_params() if is_moe else [],
                head_params=model.head_params(), trainable_params=n_params, trainable_bytes=4 * n_params, measured=measured,
                rank=rank, lora_params=[] if is_moe else model.lora_params(),
            )  # fmt: skip
            reports.append(
                TierReport(
                    slots=slots, top_k=tiers[slots].top_k, trainable_params=n_params, rank=rank,
                    artifact_mb=sum(f.size for f in files.values()) / 1e6, export_s=export_s,
                    step_time_s=measured.step_time_s if measured else None,
                    peak_rss_mb=measured.peak_rss_mb if measured else None,
                )  # fmt: skip
            )
            del model

        progress("exporting the inference model")
        inference_files = _write_inference(stage, encoder, preprocessor, arch, opts, labels, pool, image_size)
        if opts.lora is not None:
            from exporter.lora import lora_info

            method, lora = opts.lora.method, lora_info(opts.lora)
            experts, width, top_k, aux = 1, opts.lora.max_rank, 1, (0.0, 0.0)
        else:
            a = opts.adapter
            method, lora, experts, width, top_k, aux = "fftmoe", None, a.num_experts, a.expert_dim, a.top_k, (a.aux_alpha, a.aux_beta)
        moe_rules = {} if opts.lora is not None else {"balance_loss": opts.adapter.balance_loss, "adapter_placement": opts.adapter.placement}
        manifest = Manifest(
            model=model_info, labels=labels, max_seq_len=opts.max_seq_len, method=method, lora=lora,
            num_experts=experts, expert_dim=width, top_k=top_k, aux_alpha=aux[0], aux_beta=aux[1], pooling=arch.pooling, opset=OPSET,
            tiers=tiers, global_pool=FileEntry.of(stage, GLOBAL_POOL_FILE), **moe_rules,
            inference_model=FileEntry.of(stage, f"{INFERENCE_DIR}/model.onnx"),
            tokenizer_files=tokenizer_files, inference_files=inference_files, encoder_files=encoder_files,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), fftmoe_version=_version(),
        )  # fmt: skip
        manifest.save(stage)
        progress("moving the bundle into place")
        _move_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest, reports


def _move_into_place(stage: Path, out: Path) -> None:
    """Rename the finished stage to ``out``; an old ``out`` is set aside first and deleted only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
