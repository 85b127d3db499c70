"""Message contents between coordinator and device: round trips and named errors (Flower's records, no app)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.records import (
    MessageError,
    TrainInstruction,
    instruction_from_record,
    instruction_to_record,
    update_from_record,
    update_to_record,
)
from tests.coordinator.test_merge import make_update


def test_instruction_round_trip() -> None:
    values = {"layers.0.experts.3.w1": np.arange(6, dtype=np.float32).reshape(2, 3), "head.bias": np.ones(2, np.float32)}
    ins = TrainInstruction("f" * 16, 4, 2, [[3, 1]], np.array([[0.25, 0.75]]), values, {"epochs": 1, "batch_size": 8})
    back = instruction_from_record(instruction_to_record(ins))
    assert (back.manifest_id, back.round, back.tier, back.assignment, back.train) == ("f" * 16, 4, 2, [[3, 1]], {"epochs": 1, "batch_size": 8})
    np.testing.assert_allclose(back.routing_target, [[0.25, 0.75]])
    for k, v in values.items():
        np.testing.assert_array_equal(back.values[k], v)


def test_update_round_trip_and_malformed_content() -> None:
    from flwr.app import ConfigRecord, RecordDict

    upd = make_update([[0, 2], [1, 3]], 12, 5)
    back, round_ = update_from_record(update_to_record(upd, 3))
    assert round_ == 3 and back.meta() == upd.meta()
    for k, v in upd.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)
    with pytest.raises(MessageError, match="no readable 'fftmoe' config record"):
        update_from_record(RecordDict({}))
    other = RecordDict({"fftmoe": ConfigRecord({"json": json.dumps({"messages_format": "x"})})})
    with pytest.raises(MessageError, match="not a fftmoe-messages version 1 message"):
        update_from_record(other, "reply of node 9")
    no_round = update_to_record(upd, 3)
    meta = json.loads(no_round.config_records["fftmoe"]["json"])
    meta["round"] = "3"
    no_round["fftmoe"] = ConfigRecord({"json": json.dumps(meta)})
    with pytest.raises(MessageError, match="'round' must be an integer"):
        update_from_record(no_round)
