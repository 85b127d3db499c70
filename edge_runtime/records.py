"""The contents of the Flower messages between coordinator and device (format ``fftmoe-messages``, version 1).

Defined once here, validated on read, documented in ``docs/update-format.md``:

- **train instruction** (coordinator -> device), a ``RecordDict`` with
  ``"fftmoe"``: ConfigRecord ``{"json": <meta>}``, meta = ``{format, format_version, manifest_id, round, tier,
  assignment, routing_target [L][t], train: {epochs, batch_size, learning_rate, max_steps, seed}}``;
  ``"values"``: ArrayRecord of the tier's starting tensors under the update format's global names (the assigned
  experts, router rows, head), so a device receives only what its tier needs.
- **update** (device -> coordinator): ``"fftmoe"``: ConfigRecord ``{"json": <Update.meta() + round>}``,
  ``"update"``: ArrayRecord of the ``Update``'s tensors.

Flower's ``Message`` wraps these; keeping the contents in plain functions lets tests check them without Flower
running (``Message`` cannot be built outside a running app).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.update import Update, UpdateError

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
