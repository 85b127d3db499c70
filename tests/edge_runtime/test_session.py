"""Training sessions on the tiny bundle: only the slots change, the update matches the trained values,
changed artifacts are refused, and the ONNX Runtime and PyTorch backends agree."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_runtime.bundle import IntegrityError, global_expert_key, load_manifest
from edge_runtime.data import EncodedData
from edge_runtime.session import OUT, TierSession, TrainConfig, TrainingError

ASSIGNMENT = [[3, 1], [0, 2]]


def tiny_data(n: int = 24, vocab: int = 43, seed: int = 0) -> EncodedData:
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[2], rng.integers(5, vocab, rng.integers(3, 14)), [3]]).astype(np.int64) for _ in range(n)]
    return EncodedData(ids, rng.integers(0, 3, n).astype(np.int64))


def open_session(bundle: Path, backend: str = "ort", slots: int = 2) -> tuple[TierSession, dict]:
    manifest = load_manifest(bundle)
    session = TierSession(bundle, manifest, slots, backend, threads=1)
    pool = load_file(str(bundle / manifest.global_pool.path))
    session.load(pool, ASSIGNMENT if slots == 2 else [list(range(slots))] * manifest.num_layers)
    return session, pool


def test_training_changes_only_the_slots_and_the_update_holds_the_trained_values(tiny_bundle: Path) -> None:
    session, pool = open_session(tiny_bundle)
    state = session.backend.session.state
    trainable = set(session.tier.trainable_names)
    frozen_before = {n: np.array(p.data) for n, p in state.parameters if n not in trainable}
    before = session.values()
    result = session.train(tiny_data(), TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2))
    assert result.steps == 6 and result.examples == 48
    after = session.values()
    assert all(not np.array_equal(before[n], after[n]) for n in trainable), "a slot tensor did not train"
    for n, p in state.parameters:
        if n not in trainable:
            np.testing.assert_array_equal(np.array(p.data), frozen_before[n], err_msg=f"frozen {n} changed")
    update = session.update(result.examples, result.stats).validate(session.manifest, ASSIGNMENT)
    for p in session.tier.slot_params:  # the update carries the checkpoint's trained values under global ids
        key = global_expert_key(p.layer, ASSIGNMENT[p.layer][p.slot], p.tensor)
        np.testing.assert_array_equal(update.tensors[key], np.array(state.parameters[p.name].data))
    # every token is routed to top_k = 2 of the 2 slots: counts sum to 2 x tokens seen per layer
    tokens = sum(len(x) for x in tiny_data().ids) * 2
    np.testing.assert_allclose(update.route_counts.sum(axis=1), 2 * tokens)
    np.testing.assert_allclose(update.route_prob_sum.sum(axis=1), tokens, rtol=1e-5)


def test_evaluate_reports_accuracy_and_loss(tiny_bundle: Path) -> None:
    session, _ = open_session(tiny_bundle)
    data = tiny_data(20)
    metrics = session.evaluate(data, batch_size=7)
    ids, mask, labels = data.batch(np.arange(20))
    logits = session.backend.evaluate(session.inputs((ids, mask, labels)))[OUT["logits"]]
    assert metrics["examples"] == 20
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert metrics["loss"] > 0


def test_changed_artifact_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    model = copy / "tiers" / "t2" / "training_model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"training_model.onnx: sha256 .* differs"):
        TierSession(copy, load_manifest(copy), 2, "ort")


def test_nan_loss_stops_with_a_clear_error(tiny_bundle: Path) -> None:
    session, _ = open_session(tiny_bundle)
    name = session.tier.head_params[0].name
    session.backend.set(name, np.full_like(session.backend.get(name), np.nan))
    with pytest.raises(TrainingError, match="loss became nan.*lower --lr"):
        session.train(tiny_data(), TrainConfig(batch_size=8))


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_backends_agree_on_loss_and_first_step(tiny_bundle: Path, slots: int) -> None:
    ort_session, _ = open_session(tiny_bundle, "ort", slots)
    torch_session, _ = open_session(tiny_bundle, "torch", slots)
    rng = np.random.default_rng(slots)
    values = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ort_session.values().items()}
    ort_session.set_values(values)
    torch_session.set_values(values)
    batch = list(tiny_data(8).batch(np.arange(8)))
    inputs = ort_session.inputs(batch)
    a, b = ort_session.backend.loss_only(inputs), torch_session.backend.loss_only(inputs)
    for name in ("loss", "ce_loss", "aux_balance", "aux_hetero", "route_counts"):
        np.testing.assert_allclose(a[OUT[name]], b[OUT[name]], rtol=1e-5, atol=1e-6, err_msg=name)
    ort_session.backend.set_learning_rate(1e-2)
    torch_session.backend.set_learning_rate(1e-2)
    ort_session.backend.train_step(inputs)
    torch_session.backend.train_step(inputs)
    va, vb = ort_session.values(), torch_session.values()
    worst = max(float(np.abs(va[k] - vb[k]).max()) for k in va)
    assert worst < 1e-4, f"one AdamW step differs by {worst}"


def test_the_pytorch_backend_trains_from_the_encoder_without_the_tiers_ort_artifacts(tiny_bundle: Path, tmp_path: Path) -> None:
    """A board on the PyTorch backend (a Raspberry Pi) downloads only what ``needed_files`` names: the encoder and
    the tokenizer, none of the tier's ORT artifacts. A session opens, verifies and trains from exactly those files,
    and the ORT backend is refused there, naming the missing artifact."""
    from edge_runtime.bundle import needed_files

    manifest = load_manifest(tiny_bundle)
    needed = needed_files(manifest, 2, "torch")
    assert {e.path for e in needed} == {e.path for e in [*manifest.encoder_files, *manifest.tokenizer_files]}
    assert not {e.path for e in needed} & {e.path for e in manifest.tier(2).files.values()}
    board = tmp_path / "board"
    for entry in [*needed, manifest.global_pool]:
        (board / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_bundle / entry.path, board / entry.path)
    shutil.copy2(tiny_bundle / "manifest.json", board / "manifest.json")
    session, _ = open_session(board, "torch")
    before = session.values()
    result = session.train(tiny_data(), TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2))
    assert result.steps == 3 and all(not np.array_equal(before[n], v) for n, v in session.values().items())
    with pytest.raises(IntegrityError, match="tiers/t2/"):
        open_session(board, "ort")


def test_head_statistics_are_the_sums_of_the_pooled_features_pytorch_computes(tiny_bundle: Path) -> None:
    """The ORT eval model's ``features`` summed into G and B equal the same sums over PyTorch's pooled output
    (an independent forward pass), with the slots filled as the session's; and the sums pass their own checks."""
    import torch

    from edge_runtime.backends import model_from_bundle

    session, _ = open_session(tiny_bundle)
    data = tiny_data(21)
    stats = session.head_statistics(data, batch_size=8)
    model = model_from_bundle(tiny_bundle, session.manifest, 2)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in session.values().items()}, strict=False)
    model.eval()
    rows = []
    with torch.no_grad():
        for ids, mask, _ in data.batches(8):
            rows.append(model.features(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy())
    phi = np.concatenate(rows).astype(np.float64)
    z = np.concatenate([phi, np.ones((len(phi), 1))], axis=1)
    y = np.eye(len(session.manifest.labels))[data.labels]
    assert stats.examples == 21
    np.testing.assert_allclose(stats.gram, z.T @ z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.cross, z.T @ y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(stats.gram, stats.gram.T)
    stats.validate(session.manifest.hidden_size, len(session.manifest.labels), 21)


def test_a_frozen_head_stays_while_the_slots_train(tiny_bundle: Path) -> None:
    session, _ = open_session(tiny_bundle)
    before = session.values()
    head = tuple(n for n in session.tier.trainable_names if n.startswith("head."))
    assert head
    session.train(tiny_data(), TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2), frozen=head)
    after = session.values()
    for n in session.tier.trainable_names:
        assert np.array_equal(before[n], after[n]) == (n in head), n


def test_the_label_prior_adjusts_training_only(tiny_bundle: Path) -> None:
    """tau log pi with add-one smoothing enters the training loss (the ORT loss equals CE(z + adj, y) computed here
    from the plain logits) and never the evaluation."""
    session, _ = open_session(tiny_bundle)
    labels = np.array([0, 0, 0, 1])
    adj = session.set_label_prior(labels, 1.0)
    np.testing.assert_allclose(adj, np.log(np.array([4.0, 2.0, 1.0]) / 7.0), rtol=1e-6)
    batch = next(tiny_data(8).batches(8))
    plain = session.backend.evaluate(session.inputs(batch))
    z = plain[OUT["logits"]].astype(np.float64) + adj
    want = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(8), batch[-1]]))
    trained = session.backend.loss_only(session.inputs(batch, training=True))
    assert float(trained[OUT["ce_loss"]]) == pytest.approx(want, rel=1e-5)
    np.testing.assert_array_equal(session.backend.evaluate(session.inputs(batch))[OUT["logits"]], plain[OUT["logits"]])
    assert not session.set_label_prior(labels, 0.0).any()
