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
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.bundle import BACKEND_NAMES, BundleError, Manifest, needed_files
from edge_runtime.head_stats import STATS_FORMAT, STATS_VERSION, HeadStatistics, StatisticsError
from edge_runtime.update import MAX_COUNT, MAX_METRIC, Update, UpdateError, manifest_id

MESSAGES_FORMAT = "fftmoe-messages"
MESSAGES_VERSION = 1
META_KEY = "fftmoe"


class MessageError(UpdateError):
    """A message's content is malformed; the message names the field."""


MAX_TEXT = 200
"""Device-chosen strings (names, reasons) are cut to this many characters before they reach a log or history."""
MANIFEST_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: object, limit: int = MAX_TEXT) -> str:
    """A peer-chosen value as it may appear in a log line or ``history.json``: every character outside printable
    ASCII replaced by ``?`` (no terminal escapes, no forged log lines), cut to ``limit`` characters."""
    out = _UNPRINTABLE.sub("?", str(text))
    return out if len(out) <= limit else out[: max(0, limit - 3)] + "..."


def check_manifest_id(value: Any, where: str) -> str:
    """A bundle id as ``manifest_id`` writes it (16 lowercase hex digits): it names a cache folder on the device, so
    anything else (``../x``, an absolute path) is refused."""
    if not isinstance(value, str) or not MANIFEST_ID_PATTERN.fullmatch(value):
        raise MessageError(f"{where}: 'manifest_id' must be 16 lowercase hex digits, got {printable(repr(value), 60)}")
    return value


def count_field(obj: dict[str, Any], key: str, where: str, low: int = 0, high: int = MAX_COUNT, default: int | None = None) -> int:
    """An integer field in ``[low, high]`` (not a boolean, not a float); ``default`` when absent, if given."""
    if key not in obj and default is not None:
        return default
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MessageError(f"{where}: {key!r} must be an integer in [{low}, {high}], got {printable(repr(value), 60)}")
    return value


def text_field(obj: dict[str, Any], key: str, where: str) -> str:
    """An optional string field, made printable and cut to ``MAX_TEXT`` characters."""
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise MessageError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return printable(value)


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
    check_manifest_id(meta.get("manifest_id"), "train instruction")
    try:
        values = _arrays(content.array_records["values"])
    except KeyError:
        raise MessageError("train instruction: no 'values' array record") from None
    except Exception as exc:  # noqa: BLE001  # np.load of bytes that are no .npy raises EOFError, BadZipFile, ...
        raise MessageError(f"train instruction: an array of the 'values' record cannot be read ({type(exc).__name__})") from None
    try:
        with np.errstate(over="raise"):
            target = np.asarray(meta["routing_target"], np.float64).astype(np.float32)
        if not np.isfinite(target).all():
            raise ValueError("routing_target holds a value that is not finite in float32")
        return TrainInstruction(str(meta["manifest_id"]), _integer(meta["round"], "round"), _integer(meta["tier"], "tier"),
                                [[_integer(e, "assignment") for e in row] for row in meta["assignment"]], target, values, dict(meta["train"]))  # fmt: skip
    except (KeyError, TypeError, ValueError, OverflowError, FloatingPointError) as exc:
        raise MessageError(f"train instruction: missing or malformed field ({printable(exc, 200)})") from None


def _integer(value: Any, name: str) -> int:
    """A JSON integer (not a float, boolean or string): TypeError naming the field otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name!r} must be an integer, got {printable(repr(value), 40)}")
    return value


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
    except (ValueError, TypeError, AttributeError) as exc:  # an Array whose dtype, shape and bytes do not agree
        raise MessageError(f"{where}: an array of the 'update' record cannot be read ({printable(exc, 120)})") from None
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


@dataclass(frozen=True)
class DeviceInfo:
    """What a device says of itself in its hello reply, every field checked (``device_info_from_hello_reply``)."""

    tier: int
    batch_size: int
    backend: str
    train_examples: int
    eval_examples: int
    missing: tuple[str, ...]
    """The files of its tier it lacks: listed by the device, de-duplicated and limited to what the tier needs."""
    missing_bytes: int
    """Their size by the coordinator's manifest (the device's own figure is not used)."""
    name: str = ""
    tier_reason: str = ""
    backend_reason: str = ""
    ignored: tuple[str, ...] = ()
    """Files the device listed that its tier and backend do not need (never sent)."""


MAX_BATCH = 1 << 16
"""The largest local batch a hello reply may state."""
MAX_LISTED = 100_000
"""The longest ``missing`` list a hello reply may hold (duplicates included; they are dropped)."""


def device_info_from_hello_reply(content: Any, manifest: Manifest) -> DeviceInfo:
    """The hello reply's fields, each checked: a tier of the bundle, a known backend, bounded counts, strings made
    printable, and a ``missing`` list of bundle files. That list is de-duplicated and limited to the files the tier
    needs on that backend, so a device can never make the coordinator send more than one copy of its tier's files."""
    reply = hello_reply_from_record(content)
    where = "hello reply"
    tier = count_field(reply, "tier", where, 1, max(manifest.tiers))
    if tier not in manifest.tiers:
        raise MessageError(f"hello reply: tier {tier} is not one of the bundle's tiers {sorted(manifest.tiers)}")
    backend = reply.get("backend")
    if backend not in BACKEND_NAMES:
        raise MessageError(f"hello reply: 'backend' must be one of {', '.join(BACKEND_NAMES)}, got {printable(repr(backend), 40)}")
    known = {e.path: e for e in manifest.all_files()}
    listed = reply.get("missing", [])
    if not isinstance(listed, list) or len(listed) > MAX_LISTED or any(not isinstance(m, str) or m not in known for m in listed):
        raise MessageError(f"hello reply: 'missing' must list files of the bundle, got {printable(repr(listed), 120)}")
    if "missing_bytes" in reply:
        count_field(reply, "missing_bytes", where, 0, MAX_COUNT)
    needed = {e.path for e in needed_files(manifest, tier, backend)}
    unique = list(dict.fromkeys(listed))
    missing = tuple(m for m in unique if m in needed)
    return DeviceInfo(
        tier=tier, batch_size=count_field(reply, "batch_size", where, 1, MAX_BATCH), backend=backend,
        train_examples=count_field(reply, "train_examples", where, 1), eval_examples=count_field(reply, "eval_examples", where, 0, default=0),
        missing=missing, missing_bytes=sum(known[m].size for m in missing), name=text_field(reply, "name", where),
        tier_reason=text_field(reply, "tier_reason", where), backend_reason=text_field(reply, "backend_reason", where),
        ignored=tuple(m for m in unique if m not in needed),
    )  # fmt: skip


def artifacts_to_record(mid: str, chunks: list[tuple[str, int, bytes]]) -> Any:
    """Chunks (bundle path, offset, bytes) of bundle files for a device that lacks them."""
    from flwr.app import ConfigRecord, RecordDict

    listed = [{"path": path, "offset": offset, "key": f"c{i}"} for i, (path, offset, _) in enumerate(chunks)]
    data = ConfigRecord({f"c{i}": data for i, (_, _, data) in enumerate(chunks)})
    return RecordDict({META_KEY: _meta_record({"manifest_id": mid, "chunks": listed}), "chunks": data})


def artifacts_from_record(content: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The artifacts message's meta (a checked ``manifest_id`` and its chunks: path, offset, key) and the bytes by
    key. Where the pieces may be written is checked against the manifest by the device (``write_chunks``)."""
    meta = _meta(content, "artifacts")
    check_manifest_id(meta.get("manifest_id"), "artifacts")
    try:
        data = content.config_records["chunks"]
        if not isinstance(meta["chunks"], list):
            raise TypeError("'chunks' is not a list")
        for c in meta["chunks"]:
            if not isinstance(c, dict) or not isinstance(c.get("path"), str) or not isinstance(c.get("key"), str):
                raise ValueError(f"chunk {printable(repr(c), 80)}")
            if not isinstance(c.get("offset"), int) or isinstance(c["offset"], bool) or not 0 <= c["offset"] < MAX_COUNT:
                raise ValueError(f"chunk offset {printable(repr(c.get('offset')), 40)}")
        chunks = {}
        for c in meta["chunks"]:
            piece = data[c["key"]]
            if not isinstance(piece, bytes):  # bytes(n) of an integer would allocate n zero bytes
                raise TypeError(f"chunk {printable(c['key'], 40)} holds {type(piece).__name__}, not bytes")
            chunks[c["key"]] = piece
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"artifacts: missing or malformed chunk ({exc})") from None
    return meta, chunks


def metrics_to_record(round_: int, metrics: dict[str, float]) -> Any:
    from flwr.app import RecordDict

    return RecordDict({META_KEY: _meta_record({"round": round_, "metrics": {k: float(v) for k, v in metrics.items()}})})


@dataclass(frozen=True)
class Evaluation:
    """A device's evaluation on its held-out share: examples (0: it holds none) and, when > 0, accuracy and loss."""

    examples: int
    accuracy: float = 0.0
    loss: float = 0.0


def evaluation_from_record(content: Any, where: str = "evaluate reply", max_examples: int = MAX_COUNT) -> tuple[Evaluation, int]:
    """The evaluation a reply reports and the round it answers, each field checked: ``examples`` an integer count
    of at most ``max_examples`` (the device's hello figure); with examples, ``accuracy`` in [0, 1] and a finite
    ``loss`` >= 0."""
    metrics, round_ = metrics_from_record(content, where)
    examples = metrics.get("examples")
    if examples is None or examples != int(examples) or not 0 <= examples <= max_examples:
        raise MessageError(f"{where}: 'examples' must be an integer count in [0, {max_examples}], got {examples!r}")
    if examples == 0:
        return Evaluation(0), round_
    accuracy, loss = metrics.get("accuracy"), metrics.get("loss")
    if accuracy is None or not 0.0 <= accuracy <= 1.0:
        raise MessageError(f"{where}: 'accuracy' must be a number in [0, 1], got {accuracy!r}")
    if loss is None or not (math.isfinite(loss) and 0 <= loss <= MAX_METRIC):
        raise MessageError(f"{where}: 'loss' must be a number in [0, {MAX_METRIC:g}], got {loss!r}")
    return Evaluation(int(examples), accuracy, loss), round_


def metrics_from_record(content: Any, where: str = "evaluate reply") -> tuple[dict[str, float], int]:
    meta = _meta(content, where)
    metrics = meta.get("metrics")
    if not isinstance(meta.get("round"), int) or not isinstance(metrics, dict):
        raise MessageError(f"{where}: needs an integer 'round' and a 'metrics' object")
    out = {}
    for k, v in metrics.items():
        try:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        except OverflowError:  # an integer too large for a float
            ok = False
        if not ok:
            raise MessageError(f"{where}: metric {printable(repr(k), 40)} must be a finite number, got {printable(repr(v), 40)}")
        out[str(k)] = float(v)
    return out, meta["round"]


def statistics_to_record(stats: HeadStatistics, round_: int, metrics: dict[str, float] | None = None) -> Any:
    """A device's head statistics (``edge_runtime/head_stats.py``) as the reply to a ``query.statistics``."""
    from flwr.app import Array, ArrayRecord, RecordDict

    meta = {"round": round_, "statistics": {"format": STATS_FORMAT, "format_version": STATS_VERSION, "examples": stats.examples},
            "metrics": {k: float(v) for k, v in (metrics or {}).items()}}  # fmt: skip
    arrays = ArrayRecord({"gram": Array(np.ascontiguousarray(stats.gram, np.float64)), "cross": Array(np.ascontiguousarray(stats.cross, np.float64))})
    return RecordDict({META_KEY: _meta_record(meta), "statistics": arrays})


def statistics_from_record(content: Any, manifest: Manifest, where: str = "statistics reply", max_examples: int = MAX_COUNT) -> tuple[HeadStatistics, int]:
    """The checked head statistics a reply carries and the round it answers: ``MessageError`` for a malformed
    message, ``StatisticsError`` (naming the rule) for sums that no ``max_examples`` rows of this bundle's
    ``hidden_size`` features and labels could give."""
    meta = _meta(content, where)
    info = meta.get("statistics")
    if not isinstance(info, dict) or info.get("format") != STATS_FORMAT or info.get("format_version") != STATS_VERSION:
        raise MessageError(f"{where}: 'statistics' must be a {STATS_FORMAT} version {STATS_VERSION} object")
    round_ = count_field(meta, "round", where)
    examples = count_field(info, "examples", where, 1, max_examples)
    try:
        arrays = _arrays(content.array_records["statistics"])
    except KeyError:
        raise MessageError(f"{where}: no 'statistics' array record") from None
    except Exception as exc:  # noqa: BLE001  # np.load of bytes that are no .npy raises EOFError, BadZipFile, ...
        raise MessageError(f"{where}: an array of the 'statistics' record cannot be read ({type(exc).__name__})") from None
    if set(arrays) != {"gram", "cross"}:
        raise MessageError(f"{where}: the 'statistics' record must hold exactly 'gram' and 'cross', got {printable(repr(sorted(arrays)), 120)}")
    stats = HeadStatistics(arrays["gram"], arrays["cross"], examples)
    try:
        return stats.validate(manifest.hidden_size, len(manifest.labels), max_examples), round_
    except StatisticsError as exc:
        raise MessageError(f"{where}: {exc}") from None
