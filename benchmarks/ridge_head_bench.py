"""Choose --ridge and --ridge-scale for the closed-form head on training rows only (never the global test rows).

The rows are those `fftmoe-coordinator simulate` gives its clients for the benchmark's settings (its plan, written
into a scratch folder: the global test rows are held out there and never read here). Their pooled features from the
frozen encoder (the bundle's initial model, the features the head is solved from before round 1) are split into K
folds; for each fold the head is solved from the other folds' sums (``coordinator.ridge_head.solve_head``, as the
coordinator does) and scored on the fold: accuracy (does not depend on the scale) and mean cross-entropy (does).

    python benchmarks/ridge_head_bench.py --bundle runs/minilm-bundle --data ../shared/data/ag_news/ag_news_6000.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.global_model import build_global_model  # noqa: E402
from coordinator.ridge_head import solve_head  # noqa: E402
from coordinator.simulate import SimSettings, prepare  # noqa: E402
from edge_runtime.bundle import load_manifest  # noqa: E402
from edge_runtime.data import DataSpec, TextEncoder, encode_examples, load_examples  # noqa: E402
from edge_runtime.head_stats import HeadStatistics  # noqa: E402

RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SCALES = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def training_features(bundle: Path, data: Path, seed: int, alpha: float, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled frozen-encoder features [n, d] and labels [n] of every client's training rows of the benchmark plan."""
    import torch

    manifest = load_manifest(bundle)
    with tempfile.TemporaryDirectory() as tmp:
        settings = SimSettings(bundle=bundle, data=str(data), out=Path(tmp), clients=20, fleet="three-tiers", alpha=alpha, min_partition_size=5,
                               text_columns=("title", "description"), label_map="1=World,2=Sports,3=Business,4=Sci/Tech", seed=seed,
                               run={"batch_size": 16})  # fmt: skip
        plan = prepare(settings)
        model = build_global_model(bundle, manifest, _initial_pool(bundle, manifest))
        encoder = TextEncoder(bundle / Path(manifest.tokenizer_files[0].path).parent, max_seq_len)
        phi, labels = [], []
        for node in plan["nodes"]:
            rows = encode_examples(load_examples(Path(node["node_config"]["data"]), DataSpec(("text",), "label"), manifest.labels), encoder)
            with torch.no_grad():
                for ids, mask, y in rows.batches(64):
                    phi.append(model.features(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy())
                    labels.append(y)
    return np.concatenate(phi), np.concatenate(labels)


def _initial_pool(bundle: Path, manifest) -> dict[str, np.ndarray]:  # noqa: ANN001
    from safetensors.numpy import load_file

    return load_file(str(bundle / manifest.global_pool.path))


def cross_validate(phi: np.ndarray, y: np.ndarray, num_labels: int, folds: int, seed: int) -> list[dict[str, float]]:
    """Per (ridge, scale): mean held-out accuracy and cross-entropy over the folds."""
    order = np.random.default_rng(seed).permutation(len(y))
    parts = np.array_split(order, folds)
    sums = []
    for part in parts:
        s = HeadStatistics.zeros(phi.shape[1], num_labels)
        s.add(phi[part], y[part])
        sums.append(s)
    out = []
    for ridge in RIDGES:
        for scale in SCALES:
            acc, ce = [], []
            for k, part in enumerate(parts):
                gram = sum(s.gram for j, s in enumerate(sums) if j != k)
                cross = sum(s.cross for j, s in enumerate(sums) if j != k)
                w, b = solve_head(gram, cross, ridge, scale)
                logits = phi[part].astype(np.float64) @ w.T + b
                logits -= logits.max(axis=1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
                acc.append(float((logits.argmax(1) == y[part]).mean()))
                ce.append(float(-logp[np.arange(len(part)), y[part]].mean()))
            out.append({"ridge": ridge, "scale": scale, "accuracy": float(np.mean(acc)), "accuracy_sd": float(np.std(acc)),
                        "cross_entropy": float(np.mean(ce))})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="A bundle exported by fftmoe-export (MiniLM for the benchmark).")
    ap.add_argument("--data", type=Path, required=True, help="The AG News CSV of docs/benchmarks.md.")
    ap.add_argument("--seed", type=int, default=0, help="The simulate seed whose plan gives the training rows.")
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet alpha of that plan (the training rows do not depend on it).")
    ap.add_argument("--max-seq-len", type=int, default=64, help="Tokens per row, as in the benchmark.")
    ap.add_argument("--folds", type=int, default=5, help="Cross-validation folds over the training rows.")
    ap.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = ap.parse_args()
    start = time.perf_counter()
    phi, y = training_features(args.bundle, args.data, args.seed, args.alpha, args.max_seq_len)
    embedded = time.perf_counter() - start
    results = cross_validate(phi, y, int(y.max()) + 1, args.folds, args.seed)
    if args.json:
        print(json.dumps({"rows": len(y), "embed_seconds": embedded, "results": results}, indent=1))
        return
    print(f"{len(y)} training rows, {args.folds} folds; embedding took {embedded:.0f} s")
    print(f"{'ridge':>8} {'scale':>6} {'accuracy':>9} {'sd':>6} {'CE':>7}")
    for r in results:
        print(f"{r['ridge']:>8g} {r['scale']:>6g} {r['accuracy']:>9.4f} {r['accuracy_sd']:>6.4f} {r['cross_entropy']:>7.4f}")


if __name__ == "__main__":
    main()
