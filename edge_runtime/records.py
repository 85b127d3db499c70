"""The contents of the Flower messages between coordinator and device (format ``fftmoe-messages``, version 1).

Defined once here, validated on read, documented in ``docs/update-format.md``:

- **train instruction** (coordinator -> device), a ``RecordDict`` with
  ``"fftmoe"``: ConfigRecord ``{"json": <meta>}``, meta = ``{format, format_version, manifest_id, round, tier,
  assignment, routing_target [L][t], train: {epochs, batch_size, learning_rate, max_steps, seed}}``;
  ``"values"``: ArrayRecord of the tier's starting tensors under the update format's global names (the assigned
  experts, router rows, head), so a device receives only what its tier needs.
- **update** (device -> coordinator): ``"fftmoe"``: ConfigRecord ``{"json": <Update.meta() + round>}``,
  ``"update"``: ArrayRecord of the ``Update``'s tensors.
- **hello** (coordinator -> device, ``query.hello``): ``{"json": {manifest_id, manifest}}``; the reply's meta holds
  the device's tier, batch size, backend, example counts and the bundle files it lacks (``missing``).
- **artifacts** (coordinator -> device, ``query.artifacts``): ``{"json": {manifest_id, chunks: [{path, offset,
  key}]}}`` and a ConfigRecord ``"chunks"`` of bytes under each chunk's key.
- **metrics** (device -> coordinator, evaluate replies): ``{"json": {round, metrics}}``.

Flower's ``Message`` wraps these; keeping the contents in plain functions lets tests check them without Flower
running (``Message`` cannot be built outside a running app).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.bundle import BundleError, Manifest
from edge_runtime.update import Update, UpdateError, manifest_id

MESSAGES_FORMAT = "fftmoe-messages"
MESSAGES_VERSION = 1
META_KEY = "fftmoe"


class MessageError(UpdateError):
    """A message's content is malformed; the message names the field."""


@dataclass
class TrainInstruction:
    manifest_id: str
    round: int
    tier: int
    assignment: list[list[int]]
    routing_target: np.ndarray  # [L, t]
    values: dict[str, np.ndarray]  # global names (update format) -> starting values
    train: dict[str, Any]


def _arrays(record: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def _meta(content: Any, where: str) -> dict[str, Any]:
    try:
        raw = json.loads(content.config_records[META_KEY]["json"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"{where}: no readable {META_KEY!r} config record ({exc})") from None
    if not isinstance(raw, dict) or raw.get("messages_format") != MESSAGES_FORMAT or raw.get("messages_version") != MESSAGES_VERSION:
        raise MessageError(f"{where}: not a {MESSAGES_FORMAT} version {MESSAGES_VERSION} message")
    return raw


def instruction_to_record(ins: TrainInstruction) -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    meta = {
        "messages_format": MESSAGES_FORMAT, "messages_version": MESSAGES_VERSION, "manifest_id": ins.manifest_id,
        "round": ins.round, "tier": ins.tier, "assignment": ins.assignment,
        "routing_target": np.asarray(ins.routing_target, np.float64).tolist(), "train": ins.train,
    }  # fmt: skip
    values = ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32)) for k, v in ins.values.items()})
    return RecordDict({META_KEY: ConfigRecord({"json": json.dumps(meta)}), "values": values})


def instruction_from_record(content: Any) -> TrainInstruction:
    meta = _meta(content, "train instruction")
    try:
        values = _arrays(content.array_records["values"])
        target = np.asarray(meta["routing_target"], np.float32)
        return TrainInstruction(str(meta["manifest_id"]), int(meta["round"]), int(meta["tier"]),
                                [[int(e) for e in row] for row in meta["assignment"]], target, values, dict(meta["train"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"train instruction: missing or malformed field ({exc})") from None


def update_to_record(update: Update, round_: int) -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    meta = {"messages_format": MESSAGES_FORMAT, "messages_version": MESSAGES_VERSION, "round": round_, "update": update.meta()}
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in update.tensors.items()})
    return RecordDict({META_KEY: ConfigRecord({"json": json.dumps(meta)}), "update": arrays})


def update_from_record(content: Any, where: str = "reply") -> tuple[Update, int]:
    """The ``Update`` and the round it answers; the update itself still needs ``Update.validate``."""
    meta = _meta(content, where)
    try:
        tensors = _arrays(content.array_records["update"])
    except KeyError:
        raise MessageError(f"{where}: no 'update' array record") from None
    if not isinstance(meta.get("round"), int):
        raise MessageError(f"{where}: 'round' must be an integer, got {meta.get('round')!r}")
    return Update.from_parts(meta.get("update"), tensors, where), meta["round"]


def _meta_record(meta: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({"json": json.dumps({"messages_format": MESSAGES_FORMAT, "messages_version": MESSAGES_VERSION, **meta})})


def hello_to_record(manifest: Manifest) -> Any:
    from flwr.app import RecordDict

    return RecordDict({META_KEY: _meta_record({"manifest_id": manifest_id(manifest), "manifest": manifest.to_dict()})})


def manifest_from_hello(content: Any) -> tuple[Manifest, str]:
    """The coordinator's manifest and its id; refused when the manifest does not hash to the id it came with."""
    meta = _meta(content, "hello")
    try:
        manifest = Manifest.from_dict(meta["manifest"])
    except (KeyError, BundleError) as exc:
        raise MessageError(f"hello: no valid manifest ({exc})") from None
    if manifest_id(manifest) != meta.get("manifest_id"):
        raise MessageError(f"hello: the manifest hashes to {manifest_id(manifest)}, not to its stated id {meta.get('manifest_id')!r}")
    return manifest, manifest_id(manifest)


def hello_reply_to_record(reply: dict[str, Any]) -> Any:
    from flwr.app import RecordDict

    return RecordDict({META_KEY: _meta_record({"reply": reply})})


def hello_reply_from_record(content: Any) -> dict[str, Any]:
    meta = _meta(content, "hello reply")
    reply = meta.get("reply")
    if not isinstance(reply, dict):
        raise MessageError("hello reply: no 'reply' object")
    return reply


def device_info_from_hello_reply(content: Any, manifest: Manifest) -> dict[str, Any]:
    """The hello reply's fields, checked: a tier of the bundle, a positive batch size, a list of bundle files."""
    reply = hello_reply_from_record(content)
    tier = reply.get("tier")
    if not isinstance(tier, int) or tier not in manifest.tiers:
        raise MessageError(f"hello reply: tier {tier!r} is not one of the bundle's tiers {sorted(manifest.tiers)}")
    known = {e.path for e in manifest.all_files()}
    missing = reply.get("missing", [])
    if not isinstance(missing, list) or any(m not in known for m in missing):
        raise MessageError(f"hello reply: 'missing' must list files of the bundle, got {missing!r:.120}")
    if not isinstance(reply.get("train_examples"), int) or reply["train_examples"] < 1:
        raise MessageError(f"hello reply: 'train_examples' must be a positive integer, got {reply.get('train_examples')!r}")
    return reply


def artifacts_to_record(mid: str, chunks: list[tuple[str, int, bytes]]) -> Any:
    """Chunks (bundle path, offset, bytes) of bundle files for a device that lacks them."""
    from flwr.app import ConfigRecord, RecordDict

    listed = [{"path": path, "offset": offset, "key": f"c{i}"} for i, (path, offset, _) in enumerate(chunks)]
    data = ConfigRecord({f"c{i}": data for i, (_, _, data) in enumerate(chunks)})
    return RecordDict({META_KEY: _meta_record({"manifest_id": mid, "chunks": listed}), "chunks": data})


def artifacts_from_record(content: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    meta = _meta(content, "artifacts")
    try:
        data = content.config_records["chunks"]
        chunks = {c["key"]: bytes(data[c["key"]]) for c in meta["chunks"]}
        for c in meta["chunks"]:
            if not isinstance(c["offset"], int) or c["offset"] < 0 or not isinstance(c["path"], str):
                raise ValueError(f"chunk {c!r:.80}")
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"artifacts: missing or malformed chunk ({exc})") from None
    return meta, chunks


def metrics_to_record(round_: int, metrics: dict[str, float]) -> Any:
    from flwr.app import RecordDict

    return RecordDict({META_KEY: _meta_record({"round": round_, "metrics": {k: float(v) for k, v in metrics.items()}})})


def metrics_from_record(content: Any, where: str = "evaluate reply") -> tuple[dict[str, float], int]:
    meta = _meta(content, where)
    metrics = meta.get("metrics")
    if not isinstance(meta.get("round"), int) or not isinstance(metrics, dict):
        raise MessageError(f"{where}: needs an integer 'round' and a 'metrics' object")
    out = {}
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            raise MessageError(f"{where}: metric {k!r} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out, meta["round"]
