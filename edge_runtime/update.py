"""The sparse update a device returns after training its tier (format ``fftmoe-update``, version 1).

Defined once here, validated on read, documented in ``docs/update-format.md``. The same object travels as a
safetensors file (standalone training, tests) and, later, inside a Flower message.

An update names global experts, not slots: slot ``j`` of layer ``l`` trained global expert ``assignment[l][j]``.

Tensors (all float32):

- ``layers.{l}.experts.{e}.{w1,b1,w2,b2}``: the trained values of each global expert ``e`` this device held;
- ``layers.{l}.router_rows.{weight,bias}``: the tier's router, ``[t, d]`` and ``[t]``; row ``j`` belongs to global
  expert ``assignment[l][j]`` (absent for a one-slot tier, whose gate is constant);
- ``head.{weight,bias}``: the classification head;
- LoRA baselines instead of experts and router rows: ``lora.{module}.{A,B}`` at the tier's rank, ``A`` [r, in] and
  ``B`` [out, r] (the assignment is ``[[0]]`` per layer: every device holds the one global adapter);
- ``stats.route_counts`` and ``stats.route_prob_sum``, ``[L, t]``: top-k assignments and summed router
  probabilities per slot over the real tokens seen in training (the routing statistics the coordinator uses).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import (
    EXPERT_TENSORS,
    HEAD_TENSORS,
    ROUTER_TENSORS,
    BundleError,
    Manifest,
    global_expert_key,
    global_head_key,
    global_lora_key,
    global_router_key,
)

UPDATE_FORMAT = "fftmoe-update"
UPDATE_VERSION = 1
MAX_METRIC = 1e30
"""The largest magnitude a metric may have: metrics are weighed by example counts and summed, and 1e30 x 2**53 is
still far inside a float64 (``10**308`` once overflowed the round's mean training loss)."""
MAX_COUNT = 2**53
"""The largest example or token count an update or message may carry: the largest integer a float64 holds exactly
(counts are weighed and summed as floats; ``10**309`` would overflow)."""


class UpdateError(BundleError):
    """An update is malformed or does not fit the bundle; the message names the field or tensor at fault."""


def manifest_id(manifest: Manifest) -> str:
    """A short, stable identifier of a bundle: sha256 of its canonical manifest JSON (16 hex digits)."""
    canonical = json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def router_rows_key(layer: int, tensor: str) -> str:
    """Name of a tier router tensor in an update (rows follow the layer's assignment)."""
    return f"layers.{layer}.router_rows.{tensor}"


def default_assignment(manifest: Manifest, slots: int) -> list[list[int]]:
    """Slot j of every layer <- global expert j (what standalone training uses); ``[[0]]`` per layer for LoRA."""
    return [list(range(manifest.route_width(slots))) for _ in range(manifest.num_layers)]


def check_assignment(manifest: Manifest, slots: int, assignment: Any) -> list[list[int]]:
    """Validate an assignment (one list of ``slots`` distinct global expert ids per layer) and return it."""
    if not isinstance(assignment, (list, tuple)) or len(assignment) != manifest.num_layers:
        raise UpdateError(f"assignment must have one list per layer ({manifest.num_layers}), got {assignment!r:.80}")
    out = []
    width = manifest.route_width(slots)
    for layer, ids in enumerate(assignment):
        ids = [int(i) for i in ids]
        if len(ids) != width or len(set(ids)) != width or not all(0 <= i < manifest.num_experts for i in ids):
            raise UpdateError(
                f"assignment of layer {layer} is {ids}: it must name {width} distinct experts in 0..{manifest.num_experts - 1}"
            )
        out.append(ids)
    return out


def tier_values_from_pool(
    manifest: Manifest, slots: int, pool: dict[str, np.ndarray], assignment: list[list[int]]
) -> dict[str, np.ndarray]:
    """The values of a tier's trainable parameters (by ONNX name) from a global pool and an assignment."""
    tier = manifest.tier(slots)
    out: dict[str, np.ndarray] = {}
    for p in tier.slot_params:
        out[p.name] = pool[global_expert_key(p.layer, assignment[p.layer][p.slot], p.tensor)]
    for p in tier.lora_params:  # HetLoRA's truncation: the first r rows of A, the first r columns of B
        full = pool[global_lora_key(p.module, p.matrix)]
        out[p.name] = full[: p.shape[0]] if p.matrix == "A" else full[:, : p.shape[1]]
    for p in tier.router_params:
        out[p.name] = np.ascontiguousarray(pool[global_router_key(p.layer, p.tensor)][assignment[p.layer]])
    for p in tier.head_params:
        out[p.name] = pool[global_head_key(p.tensor)]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def tier_values_to_global(
    manifest: Manifest, slots: int, assignment: list[list[int]], values: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A tier's values (by ONNX name) under the update format's global names: assigned experts, router rows, head."""
    tier = manifest.tier(slots)
    out: dict[str, np.ndarray] = {}
    for p in tier.slot_params:
        out[global_expert_key(p.layer, assignment[p.layer][p.slot], p.tensor)] = values[p.name]
    for p in tier.lora_params:
        out[global_lora_key(p.module, p.matrix)] = values[p.name]
    for p in tier.router_params:
        out[router_rows_key(p.layer, p.tensor)] = values[p.name]
    for p in tier.head_params:
        out[global_head_key(p.tensor)] = values[p.name]
    return out


def tier_values_from_global(
    manifest: Manifest, slots: int, assignment: list[list[int]], values: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The inverse of ``tier_values_to_global``: global names -> the tier's parameter names. Raises UpdateError
    naming the first tensor that ``values`` lacks."""
    tier = manifest.tier(slots)
    out: dict[str, np.ndarray] = {}
    for params, key in ((tier.slot_params, lambda p: global_expert_key(p.layer, assignment[p.layer][p.slot], p.tensor)),
                        (tier.router_params, lambda p: router_rows_key(p.layer, p.tensor)),
                        (tier.lora_params, lambda p: global_lora_key(p.module, p.matrix)),
                        (tier.head_params, lambda p: global_head_key(p.tensor))):  # fmt: skip
        for p in params:
            name = key(p)
            if name not in values:
                raise UpdateError(f"tensor {name!r} is missing for tier {slots} with assignment {assignment}")
            out[p.name] = values[name]
    return out


def _finite(v: int | float) -> bool:
    """A metric usable as a float: finite, and (for an int) not too large to convert."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


@dataclass
class Update:
    """What one device sends back after a training session on its tier."""

    manifest_id: str
    tier: int
    assignment: list[list[int]]
    num_examples: int
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    format: str = UPDATE_FORMAT
    format_version: int = UPDATE_VERSION

    # -- building ----------------------------------------------------------------------------------------------

    @classmethod
    def from_tier_values(
        cls,
        manifest: Manifest,
        slots: int,
        assignment: list[list[int]],
        values: dict[str, np.ndarray],
        num_examples: int,
        route_counts: np.ndarray,
        route_prob_sum: np.ndarray,
        metrics: dict[str, float] | None = None,
    ) -> Update:
        """Map a tier's trained values (by ONNX name) back to global expert ids."""
        tensors = tier_values_to_global(manifest, slots, assignment, values)
        tensors["stats.route_counts"] = np.asarray(route_counts, np.float32)
        tensors["stats.route_prob_sum"] = np.asarray(route_prob_sum, np.float32)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
        return cls(manifest_id(manifest), slots, assignment, int(num_examples), tensors, dict(metrics or {}))

    # -- reading the content -----------------------------------------------------------------------------------

    @property
    def route_counts(self) -> np.ndarray:
        return self.tensors["stats.route_counts"]

    @property
    def route_prob_sum(self) -> np.ndarray:
        return self.tensors["stats.route_prob_sum"]

    def expert_tensors(self) -> dict[tuple[int, int], dict[str, np.ndarray]]:
        """``{(layer, global expert): {tensor: value}}``."""
        out: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for layer, ids in enumerate(self.assignment):
            for e in ids:
                out[(layer, e)] = {t: self.tensors[global_expert_key(layer, e, t)] for t in EXPERT_TENSORS}
        return out

    def tier_values(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """The update's tensors by the tier's parameter names: the inverse of ``from_tier_values``."""
        return tier_values_from_global(manifest, self.tier, self.assignment, self.tensors)

    def meta(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "manifest_id": self.manifest_id,
            "tier": self.tier,
            "assignment": self.assignment,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
        }

    # -- validation --------------------------------------------------------------------------------------------

    def expected_shapes(self, manifest: Manifest) -> dict[str, tuple[int, ...]]:
        d, r, n_layers = manifest.hidden_size, manifest.expert_dim, manifest.num_layers
        t = manifest.route_width(self.tier)  # slots of an MoE tier; 1 for LoRA: the adapter every token uses
        out: dict[str, tuple[int, ...]] = {}
        if manifest.is_lora:
            for p in manifest.tier(self.tier).lora_params:
                out[global_lora_key(p.module, p.matrix)] = tuple(p.shape)
        else:
            shapes = {"w1": (d, r), "b1": (r,), "w2": (r, d), "b2": (d,)}
            for layer, ids in enumerate(self.assignment):
                for e in ids:
                    for tensor in EXPERT_TENSORS:
                        out[global_expert_key(layer, e, tensor)] = shapes[tensor]
                if t > 1:
                    out[router_rows_key(layer, "weight")] = (t, d)
                    out[router_rows_key(layer, "bias")] = (t,)
        out[global_head_key("weight")] = (len(manifest.labels), d)
        out[global_head_key("bias")] = (len(manifest.labels),)
        out["stats.route_counts"] = (n_layers, t)
        out["stats.route_prob_sum"] = (n_layers, t)
        return out

    def validate(self, manifest: Manifest, expected_assignment: list[list[int]] | None = None) -> Update:
        """Raise UpdateError naming the first problem; return self when the update fits ``manifest``."""
        if self.format != UPDATE_FORMAT or self.format_version != UPDATE_VERSION:
            raise UpdateError(
                f"update is {self.format!r} version {self.format_version}; this fftmoe reads {UPDATE_FORMAT!r} version {UPDATE_VERSION}"
            )
        if self.manifest_id != manifest_id(manifest):
            raise UpdateError(f"update was made for bundle {self.manifest_id}, not this bundle {manifest_id(manifest)}")
        if self.tier not in manifest.tiers:
            raise UpdateError(f"update is for tier {self.tier}; the bundle has tiers {sorted(manifest.tiers)}")
        check_assignment(manifest, self.tier, self.assignment)
        if expected_assignment is not None and [list(map(int, a)) for a in expected_assignment] != self.assignment:
            raise UpdateError(f"update trained experts {self.assignment}, but this device was assigned {expected_assignment}")
        if not isinstance(self.num_examples, int) or isinstance(self.num_examples, bool) or not 1 <= self.num_examples <= MAX_COUNT:
            shown = self.num_examples if not isinstance(self.num_examples, int) or self.num_examples < 10**20 else f"an integer of {len(str(self.num_examples))} digits"
            raise UpdateError(f"update field 'num_examples' must be an integer in [1, 2**53], got {shown!r}")
        expected = self.expected_shapes(manifest)
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing:
            raise UpdateError(f"update lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            raise UpdateError(f"update has tensor(s) not assigned to this device: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, shape in expected.items():
            value = self.tensors[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                raise UpdateError(f"update tensor {name!r} must be float32, got {getattr(value, 'dtype', type(value).__name__)}")
            if value.shape != shape:
                raise UpdateError(f"update tensor {name!r} has shape {list(value.shape)}, expected {list(shape)}")
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                raise UpdateError(f"update tensor {name!r} has {bad} NaN or Inf value(s)")
        if (self.route_counts < 0).any() or (self.route_prob_sum < 0).any():
            raise UpdateError("update routing statistics must be >= 0")
        for k, v in self.metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not _finite(v) or abs(v) > MAX_METRIC:
                shown = f"an integer of {len(str(v))} digits" if isinstance(v, int) and abs(v) > 10**20 else repr(v)[:60]
                raise UpdateError(f"update metric {str(k)[:60]!r} must be a finite number of magnitude <= {MAX_METRIC:g}, got {shown}")
        return self

    # -- files -------------------------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write the update as one safetensors file (metadata: the JSON of ``meta()``), atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(self.tensors, str(tmp), metadata={"fftmoe_update": json.dumps(self.meta())})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Update:
        """Read an update file; the content is checked against a bundle by ``validate``."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta_raw = (f.metadata() or {}).get("fftmoe_update")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged headers
            raise UpdateError(f"{path}: not a readable update file ({exc})") from exc
        if meta_raw is None:
            raise UpdateError(f"{path}: no 'fftmoe_update' metadata; not an fftmoe update")
        try:
            meta = json.loads(meta_raw)
        except json.JSONDecodeError as exc:
            raise UpdateError(f"{path}: 'fftmoe_update' metadata is not valid JSON ({exc})") from exc
        return cls.from_parts(meta, tensors, where=str(path))

    @classmethod
    def from_parts(cls, meta: Any, tensors: dict[str, np.ndarray], where: str = "update") -> Update:
        if not isinstance(meta, dict):
            raise UpdateError(f"{where}: metadata must be an object")

        def integer(value: Any, name: str) -> int:  # strictly an integer: 1.5, true and "3" are refused, not converted
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name!r} must be an integer, got {type(value).__name__}")
            return value

        try:
            return cls(
                manifest_id=str(meta["manifest_id"]),
                tier=integer(meta["tier"], "tier"),
                assignment=[[integer(i, "assignment") for i in ids] for ids in meta["assignment"]],
                num_examples=integer(meta["num_examples"], "num_examples"),
                tensors=dict(tensors),
                metrics={str(k): v for k, v in dict(meta.get("metrics", {})).items()},
                format=str(meta["format"]),
                format_version=integer(meta["format_version"], "format_version"),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise UpdateError(f"{where}: metadata field missing or malformed: {str(exc)[:200]}") from exc
