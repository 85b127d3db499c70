"""Global state checkpoints: round trip, the last commit wins, a half-written round never loads, tampering is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.state import GlobalState, GlobalStateError, kept_checkpoints

from .test_merge import L, M, make_pool


def test_round_trip_and_only_the_last_commit_is_kept(tmp_path: Path) -> None:
    state = GlobalState.initial("a" * 16, make_pool(), L, M)
    state.save(tmp_path, keep=1)
    state.round, state.pool["head.bias"] = 1, state.pool["head.bias"] + 1
    state.preferences[7] = np.full((L, M), 0.25)
    state.history.append({"round": 1, "replies": 3})
    state.save(tmp_path, keep=1)
    loaded = GlobalState.load(tmp_path, "a" * 16)
    assert loaded.round == 1 and loaded.history == [{"round": 1, "replies": 3}]
    np.testing.assert_array_equal(loaded.pool["head.bias"], state.pool["head.bias"])
    np.testing.assert_array_equal(loaded.preferences[7], state.preferences[7])
    np.testing.assert_allclose(loaded.usage, 1.0 / M)
    assert len(list(tmp_path.glob("round-*"))) == 1


def test_the_newest_rounds_are_kept_and_an_earlier_one_can_be_resumed(tmp_path: Path) -> None:
    """keep=3 keeps the last round and two before it (hash-checked when loaded); going back to round 2 and saving
    round 3 again drops the abandoned rounds 3 and 4."""
    state = GlobalState.initial("a" * 16, make_pool(), L, M)
    for r in range(5):
        state.round, state.pool["head.bias"] = r, np.full_like(state.pool["head.bias"], float(r))
        state.save(tmp_path, keep=3)
    assert [e["round"] for e in kept_checkpoints(tmp_path)] == [4, 3, 2] and len(list(tmp_path.glob("round-*"))) == 3
    for r in (4, 3, 2):
        back = GlobalState.load(tmp_path, "a" * 16, round=r)
        assert back.round == r and (back.pool["head.bias"] == r).all()
    with pytest.raises(GlobalStateError, match=r"keeps no checkpoint of round 1; it keeps rounds \[2, 3, 4\]"):
        GlobalState.load(tmp_path, round=1)
    two = next(e for e in kept_checkpoints(tmp_path) if e["round"] == 2)
    pool = tmp_path / two["checkpoint"] / "pool.safetensors"
    original = pool.read_bytes()
    pool.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(GlobalStateError, match="contents differ"):
        GlobalState.load(tmp_path, round=2)
    pool.write_bytes(original)
    back = GlobalState.load(tmp_path, round=2)
    back.round = 3
    back.save(tmp_path, keep=3)
    assert [e["round"] for e in kept_checkpoints(tmp_path)] == [3, 2] and len(list(tmp_path.glob("round-*"))) == 2
    assert (GlobalState.load(tmp_path).pool["head.bias"] == 2).all()


def test_half_written_round_is_ignored_and_tampering_named(tmp_path: Path) -> None:
    state = GlobalState.initial("a" * 16, make_pool(), L, M)
    state.save(tmp_path)
    (tmp_path / "round-00001-dead00.partial").mkdir()  # a crash while writing round 1
    (tmp_path / "round-00001-dead00.partial" / "pool.safetensors").write_bytes(b"half")
    assert GlobalState.load(tmp_path).round == 0
    with pytest.raises(GlobalStateError, match="another bundle"):
        GlobalState.load(tmp_path, "b" * 16)
    pointer = json.loads((tmp_path / "latest.json").read_text())
    pool = tmp_path / pointer["checkpoint"] / "pool.safetensors"
    pool.write_bytes(pool.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(GlobalStateError, match="pool.safetensors: contents differ"):
        GlobalState.load(tmp_path)
    with pytest.raises(GlobalStateError, match="no saved global state"):
        GlobalState.load(tmp_path / "nothing")
