"""``fftmoe-export`` as a user runs it: the table or JSON, the measurement, and every bad-input exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_runtime.bundle import load_manifest, verify_bundle
from exporter import export as export_mod
from exporter.cli import EXIT_BAD_ARGS, EXIT_BAD_MODEL, EXIT_FAILED, EXIT_OUTPUT_EXISTS, app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _small(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--experts", "2", "--expert-dim", "4", "--max-seq-len", "8", *extra]


def test_help_explains_every_option_and_the_exit_codes() -> None:
    result = _run("--help")
    assert result.exit_code == 0
    for flag in ("--tiers", "--model", "--experts", "--expert-dim", "--top-k", "--labels", "--num-labels", "--max-seq-len", "--force", "--json"):
        assert flag in result.output
    assert "Exit codes" in result.output


def test_export_with_measurement_prints_json_and_writes_a_verified_bundle(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = _run(*_small(tiny_bert_dir, out, "--tiers", "2", "--num-labels", "3", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    (tier,) = report["tiers"]
    assert tier["slots"] == 2 and tier["trainable_params"] > 0
    assert tier["step_time_s"] > 0 and tier["peak_rss_mb"] > 50
    manifest = verify_bundle(out)
    assert manifest.labels == ["0", "1", "2"]
    measured = manifest.tier(2).measured
    assert measured is not None and measured.batch_size == 16 and measured.seq_len == 8 and measured.threads == 2
    assert not list(tmp_path.glob(".b.*")), "staging folders left behind"


@pytest.mark.parametrize(
    ("tiers", "message"),
    [("2,x", "not an integer"), ("0,2", "< 1"), ("2,3", "exceeds --experts 2"), ("2,,4", "empty entry")],
)
def test_bad_tiers_exit_2_with_one_message(tiny_bert_dir: Path, tmp_path: Path, tiers: str, message: str) -> None:
    result = _run(*_small(tiny_bert_dir, tmp_path / "b", "--tiers", tiers))
    assert result.exit_code == EXIT_BAD_ARGS
    assert message in result.output and "--tiers" in result.output
    assert not (tmp_path / "b").exists()


def test_bad_settings_exit_2(tiny_bert_dir: Path, tmp_path: Path) -> None:
    assert _run(*_small(tiny_bert_dir, tmp_path / "b", "--top-k", "3")).exit_code == EXIT_BAD_ARGS
    assert _run(*_small(tiny_bert_dir, tmp_path / "b", "--labels", "a,a")).exit_code == EXIT_BAD_ARGS
    result = _run(*_small(tiny_bert_dir, tmp_path / "b", "--tiers", "1", "--max-seq-len", "500", "--no-measure"))
    assert result.exit_code == EXIT_BAD_ARGS and "positions" in result.output
    result = _run(*_small(tiny_bert_dir, tmp_path / "b", "--balance-loss", "soft"))
    assert result.exit_code == EXIT_BAD_ARGS and "--balance-loss 'soft'" in result.output
    result = _run(*_small(tiny_bert_dir, tmp_path / "b", "--method", "fedit", "--ranks", "2", "--adapter-placement", "pre-ln"))
    assert result.exit_code == EXIT_BAD_ARGS and "--adapter-placement is FFT-MoE's" in result.output


def test_pre_ln_is_refused_for_an_image_model_before_anything_is_written(tiny_vit_dir: Path, tmp_path: Path) -> None:
    result = _run(*_small(tiny_vit_dir, tmp_path / "b", "--tiers", "2", "--num-labels", "3", "--adapter-placement", "pre-ln", "--no-measure"))
    assert result.exit_code == EXIT_BAD_ARGS and "use --adapter-placement post-ln" in result.output, result.output
    assert not (tmp_path / "b").exists()


def test_missing_and_unsupported_models_exit_3(tmp_path: Path) -> None:
    result = _run("--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "b"), "--tiers", "2")
    assert result.exit_code == EXIT_BAD_MODEL and "no-such-model" in result.output
    import transformers

    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    result = _run("--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "b"), "--tiers", "2")
    assert result.exit_code == EXIT_BAD_MODEL and "supported: bert" in result.output
    assert not (tmp_path / "b").exists()


def test_existing_bundle_is_refused_without_force_and_replaced_with_it(tiny_bundle: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_bytes()
    result = _run(*_small(tiny_bert_dir, out, "--tiers", "1", "--no-measure"))
    assert result.exit_code == EXIT_OUTPUT_EXISTS and "--force" in result.output
    assert (out / "manifest.json").read_bytes() == before
    result = _run(*_small(tiny_bert_dir, out, "--tiers", "1", "--no-measure", "--force"))
    assert result.exit_code == 0, result.output
    assert sorted(load_manifest(out).tiers) == [1]
    assert not list(tmp_path.glob(".b.*"))


def test_failure_half_way_leaves_no_bundle_and_keeps_the_old_one(
    tiny_bundle: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    real = export_mod.generate_tier_artifacts
    calls = []

    def fail_on_second_tier(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while exporting")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "generate_tier_artifacts", fail_on_second_tier)
    fresh = tmp_path / "fresh"
    result = _run(*_small(tiny_bert_dir, fresh, "--tiers", "1,2", "--no-measure"))
    assert result.exit_code == EXIT_FAILED and "simulated crash" in result.output
    assert not fresh.exists() and list(tmp_path.iterdir()) == []

    calls.clear()
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    result = _run(*_small(tiny_bert_dir, old, "--tiers", "1,2", "--no-measure", "--force"))
    assert result.exit_code == EXIT_FAILED
    verify_bundle(old)  # the previous bundle is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
