"""Fault injection for the reliability suites (``docs/reliability.md``): crashes and stalls at named points.

``FFTMOE_FAULT`` holds comma-separated entries; with none set, ``reach`` is one dictionary lookup and does nothing.

- ``kill:<point>[@<n>]`` -- the n-th time (default: the first) this process reaches ``<point>``, it sends itself
  SIGKILL: no handler, no ``finally``, no buffered write runs, as in a crash. With ``FFTMOE_FAULT_GROUP=1`` the whole
  process group is killed. With ``FFTMOE_FAULT_LOG=<file>`` a line naming the point is appended to that file first
  (flushed to disk), so a test can tell which process died where even when its stderr is not kept.
- ``sleep:<point>=<seconds>`` -- every time, wait this long there (a straggler, a slow disk).

Unknown point names are refused at the first ``reach``, so a typo in a test cannot silently never fire.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "FFTMOE_FAULT"
POINTS = {
    # coordinator.state / edge_runtime.checkpoints: a checkpoint save, in order
    "checkpoint.writing": "the new folder exists, its files are being written (after the first file)",
    "checkpoint.written": "all files written to <name>.partial, before hashing",
    "checkpoint.renamed": "the folder renamed to its final name, the pointer not yet replaced",
    "checkpoint.pointer-partial": "the new pointer written to <pointer>.partial, before the atomic rename",
    "checkpoint.committed": "the pointer replaced, the older folders not yet deleted",
    # coordinator.server_app: a round, in order
    "round.start": "a round begins (nodes connected)",
    "round.sent": "training instructions sent, no reply collected yet",
    "round.replies": "replies collected, before screening and merging",
    "round.merged": "the new state computed, before evaluation",
    "round.saved": "the checkpoint committed, before history.json and progress.png",
    "round.done": "history.json and progress.png written",
    # edge_runtime: a device
    "client.train": "a device's ClientApp received a train instruction, before training",
    "local.step": "after each local training step of ``fftmoe-edge train`` (and its periodic checkpoint)",
}

_plan: dict[str, tuple[str, float]] | None = None  # point -> ("kill", n) or ("sleep", seconds)
_counts: dict[str, int] = {}


class FaultSpecError(ValueError):
    """``FFTMOE_FAULT`` is malformed or names an unknown point."""


def parse(spec: str) -> dict[str, tuple[str, float]]:
    """The entries of an ``FFTMOE_FAULT`` value, point -> (action, n or seconds)."""
    plan: dict[str, tuple[str, float]] = {}
    for raw in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = raw.partition(":")
        if action == "kill":
            point, _, n = rest.partition("@")
            value = float(n) if n else 1.0
        elif action == "sleep":
            point, _, secs = rest.partition("=")
            value = float(secs) if secs else -1.0
        else:
            raise FaultSpecError(f"{ENV}: {raw!r}: expected kill:<point>[@<n>] or sleep:<point>=<seconds>")
        if point not in POINTS:
            raise FaultSpecError(f"{ENV}: unknown point {point!r}; known: {', '.join(POINTS)}")
        if value <= 0:
            raise FaultSpecError(f"{ENV}: {raw!r}: the count or seconds must be > 0")
        plan[point] = (action, value)
    return plan


def reach(point: str) -> None:
    """Mark that this process reached ``point``; act if ``FFTMOE_FAULT`` says so."""
    global _plan
    if _plan is None:
        _plan = parse(os.environ.get(ENV, ""))
    if not _plan:
        return
    if point not in POINTS:
        raise FaultSpecError(f"fault point {point!r} is not declared in edge_runtime.faults.POINTS")
    entry = _plan.get(point)
    if entry is None:
        return
    action, value = entry
    if action == "sleep":
        time.sleep(value)
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(value):
        line = f"fftmoe fault injection: SIGKILL at {point} (time {_counts[point]}, pid {os.getpid()})"
        print(line, file=sys.stderr, flush=True)
        if os.environ.get("FFTMOE_FAULT_LOG"):
            with open(os.environ["FFTMOE_FAULT_LOG"], "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        if os.environ.get("FFTMOE_FAULT_GROUP") == "1":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
