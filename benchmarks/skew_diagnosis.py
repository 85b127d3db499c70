"""Where a finished label-skew run loses accuracy: the head, the router's top-k, or the evaluation's noise.

Reads a `fftmoe-coordinator simulate` run folder (its plan, client files, global test rows and final global state)
and, with PyTorch's global model (``coordinator.global_model``, the model the coordinator evaluates), scores on the
global test rows:

- ``as_run``: the final global model as saved (its central accuracy, recomputed);
- ``frozen_probe``: a ridge head on the *initial* model's features of all training rows (no adapter training);
- ``oracle_head``: a ridge head re-fitted on the final model's features of all training rows (every client's), the
  head oracle of issue 18: what is left of the gap once the head is perfect for the adapted features;
- ``tier_m_head``: the same, from the clients whose tier computes the global model's features (``--ridge-resolve``);
- for FFT-MoE, ``top_k``: the final model (head as saved) with k of the M experts per token;
- ``noise``: the binomial standard error of an accuracy on these rows and a bootstrap 95% interval of ``as_run``.

The heads use the run's --ridge and --ridge-scale rule (``coordinator.ridge_head.solve_head``); the test rows are
only scored, never fitted on.

    python benchmarks/skew_diagnosis.py runs/skew/fftmoe-rf-la1-0.1-s0 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.global_model import build_global_model  # noqa: E402
from coordinator.ridge_head import global_view_tiers, solve_head  # noqa: E402
from coordinator.state import GlobalState  # noqa: E402
from edge_runtime.bundle import load_manifest  # noqa: E402
from edge_runtime.data import DataSpec, TextEncoder, encode_examples, load_examples  # noqa: E402
from edge_runtime.head_stats import HeadStatistics  # noqa: E402
from edge_runtime.update import manifest_id  # noqa: E402


def features(model, rows, batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    """(pooled features [n, d], logits [n, C], labels [n]) of encoded rows."""
    import torch

    phi, logits, labels = [], [], []
    with torch.no_grad():
        for ids, mask, y in rows.batches(batch):
            z, _ = model.features(torch.from_numpy(ids), torch.from_numpy(mask))
            phi.append(z.numpy())
            logits.append(model.head(z).numpy())
            labels.append(y)
            model.clear_routing()
    return np.concatenate(phi), np.concatenate(logits), np.concatenate(labels)


def ridge_accuracy(train: list[tuple[np.ndarray, np.ndarray]], test_phi: np.ndarray, test_y: np.ndarray, num_labels: int,
                   ridge: float, scale: float) -> float:  # fmt: skip
    """Accuracy on the test features of the ridge head solved from the training (features, labels) pairs."""
    s = HeadStatistics.zeros(test_phi.shape[1], num_labels)
    for phi, y in train:
        s.add(phi, y)
    w, b = solve_head(s.gram, s.cross, ridge, scale)
    return float(np.mean((test_phi @ w.T + b).argmax(-1) == test_y))


def set_top_k(model, k: int) -> None:  # noqa: ANN001
    """Route every token of every MoE layer to its k most probable experts."""
    for module in model.modules():
        if hasattr(module, "top_k") and hasattr(module, "slots") and module.slots > 1:
            module.top_k = k


def diagnose(run: Path, max_len: int) -> dict:
    """The figures above for one run folder (``max_len``: the run's --max-seq-len)."""
    plan = json.loads((run / "plan.json").read_text())
    bundle = Path(plan["bundle"])
    manifest = load_manifest(bundle)
    state = GlobalState.load(run / "state", manifest_id(manifest))
    solved = next((h["ridge_head"] for h in state.history if "ridge_head" in h), {})  # the run's own --ridge, --ridge-scale
    ridge, scale = float(solved.get("ridge", 0.1)), float(solved.get("scale", 6.0))
    encoder = TextEncoder(bundle / Path(manifest.tokenizer_files[0].path).parent, max_len)
    spec = DataSpec(("text",), "label")
    test = encode_examples(load_examples(run / "data" / "global-test.csv", spec, manifest.labels), encoder)
    clients = [(n["tier"], encode_examples(load_examples(Path(n["node_config"]["data"]), spec, manifest.labels), encoder)) for n in plan["nodes"]]
    c = len(manifest.labels)
    out: dict = {"run": str(run), "method": manifest.method, "rounds": state.round, "ridge": ridge, "scale": scale, "test_rows": len(test)}

    from safetensors.numpy import load_file

    initial = build_global_model(bundle, manifest, load_file(str(bundle / manifest.global_pool.path)))
    t_phi, _, t_y = features(initial, test)
    train0 = [features(initial, rows)[::2] for _, rows in clients]
    out["frozen_probe"] = ridge_accuracy(train0, t_phi, t_y, c, ridge, scale)
    del initial

    model = build_global_model(bundle, manifest, state.pool)
    t_phi, t_logits, t_y = features(model, test)
    correct = (t_logits.argmax(-1) == t_y).astype(float)
    out["as_run"] = float(correct.mean())
    trained = [(tier, *features(model, rows)[::2]) for tier, rows in clients]
    out["oracle_head"] = ridge_accuracy([(p, y) for _, p, y in trained], t_phi, t_y, c, ridge, scale)
    view = global_view_tiers(manifest)
    tier_m = [(p, y) for tier, p, y in trained if tier in view]
    out["tier_m_head"] = ridge_accuracy(tier_m, t_phi, t_y, c, ridge, scale) if tier_m else None
    out["tier_m_clients"] = len(tier_m)
    out["tier_m_labels"] = np.bincount(np.concatenate([y for _, y in tier_m]), minlength=c).tolist() if tier_m else []
    if not manifest.is_lora:
        out["top_k"] = {}
        for k in sorted({1, 2, manifest.top_k, 4, manifest.num_experts}):
            set_top_k(model, k)
            _, logits_k, _ = features(model, test)
            out["top_k"][str(k)] = float(np.mean(logits_k.argmax(-1) == t_y))
        set_top_k(model, manifest.top_k)
    p = out["as_run"]
    boot = np.random.default_rng(0).choice(correct, size=(2000, len(correct))).mean(axis=1)
    out["noise"] = {"binomial_se": float(np.sqrt(p * (1 - p) / len(correct))), "bootstrap_95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="simulate run folders")
    parser.add_argument("--max-seq-len", type=int, default=64, help="the runs' --max-seq-len (docs/benchmarks.md: 64)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        started = time.perf_counter()
        r = diagnose(run, args.max_seq_len)
        r["seconds"] = round(time.perf_counter() - started, 1)
        results.append(r)
        top = " ".join(f"k{k}: {v:.3f}" for k, v in r.get("top_k", {}).items())
        print(f"{run.name}: as run {r['as_run']:.3f} (se {r['noise']['binomial_se']:.3f}), frozen probe {r['frozen_probe']:.3f}, "
              f"oracle head {r['oracle_head']:.3f}, tier-M head {r['tier_m_head']} ({r['tier_m_clients']} clients) {top} [{r['seconds']} s]", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
