"""The bundle format: validated on read with errors that name the field, and hash-verified files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.bundle import (
    FORMAT_VERSION,
    IntegrityError,
    Manifest,
    ManifestError,
    load_manifest,
    verify_bundle,
    verify_files,
)


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_round_trips(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.format_version == FORMAT_VERSION
    assert sorted(manifest.tiers) == [1, 2, 4]
    assert manifest.tier(1).router_params == []  # a one-slot tier has no router to train
    assert manifest.input_names == ("input_ids", "attention_mask", "labels", "routing_target", "logit_adjustment")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version=99), "format version 99 is not supported"),
        (lambda d: d.pop("labels"), "'labels' is missing"),
        (lambda d: d.update(num_experts="8"), "'num_experts' must be an integer"),
        (lambda d: d.update(top_k=True), "'top_k' must be an integer, got a boolean"),
        (lambda d: d["tiers"]["2"].update(slots=9), "'tiers.2.slots' is 9, more than num_experts=4"),
        (lambda d: d["tiers"]["2"]["files"]["checkpoint"].update(sha256="xyz"), "'tiers.2.files.checkpoint.sha256'"),
        (lambda d: d["tiers"]["2"]["files"]["checkpoint"].update(path="../../etc/passwd"), "relative path inside the bundle"),
        (lambda d: d["tiers"]["2"]["slot_params"].pop(), "'tiers.2.slot_params' has"),
        (lambda d: d["tiers"]["2"]["slot_params"][0].update(slot=7), "out of range"),
        (lambda d: d.update(format="something-else"), "not an fftmoe bundle"),
    ],
)
def test_malformed_manifest_names_the_field(bundle_copy: Path, change, message: str) -> None:
    _edit(bundle_copy, change)
    with pytest.raises(ManifestError, match="manifest.json") as info:
        load_manifest(bundle_copy)
    assert message in str(info.value)


def test_unreadable_manifest_and_missing_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bundle_copy)
    with pytest.raises(ManifestError, match="not an fftmoe bundle"):
        load_manifest(tmp_path)


def test_tampered_and_truncated_files_are_detected(bundle_copy: Path) -> None:
    verify_bundle(bundle_copy)
    ckpt = bundle_copy / "tiers" / "t2" / "checkpoint"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    verify_bundle(bundle_copy, tiers=[1, 4])  # other tiers are still fine
    with pytest.raises(IntegrityError, match="sha256 .* differs"):
        verify_bundle(bundle_copy, tiers=[2])
    pool = bundle_copy / "global_pool.safetensors"
    pool.write_bytes(pool.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        verify_bundle(bundle_copy, tiers=[])
    (bundle_copy / "tiers" / "t4" / "eval_model.onnx").unlink()
    with pytest.raises(IntegrityError, match="eval_model.onnx: missing"):
        verify_files(bundle_copy, list(load_manifest(bundle_copy).tier(4).files.values()))


def test_training_api_imports_without_torch(tiny_bundle: Path) -> None:
    code = (
        "import sys; from edge_runtime.ort_backend import OrtTierSession\n"
        "from edge_runtime.bundle import load_manifest\n"
        f"b = {str(tiny_bundle)!r}; m = load_manifest(b)\n"
        "s = OrtTierSession({k: b + '/' + f.path for k, f in m.tier(2).files.items()})\n"
        "assert s.trainable_names, 'no trainable tensors'\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_fftmoe_manifests_are_written_as_before_the_lora_baselines(tiny_bundle: Path) -> None:
    """No method or LoRA fields in an FFT-MoE manifest, so its manifest id (and resumable run state) is unchanged."""
    d = load_manifest(tiny_bundle).to_dict()
    assert "method" not in d and "lora" not in d and "rank" not in d["tiers"]["2"]
    assert load_manifest(tiny_bundle).method == "fftmoe"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(method="lora"), "'method' must be one of fftmoe, fedit, hetlora"),
        (lambda d: d.pop("lora"), "'lora' is missing"),
        (lambda d: d["lora"].update(target_modules=[]), "'lora.target_modules' must be a non-empty list"),
        (lambda d: d["tiers"]["4"].update(rank=9), "'tiers.4.rank' is 9, more than lora.max_rank=8"),
        (lambda d: d["tiers"]["2"]["lora_params"][0].update(shape=[3, 32]), "does not fit rank 4"),
        (lambda d: d["tiers"]["2"].update(lora_params=[]), "'tiers.2.lora_params' is empty"),
    ],
)
def test_malformed_lora_manifest_names_the_field(tiny_hetlora: Path, tmp_path: Path, change, message: str) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_hetlora, copy)
    manifest = load_manifest(copy)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    _edit(copy, change)
    with pytest.raises(ManifestError, match="manifest.json") as info:
        load_manifest(copy)
    assert message in str(info.value)
