"""The federation's global state and its crash-safe checkpoints (format ``fftmoe-global-state``, version 1).

State: the global pool (every expert, the routers' rows, the head), fleet usage ``[L, M]``, each node's last
preferences ``[L, M]``, the number of completed rounds, and one record per completed round.

On disk, in the coordinator's state folder::

    latest.json                  {"format", "format_version", "checkpoint": "round-00003-ab12cd", "files": {name: sha256}}
    round-00003-ab12cd/pool.safetensors
    round-00003-ab12cd/state.json  manifest_id, round, usage, preferences, history

A save writes a new round folder completely, then replaces ``latest.json`` (the one atomic commit), then deletes
older folders: a crash at any moment leaves the last completed round loadable, and never a half-written one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.checkpoints import commit_checkpoint, read_pointer
from edge_runtime.faults import reach

STATE_FORMAT = "fftmoe-global-state"
STATE_VERSION = 1
LATEST = "latest.json"
POOL_FILE = "pool.safetensors"
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

    @classmethod
    def initial(cls, manifest_id: str, pool: dict[str, np.ndarray], num_layers: int, num_experts: int) -> GlobalState:
        return cls(manifest_id, {k: np.asarray(v, np.float32) for k, v in pool.items()}, np.full((num_layers, num_experts), 1.0 / num_experts))

    def save(self, folder: Path) -> Path:
        """Write this state as a new checkpoint of ``folder`` and commit it; returns the checkpoint folder."""
        from safetensors.numpy import save_file

        def write(ckpt: Path) -> None:
            save_file({k: np.ascontiguousarray(v) for k, v in self.pool.items()}, str(ckpt / POOL_FILE))
            reach("checkpoint.writing")
            meta = {
                "manifest_id": self.manifest_id, "round": self.round, "usage": self.usage.tolist(),
                "preferences": {str(n): p.tolist() for n, p in self.preferences.items()}, "history": self.history,
            }  # fmt: skip
            (ckpt / STATE_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")

        def pointer_text(name: str, files: dict[str, str]) -> str:
            pointer = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "checkpoint": name, "files": files}
            return json.dumps(pointer, indent=2) + "\n"

        return commit_checkpoint(folder, CHECKPOINT_PREFIX, f"{self.round:05d}", write, folder / LATEST, pointer_text)

    @classmethod
    def load(cls, folder: Path, manifest_id: str | None = None) -> GlobalState:
        """The last committed state of ``folder``; refused if damaged or (with ``manifest_id``) of another bundle."""
        from safetensors.numpy import load_file

        _, ckpt = read_pointer(folder / LATEST, STATE_FORMAT, STATE_VERSION, GlobalStateError, "no saved global state (start without --resume)")
        try:
            meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            pool = load_file(str(ckpt / POOL_FILE))
            state = cls(meta["manifest_id"], pool, np.asarray(meta["usage"], np.float64), int(meta["round"]),
                        {int(n): np.asarray(p) for n, p in meta["preferences"].items()}, list(meta["history"]))  # fmt: skip
        except GlobalStateError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GlobalStateError(f"{folder}: saved global state is damaged ({exc})") from exc
        if manifest_id is not None and state.manifest_id != manifest_id:
            raise GlobalStateError(f"{folder} holds the state of another bundle ({state.manifest_id}, this one is {manifest_id})")
        return state
