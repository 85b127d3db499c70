"""ONNX external data cannot reach outside a tier folder: the attack through ONNX Runtime, its refusal by
``edge_runtime.onnx_guard`` before any ORT object exists, the wire-format reader against the ``onnx`` package,
and malformed or fuzzed model files that must fail with a ``BundleError`` and nothing else."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edge_runtime import ort_backend
from edge_runtime.bundle import BundleError, IntegrityError, load_manifest, tier_file_paths
from edge_runtime.onnx_guard import MAX_GRAPH_DEPTH, UnsafeModelError, check_external_data, check_tier_files, read_tensors
from edge_runtime.ort_backend import OrtTierSession

# --------------------------------------------------------------------------------------------------------------
# Helpers


def copy_tier(bundle: Path, dest: Path, slots: int = 2) -> Path:
    """A private copy of one tier folder of the bundle, for one attack."""
    tier = dest / f"t{slots}"
    shutil.copytree(bundle / "tiers" / f"t{slots}", tier)
    return tier


def expert_name(bundle: Path) -> str:
    return load_manifest(bundle).tier(2).slot_params[0].name


def external(name: str, location: str | None, dims: list[int], **keys: str) -> TensorProto:
    """A float tensor marked EXTERNAL whose data lives at ``location`` (no location entry when None)."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in ([("location", location)] if location is not None else []) + list(keys.items()):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def leak_gradient(tier: Path, name: str, location: str) -> int:
    """The working attack: the training model's gradient of trainable tensor ``name`` is fed from an initializer
    ``leak`` whose external data is ``location``. Returns how many bytes of that file ORT reads.

    (Turning ``name`` itself into an external initializer does not leak through the training API: ORT then keeps
    the checkpoint's value for the parameter and ``Optimizer`` cannot be created; see the report of this change.)
    """
    path = tier / "training_model.onnx"
    model = onnx.load(path)
    param = next(i for i in model.graph.input if i.name == name)
    dims = [d.dim_value for d in param.type.tensor_type.shape.dim]
    accumulate = next(n for n in model.graph.node if n.op_type == "InPlaceAccumulatorV2" and n.input[1] == f"{name}_grad")
    accumulate.input[1] = "leak"
    model.graph.initializer.append(external("leak", location, dims))
    path.write_bytes(model.SerializeToString())
    return int(np.prod(dims)) * 4


def one_batch(bundle: Path) -> list[np.ndarray]:
    m = load_manifest(bundle)
    ids = np.array([[2, 7, 8, 9, 3, 0, 0, 0], [2, 10, 11, 3, 0, 0, 0, 0]], np.int64)
    return [ids, (ids > 0).astype(np.int64), np.array([1, 0], np.int64), np.full((m.num_layers, 2), 0.5, np.float32),
            np.zeros(len(m.labels), np.float32)]


def make_model(nodes: list, initializers: list | None = None, sparse: list | None = None, functions: list | None = None,
               inputs: list | None = None, outputs: list | None = None) -> onnx.ModelProto:  # fmt: skip
    """A small model for the reader's tests (it need not be loadable by ORT)."""
    graph = helper.make_graph(
        nodes, "g", inputs or [], outputs or [], initializer=initializers or [], sparse_initializer=sparse or []
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], functions=functions or [])


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # no onnx.save: it would try to write external data
    return path


def onnx_walk(model: onnx.ModelProto) -> list[tuple[str, int, tuple[tuple[str, str], ...]]]:
    """The independent reference: every tensor's (name, data_location, external_data) walked with ``onnx``."""
    out: list[tuple[str, int, tuple[tuple[str, str], ...]]] = []

    def tensor(t: TensorProto) -> None:
        out.append((t.name, t.data_location, tuple((e.key, e.value) for e in t.external_data)))

    def sparse_tensor(s: onnx.SparseTensorProto) -> None:
        if s.HasField("values"):
            tensor(s.values)
        if s.HasField("indices"):
            tensor(s.indices)

    def attribute(a: onnx.AttributeProto) -> None:
        if a.HasField("t"):
            tensor(a.t)
        for t in a.tensors:
            tensor(t)
        if a.HasField("g"):
            graph(a.g)
        for g in a.graphs:
            graph(g)
        if a.HasField("sparse_tensor"):
            sparse_tensor(a.sparse_tensor)
        for s in a.sparse_tensors:
            sparse_tensor(s)

    def graph(g: onnx.GraphProto) -> None:
        for n in g.node:
            for a in n.attribute:
                attribute(a)
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse_tensor(s)

    graph(model.graph)
    for f in model.functions:
        for n in f.node:
            for a in n.attribute:
                attribute(a)
        for a in f.attribute_proto:
            attribute(a)
    for info in model.training_info:
        graph(info.initialization)
        graph(info.algorithm)
    return out


def guard_walk(path: Path) -> list[tuple[str, int, tuple[tuple[str, str], ...]]]:
    return [(t.name, t.data_location, t.external_data) for t in read_tensors(path)]


@pytest.fixture
def no_ort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if ``OrtTierSession`` gets as far as importing the training API (opening any ORT object)."""

    def refuse() -> None:
        pytest.fail("an ORT session was opened for a refused model")

    monkeypatch.setattr(ort_backend, "import_training_api", refuse)


# --------------------------------------------------------------------------------------------------------------
# The attack, through OrtTierSession, and its refusal


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_hostile_training_model_leaks_a_file_without_the_guard(tiny_bundle: Path, tmp_path: Path, how: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Without the guard, ORT reads the device's private file into the expert's gradient: ``grad`` is the file's
    bytes, and the trained value the device would send back moves by -lr * sign of every secret float."""
    tier = copy_tier(tiny_bundle, tmp_path)
    name = expert_name(tiny_bundle)
    secret = tmp_path / "id_ecdsa"  # outside the tier folder
    if how == "symlink":
        (tier / "weights.bin").symlink_to(secret)
    location = {"absolute": str(secret), "dotdot": "../id_ecdsa", "symlink": "weights.bin"}[how]
    nbytes = leak_gradient(tier, name, location)
    secret_values = np.random.default_rng(1).normal(size=nbytes // 4).astype(np.float32)
    secret.write_bytes(secret_values.tobytes())

    monkeypatch.setattr(ort_backend, "check_tier_files", lambda files: None)  # the device before this change
    session = OrtTierSession(tier_file_paths(tier), threads=1)
    before = session.get(name)
    session.train_step(one_batch(tiny_bundle))
    assert session.grad(name).tobytes() == secret_values.tobytes()
    moved = (before - session.get(name)).ravel()
    np.testing.assert_array_equal(np.sign(moved), np.sign(secret_values))


@pytest.mark.parametrize(
    ("how", "why"),
    [("absolute", "is an absolute path"), ("dotdot", "contains a '..' component"), ("symlink", "goes through the symlink")],
)
def test_the_guard_refuses_the_attack_before_any_ort_session(tiny_bundle: Path, tmp_path: Path, how: str, why: str,
                                                             no_ort: None) -> None:  # fmt: skip
    tier = copy_tier(tiny_bundle, tmp_path)
    secret = tmp_path / "id_ecdsa"
    secret.write_bytes(b"\x01" * 4096)
    if how == "symlink":
        (tier / "weights.bin").symlink_to(secret)
    location = {"absolute": str(secret), "dotdot": "../id_ecdsa", "symlink": "weights.bin"}[how]
    leak_gradient(tier, expert_name(tiny_bundle), location)
    with pytest.raises(UnsafeModelError, match=why) as caught:
        OrtTierSession(tier_file_paths(tier), threads=1)
    message = str(caught.value)
    assert "training_model.onnx" in message and "'leak'" in message and repr(location) in message


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_the_expert_tensor_itself_as_external_initializer_is_refused_naming_it(tiny_bundle: Path, tmp_path: Path, how: str,
                                                                              no_ort: None) -> None:  # fmt: skip
    """The literal form of the attack: the trainable expert tensor stored as external data outside the folder."""
    tier = copy_tier(tiny_bundle, tmp_path)
    name = expert_name(tiny_bundle)
    secret = tmp_path / "id_ecdsa"
    secret.write_bytes(b"\x01" * 1024)
    if how == "symlink":
        (tier / "weights.bin").symlink_to(secret)
    location = {"absolute": str(secret), "dotdot": "../id_ecdsa", "symlink": "weights.bin"}[how]
    model = onnx.load(tier / "training_model.onnx")
    param = next(i for i in model.graph.input if i.name == name)
    model.graph.initializer.append(external(name, location, [d.dim_value for d in param.type.tensor_type.shape.dim]))
    save(model, tier / "training_model.onnx")
    with pytest.raises(UnsafeModelError, match=f"tensor {name!r}.*{location!r}"):
        OrtTierSession(tier_file_paths(tier), threads=1)


def test_in_folder_external_data_is_accepted_and_trains(tiny_bundle: Path, tmp_path: Path) -> None:
    """A legitimate model whose initializers live in a regular file inside the tier folder still trains, with the
    same outputs as the embedded original."""
    original = tiny_bundle / "tiers" / "t2"
    tier = copy_tier(tiny_bundle, tmp_path)
    model = onnx.load(tier / "training_model.onnx")
    onnx.external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=128)
    onnx.save(model, tier / "training_model.onnx")
    assert (tier / "weights.bin").stat().st_size > 0
    assert any(t.data_location == 1 for t in read_tensors(tier / "training_model.onnx"))
    batch = one_batch(tiny_bundle)
    session = OrtTierSession(tier_file_paths(tier), threads=1)
    reference = OrtTierSession(tier_file_paths(original), threads=1)
    before = {name: session.get(name) for name in session.trainable_names}
    for _ in range(2):
        out, ref = session.train_step(batch), reference.train_step(batch)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    assert any(not np.array_equal(value, session.get(name)) for name, value in before.items()), "nothing trained"
    for name in before:
        np.testing.assert_allclose(session.get(name), reference.get(name), rtol=1e-6)


def test_ort_reads_process_memory_through_its_address_tag_and_the_guard_refuses_it(tmp_path: Path) -> None:
    """ORT 1.19.2 treats location ``*/_ORT_MEM_ADDR_/*`` as a memory address in ``offset`` (for a model on disk too)."""
    ort = pytest.importorskip("onnxruntime")
    secret = np.frombuffer(b"SECRETKEYBYTES!!", np.float32).copy()
    tag = external("w", "*/_ORT_MEM_ADDR_/*", [4], offset=str(secret.ctypes.data), length="16")
    model = make_model([helper.make_node("Identity", ["w"], ["y"])], [tag], outputs=[helper.make_tensor_value_info("y", 1, [4])])
    model.ir_version = 9
    path = save(model, tmp_path / "tier" / "m.onnx")
    leaked = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert leaked.tobytes() == secret.tobytes()
    with pytest.raises(UnsafeModelError, match="tag for reading process memory"):
        check_external_data(path, path.parent)


def test_ort_reads_a_constant_nodes_external_tensor_and_the_guard_refuses_it(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOPSECRETBYTES!!")
    node = helper.make_node("Constant", [], ["y"], value=external("c", str(secret), [4]))
    model = make_model([node], outputs=[helper.make_tensor_value_info("y", 1, [4])])
    model.ir_version = 9
    path = save(model, tmp_path / "tier" / "m.onnx")
    leaked = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert leaked.tobytes() == secret.read_bytes()
    with pytest.raises(UnsafeModelError, match=r"tensor 'c' \(graph.node\[0\].attribute\[0\].t\).*is an absolute path"):
        check_external_data(path, path.parent)


# --------------------------------------------------------------------------------------------------------------
# Where external data may hide: subgraphs, sparse tensors, functions, training info


def if_model(tensor: TensorProto, depth: int = 1) -> onnx.ModelProto:
    """An If whose then-branch (nested ``depth`` times) holds ``tensor`` as an initializer."""
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])
    body = helper.make_graph([helper.make_node("Identity", [tensor.name], ["o"])], "then", [], [out], [tensor])
    for _ in range(depth - 1):
        inner = helper.make_node("If", ["c"], ["o"], then_branch=body, else_branch=body)
        body = helper.make_graph([inner], "then", [], [out])
    node = helper.make_node("If", ["c"], ["o"], then_branch=body, else_branch=helper.make_graph([], "else", [], [out]))
    return make_model([node], inputs=[helper.make_tensor_value_info("c", TensorProto.BOOL, [])], outputs=[out])


def hiding_places(location: str) -> dict[str, onnx.ModelProto]:
    """Models that keep one external tensor ``x`` at ``location`` in each place the reader must look."""
    x = external("x", location, [4])
    indices = helper.make_tensor("x_indices", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(x, indices, [8])
    constant = helper.make_node("Constant", [], ["y"], value=x)
    function = helper.make_function("local", "f", [], ["y"], [constant], [helper.make_opsetid("", 17)])
    loop_body = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "body", [], [], [x])
    with_info = make_model([])
    info = with_info.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph([], "algo", [], [], [x]))
    return {
        "initializer": make_model([], [x]),
        "constant": make_model([constant]),
        "attribute tensors": make_model([helper.make_node("Foo", [], [], domain="x", ts=[indices, x])]),
        "if subgraph": if_model(x),
        "nested if subgraphs": if_model(x, depth=5),
        "loop body": make_model([helper.make_node("Loop", ["", ""], [], body=loop_body)]),
        "attribute graphs": make_model([helper.make_node("Foo", [], [], domain="x", gs=[loop_body, loop_body])]),
        "sparse initializer": make_model([], sparse=[sparse]),
        "sparse attribute": make_model([helper.make_node("Constant", [], ["y"], sparse_value=sparse)]),
        "function": make_model([helper.make_node("f", [], ["y"], domain="local")], functions=[function]),
        "training info": with_info,
    }


@pytest.mark.parametrize("place", list(hiding_places("x")))
def test_external_data_is_found_wherever_it_hides(tmp_path: Path, place: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(16))
    model = hiding_places(str(secret))[place]
    path = save(model, tmp_path / "tier" / "m.onnx")
    assert sorted(guard_walk(path)) == sorted(onnx_walk(model))
    with pytest.raises(UnsafeModelError, match=r"tensor 'x' .*is an absolute path"):
        check_external_data(path, path.parent)
    # the same model with its data in a regular file of the folder is accepted
    (tmp_path / "tier" / "x.bin").write_bytes(bytes(16))
    ok = save(hiding_places("x.bin")[place], tmp_path / "tier" / "ok.onnx")
    check_external_data(ok, ok.parent)


def test_the_reader_agrees_with_onnx_on_every_artifact_of_the_tiny_bundle(tiny_bundle: Path) -> None:
    files = sorted((tiny_bundle / "tiers").glob("t*/*.onnx"))
    assert len(files) == 9
    for path in files:
        found = guard_walk(path)
        assert sorted(found) == sorted(onnx_walk(onnx.load(path, load_external_data=False))), path
        check_tier_files(tier_file_paths(path.parent))
    assert any(guard_walk(p) for p in files), "no tensor found at all"


def test_the_reader_agrees_with_onnx_on_externalised_artifacts(tiny_bundle: Path, tmp_path: Path) -> None:
    tier = copy_tier(tiny_bundle, tmp_path)
    for name in ("training_model.onnx", "eval_model.onnx"):
        model = onnx.load(tier / name)
        onnx.external_data_helper.convert_model_to_external_data(
            model, location=f"{name}.data", size_threshold=64, convert_attribute=True
        )
        onnx.save(model, tier / name)
        found = guard_walk(tier / name)
        assert sorted(found) == sorted(onnx_walk(onnx.load(tier / name, load_external_data=False)))
        assert sum(t[1] == 1 for t in found) > 0
    check_tier_files(tier_file_paths(tier))


# --------------------------------------------------------------------------------------------------------------
# The location rule


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("", "is empty"),
        ("/etc/passwd", "is an absolute path"),
        ("C:\\Users\\me\\key", "is an absolute path"),
        ("C:key", "is an absolute path"),
        ("\\\\server\\share\\key", "is an absolute path"),
        ("//server/share/key", "is an absolute path"),
        ("\\key", "is an absolute path"),
        ("../key", "contains a '..' component"),
        ("..\\key", "contains a '..' component"),
        ("sub/../../key", "contains a '..' component"),
        ("sub/../x.bin", "contains a '..' component"),
        ("x.bin\x00", "contains a NUL character"),
        ("missing.bin", "cannot be read"),
        ("sub", "is not a regular file"),
        ("linked/x.bin", "goes through the symlink"),
        ("*/_ORT_MEM_ADDR_/*", "tag for reading process memory"),
    ],
)
def test_unsafe_locations_are_refused(tmp_path: Path, location: str, why: str) -> None:
    tier = tmp_path / "tier"
    (tier / "sub").mkdir(parents=True)
    (tier / "x.bin").write_bytes(bytes(16))
    (tier / "sub" / "x.bin").write_bytes(bytes(16))
    (tier / "linked").symlink_to(tier / "sub")  # a symlink that even stays inside the folder
    path = save(make_model([], [external("w", location, [4])]), tier / "m.onnx")
    with pytest.raises(UnsafeModelError, match=why) as caught:
        check_external_data(path, tier)
    assert "m.onnx" in str(caught.value) and "'w'" in str(caught.value)


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        ({"offset": "-1"}, "not a non-negative integer"),
        ({"length": "16.0"}, "not a non-negative integer"),
        ({"offset": "0x10"}, "not a non-negative integer"),
        ({"offset": "9" * 5000}, "not a non-negative integer"),
        ({"length": "17"}, "bytes 0..17 of a 16-byte file"),
        ({"offset": "8", "length": "9"}, "bytes 8..17 of a 16-byte file"),
        ({"offset": "17"}, "bytes 17..17 of a 16-byte file"),
    ],
)
def test_offset_and_length_must_stay_within_the_file(tmp_path: Path, keys: dict[str, str], why: str) -> None:
    (tmp_path / "x.bin").write_bytes(bytes(16))
    path = save(make_model([], [external("w", "x.bin", [4], **keys)]), tmp_path / "m.onnx")
    with pytest.raises(UnsafeModelError, match=why):
        check_external_data(path, tmp_path)


def test_safe_locations_are_accepted(tmp_path: Path) -> None:
    """Files in the folder or a subfolder, with offsets inside them; a symlink above the tier folder is fine."""
    real = tmp_path / "real" / "tier"
    (real / "data").mkdir(parents=True)
    (real / "x.bin").write_bytes(bytes(16))
    (real / "data" / "y.bin").write_bytes(bytes(32))
    tensors = [
        external("a", "x.bin", [4]), external("b", "data/y.bin", [4], offset="16", length="16"), external("c", "./x.bin", [4])
    ]
    save(make_model([], tensors), real / "m.onnx")
    check_external_data(real / "m.onnx", real)
    (tmp_path / "bundles").symlink_to(tmp_path / "real")  # e.g. a bundle folder on another disk
    check_external_data(tmp_path / "bundles" / "tier" / "m.onnx", tmp_path / "bundles" / "tier")


def test_external_without_location_and_stray_entries_are_refused(tmp_path: Path) -> None:
    path = save(make_model([], [external("w", None, [4])]), tmp_path / "m.onnx")
    with pytest.raises(UnsafeModelError, match="tensor 'w'.*has no 'location' entry"):
        check_external_data(path, tmp_path)
    # entries without data_location EXTERNAL become live if another occurrence of the message sets it: checked too
    stray = external("w", "/etc/passwd", [4])
    stray.data_location = TensorProto.DEFAULT
    path = save(make_model([], [stray]), tmp_path / "m.onnx")
    with pytest.raises(UnsafeModelError, match="is an absolute path"):
        check_external_data(path, tmp_path)


def test_an_enum_value_with_high_bits_reads_as_external(tmp_path: Path) -> None:
    """Protobuf keeps the low 32 bits of an enum's varint: data_location 2**32 + 1 is EXTERNAL to ORT."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4]).SerializeToString()
    tensor += b"\x70" + varint(2**32 + 1)  # field 14, varint
    path = tmp_path / "m.onnx"
    path.write_bytes(ld(7, ld(5, tensor)))
    assert [t.data_location for t in read_tensors(path)] == [1]
    with pytest.raises(UnsafeModelError, match="has no 'location' entry"):
        check_external_data(path, tmp_path)


# --------------------------------------------------------------------------------------------------------------
# The tier files themselves


def test_tier_files_must_be_regular_files_inside_the_tier_folder(tiny_bundle: Path, tmp_path: Path, no_ort: None) -> None:
    tier = copy_tier(tiny_bundle, tmp_path)
    files = tier_file_paths(tier)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for role in ("eval_model", "optimizer_model", "checkpoint"):
        moved = elsewhere / files[role].name
        shutil.copy(files[role], moved)
        files[role].unlink()
        files[role].symlink_to(moved)
        with pytest.raises(UnsafeModelError, match=f"the {role} is a symlink"):
            OrtTierSession(files)
        files[role].unlink()
        shutil.copy(moved, files[role])
    with pytest.raises(UnsafeModelError, match="eval_model lies outside the tier folder"):
        check_tier_files({**files, "eval_model": elsewhere / "eval_model.onnx"})
    (tier / "dir.onnx").mkdir()
    with pytest.raises(UnsafeModelError, match="is not a regular file"):
        check_tier_files({**files, "eval_model": tier / "dir.onnx"})
    with pytest.raises(IntegrityError, match="missing"):
        check_tier_files({**files, "eval_model": tier / "gone.onnx"})
    # a model is checked as ONNX whatever its name; ORT's own format is not used by fftmoe
    shutil.copy(files["eval_model"], tier / "eval.bin")
    check_tier_files({**files, "eval_model": tier / "eval.bin"})
    with pytest.raises(UnsafeModelError, match="ORT's own format"):
        check_tier_files({**files, "eval_model": tier / "eval.ort"})
    # the optimizer checkpoint a resumed device wrote itself may live in its run folder, but not behind a symlink
    check_tier_files({**files, "checkpoint": elsewhere / "checkpoint"})
    os.symlink(tmp_path / "secret", str(files["checkpoint"]) + ".data")
    with pytest.raises(UnsafeModelError, match="checkpoint external data is a symlink"):
        check_tier_files(files)


def test_a_symlinked_training_model_is_refused(tiny_bundle: Path, tmp_path: Path, no_ort: None) -> None:
    tier = copy_tier(tiny_bundle, tmp_path)
    files = tier_file_paths(tier)
    shutil.move(files["training_model"], tmp_path / "training_model.onnx")
    files["training_model"].symlink_to(tmp_path / "training_model.onnx")
    with pytest.raises(UnsafeModelError, match="the training_model is a symlink"):
        OrtTierSession({k: str(v) for k, v in files.items()})


# --------------------------------------------------------------------------------------------------------------
# Malformed files: a BundleError naming the file, nothing else


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def nested_graphs(depth: int) -> bytes:
    """A ModelProto whose graph holds ``depth`` graphs, each the ``g`` attribute of a node of the one above."""
    graph = ld(5, TensorProto(name="inner").SerializeToString())
    for _ in range(depth - 1):
        graph = ld(1, ld(5, ld(6, graph)))  # GraphProto.node -> NodeProto.attribute -> AttributeProto.g
    return ld(7, graph)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty file"),
        (b"\x08\x07", "no graph"),  # ir_version only
        (b"\x3a", "truncated varint"),
        (b"\x3a\x80", "truncated varint"),
        (b"\x3a\xff\x01" + b"x" * 10, "runs past the end"),
        (b"\x3a\x02\x2a\x7f", "runs past the end"),  # an initializer longer than its graph
        (b"\x38\x01", "ModelProto.graph .* wire type 0"),
        (ld(7, b"\x2a\x01\x70"), "truncated varint"),
        (ld(7, ld(5, b"\x70\x01\x40\x01")), "TensorProto.name .* wire type 0"),
        (ld(7, ld(5, b"\x6a\x02\x08\x01")), "key/value .* wire type 0"),
        (b"\x3b\x3c", "wire type 3"),
        (b"\x3e", "wire type 6"),
        (b"\x3a\x03\x0d\x01\x02", "truncated fixed-width"),
        (b"\x02\x00", "field number 0"),
        (b"\x3a" + b"\xff" * 11, "varint longer than 10 bytes"),
        (nested_graphs(MAX_GRAPH_DEPTH + 1), "nested deeper than 64"),
        (nested_graphs(1000), "nested deeper than 64"),
    ],
)
def test_malformed_models_raise_unsafe_model_error(tmp_path: Path, data: bytes, why: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(UnsafeModelError, match=why) as caught:
        check_external_data(path, tmp_path)
    assert str(path) in str(caught.value)


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(nested_graphs(MAX_GRAPH_DEPTH))
    assert [t.name for t in read_tensors(path)] == ["inner"]


def test_truncated_and_random_files_raise_unsafe_model_error(tiny_bundle: Path, tmp_path: Path) -> None:
    data = (tiny_bundle / "tiers" / "t2" / "training_model.onnx").read_bytes()
    path = tmp_path / "m.onnx"
    for cut in (1, 5, 20, 100, len(data) // 3, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(UnsafeModelError):
            check_external_data(path, tmp_path)
    rng = np.random.default_rng(0)
    for size in (1, 10, 100, 1000, 100_000):
        path.write_bytes(rng.bytes(size))
        with pytest.raises(UnsafeModelError):
            check_external_data(path, tmp_path)


@pytest.fixture(scope="module")
def fuzz_seeds(tiny_bundle: Path) -> list[bytes]:
    """A real training model, and a small model whose tensors have external data (so flips hit the locations)."""
    tensors = [external("a", "x.bin", [4], offset="0", length="16"), external("b", "sub/y.bin", [2], offset="8")]
    node = helper.make_node("Constant", [], ["y"], value=external("c", "x.bin", [4]))
    small = if_model(external("d", "x.bin", [4], length="16"))
    small.graph.node.append(node)
    small.graph.initializer.extend(tensors)
    return [(tiny_bundle / "tiers" / "t2" / "training_model.onnx").read_bytes(), small.SerializeToString()]


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=8),
       keep=st.one_of(st.none(), st.floats(0, 1)))  # fmt: skip
def test_fuzzed_models_raise_only_bundle_errors(fuzz_seeds: list[bytes], tmp_path: Path, seed: int, flips: list,
                                                keep: float | None) -> None:  # fmt: skip
    """Bit flips and truncations of real and external-data models: accepted, or refused with a BundleError."""
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "x.bin").write_bytes(bytes(16))
    (tmp_path / "sub" / "y.bin").write_bytes(bytes(16))
    data = bytearray(fuzz_seeds[seed])
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    if keep is not None:
        data = data[: int(keep * len(data))]
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(bytes(data))
    try:
        check_external_data(path, tmp_path)
    except BundleError:
        pass
