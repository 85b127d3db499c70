"""Standalone training: Ctrl-C-style stop saves the state, --resume continues it, and a finished run writes the
update, an inference model that ONNX Runtime runs, and the history plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_runtime.bundle import load_manifest
from edge_runtime.local import STATE_FILE, StateError, load_state, read_run, train_local
from edge_runtime.session import TierSession, TrainConfig
from edge_runtime.update import Update, default_assignment

from .test_session import tiny_data


def session_for(bundle: Path, slots: int = 2) -> TierSession:
    manifest = load_manifest(bundle)
    session = TierSession(bundle, manifest, slots, "ort", threads=1)
    session.load(load_file(str(bundle / manifest.global_pool.path)), default_assignment(manifest, slots))
    return session


def test_stop_saves_state_and_resume_finishes(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2)
    train, held = tiny_data(24), tiny_data(9, seed=1)
    steps = {"n": 0}

    def stop_after_4() -> bool:
        steps["n"] += 1
        return steps["n"] > 4

    session = session_for(tiny_bundle)
    state = train_local(session, tiny_bundle, out, train, held, config, should_stop=stop_after_4)
    assert not state.finished and state.step == 4 and (state.epoch, state.batch_in_epoch) == (1, 1)
    assert len(state.history) == 1  # epoch 1 (3 batches) completed and was evaluated
    _, saved, _ = read_run(out)
    for name, value in session.values().items():
        np.testing.assert_array_equal(saved[name], value)
    assert not (out / "update.safetensors").exists()

    resumed = session_for(tiny_bundle)  # a new process would start from the bundle's weights
    state = train_local(resumed, tiny_bundle, out, train, held, config, resume=True)
    assert state.finished and state.step == 6 and len(state.history) == 2
    assert len(state.step_losses) == 6  # the loss of every step, across the interruption, for history.png
    assert [h["epoch"] for h in state.history] == [1, 2] and 0 <= state.history[-1]["eval_accuracy"] <= 1
    update = Update.load(out / "update.safetensors").validate(resumed.manifest)
    assert update.num_examples == 48
    assert (out / "history.png").stat().st_size > 1000

    import onnxruntime as ort

    model = ort.InferenceSession(str(out / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, labels = held.batch(np.arange(9))
    feed = {i.name: {"input_ids": ids, "attention_mask": mask}[i.name] for i in model.get_inputs()}
    (logits,) = model.run(["logits"], feed)
    expected = resumed.backend.evaluate(resumed.inputs((ids, mask, labels)))[1]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}


def test_resume_refuses_other_settings(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    manifest = load_manifest(tiny_bundle)
    with pytest.raises(StateError, match="no saved state"):
        load_state(out, manifest, 2, TrainConfig())
    train_local(session_for(tiny_bundle), tiny_bundle, out, tiny_data(8), None, TrainConfig(batch_size=4, max_steps=1))
    with pytest.raises(StateError, match="--batch-size 4"):
        load_state(out, manifest, 2, TrainConfig(batch_size=8))
    with pytest.raises(StateError, match="--tier 2"):
        load_state(out, manifest, 4, TrainConfig(batch_size=4))
    with pytest.raises(StateError, match="--max-seq-len None"):
        load_state(out, manifest, 2, TrainConfig(batch_size=4, max_seq_len=8))
    state, _, folder = read_run(out)
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    with pytest.raises(StateError, match="weights.safetensors: contents differ from the SHA-256"):
        load_state(out, manifest, 2, TrainConfig(batch_size=4))
    (out / STATE_FILE).write_text("{not json")
    with pytest.raises(StateError, match="damaged"):
        load_state(out, manifest, 2, TrainConfig(batch_size=4))


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_resume_continues_adamw_exactly(tiny_bundle: Path, tmp_path: Path, backend: str) -> None:
    """Stopped after 3 steps and resumed in a new session, training ends where an uninterrupted run ends: the
    optimizer's moments and step count are saved with the weights (a restart from zero moments would differ)."""
    manifest = load_manifest(tiny_bundle)
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2)
    train = tiny_data(24)

    def fresh() -> TierSession:
        session = TierSession(tiny_bundle, manifest, 2, backend, threads=1)
        session.load(load_file(str(tiny_bundle / manifest.global_pool.path)), default_assignment(manifest, 2))
        return session

    whole = fresh()
    train_local(whole, tiny_bundle, tmp_path / "whole", train, None, config)
    calls = {"n": 0}

    def stop_after_3() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    train_local(fresh(), tiny_bundle, tmp_path / "split", train, None, config, should_stop=stop_after_3)
    first = read_run(tmp_path / "split")[0]
    assert first.step == 3 and not first.finished
    assert len(list((tmp_path / "split").glob("ckpt-*"))) == 1  # older checkpoint folders are removed on commit
    resumed = fresh()
    state = train_local(resumed, tiny_bundle, tmp_path / "split", train, None, config, resume=True)
    assert state.finished and state.step == 6
    for name, value in whole.values().items():
        np.testing.assert_allclose(resumed.values()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
