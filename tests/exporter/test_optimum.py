"""The exported inference model loads with optimum's ORTModelForSequenceClassification and runs in a pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.bundle import load_manifest


def test_inference_model_runs_in_optimum_and_a_transformers_pipeline(tiny_bundle: Path) -> None:
    import onnxruntime
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    manifest = load_manifest(tiny_bundle)
    folder = tiny_bundle / "inference"
    model = ORTModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    scores = classify(["the team win the game", "stock market fall"])
    assert len(scores) == 2
    assert {s["label"] for s in scores[0]} == set(manifest.labels)
    assert abs(sum(s["score"] for s in scores[0]) - 1.0) < 1e-4

    # optimum's logits are the raw ONNX model's logits
    enc = tokenizer(["the team win the game"], return_tensors="np")
    want = onnxruntime.InferenceSession(str(folder / "model.onnx")).run(
        ["logits"], {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    )[0]
    got = model(**tokenizer(["the team win the game"], return_tensors="pt")).logits.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
