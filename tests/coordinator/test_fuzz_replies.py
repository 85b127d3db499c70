"""Fuzzing hostile replies at the coordinator, and a hostile coordinator's messages at the device.

Every message a device sends (hello reply, train reply carrying an update, evaluate reply) is built from an honest
one with 1-3 hostile edits, or replaced by arbitrary content, and handed to the strategy methods the ServerApp calls
(``FFTMoEStrategy.accept_hello``, ``aggregate_train``, ``aggregate_evaluate``). The other direction, where the
coordinator may be the hostile party, is fuzzed on the device's readers: ``artifacts`` messages written into a cache
folder by ``write_chunks``, and ``train`` instructions (``instruction_from_record``).

The oracles are computed here, with NumPy, not by the code under test: a hello reply gives a well-typed, bounded
``DeviceInfo`` or is refused with a reason; a round with one hostile reply merges the two honest ones, and its pool
equals the convex combination of the accepted updates (clipped to their ``NormBound``) with shares from an
independent water-filling (no node above ``max_share`` unless it has fewer co-holders), every value finite and no
unit moved further than the bounds of the updates carrying it; an evaluation is bounded by the nodes' hello figures;
a device writes nothing outside its bundle's cache folder and raises only ``BundleError``.

CI runs the same cases every time (hypothesis ``derandomize=True``); ``FFTMOE_FUZZ_SCALE=10`` runs ten times as many
with a fresh seed. ``FFTMOE_FUZZ_REPORT=counts.json`` writes the cases run per kind (merged into the file if it
already holds other counts). The five findings of this fuzzer are fixed and kept as regression tests at the end
(``test_found_*``); should one reproduce again, the fuzz tests fail on it (``known`` checks that it still does not).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from safetensors.numpy import load_file

from coordinator.rounds import NormBound, ReplyLimits, plan_round, reply_limits
from coordinator.server_app import FFTMoEStrategy, RunSettings
from coordinator.state import GlobalState
from edge_runtime.bundle import (
    BACKEND_NAMES,
    EXPERT_TENSORS,
    HEAD_TENSORS,
    ROUTER_TENSORS,
    BundleError,
    Manifest,
    global_expert_key,
    global_head_key,
    global_lora_key,
    global_router_key,
    load_manifest,
    needed_files,
    sha256_file,
)
from edge_runtime.client_app import NodeSettings, bundle_dir_for, write_chunks
from edge_runtime.records import (
    MAX_BATCH,
    MAX_COUNT,
    MAX_LISTED,
    MAX_TEXT,
    MESSAGES_FORMAT,
    MESSAGES_VERSION,
    META_KEY,
    DeviceInfo,
    MessageError,
    TrainInstruction,
    artifacts_from_record,
    artifacts_to_record,
    hello_reply_to_record,
    instruction_from_record,
    instruction_to_record,
    metrics_to_record,
    update_to_record,
)
from edge_runtime.update import MAX_METRIC, Update, manifest_id, router_rows_key
from tests.coordinator.test_rounds import trained
from tests.fuzzing import fuzz


CASES: Counter[str] = Counter()  # kind -> cases run (and "known: ..." -> cases that hit a finding left for the lead)


class Drawer:
    """``data.draw`` without the interactive bookkeeping (a label, a repr and a random-module check per draw, most of
    a cheap case's time): draws go to the underlying ConjectureData, and the labels and values are noted only when
    hypothesis replays a failing case, so its report still shows them."""

    def __init__(self, data: st.DataObject) -> None:
        from hypothesis.control import should_note

        self._data = data.conjecture_data
        self._note = should_note()

    def draw(self, strategy: Any, label: str = "") -> Any:
        value = self._data.draw(strategy)
        if self._note:
            text = repr(value)
            note(f"{label}: {text if len(text) <= 200 else text[:200] + '...'}")
        return value


def counted(kind: str) -> Any:
    """Count a case of ``kind`` when it ran to its end (hypothesis also starts cases it abandons when they draw too
    much; those are not counted, as hypothesis does not count them towards ``max_examples``)."""

    def wrap(test: Any) -> Any:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            if "data" in kwargs:
                kwargs["data"] = Drawer(kwargs["data"])
            test(*args, **kwargs)
            CASES[kind] += 1

        return run

    return wrap


@pytest.fixture(scope="module", autouse=True)
def report_cases() -> Any:
    """Print the cases run per kind (``pytest -s``), and write them as JSON to FFTMOE_FUZZ_REPORT if set."""
    yield
    print(f"\nfuzz cases per kind: {dict(CASES)}")
    target = os.environ.get("FFTMOE_FUZZ_REPORT")
    if target:
        path = Path(target)
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            old = {}
        path.write_text(json.dumps({**(old if isinstance(old, dict) else {}), **dict(CASES)}))


# -- hostile values -------------------------------------------------------------------------------------------------

HUGE_INTS = [10**309, -(10**309), 10**308, 2**1023, 10**400, 2**64, 2**63, 2**53 + 1, 2**53, 10**30, 10**12]
FLOAT_EDGES = [float("nan"), float("inf"), float("-inf"), 1e308, 1.7976931348623157e308, -1e308, 5e-324, -0.0]
NASTY_TEXT = [
    "\x1b[31mred\x1b[0m", "\x1b]0;title\x07", "line\n2026-11-25 INFO node 9: accepted", "\r\x00\x07\x08\x7f",
    "\u202eevil", "\u2028sep", "é€\ufeff日本", "\ud800lone", "x" * 10_000, "", " ", "../../etc/passwd", "%s%n{0}",
]  # fmt: skip
TEXTS = st.sampled_from(NASTY_TEXT) | st.text(max_size=30)
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE_INTS) | st.floats() | st.sampled_from(FLOAT_EDGES)
                | TEXTS)  # fmt: skip
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=6
)
NESTED = [[], {}, [None], [1, 2], [[0, 1], [2, 3]], {"a": 1}, {"": None}, [[]], [{"tier": 2}], {"json": "{}"}, [10**309], {"x": [float("nan")]},
          ["x"] * 50, list(range(100)), [[0.5, 0.5]], {"epochs": 10**309}, [True], {"accuracy": 0.5}]  # fmt: skip
ANY_VALUE = st.one_of(JSON_SCALARS, JSON_SCALARS, st.sampled_from(NESTED).map(copy.deepcopy), JSON_VALUES)  # a fresh copy: mutate() edits values in place
"""Any JSON value, mostly scalars and fixed nested values: the recursive strategy costs about 2.6 ms a draw."""
_ASCII_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def assert_printable(text: Any, what: str, limit: int | None = None) -> None:
    """``text`` is a non-empty string of printable ASCII (no escapes, no line breaks), of at most ``limit`` characters."""
    assert isinstance(text, str) and text, f"{what}: empty or not a string: {text!r}"
    assert _ASCII_PRINTABLE.fullmatch(text), f"{what}: not printable ASCII: {text[:300]!r}"
    if limit is not None:
        assert len(text) <= limit, f"{what}: {len(text)} characters, more than {limit}: {text[:120]!r}..."


def strict_int(value: Any) -> int | None:
    """``value`` when it is an integer (not a boolean), else None: the update format takes no 1.5, true or "3"."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def mutate(doc: Any, data: st.DataObject, rounds: int = 3) -> Any:
    """A copy of ``doc`` with 1..rounds edits anywhere in it: a value replaced by any JSON value, a key deleted, a key
    added."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, rounds), label="edits")):
        paths = _paths(doc)
        if not paths:
            return doc
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        if action == "replace":
            parent[path[-1]] = data.draw(ANY_VALUE, label="value")
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][data.draw(st.text(max_size=8), label="new key")] = data.draw(ANY_VALUE, label="new value")
    return doc


def envelope(body: dict[str, Any]) -> dict[str, Any]:
    return {"messages_format": MESSAGES_FORMAT, "messages_version": MESSAGES_VERSION, **body}


def record(meta: Any, arrays: dict[str, Any] | None = None, array_name: str = "update", configs: dict[str, Any] | None = None) -> Any:
    """A RecordDict as a device (or coordinator) could send it: ``meta`` as the JSON text of the ``fftmoe`` record
    (any other value is stored as it is), an ArrayRecord of ``arrays`` (NumPy arrays or Flower Arrays)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    text = json.dumps(meta) if isinstance(meta, dict) else meta
    records: dict[str, Any] = {META_KEY: ConfigRecord({"json": text})}
    if arrays is not None:
        arrays_record = ArrayRecord()  # item by item: ArrayRecord(dict) would copy every Array
        for k, v in arrays.items():
            arrays_record[k] = v if isinstance(v, Array) else Array(np.ascontiguousarray(v))
        records[array_name] = arrays_record
    for name, values in (configs or {}).items():
        records[name] = ConfigRecord(values)
    return RecordDict(records)


def raw_meta(data: st.DataObject) -> Any:
    """What may stand in the ``json`` field instead of a message: any text, any JSON, another value type."""
    return data.draw(
        TEXTS | ANY_VALUE.map(json.dumps) | st.sampled_from([b"\xff\xfe", b"{}", 7, 1.5, True, ["{}"], '{"messages_format": 1}', "[]", "null", "NaN"])
        | st.builds(lambda body: json.dumps({"messages_format": MESSAGES_FORMAT, "messages_version": MESSAGES_VERSION, **body}),
                    st.dictionaries(st.sampled_from(["reply", "update", "metrics", "round", "chunks", "manifest_id"]), ANY_VALUE, max_size=3)),
        label="raw json",
    )  # fmt: skip


def empty_content(data: st.DataObject) -> Any:
    """A content without the ``fftmoe`` config record: empty, or other records only."""
    from flwr.app import ConfigRecord, RecordDict

    return data.draw(st.sampled_from([RecordDict({}), RecordDict({"other": ConfigRecord({"json": "{}"})}), RecordDict({META_KEY: ConfigRecord({})}),
                                      RecordDict({META_KEY: ConfigRecord({"JSON": "{}"})})]), label="no record")  # fmt: skip


# ====================================================================================================================
# 1. hello replies -> FFTMoEStrategy.accept_hello
# ====================================================================================================================


@dataclass(repr=False)
class HelloCase:
    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints a failing case's arguments: keep it short
        p.text("<HelloCase>")

    manifest: Manifest
    strategy: FFTMoEStrategy
    honest: dict[str, Any]
    known: dict[str, int]  # every bundle path -> its size
    needed: dict[tuple[int, str], list[str]]  # (tier, backend) -> the paths it needs


@pytest.fixture(scope="module")
def hello_case(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> HelloCase:
    manifest = load_manifest(tiny_bundle)
    strategy = FFTMoEStrategy(RunSettings(bundle=str(tiny_bundle), state_dir=str(tmp_path_factory.mktemp("hello-state"))))
    needed = {(t, b): [e.path for e in needed_files(manifest, t, b)] for t in manifest.tiers for b in BACKEND_NAMES}
    honest = {
        "tier": 2, "batch_size": 8, "backend": "ort", "tier_reason": "fits 2 GB with batch 8", "backend_reason": "onnxruntime-training found",
        "train_examples": 40, "eval_examples": 4, "missing": list(needed[(2, "ort")]),
        "missing_bytes": sum(e.size for e in needed_files(manifest, 2, "ort")), "name": "rpi-4-2gb",
    }  # fmt: skip
    return HelloCase(manifest, strategy, honest, {e.path: e.size for e in manifest.all_files()}, needed)


HELLO_NEAR = {
    "tier": [0, 3, 5, 4, 1, -1, 99, 2.0, True, "2", None, [2], 10**309, float("nan")],
    "batch_size": [0, -1, 1, MAX_BATCH, MAX_BATCH + 1, 10**309, 8.0, 1.5, True, "8", None, float("inf")],
    "backend": ["ORT", "onnx", "", "torch", "ort\n", "tor", None, 1, ["ort"], "\x1b[31mort"],
    "train_examples": [0, -1, 1, MAX_COUNT, MAX_COUNT + 1, 10**12, 10**309, 40.0, 1.5, True, False, "40", None, float("nan"), float("inf")],
    "eval_examples": [0, -1, MAX_COUNT, MAX_COUNT + 1, 10**309, 4.0, True, "4", None],
    "missing_bytes": [0, -1, 1, MAX_COUNT + 1, 10**309, 1.5, True, "7", None, float("-inf")],
}  # fmt: skip


def hostile_missing(case: HelloCase, data: st.DataObject) -> Any:
    """A ``missing`` list no honest device sends."""
    own = case.needed[(2, "ort")]
    others = sorted({p for (t, b), paths in case.needed.items() for p in paths if (t, b) != (2, "ort")} - set(own))
    bad = ["../manifest.json", "tiers/../manifest.json", "../../../etc/passwd", "/etc/passwd", "tiers/t9/checkpoint", "manifest.json",
           "tier-choice.json", "", ".", "tiers/t2/checkpoint\x00", "tiers/t2/checkpoint/", "TIERS/T2/CHECKPOINT", "x" * 5000]  # fmt: skip
    kind = data.draw(st.sampled_from(["dup1000", "dup100", "other-tiers", "not-in-bundle", "dotdot", "mix", "not-strings", "not-a-list", "empty"]), label="missing")
    if kind == "dup1000":
        return [data.draw(st.sampled_from(own), label="file")] * 1000
    if kind == "dup100":
        return [p for p in own for _ in range(25)][:100]
    if kind == "other-tiers":
        return data.draw(st.lists(st.sampled_from(others), min_size=1, max_size=8), label="others") + own[:1]
    if kind == "not-in-bundle":
        return own + [data.draw(st.sampled_from(bad[4:]) | st.text(max_size=20), label="path")]
    if kind == "dotdot":
        return [data.draw(st.sampled_from(bad[:4]), label="path"), *own]
    if kind == "mix":
        return data.draw(st.lists(st.sampled_from(own + others + bad), max_size=30), label="paths")
    if kind == "not-strings":
        return [*own[:2], data.draw(JSON_SCALARS.filter(lambda v: not isinstance(v, str)), label="entry")]
    if kind == "not-a-list":
        return data.draw(st.sampled_from([own[0], {own[0]: 1}, None, 3, ",".join(own)]), label="not a list")
    return []


def hostile_hello(case: HelloCase, data: st.DataObject) -> dict[str, Any]:
    reply = copy.deepcopy(case.honest)
    keys = list(reply)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        action = data.draw(st.sampled_from(["value", "near", "delete", "add", "missing", "text", "generic"]), label="action")
        key = data.draw(st.sampled_from(keys), label="field")
        if action == "value":
            reply[key] = data.draw(ANY_VALUE, label="value")
        elif action == "near":
            key = data.draw(st.sampled_from(sorted(HELLO_NEAR)), label="near field")
            reply[key] = data.draw(st.sampled_from(HELLO_NEAR[key]), label="near")
        elif action == "delete":
            reply.pop(key, None)
        elif action == "add":
            reply[data.draw(TEXTS, label="new key")] = data.draw(ANY_VALUE, label="new value")
        elif action == "missing":
            reply["missing"] = hostile_missing(case, data)
        elif action == "text":
            reply[data.draw(st.sampled_from(["name", "tier_reason", "backend_reason"]), label="text field")] = data.draw(TEXTS, label="text")
        else:
            reply = mutate(reply, data, 1)
    return reply


def check_device_info(case: HelloCase, info: DeviceInfo, reply: dict[str, Any]) -> None:
    """The oracle of an accepted hello reply: every field well-typed and bounded, and what the reply said."""
    m = case.manifest
    assert type(info.tier) is int and info.tier in m.tiers, info
    assert type(info.batch_size) is int and 1 <= info.batch_size <= MAX_BATCH, info
    assert info.backend in BACKEND_NAMES, info
    assert type(info.train_examples) is int and 1 <= info.train_examples <= 2**53, info
    assert type(info.eval_examples) is int and 0 <= info.eval_examples <= 2**53, info
    needed = case.needed[(info.tier, info.backend)]
    assert isinstance(info.missing, tuple) and len(set(info.missing)) == len(info.missing), info.missing
    assert set(info.missing) <= set(needed), f"missing lists files its tier does not need: {set(info.missing) - set(needed)}"
    assert info.missing_bytes == sum(case.known[p] for p in info.missing)
    assert set(info.ignored) <= set(case.known) - set(needed) and len(set(info.ignored)) == len(info.ignored)
    for name in ("name", "tier_reason", "backend_reason"):
        text = getattr(info, name)
        assert isinstance(text, str) and _ASCII_PRINTABLE.fullmatch(text) and len(text) <= MAX_TEXT, f"{name}: {text[:80]!r}"
    # ... and it is what the reply said, not something else that happens to be valid
    assert (info.tier, info.batch_size, info.backend, info.train_examples) == (reply["tier"], reply["batch_size"], reply["backend"], reply["train_examples"])
    assert info.eval_examples == reply.get("eval_examples", 0)
    listed = reply.get("missing", [])
    assert info.missing == tuple(dict.fromkeys(p for p in listed if p in needed))
    assert len(listed) <= MAX_LISTED, f"a missing list longer than {MAX_LISTED} entries must be refused"
    for name in ("name", "tier_reason", "backend_reason"):
        given_text = reply.get(name, "")
        assert isinstance(given_text, str)
        assert getattr(info, name) == given_text or len(given_text) > MAX_TEXT or not _ASCII_PRINTABLE.fullmatch(given_text)


@fuzz(1000)
@given(data=st.data())
@counted("hello reply")
def test_hostile_hello_replies(hello_case: HelloCase, data: st.DataObject) -> None:
    """1-3 edits of an honest hello reply, or arbitrary content: a bounded DeviceInfo, or None with the reason kept."""
    strategy = hello_case.strategy
    strategy.devices.clear()
    strategy.refused.clear()
    kind = data.draw(st.sampled_from(["edit"] * 8 + ["raw", "no-record", "failure"]), label="kind")
    reply: dict[str, Any] | None = None
    if kind == "edit":
        reply = hostile_hello(hello_case, data)
        message: Any = SimpleNamespace(content=hello_reply_to_record(reply))
    elif kind == "raw":
        message = SimpleNamespace(content=record(raw_meta(data)))
    elif kind == "no-record":
        message = SimpleNamespace(content=empty_content(data))
    else:
        message = data.draw(TEXTS, label="failure text")
    node = data.draw(st.sampled_from([1, 2**64 - 59, 0]), label="node")
    info = strategy.accept_hello(node, message)
    if info is None:
        assert node not in strategy.devices
        if isinstance(message, str):
            assert str(node) not in strategy.refused, "a failed node (no content) is not a refused reply"
        else:
            assert_printable(strategy.refused.get(str(node)), "refused hello reason", 600)
            assert strategy.refused[str(node)].startswith("hello: ")
        return
    assert kind == "edit" and reply is not None, f"a {kind} reply was accepted: {info}"
    assert strategy.devices[node] is info and not strategy.refused
    check_device_info(hello_case, info, reply)


def test_honest_hello_is_accepted(hello_case: HelloCase) -> None:
    """The harness is not vacuous: the honest reply joins with what it said; 1000 duplicates are refused."""
    strategy = hello_case.strategy
    info = strategy.accept_hello(5, SimpleNamespace(content=hello_reply_to_record(hello_case.honest)))
    assert info is not None and info.missing == tuple(hello_case.needed[(2, "ort")]) and info.missing_bytes == hello_case.honest["missing_bytes"]
    check_device_info(hello_case, info, hello_case.honest)
    first = hello_case.needed[(2, "ort")][0]
    dup = strategy.accept_hello(6, SimpleNamespace(content=hello_reply_to_record({**hello_case.honest, "missing": [first] * 1000})))
    assert dup is not None and dup.missing == (first,) and dup.missing_bytes == hello_case.known[first]  # de-duplicated
    many = {**hello_case.honest, "missing": [first] * (MAX_LISTED + 1)}
    assert strategy.accept_hello(7, SimpleNamespace(content=hello_reply_to_record(many))) is None and "'missing'" in strategy.refused["7"]


# ====================================================================================================================
# 2. train replies (updates) -> FFTMoEStrategy.aggregate_train
# ====================================================================================================================

COUNTS = {1: 6, 2: 10, 3: 40}
"""Honest example counts: node 3 claims its whole limit (40), so the max-share bound (0.5) binds in the head merge."""
TIERS = {1: 1, 2: 2, 3: 4}
HELLO_TRAIN_EXAMPLES, HELLO_BATCH = 40, 8


@functools.lru_cache(maxsize=None)
def _read_once_class() -> Any:
    from flwr.app import Array

    class ReadOnce(Array):
        """A Flower Array that deserialises its bytes once and then hands out copies: the two honest replies of every
        fuzzed round are the same objects, and reading them again (``np.load`` of each tensor) was half a case's
        time. The hostile reply is always built of plain Arrays."""

        def numpy(self) -> np.ndarray:
            cached = self.__dict__.get("_fuzz_value")
            if cached is None:
                cached = self.__dict__["_fuzz_value"] = super().numpy()
            return cached.copy()

    return ReadOnce


def ReadOnce(value: np.ndarray) -> Any:  # noqa: N802
    return _read_once_class()(value)


@dataclass(repr=False)
class RoundCase:
    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints a failing case's arguments: keep it short
        p.text("<RoundCase>")

    manifest: Manifest
    strategy: FFTMoEStrategy
    state: GlobalState
    sent: dict[int, TrainInstruction]
    honest: dict[int, Update]
    replies: dict[int, Any]  # the honest replies, built once
    limits: dict[int, ReplyLimits]
    other_tier: dict[int, list[Update]]  # node -> valid updates for each tier it was NOT sent
    pool_digest: str
    unit_bounds: dict[int, dict[str, float]] = field(default_factory=dict)
    arrays: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> its honest tensors as Flower Arrays


def _pool_digest(pool: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(pool):
        h.update(k.encode() + pool[k].tobytes())
    return h.hexdigest()


def units_of(tensors: dict[str, Any]) -> dict[str, list[str]]:
    """Unit (an expert, a layer's router rows, a LoRA module, the head) -> its tensor names; statistics are no unit."""
    out: dict[str, list[str]] = {}
    for k in sorted(tensors):
        if not k.startswith("stats."):
            out.setdefault(k.rsplit(".", 1)[0], []).append(k)
    return out


def make_round(bundle: Path, state_dir: Path) -> RoundCase:
    manifest = load_manifest(bundle)
    # head fedavg: the merge computed here covers every unit, the head too (the default frozen head is left out of
    # the merge, tested in test_ridge_head.py)
    strategy = FFTMoEStrategy(RunSettings(bundle=str(bundle), state_dir=str(state_dir), min_clients=2, head="fedavg"))
    state = GlobalState.initial(manifest_id(manifest), load_file(str(bundle / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    train = strategy.settings.train_settings()
    sent = plan_round(state, manifest, TIERS, train)
    strategy.devices = {n: DeviceInfo(sent[n].tier, HELLO_BATCH, "ort", HELLO_TRAIN_EXAMPLES, 4, (), 0) for n in sent}
    honest = {n: trained(sent[n], COUNTS[n], n) for n in sent}
    for n, u in honest.items():
        u.metrics = {"train_loss": 1.0 + n / 10}
    limits = {n: reply_limits(HELLO_TRAIN_EXAMPLES, HELLO_BATCH, sent[n].train, manifest) for n in sent}
    other = {}
    for n in sent:
        other[n] = []
        for t in sorted(manifest.tiers):
            if t != sent[n].tier:
                ins = plan_round(state, manifest, {n: t}, train)[n]
                other[n].append(trained(ins, COUNTS[n], 100 + t))
    replies = {n: SimpleNamespace(content=record(envelope({"round": 1, "update": u.meta()}), {k: ReadOnce(np.ascontiguousarray(v)) for k, v in u.tensors.items()}))
               for n, u in honest.items()}  # fmt: skip
    case = RoundCase(manifest, strategy, state, sent, honest, replies, limits, other, _pool_digest(state.pool))
    for n, u in honest.items():  # the same reply as update_to_record writes it
        assert json.loads(replies[n].content.config_records[META_KEY]["json"]) == json.loads(update_to_record(u, 1).config_records[META_KEY]["json"])
    from flwr.app import Array

    case.arrays = {n: {k: Array(np.ascontiguousarray(v)) for k, v in u.tensors.items()} for n, u in honest.items()}
    lr = strategy.settings.lr
    for n, ins in sent.items():
        case.unit_bounds[n] = {unit: NormBound("auto").for_unit(sum(int(ins.values[k].size) for k in keys), lr, limits[n].max_steps)
                               for unit, keys in units_of(ins.values).items()}  # fmt: skip
    return case


@pytest.fixture(scope="module", autouse=True)
def memoised_manifest_id() -> Any:
    """``Update.validate`` recomputes the bundle id (sha256 of the manifest's canonical JSON, about 10 ms for the tiny
    bundle) for every update; memoised per Manifest object here, which is most of a fuzz case's time otherwise. The
    id of a given (frozen) manifest never changes, so the code under test sees the same values."""
    import edge_runtime.update as update_module

    original = update_module.manifest_id
    seen: dict[int, tuple[Manifest, str]] = {}

    def memoised(manifest: Manifest) -> str:
        hit = seen.get(id(manifest))
        if hit is None or hit[0] is not manifest:
            hit = seen[id(manifest)] = (manifest, original(manifest))
        return hit[1]

    mp = pytest.MonkeyPatch()
    mp.setattr(update_module, "manifest_id", memoised)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def moe_round(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> RoundCase:
    return make_round(tiny_bundle, tmp_path_factory.mktemp("moe-state"))


@pytest.fixture(scope="module")
def lora_round(tiny_hetlora: Path, tmp_path_factory: pytest.TempPathFactory) -> RoundCase:
    return make_round(tiny_hetlora, tmp_path_factory.mktemp("lora-state"))


@dataclass
class Hostile:
    """One hostile train reply under construction: the envelope (with the update's meta), the tensors, and what the
    edits imply: ``expect`` is "reject" when some edit makes the update wrong, "accept" when every edit leaves a
    valid update, else "any"; ``claimed`` the example count it claims as the coordinator must read it."""

    doc: dict[str, Any]
    tensors: dict[str, Any]
    expect: set[str] = field(default_factory=set)
    claimed: int | None = None
    content: Any = None  # set when the whole content is replaced
    edits: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        return "reject" if "reject" in self.expect else "accept" if self.expect == {"accept"} else "any"


NUM_EXAMPLES = [10**309, 10**12, 2**53 + 1, 41, 40, 1, 0, -1, 1.5, True, False, "3", "-3", None, float("nan"), float("inf"), [], {}, "x", 2**63]
METRIC_VALUES = [10**308, 2**1023, 17 * 10**307, 10**400, -(10**308), 1e308, -1e308, 1.7976931348623157e308, float("nan"), float("inf"), "x",
                 True, None, [1], {}, 0, -5, 1e-300]  # fmt: skip
HUGE_FINITE = [3e38, -3e38, 1e30, -1e30, float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max), 1e20]
BAD_DTYPES = [np.float64, np.float16, np.int32, np.int8, np.uint8, np.bool_, np.complex64, np.int64]
EXTRA_NAMES = ["layers.0.experts.9.w1", "head.extra", "stats.other", "x", "\x1b[31mred", "é" * 3, "n\nforged", "k" * 10_000, "",
               "layers.0.router_rows.weight", "lora.x.A"]  # fmt: skip


def meta_edit(h: Hostile, case: RoundCase, node: int, data: st.DataObject, done: set[str]) -> None:
    meta = h.doc["update"]
    if not isinstance(meta, dict):  # an envelope edit replaced the whole meta
        return
    ins = case.sent[node]
    key = data.draw(st.sampled_from(["num_examples", "tier", "assignment", "format", "format_version", "manifest_id", "metrics", "delete", "add"]),
                    label="meta field")  # fmt: skip
    if key in done:
        return
    done.add(key)
    h.edits.append(f"meta.{key}")
    if key == "num_examples":
        v = data.draw(st.sampled_from(NUM_EXAMPLES) | ANY_VALUE, label="num_examples")
        meta[key] = v
        n = strict_int(v)
        if n is None or not 1 <= n <= MAX_COUNT:
            h.expect.add("reject")
        else:  # a small count is refused when the (honest) routing statistics need more tokens than it holds
            tokens = min(n, case.limits[node].max_examples) * case.limits[node].tokens_per_example
            top_k = 1 if case.manifest.is_lora else case.manifest.tier(ins.tier).top_k
            fits = float(np.asarray(case.honest[node].route_counts, np.float64).sum(axis=1).max()) <= tokens * top_k * (1 + 1e-4) + 1
            h.expect.add("accept" if fits else "any")
        h.claimed = n
    elif key == "tier":
        v = data.draw(st.sampled_from([t for t in case.manifest.tiers if t != ins.tier] + [0, 3, 99, -1, "2", 2.5, 1.0, True, None, 10**309, [ins.tier]]),
                      label="tier")  # fmt: skip
        meta[key] = v
        h.expect.add("any" if strict_int(v) == ins.tier else "reject")
    elif key == "assignment":
        a = copy.deepcopy(ins.assignment)
        M = case.manifest.num_experts
        choice = data.draw(st.sampled_from(["permute", "other", "dup", "short", "long", "float", "junk", "json"]), label="assignment")
        if choice == "permute":
            a = [list(reversed(ids)) for ids in a]
        elif choice == "other":
            a[0][0] = next((e for e in range(M) if e not in a[0]), M)
        elif choice == "dup":
            a[-1] = [a[-1][0]] * len(a[-1])
        elif choice == "short":
            a = a[:-1]
        elif choice == "long":
            a = a + [a[0]]
        elif choice == "float":
            a = [[i + 0.5 for i in ids] for ids in a]
        elif choice == "junk":
            a = data.draw(st.sampled_from([[], "x", None, 5, [[None]], [["0"]], [[10**309]], [[-1]], [[float("nan")]]]), label="junk")
        else:
            a = data.draw(ANY_VALUE, label="assignment value")
        meta[key] = a
        try:
            same = all(strict_int(i) is not None for ids in a for i in ids) and [list(ids) for ids in a] == ins.assignment
        except TypeError:
            same = False
        h.expect.add("any" if same else "reject")
    elif key == "format":
        v = data.draw(st.sampled_from(["fftmoe-update2", "", "FFTMOE-UPDATE", None, 1, "fftmoe-update\n"]) | TEXTS, label="format")
        meta[key] = v
        h.expect.add("any" if str(v) == "fftmoe-update" else "reject")
    elif key == "format_version":
        v = data.draw(st.sampled_from([2, 0, -1, "1", 1.0, True, None, 10**309, "x"]), label="format_version")
        meta[key] = v
        h.expect.add("any" if strict_int(v) == 1 else "reject")
    elif key == "manifest_id":
        v = data.draw(st.sampled_from(["0" * 16, "", "../x", None, ins.manifest_id.upper(), ins.manifest_id + "0"]) | TEXTS, label="manifest_id")
        meta[key] = v
        h.expect.add("any" if str(v) == ins.manifest_id else "reject")
    elif key == "metrics":
        name = data.draw(st.sampled_from(["train_loss", "steps", "seconds", "x", "\x1b[2J", "peak_rss_mb"]), label="metric")
        v = data.draw(st.sampled_from(METRIC_VALUES), label="metric value")
        if data.draw(st.booleans(), label="non-dict metrics"):
            meta[key] = data.draw(ANY_VALUE, label="metrics value")
            h.expect.add("any")
        else:
            meta[key] = {**(meta[key] if isinstance(meta.get(key), dict) else {}), name: v}
            h.expect.add("accept" if _metric_ok(v) else "reject")
    elif key == "delete":
        if not meta:
            return
        k = data.draw(st.sampled_from(sorted(meta)), label="deleted")
        if k in done:
            return
        done.add(k)
        del meta[k]
        h.expect.add("accept" if k == "metrics" else "reject")
    else:
        meta[data.draw(TEXTS.filter(lambda s: s not in meta), label="new key")] = data.draw(ANY_VALUE, label="new value")
        h.expect.add("accept")


def envelope_edit(h: Hostile, data: st.DataObject, done: set[str]) -> None:
    key = data.draw(st.sampled_from(["round", "messages_format", "messages_version", "update"]), label="envelope field")
    if key in done:
        return
    done.add(key)
    h.edits.append(f"envelope.{key}")
    if key == "round":
        v = data.draw(st.sampled_from([0, 2, -1, 10**309, "1", 1.0, True, None, float("nan"), [1]]) | ANY_VALUE, label="round")
        h.doc[key] = v
        h.expect.add("any" if isinstance(v, int) and v == 1 else "reject")
    elif key == "messages_format":
        v = data.draw(st.sampled_from(["fftmoe-messages2", "", None, 1]) | TEXTS, label="messages_format")
        h.doc[key] = v
        h.expect.add("any" if v == MESSAGES_FORMAT else "reject")
    elif key == "messages_version":
        v = data.draw(st.sampled_from([0, 2, "1", None, 1.5]) | ANY_VALUE, label="messages_version")
        h.doc[key] = v
        h.expect.add("any" if v == MESSAGES_VERSION else "reject")
    else:
        v = data.draw(ANY_VALUE, label="update value")
        h.doc[key] = v
        h.expect.add("reject")


def tensor_edit(h: Hostile, case: RoundCase, node: int, data: st.DataObject, done: set[str]) -> None:
    params = sorted(k for k in h.tensors if not k.startswith("stats."))
    name = data.draw(st.sampled_from(params), label="tensor")
    if name in done:
        return
    done.add(name)
    value = np.array(h.tensors[name], copy=True)
    edit = data.draw(st.sampled_from(["huge-one", "huge-all", "nan", "inf", "dtype", "shape", "transpose", "scalar", "empty", "drop", "extra",
                                      "unassigned", "tiny", "array"]), label="tensor edit")  # fmt: skip
    h.edits.append(f"tensor.{edit}")
    if edit in ("huge-one", "huge-all"):
        v = data.draw(st.sampled_from(HUGE_FINITE), label="huge")
        if edit == "huge-all":
            value[...] = v
        else:
            value.reshape(-1)[data.draw(st.integers(0, value.size - 1), label="at")] = v
        h.tensors[name] = value
        h.expect.add("accept")
    elif edit in ("nan", "inf"):
        value.reshape(-1)[data.draw(st.integers(0, value.size - 1), label="at")] = np.nan if edit == "nan" else data.draw(st.sampled_from([np.inf, -np.inf]), label="sign")
        h.tensors[name] = value
        h.expect.add("reject")
    elif edit == "dtype":
        h.tensors[name] = value.astype(data.draw(st.sampled_from(BAD_DTYPES), label="dtype"))
        h.expect.add("reject")
    elif edit == "shape":
        h.tensors[name] = np.concatenate([value.reshape(-1), np.zeros(data.draw(st.integers(1, 5), label="pad"), np.float32)])
        h.expect.add("reject")
    elif edit == "transpose":
        h.tensors[name] = np.ascontiguousarray(value.T)
        h.expect.add("accept" if value.T.shape == value.shape and value.ndim < 2 else "any" if value.T.shape == value.shape else "reject")
    elif edit == "scalar":
        h.tensors[name] = np.float32(1.0).reshape(())
        h.expect.add("reject")
    elif edit == "empty":
        h.tensors[name] = np.zeros((0,), np.float32)
        h.expect.add("reject")
    elif edit == "drop":
        del h.tensors[name]
        h.expect.add("reject")
    elif edit == "extra":
        extra = data.draw(st.sampled_from(EXTRA_NAMES), label="extra name")
        h.expect.add("any" if extra in h.tensors else "reject")  # an existing name is a replaced tensor, not an extra one
        h.tensors[extra] = value
    elif edit == "unassigned":
        held = set(case.sent[node].assignment[0])
        other = next((e for e in range(case.manifest.num_experts) if e not in held), case.manifest.num_experts)
        h.tensors[global_expert_key(0, other, "w1")] = np.zeros((case.manifest.hidden_size, case.manifest.expert_dim), np.float32)
        h.expect.add("reject")
    elif edit == "tiny":
        h.tensors[name] = (value + np.float32(1e-6)).astype(np.float32)
        h.expect.add("accept")
    else:
        h.tensors[name] = hostile_array(data)
        h.expect.add("reject")


def hostile_array(data: st.DataObject) -> Any:
    """A Flower Array whose dtype, shape and bytes do not agree, or whose bytes are no .npy at all."""
    from flwr.app import Array

    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32))
    npy = buf.getvalue()
    payload = data.draw(st.sampled_from([b"", b"garbage", npy[:20], npy[:-3], npy.replace(b"<f4", b"<f8"), npy.replace(b"(6,)", b"(9,)"),
                                         npy.replace(b"(6,)", b"(0,)"), npy.replace(b"'<f4'", b"'|O'"), b"PK\x03\x04" + b"\x00" * 40]) | st.binary(max_size=64),
                        label="array bytes")  # fmt: skip
    stype = data.draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch.Tensor", ""]), label="stype")
    return Array(dtype="float32", shape=(6,), stype=stype, data=payload)


def stats_edit(h: Hostile, data: st.DataObject, done: set[str]) -> None:
    name = data.draw(st.sampled_from(["stats.route_counts", "stats.route_prob_sum"]), label="statistic")
    if name in done:
        return
    done.add(name)
    value = np.array(h.tensors[name], copy=True)
    edit = data.draw(st.sampled_from(["huge-one", "huge-all", "negative", "shape", "zeros", "nan", "drop"]), label="stats edit")
    h.edits.append(f"stats.{edit}")
    if edit == "huge-one":
        value.reshape(-1)[data.draw(st.integers(0, value.size - 1), label="at")] = data.draw(st.sampled_from([1e30, 3e38, 1e9]), label="huge")
        h.expect.add("reject")
    elif edit == "huge-all":
        value[...] = data.draw(st.sampled_from([1e30, 3e38, 1e7]), label="huge")
        h.expect.add("reject")
    elif edit == "negative":
        value.reshape(-1)[0] = -1.0
        h.expect.add("reject")
    elif edit == "shape":
        value = np.zeros((value.shape[0] + 1, value.shape[1]), np.float32)
        h.expect.add("reject")
    elif edit == "zeros":
        value[...] = 0.0
        h.expect.add("accept")
    elif edit == "nan":
        value.reshape(-1)[0] = np.nan
        h.expect.add("reject")
    else:
        del h.tensors[name]
        h.expect.add("reject")
        return
    h.tensors[name] = value


def hostile_update(case: RoundCase, node: int, data: st.DataObject) -> Hostile:
    base = case.honest[node]
    h = Hostile(envelope({"round": 1, "update": copy.deepcopy(base.meta())}), dict(base.tensors))
    h.claimed = base.num_examples
    family = data.draw(st.sampled_from(["edits"] * 10 + ["valid"] * 5 + ["other-tier", "other-tier", "raw-json", "no-record", "no-arrays", "generic"]),
                       label="family")  # fmt: skip
    h.edits.append(family)
    if family == "other-tier":  # a valid update, but for a tier this node was not sent
        other = data.draw(st.sampled_from(case.other_tier[node]), label="other tier")
        h.doc["update"], h.tensors = other.meta(), dict(other.tensors)
        h.expect.add("reject")
    elif family == "raw-json":
        h.content = record(raw_meta(data), h.tensors)
        h.expect.add("reject")
    elif family == "no-record":
        h.content = empty_content(data)
        h.expect.add("reject")
    elif family == "no-arrays":
        h.content = record(h.doc, h.tensors, array_name=data.draw(st.sampled_from(["updates", "values", ""]), label="array record"))
        h.expect.add("reject")
    elif family == "generic":
        h.doc = mutate(h.doc, data)
        h.expect.add("any")
        h.claimed = None
    elif family == "valid":  # edits that leave a valid update, which must be accepted (clipped, capped) and merged
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            which = data.draw(st.sampled_from(["huge", "huge", "tiny", "count", "metric", "zeros"]), label="valid edit")
            h.edits.append(f"valid.{which}")
            if which in ("huge", "tiny"):
                name = data.draw(st.sampled_from(sorted(k for k in h.tensors if not k.startswith("stats."))), label="tensor")
                value = np.array(h.tensors[name], copy=True)
                if which == "tiny":
                    value += np.float32(1e-6)
                elif data.draw(st.booleans(), label="all"):
                    value[...] = data.draw(st.sampled_from(HUGE_FINITE), label="huge")
                else:
                    value.reshape(-1)[data.draw(st.integers(0, value.size - 1), label="at")] = data.draw(st.sampled_from(HUGE_FINITE), label="huge")
                h.tensors[name] = value
            elif which == "count":
                h.claimed = h.doc["update"]["num_examples"] = data.draw(st.sampled_from([10**12, MAX_COUNT, 41, 1000, 40, 2**40]), label="count")
            elif which == "metric":
                name = data.draw(st.sampled_from(["train_loss", "steps", "seconds", "x"]), label="metric")
                h.doc["update"]["metrics"][name] = data.draw(st.sampled_from([0, -5, MAX_METRIC, -MAX_METRIC, 10**30, -(10**30), 1e-300, 3.5]), label="metric value")
            else:
                h.tensors[data.draw(st.sampled_from(["stats.route_counts", "stats.route_prob_sum"]), label="statistic")] = np.zeros_like(h.tensors["stats.route_counts"])
        h.expect.add("accept")
    else:
        done: set[str] = set()
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            which = data.draw(st.sampled_from(["meta", "meta", "envelope", "tensor", "tensor", "stats"]), label="edit family")
            if which == "meta":
                meta_edit(h, case, node, data, done)
            elif which == "envelope":
                envelope_edit(h, data, done)
            elif which == "tensor":
                tensor_edit(h, case, node, data, done)
            else:
                stats_edit(h, data, done)
    if h.content is None:  # tensors left as they were travel as the honest reply's Arrays (bytes identical, built once)
        honest = case.honest[node].tensors
        h.content = record(h.doc, {k: case.arrays[node][k] if v is honest.get(k) else v for k, v in h.tensors.items()})
    return h


# -- the oracle of a merged round, computed here ---------------------------------------------------------------------


def water_fill(weights: list[float], max_share: float) -> np.ndarray:
    """Shares summing to 1, proportional to ``weights`` except that none exceeds cap = max(max_share, 1/n): the
    largest weights are cut to the cap and the rest renormalised (closed form over how many are capped)."""
    w = np.asarray(weights, np.float64)
    assert (w > 0).all() and np.isfinite(w).all(), w
    n = len(w)
    if max_share >= 1.0:
        return w / w.sum()
    cap = max(max_share, 1.0 / n)
    order = np.argsort(-w)
    for k in range(n):  # the k largest are capped
        rest = w[order[k:]]
        lam = (1.0 - k * cap) / rest.sum()
        if lam * rest.max() <= cap * (1 + 1e-12) and (k == 0 or lam * w[order[k - 1]] >= cap * (1 - 1e-12)):
            shares = np.empty(n)
            shares[order[:k]] = cap
            shares[order[k:]] = lam * rest
            assert abs(shares.sum() - 1) < 1e-9 and (shares <= cap + 1e-9).all()
            return shares
    raise AssertionError(f"no water-filling solution for {weights}")  # pragma: no cover


def clip_here(tensors: dict[str, np.ndarray], sent: dict[str, np.ndarray], bounds: dict[str, float]) -> dict[str, np.ndarray]:
    """Each unit's change from what was sent scaled down to its bound where it is larger (float64, back to float32)."""
    out = dict(tensors)
    for unit, keys in units_of(tensors).items():
        norm = math.sqrt(sum(float(np.square(tensors[k].astype(np.float64) - sent[k].astype(np.float64)).sum()) for k in keys))
        if norm > bounds[unit]:
            for k in keys:
                base = sent[k].astype(np.float64)
                out[k] = (base + (bounds[unit] / norm) * (tensors[k].astype(np.float64) - base)).astype(np.float32)
    return out


def expected_pool(case: RoundCase, accepted: dict[int, dict[str, np.ndarray]], weights: dict[int, int], max_share: float) -> dict[str, np.ndarray]:
    """The merged pool by the documented rules, from the clipped accepted updates (node -> tensors) and their counts:
    each expert (router row) the capped-share mean over the nodes that hold it (hold its row), the head over all;
    a LoRA bundle's modules zero-padded and weighted by ||B A||_F (HetLoRA) or the counts (FedIT)."""
    m, old = case.manifest, case.state.pool
    out = {k: v.astype(np.float64) for k, v in old.items()}
    nodes = sorted(accepted)
    if m.is_lora:
        modules = sorted({k[len("lora."):-2] for k in old if k.startswith("lora.")})
        for module in modules:
            ka, kb = global_lora_key(module, "A"), global_lora_key(module, "B")
            rank = old[ka].shape[0]
            pads = []
            for n in nodes:
                a, b = accepted[n][ka].astype(np.float64), accepted[n][kb].astype(np.float64)
                pa, pb = np.zeros((rank, a.shape[1])), np.zeros((b.shape[0], rank))
                pa[: a.shape[0]], pb[:, : b.shape[1]] = a, b
                pads.append((pa, pb, float(np.linalg.norm(b @ a))))
            w = [p[2] for p in pads] if m.method == "hetlora" and sum(p[2] for p in pads) > 0 else [float(weights[n]) for n in nodes]
            shares = water_fill(w, max_share)
            out[ka] = sum(s * p[0] for s, p in zip(shares, pads))
            out[kb] = sum(s * p[1] for s, p in zip(shares, pads))
    else:
        for layer in range(m.num_layers):
            for e in range(m.num_experts):
                holders = [n for n in nodes if e in case.sent[n].assignment[layer]]
                if holders:
                    shares = water_fill([weights[n] for n in holders], max_share)
                    for t in EXPERT_TENSORS:
                        key = global_expert_key(layer, e, t)
                        out[key] = sum(s * accepted[n][key].astype(np.float64) for s, n in zip(shares, holders))
                rows = [n for n in holders if router_rows_key(layer, "weight") in accepted[n]]
                if rows:
                    shares = water_fill([weights[n] for n in rows], max_share)
                    for t in ROUTER_TENSORS:
                        slot = {n: case.sent[n].assignment[layer].index(e) for n in rows}
                        out[global_router_key(layer, t)][e] = sum(s * accepted[n][router_rows_key(layer, t)][slot[n]].astype(np.float64)
                                                                  for s, n in zip(shares, rows))  # fmt: skip
    shares = water_fill([weights[n] for n in nodes], max_share)
    for t in HEAD_TENSORS:
        key = global_head_key(t)
        out[key] = sum(s * accepted[n][key].astype(np.float64) for s, n in zip(shares, nodes))
    return out


def assert_pools_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every tensor of ``got`` equals ``want`` to float32 rounding (``assert_allclose``'s rule, checked in one pass)."""
    assert set(got) == set(want), f"{what}: pool keys differ: {set(got) ^ set(want)}"
    for key, value in got.items():
        if not (np.abs(value.astype(np.float64) - want[key]) <= atol + rtol * np.abs(want[key])).all():
            np.testing.assert_allclose(value, want[key], rtol=rtol, atol=atol, err_msg=f"{key} {what}")


def check_moves(case: RoundCase, new: dict[str, np.ndarray], accepted: dict[int, dict[str, np.ndarray]]) -> None:
    """No unit of the pool moved further than the largest bound of the accepted updates carrying it (HetLoRA's zero
    padding may also pull a module towards 0, by at most its old norm)."""
    old, m = case.state.pool, case.manifest
    largest: dict[str, float] = {}
    for n in accepted:
        for unit, b in case.unit_bounds[n].items():
            names = [f"layers.{unit.split('.')[1]}.router.{e}" for e in case.sent[n].assignment[int(unit.split(".")[1])]] if ".router_rows" in unit else [unit]
            for name in names:
                largest[name] = max(largest.get(name, 0.0), b)
    moves: dict[str, float] = {}
    old_sq: dict[str, float] = {}
    for key, value in new.items():
        delta = value.astype(np.float64) - old[key].astype(np.float64)
        if ".router." in key:
            for e, sq in enumerate(np.square(delta).reshape(delta.shape[0], -1).sum(axis=1)):
                name = f"layers.{key.split('.')[1]}.router.{e}"
                moves[name] = moves.get(name, 0.0) + float(sq)
        else:
            unit = key.rsplit(".", 1)[0]
            moves[unit] = moves.get(unit, 0.0) + float(np.square(delta).sum())
            old_sq[unit] = old_sq.get(unit, 0.0) + float(np.square(old[key].astype(np.float64)).sum())
    for unit, sq in moves.items():
        if sq == 0.0:
            continue
        assert unit in largest, f"{unit} moved by {math.sqrt(sq):.4g} though no accepted update carries it"
        allowed = largest[unit] + (math.sqrt(old_sq[unit]) if m.method == "hetlora" and unit.startswith("lora.") else 0.0)
        assert math.sqrt(sq) <= allowed * (1 + 1e-3) + 1e-6, f"{unit} moved by {math.sqrt(sq):.6g}, more than the {allowed:.6g} allowed"


def run_hostile_round(case: RoundCase, data: st.DataObject) -> None:
    node = data.draw(st.sampled_from(sorted(case.sent)), label="hostile node")
    h = hostile_update(case, node, data)
    replies = {n: (SimpleNamespace(content=h.content) if n == node else r) for n, r in case.replies.items()}
    strategy = case.strategy
    new, screened, why = strategy.aggregate_train(case.state, case.sent, replies)
    honest = [n for n in case.sent if n != node]
    assert all(n in screened.accepted for n in honest), f"honest node(s) rejected: {screened.rejected}"
    assert set(screened.rejected) <= {node}
    for n, reason in screened.rejected.items():
        assert_printable(reason, f"rejection of node {n}")
    verdict = h.verdict()
    if verdict == "reject":
        assert node in screened.rejected, f"edits {h.edits} make the update wrong, but it was accepted"
    elif verdict == "accept":
        assert node in screened.accepted, f"edits {h.edits} leave a valid update, but it was rejected: {screened.rejected.get(node)}"
    assert new is not None, f"a round with two honest replies failed: {why}"
    entry = new.history[-1]
    examples = {int(k): v for k, v in entry["examples"].items()}
    assert set(examples) == set(screened.accepted) and entry["accepted"] == sorted(screened.accepted)
    for n in honest:
        assert examples[n] == COUNTS[n]
    if node in screened.accepted:
        assert type(examples[node]) is int and 1 <= examples[node] <= case.limits[node].max_examples, examples
        if h.claimed is not None:
            assert examples[node] == min(h.claimed, case.limits[node].max_examples)
            assert (entry["capped"].get(str(node)) == h.claimed) == (h.claimed > case.limits[node].max_examples)
    for key, value in new.pool.items():
        assert value.dtype == np.float32 and np.isfinite(value).all(), f"the merged {key} is not finite"
    # the accepted updates as this test sent them, clipped here
    accepted = {}
    for n in screened.accepted:
        sent_tensors = h.tensors if n == node else case.honest[n].tensors
        tensors = {k: v if isinstance(v, np.ndarray) else np.asarray(v.numpy()) for k, v in sent_tensors.items()}
        accepted[n] = clip_here(tensors, case.sent[n].values, case.unit_bounds[n])
    want = expected_pool(case, accepted, examples, strategy.settings.max_share)
    assert_pools_close(new.pool, want, f"after edits {h.edits}")
    check_moves(case, new.pool, accepted)
    if node in screened.accepted:  # the head merge: the hostile node's share never above max_share
        w = water_fill([examples[n] for n in sorted(examples)], strategy.settings.max_share)
        assert w[sorted(examples).index(node)] <= strategy.settings.max_share + 1e-9
    CASES[f"train reply ({'lora' if case.manifest.is_lora else 'moe'}) {'accepted' if node in screened.accepted else 'rejected'}"] += 1


@fuzz(1000)
@given(data=st.data())
@counted("train reply (fft-moe)")
def test_hostile_train_replies_fftmoe(moe_round: RoundCase, data: st.DataObject) -> None:
    """One hostile reply among two honest ones, on the FFT-MoE bundle: the honest ones merge, exactly and bounded."""
    run_hostile_round(moe_round, data)


@fuzz(300)
@given(data=st.data())
@counted("train reply (hetlora)")
def test_hostile_train_replies_hetlora(lora_round: RoundCase, data: st.DataObject) -> None:
    """The same on a HetLoRA bundle, where an update for another tier (another rank) must be rejected."""
    run_hostile_round(lora_round, data)


@pytest.mark.parametrize("bundle", ["moe_round", "lora_round"])
def test_honest_round_merges_as_computed_here(bundle: str, request: pytest.FixtureRequest) -> None:
    """The harness is not vacuous: three honest replies merge to the pool computed here, and the max share binds."""
    case: RoundCase = request.getfixturevalue(bundle)
    new, screened, why = case.strategy.aggregate_train(case.state, case.sent, case.replies)
    assert new is not None and sorted(screened.accepted) == [1, 2, 3], (why, screened.rejected)
    accepted = {n: clip_here(case.honest[n].tensors, case.sent[n].values, case.unit_bounds[n]) for n in case.sent}
    want = expected_pool(case, accepted, COUNTS, 0.5)
    assert_pools_close(new.pool, want, "honest round")
    check_moves(case, new.pool, accepted)
    assert water_fill([6, 10, 40], 0.5).max() == pytest.approx(0.5)  # node 3 alone would hold 40/56 of the head
    assert _pool_digest(case.state.pool) == case.pool_digest, "aggregate_train modified the state it was given"


# ====================================================================================================================
# 3. evaluate replies -> FFTMoEStrategy.aggregate_evaluate
# ====================================================================================================================

EVAL_HELD = {1: 4, 2: 10, 3: 0}
"""Node -> its hello's eval_examples; node 4 sent no hello (0)."""
ROUND = 3


@pytest.fixture(scope="module")
def eval_strategy(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> FFTMoEStrategy:
    strategy = FFTMoEStrategy(RunSettings(bundle=str(tiny_bundle), state_dir=str(tmp_path_factory.mktemp("eval-state"))))
    strategy.devices = {n: DeviceInfo(2, 8, "ort", 40, held, (), 0) for n, held in EVAL_HELD.items()}
    return strategy


EVAL_NEAR = {
    "accuracy": [-0.1, -0.0, 0.0, 1.0, 1.0000001, 1.5, 1e308, 10**309, 10**308, float("nan"), float("inf"), "0.5", True, None, 2],
    "loss": [-1, -0.0, 0, 1e308, 1.7976931348623157e308, 4.5e307, 10**308, 10**309, float("nan"), float("inf"), "1", True, None, 5e-324],
    "examples": [0, 1, 3, 4, 5, 10, 11, -1, 4.5, 4.0, 10**309, 2**53, 1e300, float("nan"), "4", True, None, -0.0],
}  # fmt: skip


def hostile_evaluation(held: int, data: st.DataObject) -> Any:
    """(the JSON envelope or a raw value, its description) of one evaluate reply."""
    n = data.draw(st.integers(0, max(0, held)), label="examples")
    metrics: dict[str, Any] = {"accuracy": data.draw(st.floats(0, 1), label="acc"), "loss": data.draw(st.floats(0, 50), label="loss"),
                               "examples": float(n), "received_bytes": 1234.0, "seconds": 0.5}  # fmt: skip
    doc: dict[str, Any] = envelope({"round": ROUND, "metrics": metrics})
    for _ in range(data.draw(st.integers(0, 3), label="edits")):
        action = data.draw(st.sampled_from(["near", "near", "delete", "add", "value", "round", "envelope", "metrics", "generic"]), label="action")
        if action == "near":
            key = data.draw(st.sampled_from(sorted(EVAL_NEAR)), label="metric")
            metrics[key] = data.draw(st.sampled_from(EVAL_NEAR[key]), label="near")
        elif action == "delete":
            metrics.pop(data.draw(st.sampled_from(["accuracy", "loss", "examples"]), label="deleted"), None)
        elif action == "add":
            metrics[data.draw(TEXTS, label="new metric")] = data.draw(JSON_SCALARS, label="new value")
        elif action == "value":
            metrics[data.draw(st.sampled_from(["accuracy", "loss", "examples", "seconds"]), label="metric")] = data.draw(ANY_VALUE, label="value")
        elif action == "round":
            doc["round"] = data.draw(st.sampled_from([ROUND - 1, ROUND + 1, 0, -1, 10**309, "3", 3.0, True, None, [3]]), label="round")
        elif action == "envelope":
            doc[data.draw(st.sampled_from(["messages_format", "messages_version"]), label="field")] = data.draw(JSON_SCALARS, label="value")
        elif action == "metrics":
            doc["metrics"] = metrics = data.draw(ANY_VALUE.filter(lambda v: not isinstance(v, dict)), label="metrics")  # type: ignore[assignment]
            break
        else:
            doc = mutate(doc, data, 1)
            metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    return doc


def _finite_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _metric_ok(v: Any) -> bool:
    """The contract for an update's metric: a finite number of magnitude <= MAX_METRIC (update-format.md)."""
    return _finite_number(v) and abs(v) <= MAX_METRIC


def judge_evaluation(doc: Any, held: int) -> tuple[str, Any]:
    """The verdict the reply deserves, by the documented contract: ("reject", why), ("skip", None) (a valid reply to
    another round, or without examples) or ("ok", (examples, accuracy, loss)), numbers as Fractions (exact)."""
    if not isinstance(doc, dict) or doc.get("messages_format") != MESSAGES_FORMAT or doc.get("messages_version") != MESSAGES_VERSION:
        return "reject", "envelope"
    metrics = doc.get("metrics")
    if not isinstance(doc.get("round"), int) or not isinstance(metrics, dict):
        return "reject", "round or metrics"
    if not all(_finite_number(v) for v in metrics.values()):
        return "reject", "a metric is not a finite number"
    values = {str(k): float(v) for k, v in metrics.items()}
    ex = values.get("examples")
    if ex is None or ex != int(ex) or not 0 <= ex <= held:
        return "reject", "examples"
    if ex == 0:
        return "skip", None
    acc, loss = values.get("accuracy"), values.get("loss")
    if acc is None or not 0.0 <= acc <= 1.0:
        return "reject", "accuracy"
    if loss is None or not (math.isfinite(loss) and 0 <= loss <= MAX_METRIC):
        return "reject", "loss"
    if doc["round"] != ROUND:
        return "skip", None
    return "ok", (int(ex), Fraction(acc), Fraction(loss))


@fuzz(1000)
@given(data=st.data())
@counted("evaluate reply")
def test_hostile_evaluate_replies(eval_strategy: FFTMoEStrategy, data: st.DataObject) -> None:
    """1-4 nodes' evaluate replies, each honest, edited, arbitrary or a failure: bounded figures, rejections named."""
    nodes = data.draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=4, unique=True), label="nodes")
    replies: dict[int, Any] = {}
    verdicts: dict[int, tuple[str, Any]] = {}
    for n in nodes:
        held = EVAL_HELD.get(n, 0)
        kind = data.draw(st.sampled_from(["edited"] * 6 + ["honest", "raw", "no-record", "failure"]), label="kind")
        if kind == "failure":
            replies[n] = data.draw(TEXTS, label="failure")
            verdicts[n] = ("failed", None)
            continue
        if kind == "honest":
            ex = data.draw(st.integers(0, held), label="examples")
            content = metrics_to_record(ROUND, {"accuracy": 0.75, "loss": 0.5, "examples": float(ex)})
            doc: Any = envelope({"round": ROUND, "metrics": {"accuracy": 0.75, "loss": 0.5, "examples": float(ex)}})
        elif kind == "edited":
            doc = hostile_evaluation(held, data)
            content = record(doc)
        elif kind == "raw":
            doc = raw_meta(data)
            content = record(doc)
            try:
                doc = json.loads(doc) if isinstance(doc, (str, bytes)) else None
            except ValueError:
                doc = None
        else:
            doc, content = None, empty_content(data)
        replies[n] = SimpleNamespace(content=content)
        verdicts[n] = judge_evaluation(doc, held)
    out = eval_strategy.aggregate_evaluate(ROUND, replies)
    rejected = {n for n, v in verdicts.items() if v[0] == "reject"}
    oks = {n: v[1] for n, v in verdicts.items() if v[0] == "ok"}
    if not oks:
        assert out == ({"rejected": out["rejected"]} if rejected else None), out
    if rejected:
        assert set(out["rejected"]) == {str(n) for n in rejected}, (out["rejected"], verdicts)
        for n, reason in out["rejected"].items():
            assert_printable(reason, f"rejected evaluation of node {n}", 600)
    elif out is not None:
        assert "rejected" not in out
    if not oks:
        return
    assert set(out["per_node"]) == {str(n) for n in oks}, (out, verdicts)
    total = sum(ex for ex, _, _ in oks.values())
    assert out["examples"] == total <= sum(EVAL_HELD.get(n, 0) for n in nodes) and out["nodes"] == len(oks)
    for n, (ex, acc, loss) in oks.items():
        assert out["per_node"][str(n)] == {"accuracy": float(acc), "loss": float(loss), "examples": float(ex)}
    assert 0.0 <= out["accuracy"] <= 1.0
    assert out["accuracy"] == pytest.approx(float(sum(ex * acc for ex, acc, _ in oks.values()) / total), rel=1e-9, abs=1e-12)
    assert math.isfinite(out["loss"]) and out["loss"] >= 0, out
    assert out["loss"] == pytest.approx(float(sum(ex * loss for ex, _, loss in oks.values()) / total), rel=1e-9, abs=1e-300)


# ====================================================================================================================
# 4. the coordinator -> device direction: artifacts written into the cache, train instructions
# ====================================================================================================================


@dataclass(repr=False)
class DeviceCase:
    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints a failing case's arguments: keep it short
        p.text("<DeviceCase>")

    manifest: Manifest
    bundle: Path
    mid: str
    root: Path
    node: NodeSettings
    folder: Path  # the bundle's cache folder
    outside: dict[str, str]  # every file under root outside ``folder`` -> its sha256
    entries: dict[str, Any]
    bundle_snapshot: dict[str, str]


def _tree(root: Path, unhashed: str = "\0") -> dict[str, str]:
    """Every regular file and symbolic link under ``root`` (links not followed), by path relative to ``root`` -> its
    sha256, "link:<target>" for a link, "" for a file under the relative folder ``unhashed`` (checked otherwise).
    Plain string paths: pathlib costs more than the case itself here."""
    out = {}
    cut = len(str(root)) + 1
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = full[cut:]
            if os.path.islink(full):
                out[rel] = "link:" + os.readlink(full)
            elif rel.startswith(unhashed):
                out[rel] = ""
            else:
                with open(full, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def device_case(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> DeviceCase:
    manifest = load_manifest(tiny_bundle)
    mid = manifest_id(manifest)
    root = tmp_path_factory.mktemp("device")
    (root / "data.csv").write_text("text,label\nthe news,world\n")
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("do not touch\n")
    (root / "outside" / "checkpoint").write_bytes(b"\x00" * 64)
    other = root / "cache" / "fedcba9876543210"  # another bundle's folder (no manifest: nothing can be written there)
    other.mkdir(parents=True)
    (other / "keep.bin").write_bytes(b"other bundle")
    (root / "stash").mkdir()
    node = NodeSettings(data=root / "data.csv", cache_dir=root / "cache")
    folder = bundle_dir_for(node, manifest, mid)
    inside = str(folder.relative_to(root)) + "/"
    outside = {k: v for k, v in _tree(root).items() if not k.startswith(inside)}
    snapshot = {e.path: e.sha256 for e in manifest.all_files()}
    return DeviceCase(manifest, tiny_bundle, mid, root, node, folder, outside, {e.path: e for e in manifest.all_files()}, snapshot)


def hostile_chunks(case: DeviceCase, data: st.DataObject) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the listed chunks, the bytes by key) of one artifacts message: honest pieces of real files mixed with hostile
    paths, offsets, keys and data."""
    small = sorted(p for p, e in case.entries.items() if e.size < 40_000)
    listed, chunks = [], {}
    honest = data.draw(st.sampled_from([True, True, False]), label="well-formed entries")  # else keys, offsets, types hostile too
    for i in range(data.draw(st.integers(1, 4), label="chunks")):
        path = data.draw(st.sampled_from(small) | st.sampled_from(small) | st.sampled_from(["../outside/secret.txt", "../../outside/secret.txt", "/etc/passwd",
                                                                   str(case.root / "outside" / "secret.txt"), "manifest.json", "tier-choice.json",
                                                                   "tiers/t2/../../../outside/checkpoint", "", ".", "tiers", "tiers/t2/checkpoint.part",
                                                                   "tiers/t2/checkpoint\x00"]) | TEXTS, label="path")  # fmt: skip
        real = (case.bundle / path).read_bytes() if path in case.entries else b""
        how = data.draw(st.sampled_from(["whole", "first-half", "second-half", "garbage", "long", "empty"] + ([] if honest else ["non-bytes"] * 3)),
                        label="data")  # fmt: skip
        offset: Any = 0
        if how == "whole":
            piece = real
        elif how == "first-half":
            piece = real[: len(real) // 2]
        elif how == "second-half":
            offset, piece = len(real) // 2, real[len(real) // 2 :]
        elif how == "garbage":
            piece = data.draw(st.binary(max_size=64), label="bytes")
            offset = data.draw(st.integers(0, max(0, len(real))), label="offset")
        elif how == "long":
            piece = real + b"x" * data.draw(st.integers(1, 100), label="extra")
        elif how == "empty":
            piece = b""
        else:
            piece = data.draw(st.sampled_from([2**63 - 1, 2**62, 10**6, 0, 3, -1, 1.5, True, "text", [1, 2, 3], [b"a", b"b"], [300]]), label="value")
        if not honest and data.draw(st.booleans(), label="hostile offset"):
            offset = data.draw(st.sampled_from([-1, -(2**63), len(real), len(real) + 1, 2**53, 2**63 - 1, MAX_COUNT - 1, 1.5, True, "0", None, 10**309]),
                               label="offset")  # fmt: skip
        key = f"c{i}"
        entry: dict[str, Any] = {"path": path, "offset": offset, "key": key}
        edit = "none" if honest else data.draw(st.sampled_from(["none"] * 4 + ["drop-key", "other-key", "key-type", "drop-path", "path-type", "extra", "not-dict"]),
                                               label="entry edit")  # fmt: skip
        if edit == "drop-key":
            del entry["key"]
        elif edit == "other-key":
            entry["key"] = data.draw(st.sampled_from(["c9", "", "c0"]) | TEXTS, label="key")
        elif edit == "key-type":
            entry["key"] = data.draw(JSON_SCALARS.filter(lambda v: not isinstance(v, str)), label="key")
        elif edit == "drop-path":
            del entry["path"]
        elif edit == "path-type":
            entry["path"] = data.draw(ANY_VALUE.filter(lambda v: not isinstance(v, str)), label="path value")
        elif edit == "extra":
            entry[data.draw(TEXTS, label="extra key")] = data.draw(ANY_VALUE, label="extra value")
        elif edit == "not-dict":
            listed.append(data.draw(ANY_VALUE, label="entry"))
            continue
        listed.append(entry)
        chunks[key] = piece
    return listed, chunks


LINK_DIRS = ["tokenizer", "encoder", "inference", "tiers/t1", "tiers/t2", "tiers/t4"]


def plant_links(case: DeviceCase, data: st.DataObject) -> list[tuple[Path, Path | None]]:
    """Symbolic links a hostile party may have left in the cache, pointing out of it: a folder of the bundle, a file,
    or a ``.part`` file. What stood there is moved to ``stash`` (outside the cache, not compared) and put back after
    the case. Returns (link, what it displaced) pairs for ``unplant``."""
    what = data.draw(st.sampled_from(["none"] * 3 + ["dir-link", "part-link", "file-link"]), label="planted")
    if what == "none":
        return []
    outside = case.root / "outside"
    if what == "dir-link":
        link, target = case.folder / data.draw(st.sampled_from(LINK_DIRS), label="linked folder"), outside
    else:
        name = data.draw(st.sampled_from(sorted(p for p, e in case.entries.items() if e.size < 40_000)), label="linked file")
        link, target = case.folder / (name + (".part" if what == "part-link" else "")), outside / "secret.txt"
    displaced = None
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        displaced = case.root / "stash" / f"{len(list((case.root / 'stash').iterdir()))}"
        os.replace(link, displaced)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=what == "dir-link")
    return [(link, displaced)]


def unplant(planted: list[tuple[Path, Path | None]]) -> None:
    for link, displaced in planted:
        link.unlink()
        if displaced is not None:
            os.replace(displaced, link)


@fuzz(1000)
@given(data=st.data())
@counted("artifacts message")
def test_hostile_artifacts_at_the_device(device_case: DeviceCase, data: st.DataObject) -> None:
    """An artifacts message from a hostile coordinator: only BundleError, nothing written outside the bundle's cache
    folder, no file outside it changed, and every file reported complete verifies."""
    from flwr.app import ConfigRecord, RecordDict

    case = device_case
    mid: Any = case.mid
    if data.draw(st.integers(0, 5), label="hostile id") == 0:
        mid = data.draw(st.sampled_from(["0123456789abcdef", "fedcba9876543210", case.mid.upper(), "../" + case.mid, "/tmp", "", None, 7, case.mid + "\n",
                                         "." * 16, "..", case.mid[:15]]) | TEXTS, label="manifest id")  # fmt: skip
    listed, chunks = hostile_chunks(case, data)
    shape = data.draw(st.sampled_from(["normal"] * 7 + ["generic", "raw", "no-record", "no-chunks", "chunks-not-list"]), label="shape")
    doc = envelope({"manifest_id": mid, "chunks": listed})
    if shape == "generic":
        doc = mutate(doc, data, 2)
    elif shape == "chunks-not-list":
        doc["chunks"] = data.draw(ANY_VALUE.filter(lambda v: not isinstance(v, list)), label="chunks value")
    try:
        configs = {"chunks": {k: v for k, v in chunks.items()}} if shape != "no-chunks" else {}
        content = record(raw_meta(data) if shape == "raw" else doc, configs=configs) if shape != "no-record" else empty_content(data)
    except (TypeError, ValueError):  # Flower refuses the value in a ConfigRecord: it cannot be sent at all
        CASES["artifacts message (not representable)"] += 1
        return
    planted = plant_links(case, data)
    try:
        done: list[str] = []
        try:
            meta, pieces = artifacts_from_record(content)
            folder = bundle_dir_for(case.node, None, str(meta["manifest_id"]))
            CASES["artifacts message: passed the reader"] += 1
            done = write_chunks(folder, str(meta["manifest_id"]), meta["chunks"], pieces)
            CASES["artifacts message: written"] += 1
            CASES["artifacts message: files completed and verified"] += len(done)
        except BundleError as exc:
            assert str(exc)
        prefix = str(case.folder.relative_to(case.root)) + "/"
        tree = {rel: d for rel, d in _tree(case.root, prefix).items() if not rel.startswith("stash/")}
        for rel, digest in case.outside.items():
            assert tree.get(rel) == digest, f"{rel}, outside the bundle's cache folder, was changed or deleted"
        new_outside = [rel for rel in tree if rel not in case.outside and not rel.startswith(prefix)]
        assert not new_outside, f"files written outside the bundle's cache folder: {new_outside}"
        for rel, digest in tree.items():
            if rel.startswith(prefix) and not digest.startswith("link:"):
                inside = rel[len(prefix) :]
                base = inside[: -len(".part")] if inside.endswith(".part") else inside
                assert base in case.entries or inside == "manifest.json", f"{inside}: not a file of the bundle"
        for path in done:
            assert case.entries[path].sha256 == sha256_file(case.folder / path), f"{path} reported verified but differs"
    finally:
        unplant(planted)


def test_honest_artifacts_complete_and_verify(device_case: DeviceCase) -> None:
    """The harness is not vacuous: a file sent in two pieces is written, verified and reported."""
    case = device_case
    path = "tokenizer/tokenizer.json"
    real = (case.bundle / path).read_bytes()
    content = artifacts_to_record(case.mid, [(path, 0, real[:1000]), (path, 1000, real[1000:])])
    meta, pieces = artifacts_from_record(content)
    assert write_chunks(case.folder, case.mid, meta["chunks"], pieces) == [path]
    assert sha256_file(case.folder / path) == case.entries[path].sha256
    assert {e.path: e.sha256 for e in load_manifest(case.bundle).all_files()} == case.bundle_snapshot


@pytest.fixture(scope="module")
def instruction_doc(tiny_bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The meta of a real train instruction (tier 2) and its values as Flower Arrays (built once: they are the bytes
    ``instruction_to_record`` sends)."""
    from flwr.app import Array

    manifest = load_manifest(tiny_bundle)
    state = GlobalState.initial(manifest_id(manifest), load_file(str(tiny_bundle / manifest.global_pool.path)), manifest.num_layers,
                                manifest.num_experts)  # fmt: skip
    ins = plan_round(state, manifest, {7: 2}, RunSettings(bundle="b", state_dir="s").train_settings())[7]
    content = instruction_to_record(ins)
    return json.loads(content.config_records[META_KEY]["json"]), {k: Array(np.ascontiguousarray(v, np.float32)) for k, v in ins.values.items()}


INSTRUCTION_NEAR = [float("inf"), float("-inf"), float("nan"), 10**309, 10**400, -1, 1.5, "1", "x", None, [], {}, True, [[float("inf")]], [["a"]],
                    [[1.5]], [[10**309]], [[]], [1, [2]], [[10**400]]]  # fmt: skip


@fuzz(1000)
@given(data=st.data())
@counted("train instruction")
def test_hostile_train_instructions_at_the_device(instruction_doc: tuple[dict[str, Any], dict[str, np.ndarray]], data: st.DataObject) -> None:
    """A train instruction from a hostile coordinator: a well-typed TrainInstruction or MessageError, nothing else."""
    doc, values = instruction_doc
    kind = data.draw(st.sampled_from(["near"] * 4 + ["generic"] * 3 + ["raw", "no-record", "arrays"]), label="kind")
    arrays: dict[str, Any] = dict(values)
    if kind == "near":
        doc = copy.deepcopy(doc)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            key = data.draw(st.sampled_from(["round", "tier", "assignment", "routing_target", "train", "manifest_id"]), label="field")
            doc[key] = copy.deepcopy(data.draw(st.sampled_from(INSTRUCTION_NEAR) | ANY_VALUE, label="value"))
        meta: Any = doc
    elif kind == "generic":
        meta = mutate(doc, data)
    elif kind == "raw":
        meta = raw_meta(data)
    else:
        meta = doc
    if kind == "arrays":
        arrays[data.draw(st.sampled_from(sorted(arrays)), label="tensor")] = hostile_array(data)
    content = empty_content(data) if kind == "no-record" else record(meta, arrays, array_name=data.draw(st.sampled_from(["values"] * 5 + ["update"]), label="records"))
    try:
        ins = instruction_from_record(content)
    except MessageError as exc:
        assert str(exc)
        return
    assert isinstance(ins, TrainInstruction)
    assert isinstance(ins.manifest_id, str) and re.fullmatch(r"[0-9a-f]{16}", ins.manifest_id)
    assert type(ins.round) is int and type(ins.tier) is int and isinstance(ins.train, dict)
    assert all(type(e) is int for row in ins.assignment for e in row)
    assert isinstance(ins.routing_target, np.ndarray) and ins.routing_target.dtype == np.float32
    assert all(isinstance(v, np.ndarray) for v in ins.values.values())


# ====================================================================================================================
# What this fuzzer found (each fixed; these are its regression tests).
# ====================================================================================================================


def _train_loss_round(case: RoundCase, value: int) -> Any:
    u = case.honest[3]
    hostile = Update(u.manifest_id, u.tier, u.assignment, u.num_examples, dict(u.tensors), {"train_loss": value})
    replies = {**case.replies, 3: SimpleNamespace(content=update_to_record(hostile, 1))}
    return case.strategy.aggregate_train(case.state, case.sent, replies)


def _instruction_content(edit: dict[str, Any], values: dict[str, Any] | None = None) -> Any:
    meta = envelope({"manifest_id": "0" * 16, "round": 1, "tier": 2, "assignment": [[0, 1], [2, 3]], "routing_target": [[0.5, 0.5], [0.5, 0.5]],
                     "train": {"epochs": 1}, **edit})  # fmt: skip
    return record(meta, values if values is not None else {"head.bias": np.zeros(3, np.float32)}, array_name="values")


def test_updates_for_another_tier_are_rejected_not_crashed(moe_round: RoundCase, lora_round: RoundCase) -> None:
    """A valid update for a tier the node was not sent (on HetLoRA: another rank, whose shapes once broke the norm
    bound with a broadcast ValueError) is rejected with the tier named, and the round merges the honest replies."""
    for case in (moe_round, lora_round):
        for other in case.other_tier[1]:
            replies = {**case.replies, 1: SimpleNamespace(content=update_to_record(other, 1))}
            new, screened, why = case.strategy.aggregate_train(case.state, case.sent, replies)
            assert new is not None and sorted(screened.accepted) == [2, 3], why
            assert screened.rejected[1] == f"update is for tier {other.tier}, this node was sent tier {case.sent[1].tier}"


def test_found_integer_train_loss_crashes_aggregate_train(moe_round: RoundCase) -> None:
    """A device's ``train_loss`` of 10**308 (an integer: finite as a float, so ``Update.validate`` accepts it) in an
    otherwise valid update. Was: OverflowError "int too large to convert to float" from the ``train_loss`` line
    of the history record. Now: the round completes (the metric refused, or weighed as a float)."""
    new, screened, why = _train_loss_round(moe_round, 10**308)
    assert new is not None, why
    assert math.isfinite(new.history[-1]["train_loss"]) or 3 in screened.rejected


def test_found_evaluate_loss_overflows_to_infinity(eval_strategy: FFTMoEStrategy) -> None:
    """One evaluation with loss 1e308 over 4 examples (each field within its check) gives a federated loss of inf in
    the history (fixed). Wanted: a finite mean (e.g. sum of loss * examples / n computed as shares, or such a loss refused)."""
    out = eval_strategy.aggregate_evaluate(ROUND, {1: SimpleNamespace(content=metrics_to_record(ROUND, {"accuracy": 0.5, "loss": 1e308, "examples": 4.0}))})
    assert out is not None and (math.isfinite(out.get("loss", 0.0)) or "1" in out.get("rejected", {})), out


@pytest.mark.parametrize(("field", "value"), [("manifest_id", "\x1b[31mred\nforged: node 2 accepted"), ("format", "fftmoe-update\u00e9"),
                                              ("extra", "\u00e9\x1b[2J")])  # fmt: skip
def test_found_rejection_reasons_repeat_device_strings_verbatim(moe_round: RoundCase, field: str, value: str) -> None:
    """The reason a reply is rejected names what the device sent; it must be printable ASCII (``records.printable``)
    as every other device-chosen string in the log and history is. Before the fix the first case logs a raw escape and a
    forged second line; the others keep non-ASCII characters through ``repr``."""
    u = moe_round.honest[1]
    tensors = dict(u.tensors)
    if field == "extra":
        tensors[value] = tensors["head.bias"]
    hostile = Update(value if field == "manifest_id" else u.manifest_id, u.tier, u.assignment, u.num_examples, tensors,
                     format=value if field == "format" else u.format)  # fmt: skip
    _, screened, _ = moe_round.strategy.aggregate_train(moe_round.state, moe_round.sent,
                                                        {**moe_round.replies, 1: SimpleNamespace(content=update_to_record(hostile, 1))})  # fmt: skip
    assert 1 in screened.rejected
    assert_printable(screened.rejected[1], "rejection reason")


@pytest.mark.parametrize("edit", [{"round": float("inf")}, {"tier": float("-inf")}, {"assignment": [[float("inf"), 1], [2, 3]]},
                                  {"routing_target": [[10**400, 0.5], [0.5, 0.5]]}], ids=["round", "tier", "assignment", "routing_target"])  # fmt: skip
def test_found_instruction_with_infinite_numbers_raises_overflow(edit: dict[str, Any]) -> None:
    """A train instruction whose JSON holds Infinity (Python's json reads it) or an integer too large for a float.
    Was: OverflowError out of ``instruction_from_record``. Now: MessageError naming the field."""
    with pytest.raises(MessageError):
        instruction_from_record(_instruction_content(edit))


@pytest.mark.parametrize("payload", [b"", b"PK\x03\x04" + b"\x00" * 40], ids=["empty", "zip-magic"])
def test_found_instruction_with_unreadable_array_escapes(payload: bytes) -> None:
    """A train instruction whose ``values`` record holds an Array of empty bytes (EOFError) or bytes starting with
    the zip magic (BadZipFile) once escaped. Now: MessageError, as ``update_from_record`` does for the same Arrays."""
    from flwr.app import Array

    with pytest.raises(MessageError):
        instruction_from_record(_instruction_content({}, {"head.bias": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=payload)}))


@pytest.mark.parametrize("value", [2**63 - 1, 2**62, 10**6], ids=["2**63-1", "2**62", "10**6"])
def test_found_artifacts_chunk_data_as_integer(value: int) -> None:
    """An artifacts message whose chunk data is an integer (a ConfigRecord holds ints as well as bytes). Today
    ``bytes(n)`` makes n zero bytes: OverflowError or MemoryError escape, and a moderate n silently allocates n
    bytes (a hostile coordinator could exhaust a device's memory with one small message). Now: MessageError."""
    content = record(envelope({"manifest_id": "0" * 16, "chunks": [{"path": "tokenizer/vocab.txt", "offset": 0, "key": "c0"}]}), configs={"chunks": {"c0": value}})
    with pytest.raises(MessageError):
        artifacts_from_record(content)
