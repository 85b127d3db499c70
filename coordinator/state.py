"""The federation's global state and its crash-safe checkpoints (format ``fftmoe-global-state``, version 1).

State: the global pool (every expert, the routers' rows, the head), fleet usage ``[L, M]``, each node's last
preferences ``[L, M]``, the number of completed rounds, and one record per completed round.

On disk, in the coordinator's state folder::

    latest.json                  {"format", "format_version", "checkpoint": "round-00003-ab12cd", "files": {name: sha256},
                                  "kept": [{"checkpoint": "round-00002-...", "round": 2, "files": {...}}, ...]}
    round-00003-ab12cd/pool.safetensors
    round-00003-ab12cd/state.json  manifest_id, round, usage, preferences, history
    round-00003-ab12cd/optimizer.safetensors  the server optimiser's moments (only when it keeps any)
    round-00002-.../               older rounds listed in "kept" (newest first), ``keep`` - 1 of them

A save writes a new round folder completely, then replaces ``latest.json`` (the one atomic commit), then deletes
the folders that are neither the new one nor kept: a crash at any moment leaves the last completed round loadable,
and never a half-written one. ``load(folder, round=N)`` reads a kept round (hashes checked), so that a run can go
back to a round before a bad one (``serve --resume --resume-round N``); the next save then drops the rounds after N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.checkpoints import commit_checkpoint, first_mismatch, read_pointer
from edge_runtime.faults import reach

STATE_FORMAT = "fftmoe-global-state"
STATE_VERSION = 1
LATEST = "latest.json"
POOL_FILE = "pool.safetensors"
MOMENTS_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_PREFIX = "round-"


class GlobalStateError(RuntimeError):
    """A state folder cannot be loaded: missing, damaged, or from another bundle. The message names the file."""


@dataclass
class GlobalState:
    manifest_id: str
    pool: dict[str, np.ndarray]
    usage: np.ndarray  # [L, M] moving average of the fleet's routed-token share per expert
    round: int = 0  # completed rounds
    preferences: dict[int, np.ndarray] = field(default_factory=dict)  # node id -> [L, M]
    history: list[dict[str, Any]] = field(default_factory=list)
    moments: dict[str, np.ndarray] = field(default_factory=dict)
    """The server optimiser's moments (``coordinator/server_opt.py``); empty for the plain merge."""

    @classmethod
    def initial(cls, manifest_id: str, pool: dict[str, np.ndarray], num_layers: int, num_experts: int) -> GlobalState:
        return cls(manifest_id, {k: np.asarray(v, np.float32) for k, v in pool.items()}, np.full((num_layers, num_experts), 1.0 / num_experts))

    def save(self, folder: Path, keep: int = 3) -> Path:
        """Write this state as a new checkpoint of ``folder`` and commit it, keeping the newest ``keep`` - 1 earlier
        rounds; returns the checkpoint folder."""
        from safetensors.numpy import save_file

        kept = [e for e in kept_checkpoints(folder) if e["round"] < self.round][: max(0, keep - 1)]

        def write(ckpt: Path) -> None:
            save_file({k: np.ascontiguousarray(v) for k, v in self.pool.items()}, str(ckpt / POOL_FILE))
            if self.moments:
                save_file({k: np.ascontiguousarray(v) for k, v in self.moments.items()}, str(ckpt / MOMENTS_FILE))
            reach("checkpoint.writing")
            meta = {
                "manifest_id": self.manifest_id, "round": self.round, "usage": self.usage.tolist(),
                "preferences": {str(n): p.tolist() for n, p in self.preferences.items()}, "history": self.history,
            }  # fmt: skip
            (ckpt / STATE_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")

        def pointer_text(name: str, files: dict[str, str]) -> str:
            pointer = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "checkpoint": name, "files": files, "kept": kept}
            return json.dumps(pointer, indent=2) + "\n"

        return commit_checkpoint(folder, CHECKPOINT_PREFIX, f"{self.round:05d}", write, folder / LATEST, pointer_text,
                                 spare={e["checkpoint"] for e in kept})  # fmt: skip

    @classmethod
    def load(cls, folder: Path, manifest_id: str | None = None, round: int | None = None) -> GlobalState:  # noqa: A002
        """The last committed state of ``folder``, or with ``round`` that kept round; refused if damaged or (with
        ``manifest_id``) of another bundle."""
        from safetensors.numpy import load_file

        raw, ckpt = read_pointer(folder / LATEST, STATE_FORMAT, STATE_VERSION, GlobalStateError, "no saved global state (start without --resume)")
        if round is not None and _round_of(str(raw["checkpoint"])) != round:
            entry = next((e for e in kept_checkpoints(folder) if e["round"] == round), None)
            if entry is None:
                have = sorted(e["round"] for e in kept_checkpoints(folder))
                raise GlobalStateError(f"{folder} keeps no checkpoint of round {round}; it keeps rounds {have}")
            ckpt = folder / entry["checkpoint"]
            try:
                bad = first_mismatch(ckpt, entry["files"])
            except OSError as exc:
                raise GlobalStateError(f"{ckpt}: a kept checkpoint's file cannot be read ({exc})") from exc
            if bad is not None:
                raise GlobalStateError(f"{bad}: contents differ from the SHA-256 recorded in {folder / LATEST}")
        try:
            meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            pool = load_file(str(ckpt / POOL_FILE))
            moments = load_file(str(ckpt / MOMENTS_FILE)) if (ckpt / MOMENTS_FILE).is_file() else {}
            state = cls(meta["manifest_id"], pool, np.asarray(meta["usage"], np.float64), int(meta["round"]),
                        {int(n): np.asarray(p) for n, p in meta["preferences"].items()}, list(meta["history"]), moments)  # fmt: skip
        except GlobalStateError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GlobalStateError(f"{folder}: saved global state is damaged ({exc})") from exc
        if manifest_id is not None and state.manifest_id != manifest_id:
            raise GlobalStateError(f"{folder} holds the state of another bundle ({state.manifest_id}, this one is {manifest_id})")
        return state


def _round_of(name: str) -> int:
    """The round of a checkpoint folder's name (``round-00003-ab12cd`` -> 3)."""
    return int(name[len(CHECKPOINT_PREFIX) :].split("-", 1)[0])


def kept_checkpoints(folder: Path) -> list[dict[str, Any]]:
    """The committed checkpoints of a state folder, newest first: the current one and those ``latest.json`` keeps,
    each ``{"checkpoint", "round", "files"}``, of those whose folder still exists. Empty when there is no readable
    pointer (a fresh folder; ``load`` names what is wrong with a damaged one)."""
    try:
        raw = json.loads((folder / LATEST).read_text(encoding="utf-8"))
        entries = [{"checkpoint": str(raw["checkpoint"]), "files": dict(raw["files"])}, *list(raw.get("kept") or [])]
        out = []
        for e in entries:
            name = str(e["checkpoint"])
            if (folder / name).is_dir() and not name.endswith(".partial"):
                out.append({"checkpoint": name, "round": _round_of(name), "files": dict(e["files"])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(out, key=lambda e: -e["round"])
