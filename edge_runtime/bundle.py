"""The bundle format: one folder written by ``fftmoe-export``, read by the edge runtime and the coordinator.

This module is the only definition of the format (documented in ``docs/bundle-format.md``). It lives in the
edge runtime because every install of fftmoe has the edge runtime, and it imports nothing heavier than the
standard library, so the coordinator and the exporter read it too.

A bundle folder holds::

    manifest.json                      this module's Manifest, versioned and validated on read
    tokenizer/...                      the encoder's tokenizer files (text models)
    global_pool.safetensors            the initial global experts, router and head (names: global_*_key), or for a
                                       LoRA baseline the global adapter at the largest rank and the head
    tiers/t{N}/training_model.onnx     ONNX Runtime training artifacts of tier N
    tiers/t{N}/eval_model.onnx
    tiers/t{N}/optimizer_model.onnx
    tiers/t{N}/checkpoint
    inference/model.onnx               the initial global model for inference (+ config.json for optimum)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "fftmoe-bundle"
FORMAT_VERSION = 2
"""2 (2026-12-02): the training and eval models also output ``features``, the pooled representation the head reads, and
take ``logit_adjustment`` [C], added to the logits inside the cross-entropy (zeros: the plain loss)."""
MANIFEST_NAME = "manifest.json"

EXPERT_TENSORS = ("w1", "b1", "w2", "b2")
"""Tensors of one expert: ``w1`` [d, r], ``b1`` [r], ``w2`` [r, d], ``b2`` [d]; E(h) = gelu(h w1 + b1) w2 + b2."""
ROUTER_TENSORS = ("weight", "bias")
"""Tensors of a router: ``weight`` [slots, d], ``bias`` [slots]; one row per expert (slot)."""
LORA_MATRICES = ("A", "B")
"""Matrices of a LoRA adapter on a linear module: ``A`` [rank, in], ``B`` [out, rank]; delta W = scale * B A."""
METHODS = ("fftmoe", "fedit", "hetlora")
"""What a bundle's tiers train: FFT-MoE experts; or PEFT LoRA, one rank for every tier (FedIT, merged by FedAvg) or a
rank per tier (HetLoRA, zero-padded and merged with sparsity weights, truncated back to each tier's rank)."""
LORA_METHODS = ("fedit", "hetlora")
HEAD_TENSORS = ("weight", "bias")
"""Tensors of the classification head: ``weight`` [num_labels, d], ``bias`` [num_labels]."""
TIER_FILE_NAMES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}
"""The files of one tier (what ``onnxruntime.training.artifacts.generate_artifacts`` writes), by role."""
TIER_FILES = tuple(TIER_FILE_NAMES)

# Inputs of the training and eval models, in order. Text encoders take input_ids + attention_mask,
# vision encoders take pixel_values. Every model also takes labels, the routing target q and the logit adjustment.
TEXT_INPUTS = ("input_ids", "attention_mask")
VISION_INPUTS = ("pixel_values",)
COMMON_INPUTS = ("labels", "routing_target", "logit_adjustment")
# Outputs of the training and eval models, in order (the first one is the loss that is differentiated).
OUTPUTS = ("loss", "logits", "ce_loss", "aux_balance", "aux_hetero", "route_counts", "route_prob_sum", "features")


def tier_file_paths(tier_dir: Path) -> dict[str, Path]:
    """Paths of a tier's artifact files inside ``tier_dir``, by role (``training_model``, ...)."""
    return {role: Path(tier_dir) / name for role, name in TIER_FILE_NAMES.items()}


def global_expert_key(layer: int, expert: int, tensor: str) -> str:
    """Name of one global expert tensor in ``global_pool.safetensors``."""
    return f"layers.{layer}.experts.{expert}.{tensor}"


def global_router_key(layer: int, tensor: str) -> str:
    """Name of a global router tensor (all M rows) in ``global_pool.safetensors``."""
    return f"layers.{layer}.router.{tensor}"


def global_lora_key(module: str, matrix: str) -> str:
    """Name of a global LoRA matrix (``A`` [R, in] or ``B`` [out, R] at the largest rank R) of one encoder module."""
    return f"lora.{module}.{matrix}"


def global_head_key(tensor: str) -> str:
    """Name of a head tensor in ``global_pool.safetensors``."""
    return f"head.{tensor}"


class BundleError(Exception):
    """A bundle cannot be used; the message names the file and what is wrong with it."""


class ManifestError(BundleError):
    """``manifest.json`` is missing, unreadable, of another version, or has a malformed field."""


class IntegrityError(BundleError):
    """A file of the bundle is missing or its size or sha256 differs from the manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Validation helpers: every error names the manifest field at fault.


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise ManifestError(f"manifest field '{where}' must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise ManifestError(f"manifest field '{where}.{key}' is missing" if where else f"manifest field '{key}' is missing")
    value = obj[key]
    name = f"{where}.{key}" if where else key
    # bool is an int in Python; a field that wants a number must not accept true/false.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ManifestError(f"manifest field '{name}' must be {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ManifestError(f"manifest field '{name}' must be {_kind_name(kind)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ManifestError(f"manifest field '{name}' must be finite, got {value}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


POOLINGS = ("mean", "mean-l2", "cls")
"""The manifest's ``pooling`` values: how the head's input is pooled from the last hidden states: the mean over real
tokens, that mean scaled to unit L2 norm (as sentence-transformers' MiniLM pipeline ends), or the first token
(``fftmoe-export --pooling``; re-exported by ``exporter.model``)."""
BALANCE_LOSSES = ("switch", "switch-soft")
"""The manifest's ``balance_loss`` values (``exporter.config.BALANCE_LOSSES``)."""
PLACEMENTS = ("post-ln", "pre-ln")
"""The manifest's ``adapter_placement`` values (``exporter.config.PLACEMENTS``)."""


def _choice(d: dict[str, Any], key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    """A string field of the manifest that must be one of ``allowed``; ``default`` when absent (required if None)."""
    if key not in d and default is not None:
        return default
    value = _get(d, key, str, "")
    if value not in allowed:
        raise ManifestError(f"manifest field {key!r} is {value!r}, not one of {', '.join(allowed)}")
    return value


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise ManifestError(f"manifest field '{name}' must be >= 1, got {value}")
    return value


def _safe_relpath(value: str, name: str) -> str:
    p = Path(value)
    if p.is_absolute() or ".." in p.parts or value == "":
        raise ManifestError(f"manifest field '{name}' must be a relative path inside the bundle, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle: path relative to the bundle folder, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, bundle_dir: Path, relpath: str) -> FileEntry:
        full = bundle_dir / relpath
        return cls(path=relpath, sha256=sha256_file(full), size=full.stat().st_size)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        path = _safe_relpath(_get(d, "path", str, where), f"{where}.path")
        sha = _get(d, "sha256", str, where)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(f"manifest field '{where}.sha256' must be 64 lowercase hex digits, got {sha!r}")
        size = _get(d, "size", int, where)
        if size < 0:
            raise ManifestError(f"manifest field '{where}.size' must be >= 0, got {size}")
        return cls(path=path, sha256=sha, size=size)


@dataclass(frozen=True)
class SlotParam:
    """One trainable tensor of a tier's expert slot: the ONNX parameter name and where it belongs."""

    name: str
    layer: int
    slot: int
    tensor: str  # one of EXPERT_TENSORS


@dataclass(frozen=True)
class NamedParam:
    """A trainable router or head tensor: ONNX parameter name, layer (-1 for the head) and tensor kind."""

    name: str
    layer: int
    tensor: str


@dataclass(frozen=True)
class LoraParam:
    """A trainable LoRA matrix of a tier: ONNX parameter name, encoder module, ``A`` or ``B``, shape at the tier's rank."""

    name: str
    module: str
    matrix: str  # one of LORA_MATRICES
    shape: tuple[int, int]


@dataclass(frozen=True)
class LoraInfo:
    """The LoRA adapter of a baseline bundle (PEFT's LoraConfig): where it sits and how it is scaled."""

    target_modules: list[str]
    """PEFT ``target_modules``: names of the encoder's linear modules that get an adapter."""
    max_rank: int
    """The largest rank of any tier: the rank of the global adapter the coordinator keeps."""
    scale: float
    """lora_alpha / rank, the same for every tier, so truncating the rank keeps the other components' meaning."""


@dataclass(frozen=True)
class Measurement:
    """Step time and peak resident memory of a few ORT training steps, measured on the exporting machine."""

    batch_size: int
    seq_len: int
    threads: int
    steps: int
    step_time_s: float
    peak_rss_mb: float
    machine: str
    import_rss_mb: float | None = None
    """Resident memory after importing the runtime, before loading the tier (the interpreter + ORT's core)."""
    load_rss_mb: float | None = None
    """Resident memory after loading the training, eval and optimizer sessions, before the first step."""
    compute_gflops: float | None = None
    """fp32 matrix-multiply rate of the measuring machine (edge_runtime.profile.measure_gflops), to scale step times."""
    torch_loaded: bool = False
    """Whether torch was in the measuring process (it must not be: a device never loads it for ORT training)."""


@dataclass(frozen=True)
class Tier:
    """One expert-budget tier: ``slots`` experts per layer held and trained on the device."""

    slots: int
    top_k: int
    files: dict[str, FileEntry]
    slot_params: list[SlotParam]
    router_params: list[NamedParam]
    head_params: list[NamedParam]
    trainable_params: int
    trainable_bytes: int
    measured: Measurement | None = None
    rank: int | None = None
    """LoRA baselines: the rank this tier trains (None for FFT-MoE)."""
    lora_params: list[LoraParam] = field(default_factory=list)
    """LoRA baselines: the tier's A and B matrices (empty for FFT-MoE)."""

    @property
    def trainable_names(self) -> list[str]:
        return ([p.name for p in self.slot_params] + [p.name for p in self.router_params] + [p.name for p in self.lora_params]
                + [p.name for p in self.head_params])  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """The frozen encoder: where it came from, its architecture and a hash of its weights."""

    source: str
    model_type: str
    modality: str  # "text" or "vision"
    hidden_size: int
    num_layers: int
    sha256: str
    image_size: int | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything a device or the coordinator needs to know about a bundle (``manifest.json``)."""

    model: ModelInfo
    labels: list[str]
    max_seq_len: int
    num_experts: int
    expert_dim: int
    top_k: int
    aux_alpha: float
    aux_beta: float
    pooling: str
    opset: int
    tiers: dict[int, Tier]
    global_pool: FileEntry
    inference_model: FileEntry
    tokenizer_files: list[FileEntry] = field(default_factory=list)
    inference_files: list[FileEntry] = field(default_factory=list)
    encoder_files: list[FileEntry] = field(default_factory=list)
    """The frozen encoder as a Hugging Face folder (``encoder/``), for the PyTorch backend; ORT devices skip it."""
    created: str = ""
    fftmoe_version: str = ""
    method: str = "fftmoe"
    """One of METHODS. For the LoRA baselines num_experts and top_k are 1 (one global adapter that every token
    uses) and expert_dim is the largest rank; bundles written before the baselines existed are ``fftmoe``."""
    lora: LoraInfo | None = None
    balance_loss: str = "switch"
    """FFT-MoE's load-balance rule, one of ``BALANCE_LOSSES`` (``fftmoe-export --balance-loss``); written only
    when not ``switch``, and a missing field reads as ``switch`` (the rule of every bundle before it existed)."""
    adapter_placement: str = "post-ln"
    """Where each block's adapter adds its output, one of ``PLACEMENTS`` (``fftmoe-export --adapter-placement``);
    written only when not ``post-ln``, and a missing field reads as ``post-ln``."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def input_names(self) -> tuple[str, ...]:
        """Inputs of the training and eval models, in order."""
        return (TEXT_INPUTS if self.model.modality == "text" else VISION_INPUTS) + COMMON_INPUTS

    @property
    def is_lora(self) -> bool:
        return self.method in LORA_METHODS

    def route_width(self, slots: int) -> int:
        """Width of a tier's routing target and statistics: its slots for FFT-MoE, 1 for a LoRA adapter."""
        return 1 if self.is_lora else slots

    def tier(self, slots: int) -> Tier:
        if slots not in self.tiers:
            raise BundleError(f"the bundle has no tier {slots}; it has tiers {sorted(self.tiers)}")
        return self.tiers[slots]

    def all_files(self) -> list[FileEntry]:
        files = [self.global_pool, self.inference_model, *self.tokenizer_files, *self.inference_files, *self.encoder_files]
        for tier in self.tiers.values():
            files.extend(tier.files.values())
        return files

    # -- serialisation -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiers"] = {str(k): asdict(v) for k, v in sorted(self.tiers.items())}
        for key, default in (("balance_loss", "switch"), ("adapter_placement", "post-ln")):
            if d[key] == default:  # the defaults are left out, so manifests (and manifest ids) stay as before
                del d[key]
        if not self.is_lora:  # FFT-MoE manifests are written (and hashed: manifest_id) as before the baselines existed
            del d["method"], d["lora"]
            for tier in d["tiers"].values():
                del tier["rank"], tier["lora_params"]
        # Put the identification first so a person reading the file sees it at once.
        head = {"format": d.pop("format"), "format_version": d.pop("format_version")}
        return {**head, **d}

    def save(self, bundle_dir: Path) -> Path:
        path = bundle_dir / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(d).__name__}")
        fmt = _get(d, "format", str, "")
        if fmt != FORMAT_NAME:
            raise ManifestError(f"manifest field 'format' must be {FORMAT_NAME!r}, got {fmt!r}: not an fftmoe bundle")
        version = _get(d, "format_version", int, "")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"bundle format version {version} is not supported by this fftmoe (it reads version {FORMAT_VERSION}); "
                "re-export the bundle with this version of fftmoe-export"
            )
        m = _get(d, "model", dict, "")
        modality = _get(m, "modality", str, "model")
        if modality not in ("text", "vision"):
            raise ManifestError(f"manifest field 'model.modality' must be 'text' or 'vision', got {modality!r}")
        image_size = m.get("image_size")
        if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1):
            raise ManifestError(f"manifest field 'model.image_size' must be a positive integer or null, got {image_size!r}")
        model = ModelInfo(
            source=_get(m, "source", str, "model"),
            model_type=_get(m, "model_type", str, "model"),
            modality=modality,
            hidden_size=_positive(_get(m, "hidden_size", int, "model"), "model.hidden_size"),
            num_layers=_positive(_get(m, "num_layers", int, "model"), "model.num_layers"),
            sha256=_get(m, "sha256", str, "model"),
            image_size=image_size,
        )
        labels = _get(d, "labels", list, "")
        if len(labels) < 2 or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
            raise ManifestError("manifest field 'labels' must be a list of at least 2 distinct strings")
        num_experts = _positive(_get(d, "num_experts", int, ""), "num_experts")
        top_k = _positive(_get(d, "top_k", int, ""), "top_k")
        method = _get(d, "method", str, "") if "method" in d else "fftmoe"
        if method not in METHODS:
            raise ManifestError(f"manifest field 'method' must be one of {', '.join(METHODS)}, got {method!r}")
        lora = None
        if method in LORA_METHODS:
            raw = _get(d, "lora", dict, "")
            targets = _get(raw, "target_modules", list, "lora")
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ManifestError("manifest field 'lora.target_modules' must be a non-empty list of module names")
            scale = float(_get(raw, "scale", (int, float), "lora"))
            if scale <= 0:
                raise ManifestError(f"manifest field 'lora.scale' must be > 0, got {scale}")
            lora = LoraInfo(list(targets), _positive(_get(raw, "max_rank", int, "lora"), "lora.max_rank"), scale)
        tiers_raw = _get(d, "tiers", dict, "")
        if not tiers_raw:
            raise ManifestError("manifest field 'tiers' must hold at least one tier")
        tiers: dict[int, Tier] = {}
        for key, raw in tiers_raw.items():
            if not key.isdigit():
                raise ManifestError(f"manifest field 'tiers' has key {key!r}; tier keys are expert counts such as '2'")
            tiers[int(key)] = _tier_from_dict(raw, f"tiers.{key}", model.num_layers, num_experts, lora)
            if tiers[int(key)].slots != int(key):
                raise ManifestError(f"manifest field 'tiers.{key}.slots' is {tiers[int(key)].slots}, expected {key}")
        return cls(
            model=model,
            labels=list(labels),
            max_seq_len=_positive(_get(d, "max_seq_len", int, ""), "max_seq_len"),
            num_experts=num_experts,
            expert_dim=_positive(_get(d, "expert_dim", int, ""), "expert_dim"),
            top_k=top_k,
            aux_alpha=float(_get(d, "aux_alpha", (int, float), "")),
            aux_beta=float(_get(d, "aux_beta", (int, float), "")),
            pooling=_choice(d, "pooling", POOLINGS),
            opset=_get(d, "opset", int, ""),
            tiers=tiers,
            global_pool=FileEntry.from_dict(_get(d, "global_pool", dict, ""), "global_pool"),
            inference_model=FileEntry.from_dict(_get(d, "inference_model", dict, ""), "inference_model"),
            tokenizer_files=[
                FileEntry.from_dict(x, f"tokenizer_files[{i}]") for i, x in enumerate(_get(d, "tokenizer_files", list, ""))
            ],
            inference_files=[
                FileEntry.from_dict(x, f"inference_files[{i}]") for i, x in enumerate(_get(d, "inference_files", list, ""))
            ],
            encoder_files=[  # optional: bundles written before the PyTorch backend existed lack it
                FileEntry.from_dict(x, f"encoder_files[{i}]") for i, x in enumerate(_get(d, "encoder_files", list, "") if "encoder_files" in d else [])
            ],
            created=str(d.get("created", "")),
            fftmoe_version=str(d.get("fftmoe_version", "")),
            method=method,
            lora=lora,
            balance_loss=_choice(d, "balance_loss", BALANCE_LOSSES, "switch"),
            adapter_placement=_choice(d, "adapter_placement", PLACEMENTS, "post-ln"),
        )


def _tier_from_dict(d: Any, where: str, num_layers: int, num_experts: int, lora: LoraInfo | None = None) -> Tier:
    slots = _positive(_get(d, "slots", int, where), f"{where}.slots")
    if lora is None and slots > num_experts:
        raise ManifestError(f"manifest field '{where}.slots' is {slots}, more than num_experts={num_experts}")
    files_raw = _get(d, "files", dict, where)
    files = {}
    for key in TIER_FILES:
        files[key] = FileEntry.from_dict(_get(files_raw, key, dict, f"{where}.files"), f"{where}.files.{key}")
    slot_params = []
    for i, p in enumerate(_get(d, "slot_params", list, where)):
        w = f"{where}.slot_params[{i}]"
        sp = SlotParam(_get(p, "name", str, w), _get(p, "layer", int, w), _get(p, "slot", int, w), _get(p, "tensor", str, w))
        if not (0 <= sp.layer < num_layers and 0 <= sp.slot < slots and sp.tensor in EXPERT_TENSORS):
            raise ManifestError(f"manifest field '{w}' points at layer {sp.layer}, slot {sp.slot}, tensor {sp.tensor!r}: out of range")
        slot_params.append(sp)
    rank, lora_params = None, []
    if lora is not None and slot_params:
        raise ManifestError(f"manifest field '{where}.slot_params' must be empty in a LoRA bundle")
    if lora is not None:
        rank = _positive(_get(d, "rank", int, where), f"{where}.rank")
        if rank > lora.max_rank:
            raise ManifestError(f"manifest field '{where}.rank' is {rank}, more than lora.max_rank={lora.max_rank}")
        for i, p in enumerate(_get(d, "lora_params", list, where)):
            w = f"{where}.lora_params[{i}]"
            shape = _get(p, "shape", list, w)
            lp = LoraParam(_get(p, "name", str, w), _get(p, "module", str, w), _get(p, "matrix", str, w), tuple(shape))
            rank_axis = 0 if lp.matrix == "A" else 1
            if lp.matrix not in LORA_MATRICES or len(shape) != 2 or not all(isinstance(x, int) and x > 0 for x in shape) or shape[rank_axis] != rank:
                raise ManifestError(f"manifest field '{w}': matrix {lp.matrix!r} of shape {shape} does not fit rank {rank}")
            lora_params.append(lp)
        if not lora_params:
            raise ManifestError(f"manifest field '{where}.lora_params' is empty: a LoRA tier trains at least one matrix")
    elif len(slot_params) != num_layers * slots * len(EXPERT_TENSORS):
        raise ManifestError(
            f"manifest field '{where}.slot_params' has {len(slot_params)} entries, "
            f"expected {num_layers} layers x {slots} slots x {len(EXPERT_TENSORS)} tensors"
        )
    router_params = [_named_from_dict(p, f"{where}.router_params[{i}]") for i, p in enumerate(_get(d, "router_params", list, where))]
    head_params = [_named_from_dict(p, f"{where}.head_params[{i}]") for i, p in enumerate(_get(d, "head_params", list, where))]
    names = [p.name for p in slot_params] + [p.name for p in router_params] + [p.name for p in lora_params] + [p.name for p in head_params]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest field '{where}' names a trainable parameter twice")
    measured_raw = d.get("measured")
    measured = None
    if measured_raw is not None:
        w = f"{where}.measured"
        measured = Measurement(
            batch_size=_get(measured_raw, "batch_size", int, w),
            seq_len=_get(measured_raw, "seq_len", int, w),
            threads=_get(measured_raw, "threads", int, w),
            steps=_get(measured_raw, "steps", int, w),
            step_time_s=float(_get(measured_raw, "step_time_s", (int, float), w)),
            peak_rss_mb=float(_get(measured_raw, "peak_rss_mb", (int, float), w)),
            machine=_get(measured_raw, "machine", str, w),
            import_rss_mb=_optional_float(measured_raw, "import_rss_mb", w),
            load_rss_mb=_optional_float(measured_raw, "load_rss_mb", w),
            compute_gflops=_optional_float(measured_raw, "compute_gflops", w),
            torch_loaded=bool(measured_raw.get("torch_loaded", False)),
        )
    return Tier(
        slots=slots,
        top_k=_positive(_get(d, "top_k", int, where), f"{where}.top_k"),
        files=files,
        slot_params=slot_params,
        router_params=router_params,
        head_params=head_params,
        trainable_params=_get(d, "trainable_params", int, where),
        trainable_bytes=_get(d, "trainable_bytes", int, where),
        measured=measured,
        rank=rank,
        lora_params=lora_params,
    )


def _optional_float(d: dict[str, Any], key: str, where: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ManifestError(f"manifest field '{where}.{key}' must be a number, got {type(value).__name__}")
    return float(value)


def _named_from_dict(p: Any, where: str) -> NamedParam:
    return NamedParam(_get(p, "name", str, where), _get(p, "layer", int, where), _get(p, "tensor", str, where))


# --------------------------------------------------------------------------------------------------------------
# Reading and verifying a bundle folder


def load_manifest(bundle_dir: Path | str) -> Manifest:
    """Read and validate ``manifest.json`` of a bundle folder; raises ManifestError naming the problem."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise ManifestError(f"{bundle_dir}: not a folder; expected a bundle written by fftmoe-export")
    if not path.is_file():
        raise ManifestError(f"{path}: missing; {bundle_dir} is not an fftmoe bundle (run fftmoe-export --out {bundle_dir})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return Manifest.from_dict(raw)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc


def verify_files(bundle_dir: Path | str, entries: list[FileEntry]) -> None:
    """Check that each file exists with the size and sha256 the manifest records; raise IntegrityError if not."""
    bundle_dir = Path(bundle_dir)
    for entry in entries:
        full = bundle_dir / entry.path
        if not full.is_file():
            raise IntegrityError(f"{full}: missing (the manifest lists it)")
        size = full.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{full}: {size} bytes, the manifest says {entry.size}: truncated or replaced")
        actual = sha256_file(full)
        if actual != entry.sha256:
            raise IntegrityError(f"{full}: sha256 {actual} differs from the manifest's {entry.sha256}: the file was changed")


BACKEND_NAMES = ("ort", "torch")
"""The training backends a device may run: ONNX Runtime on the tier's artifacts, or PyTorch on ``encoder/``."""


def needed_files(manifest: Manifest, slots: int, backend: str) -> list[FileEntry]:
    """What training tier ``slots`` on ``backend`` reads: the backend's files (``backend_files``) and the tokenizer.
    A device fetches exactly these; the coordinator never sends anything else."""
    return [*backend_files(manifest, slots, backend), *manifest.tokenizer_files]


def backend_files(manifest: Manifest, slots: int, backend: str) -> list[FileEntry]:
    """The files a backend reads to train tier ``slots``: ONNX Runtime the tier's four artifacts; PyTorch the
    ``encoder/`` folder, from which it builds the tier itself (it reads none of the ORT artifacts, which for MiniLM
    are about as large as the encoder again: a board on the PyTorch backend need not download them)."""
    if backend == "torch":
        return list(manifest.encoder_files)
    return list(manifest.tier(slots).files.values())


def verify_bundle(bundle_dir: Path | str, tiers: list[int] | None = None, encoder: bool = True) -> Manifest:
    """Validate the manifest and verify the hashes of the shared files and of the given tiers (all if None).

    ``encoder=False`` skips the ``encoder/`` folder, which only the PyTorch backend reads.
    """
    manifest = load_manifest(bundle_dir)
    entries = [manifest.global_pool, manifest.inference_model, *manifest.tokenizer_files, *manifest.inference_files]
    if encoder:
        entries.extend(manifest.encoder_files)
    for slots in sorted(manifest.tiers) if tiers is None else tiers:
        entries.extend(manifest.tier(slots).files.values())
    verify_files(bundle_dir, entries)
    return manifest
