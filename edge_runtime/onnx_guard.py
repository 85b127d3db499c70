"""Refuse ONNX artifacts whose tensors read data from outside their tier folder, before ONNX Runtime opens them.

An ONNX tensor may keep its bytes in an external file named by its ``external_data`` entry ``location``.
ONNX Runtime 1.19.2 follows absolute locations, ``../`` and symlinks, and even treats the location
``*/_ORT_MEM_ADDR_/*`` as "read ``length`` bytes at memory address ``offset``" (checked by hand on this wheel).
A hostile coordinator could therefore ship a training model that feeds a device's private file (an SSH key) into
a tensor, and the values the device trains and sends back would carry it. ``check_tier_files`` checks every
artifact of a tier first; ``OrtTierSession`` calls it before any ORT object exists.

The models are read here without the ``onnx`` package (a device's ``fftmoe[edge]`` install has none) by a small
protobuf wire-format reader that visits only the messages that can hold a tensor and skips everything else,
``raw_data`` included, by offset. Field numbers are those of ``onnx/onnx.proto`` as installed with onnx 1.17
(``site-packages/onnx/onnx.proto``, checked field by field):

- ModelProto: ``graph`` 7, ``training_info`` 20, ``functions`` 25
- TrainingInfoProto: ``initialization`` 1, ``algorithm`` 2 (GraphProto)
- FunctionProto: ``node`` 7, ``attribute_proto`` 11
- GraphProto: ``node`` 1, ``initializer`` 5, ``sparse_initializer`` 15
- NodeProto: ``attribute`` 5
- AttributeProto: ``t`` 5, ``g`` 6, ``tensors`` 10, ``graphs`` 11, ``sparse_tensor`` 22, ``sparse_tensors`` 23
- SparseTensorProto: ``values`` 1, ``indices`` 2 (TensorProto)
- TensorProto: ``name`` 8, ``raw_data`` 9 (skipped), ``external_data`` 13, ``data_location`` 14 (1 = EXTERNAL)
- StringStringEntryProto: ``key`` 1, ``value`` 2
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from edge_runtime.bundle import BundleError, IntegrityError

MAX_GRAPH_DEPTH = 64
"""Deepest nesting of subgraphs (If/Loop/Scan bodies) a model may have; deeper files are refused as malformed."""

EXTERNAL = 1
"""``TensorProto.DataLocation.EXTERNAL``."""

ORT_MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"
"""The location ONNX Runtime reads as "``offset`` is a memory address", not a file."""

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # wire types; groups (3, 4) are refused: ONNX never uses them
_MASK64 = (1 << 64) - 1
# The fields each message reader looks at (field numbers of onnx.proto, listed in the module docstring).
_MODEL_FIELDS = frozenset({7, 20, 25})
_FUNCTION_FIELDS = frozenset({7, 11})
_GRAPH_FIELDS = frozenset({1, 5, 15})
_NODE_FIELDS = frozenset({5})
_ATTRIBUTE_FIELDS = frozenset({5, 6, 10, 11, 22, 23})
_TENSOR_FIELDS = frozenset({8, 13, 14})
_PAIR_FIELDS = frozenset({1, 2})  # TrainingInfoProto graphs, SparseTensorProto tensors, StringStringEntryProto


class UnsafeModelError(BundleError):
    """An ONNX artifact would make ONNX Runtime read data from outside its tier folder, or cannot be parsed."""


@dataclass(frozen=True)
class TensorRef:
    """One tensor found in a model: its name, ``data_location`` (int32 as ONNX Runtime reads it), its
    ``external_data`` entries in file order, and where it sits (for example ``graph.node[3].attribute[0].t``)."""

    name: str
    data_location: int
    external_data: tuple[tuple[str, str], ...]
    where: str


class _Reader:
    """Protobuf wire-format reader over one model's bytes; every parse error names the file and byte offset."""

    def __init__(self, buf: bytes | memoryview | mmap.mmap, label: str) -> None:
        self.buf = buf
        self.label = label
        self.tensors: list[TensorRef] = []

    def fail(self, what: str, pos: int) -> UnsafeModelError:
        return UnsafeModelError(f"{self.label}: not a valid ONNX model ({what} at byte {pos}); re-download or re-export the tier")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf = self.buf
        if pos >= end:
            raise self.fail("truncated varint", pos)
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
        result, shift, start = b & 0x7F, 7, pos
        pos += 1
        while True:
            if pos >= end:
                raise self.fail("truncated varint", start)
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result & _MASK64, pos
            shift += 7
            if shift >= 70:
                raise self.fail("varint longer than 10 bytes", start)

    def fields(self, start: int, end: int, wanted: frozenset[int]) -> list[tuple[int, int, int, int]]:
        """The fields numbered in ``wanted`` of the message in ``buf[start:end]``, as ``(number, wire type, a, b)``:
        for a varint ``a`` is its value, for a length-delimited field ``buf[a:b]`` is its payload. Every other field
        is skipped by its length (``raw_data`` is never copied), but its encoding is still checked."""
        buf, varint = self.buf, self.varint
        out: list[tuple[int, int, int, int]] = []
        pos = start
        while pos < end:
            at = pos
            key = buf[pos]  # one-byte keys and lengths are the common case: decoded inline
            if key < 0x80:
                pos += 1
            else:
                key, pos = varint(pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise self.fail("field number 0", at)
            if wire == _LEN:
                length = buf[pos] if pos < end else 0x80
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = varint(pos, end)
                if length > end - pos:
                    raise self.fail(f"field {number} of {length} bytes runs past the end of its message", at)
                if number in wanted:
                    out.append((number, wire, pos, pos + length))
                pos += length
            elif wire == _VARINT:
                value, pos = varint(pos, end)
                if number in wanted:
                    out.append((number, wire, value, pos))
            elif wire == _I64 or wire == _I32:
                pos += 8 if wire == _I64 else 4
                if pos > end:
                    raise self.fail(f"truncated fixed-width field {number}", at)
                if number in wanted:
                    out.append((number, wire, at, pos))
            else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
                raise self.fail(f"wire type {wire} of field {number}", at)
        return out

    def expect(self, field: tuple[int, int, int, int], wire: int, what: str) -> None:
        if field[1] != wire:
            raise self.fail(f"{what} (field {field[0]}) has wire type {field[1]}, expected {wire}", field[2])

    def text(self, start: int, end: int) -> str:
        return bytes(self.buf[start:end]).decode("utf-8", errors="surrogateescape")  # invalid bytes kept, not lost

    # Messages --------------------------------------------------------------------------------------------------

    def model(self, start: int, end: int) -> None:
        has_graph, functions = False, 0
        for f in self.fields(start, end, _MODEL_FIELDS):
            number = f[0]
            if number == 7:
                self.expect(f, _LEN, "ModelProto.graph")
                self.graph(f[2], f[3], "graph", 1)
                has_graph = True
            elif number == 25:
                self.expect(f, _LEN, "ModelProto.functions")
                self.function(f[2], f[3], f"functions[{functions}]")
                functions += 1
            elif number == 20:
                self.expect(f, _LEN, "ModelProto.training_info")
                for g in self.fields(f[2], f[3], _PAIR_FIELDS):
                    self.expect(g, _LEN, "TrainingInfoProto graph")
                    self.graph(g[2], g[3], "training_info." + ("initialization" if g[0] == 1 else "algorithm"), 1)
        if not has_graph:
            raise self.fail("no graph", start)

    def function(self, start: int, end: int, where: str) -> None:
        counts = {7: 0, 11: 0}
        for f in self.fields(start, end, _FUNCTION_FIELDS):
            self.expect(f, _LEN, "a FunctionProto node or attribute")
            i = counts[f[0]]
            counts[f[0]] = i + 1
            if f[0] == 7:
                self.node(f[2], f[3], f"{where}.node[{i}]", 1)
            else:
                self.attribute(f[2], f[3], f"{where}.attribute_proto[{i}]", 1)

    def graph(self, start: int, end: int, where: str, depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise self.fail(f"subgraphs nested deeper than {MAX_GRAPH_DEPTH}", start)
        counts = {1: 0, 5: 0, 15: 0}
        for f in self.fields(start, end, _GRAPH_FIELDS):
            number = f[0]
            self.expect(f, _LEN, "a GraphProto node or initializer")
            i = counts[number]
            counts[number] = i + 1
            if number == 1:
                self.node(f[2], f[3], f"{where}.node[{i}]", depth)
            elif number == 5:
                self.tensor(f[2], f[3], f"{where}.initializer[{i}]")
            else:
                self.sparse(f[2], f[3], f"{where}.sparse_initializer[{i}]")

    def node(self, start: int, end: int, where: str, depth: int) -> None:
        for i, f in enumerate(self.fields(start, end, _NODE_FIELDS)):
            self.expect(f, _LEN, "NodeProto.attribute")
            self.attribute(f[2], f[3], f"{where}.attribute[{i}]", depth)

    def attribute(self, start: int, end: int, where: str, depth: int) -> None:
        for f in self.fields(start, end, _ATTRIBUTE_FIELDS):
            number = f[0]
            if number in (5, 10):
                self.expect(f, _LEN, "AttributeProto tensor")
                self.tensor(f[2], f[3], f"{where}.{'t' if number == 5 else 'tensors'}")
            elif number in (6, 11):
                self.expect(f, _LEN, "AttributeProto graph")
                self.graph(f[2], f[3], f"{where}.{'g' if number == 6 else 'graphs'}", depth + 1)
            elif number in (22, 23):
                self.expect(f, _LEN, "AttributeProto sparse tensor")
                self.sparse(f[2], f[3], f"{where}.{'sparse_tensor' if number == 22 else 'sparse_tensors'}")

    def sparse(self, start: int, end: int, where: str) -> None:
        for f in self.fields(start, end, _PAIR_FIELDS):
            self.expect(f, _LEN, "SparseTensorProto values/indices")
            self.tensor(f[2], f[3], f"{where}.{'values' if f[0] == 1 else 'indices'}")

    def tensor(self, start: int, end: int, where: str) -> None:
        name, location, entries = "", 0, []
        for f in self.fields(start, end, _TENSOR_FIELDS):
            number = f[0]
            if number == 8:
                self.expect(f, _LEN, "TensorProto.name")
                name = self.text(f[2], f[3])
            elif number == 14:
                self.expect(f, _VARINT, "TensorProto.data_location")
                location = f[2] & 0xFFFFFFFF  # an enum is an int32 on the wire: higher bits are dropped
                location -= (location >> 31) << 32
            elif number == 13:
                self.expect(f, _LEN, "TensorProto.external_data")
                key = value = ""
                for g in self.fields(f[2], f[3], _PAIR_FIELDS):
                    self.expect(g, _LEN, "StringStringEntryProto key/value")
                    if g[0] == 1:
                        key = self.text(g[2], g[3])
                    else:
                        value = self.text(g[2], g[3])
                entries.append((key, value))
        self.tensors.append(TensorRef(name, location, tuple(entries), where))


def read_tensors(model_path: Path | str) -> list[TensorRef]:
    """Every tensor of an ONNX file (initializers, sparse initializers, attribute tensors of all nodes, subgraphs
    and functions), without loading any external data and without the ``onnx`` package.

    The file is memory-mapped: ``raw_data`` is skipped by offset, so its pages are never read. Raises
    ``UnsafeModelError`` naming the file if it is not well-formed protobuf or has no graph.
    """
    path = Path(model_path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise UnsafeModelError(f"{path}: not a valid ONNX model (empty file); re-download or re-export the tier")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            reader = _Reader(mm, str(path))  # mmap indexing gives ints and slices copy only the small strings
            reader.model(0, size)
            return reader.tensors


def _inside(path: str, root: str) -> bool:
    """Whether real path ``path`` lies strictly inside real path ``root``."""
    return path != root and os.path.commonpath([path, root]) == root


def _location_problem(location: str) -> str | None:
    """Why a ``location`` string is not a plain relative path (None when it is)."""
    if location == "":
        return "is empty"
    if "\x00" in location:
        return "contains a NUL character"
    try:
        location.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if location == ORT_MEMORY_TAG or "_ORT_MEM_ADDR_" in location:
        return "is ONNX Runtime's tag for reading process memory"
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.drive or windows.root:
        return "is an absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "contains a '..' component"
    return None


def check_external_data(model_path: Path | str, root: Path | str) -> None:
    """Refuse ``model_path`` if a tensor's external data could come from anywhere but a regular file inside ``root``.

    Every tensor marked EXTERNAL, and every tensor that carries ``external_data`` entries at all (protobuf merges
    repeated occurrences of a message, so entries can become live), must name a ``location`` that is relative, has
    no ``..``, is not ORT's memory-address tag, and resolves (from the model's folder) to a regular file strictly
    inside ``root`` with no symlink on the way below ``root``; ``offset`` and ``length`` must be non-negative
    integers within that file. Raises ``UnsafeModelError`` naming the file, the tensor and the location.
    """
    model_path, root = Path(model_path), Path(root)
    real_root = os.path.realpath(root)
    model_dir = os.path.realpath(model_path.parent)
    for t in read_tensors(model_path):
        if t.data_location != EXTERNAL and not t.external_data:
            continue
        locations = [v for k, v in t.external_data if k == "location"]
        if not locations:
            raise _refusal(model_path, root, t, "has no 'location' entry")
        sizes = []
        for location in locations:
            problem = _location_problem(location) or _data_file_problem(model_dir, real_root, location)
            if isinstance(problem, str):
                raise _refusal(model_path, root, t, problem, location)
            sizes.append(problem)
        for key, value in t.external_data:
            if key in ("offset", "length") and not (value.isascii() and value.isdigit() and len(value) <= 19):  # fits int64
                raise _refusal(model_path, root, t, f"has {key} {value!r}, not a non-negative integer", locations[-1])
        offset = max((int(v) for k, v in t.external_data if k == "offset"), default=0)
        length = max((int(v) for k, v in t.external_data if k == "length"), default=0)
        if offset + length > min(sizes):
            why = f"is read at bytes {offset}..{offset + length} of a {min(sizes)}-byte file"
            raise _refusal(model_path, root, t, why, locations[-1])


def _refusal(model_path: Path, root: Path, t: TensorRef, why: str, location: str | None = None) -> UnsafeModelError:
    """The error for tensor ``t`` of ``model_path``: the file, the tensor, the location and what to do."""
    at = f"external data location {location!r}" if location is not None else "its external data"
    return UnsafeModelError(
        f"{model_path}: tensor {t.name!r} ({t.where}): {at} {why}; an artifact may keep external data only in files "
        f"inside its tier folder {root} - do not use this bundle, ask the coordinator to re-export it"
    )


def _data_file_problem(model_dir: str, real_root: str, location: str) -> str | int:
    """Why the external-data file ``location`` (relative to ``model_dir``) may not be read, or its size when it is a
    regular file strictly inside ``real_root`` reached without any symlink below ``real_root``."""
    target = os.path.normpath(os.path.join(model_dir, location))
    if not _inside(target, real_root):
        return "resolves outside the tier folder"
    st = None
    current = real_root
    for part in Path(os.path.relpath(target, real_root)).parts:  # lstat every component from the tier folder down
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return f"goes through the symlink {current}"
    if st is None or not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not _inside(os.path.realpath(target), real_root):
        return "resolves outside the tier folder"
    return st.st_size


def _check_plain_file(path: Path, label: str, inside: str | None) -> None:
    """Refuse a tier file that is missing, a symlink, not a regular file, or (with ``inside``) outside that folder."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing ({label}); re-download the bundle") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeModelError(
            f"{path}: the {label} is a symlink (to {os.readlink(path)!r}); tier files must be regular files - "
            "re-download the bundle"
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeModelError(f"{path}: the {label} is not a regular file; re-download the bundle")
    if inside is not None and not _inside(os.path.realpath(path), inside):
        raise UnsafeModelError(f"{path}: the {label} lies outside the tier folder {inside}; keep a tier's files together")


def check_tier_files(files: dict[str, Path] | dict[str, str]) -> None:
    """Check a tier's artifacts before ONNX Runtime opens them (``files`` as ``OrtTierSession`` takes them).

    The tier folder is the training model's folder. Every model (every role but ``checkpoint``, whatever its file
    name: ORT reads any file that is not ``.ort`` as ONNX) must be a regular file, not a symlink, inside it and
    pass ``check_external_data``. The checkpoint (ORT's flatbuffer, not ONNX) and its
    ``<checkpoint>.data`` companion when present must be regular files, not symlinks; the checkpoint may lie
    outside the tier folder because a resumed run opens the optimizer checkpoint the device wrote itself.
    """
    root = Path(files["training_model"]).parent
    real_root = os.path.realpath(root)
    for role, raw in files.items():
        path = Path(raw)
        if role != "checkpoint":
            if path.suffix.lower() == ".ort":
                raise UnsafeModelError(
                    f"{path}: the {role} is in ORT's own format; fftmoe tiers ship ONNX models - re-export the tier"
                )
            _check_plain_file(path, role, real_root)
            check_external_data(path, root)
        else:
            _check_plain_file(path, role, None)
            companion = Path(f"{path}.data")
            if os.path.lexists(companion):
                _check_plain_file(companion, f"{role} external data", None)
