"""The two centralised references every federated figure of a simulation run is read against (issue 5).

Both are computed on the rows of the run folder (``plan.json`` of ``fftmoe-coordinator simulate``): trained on the
union of all clients' local training files, tested on the held-out global test file, the same file and the same
tokenisation the federated run's centralised accuracy uses.

- **linear probe** (``reference-probe.json``): the frozen encoder's pooled embeddings (the bundle's ``encoder/``,
  the bundle's pooling: mean over real tokens for text, the first token for images), standardised, and a
  multinomial logistic regression with L2 on the weights fitted by full-batch L-BFGS. The objective is
  scikit-learn's ``LogisticRegression(C)`` after ``StandardScaler``: ``mean CE + ||W||^2 / (2 C n)``, bias not
  penalised. What a linear read-out of the frozen features achieves, with no adapter at all.
- **centralised MoE** (``reference-central.json``): the global model of the bundle (all M experts, the global
  routers, the head, from the bundle's initial ``global_pool.safetensors``) trained with PyTorch AdamW on all the
  clients' training rows in one place, with the model's own loss (cross-entropy plus the auxiliary losses, routing
  target uniform), and evaluated with ``coordinator.global_model.evaluate_global`` after every epoch, exactly as the
  federated run evaluates its global model. What the federation would reach without its data being split.

``fftmoe-coordinator reference --out RUN`` runs them; docs/references.md describes the commands and the files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

REFERENCE_FORMAT = "fftmoe-reference"
REFERENCE_VERSION = 1
REFERENCE_FILES = {"probe": "reference-probe.json", "central": "reference-central.json"}
"""Kind -> file in the run folder."""
REFERENCE_LABELS = {"probe": "linear probe (frozen encoder)", "central": "centralised MoE"}
"""Kind -> a name for tables and plot legends."""
KINDS = ("probe", "central", "both")
DEFAULT_LR = 1e-3
"""The federated runs' default learning rate (``--lr`` of ``simulate`` and ``serve``)."""
DEFAULT_BATCH_SIZE = 16
"""The federated runs' default batch size."""
EMBED_BATCH = 64
"""Rows per forward pass when embedding for the probe (no gradients, so larger than training batches)."""
PROBE_TOL = 1e-6
"""The probe's fit stops when the largest absolute gradient of its objective is at most this."""
RUN_CONFIG = Path("flower") / "fftmoe-app" / "pyproject.toml"
"""Where ``simulate`` leaves the run config it submitted (``coordinator.deploy.write_app``), relative to the run."""

EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGS, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class ReferenceError(ValueError):
    """A reference cannot be computed or read; the message names the option or the file."""


# -- the run's rows -------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What a reference is computed on: the run's plan, its bundle, and its rows (not tokenised yet)."""

    run_dir: Path
    plan: dict[str, Any]
    bundle_dir: Path
    manifest: Any
    train: Any  # edge_runtime.data.Examples: the union of all clients' training files, in client order
    test: Any  # edge_runtime.data.Examples: the global test file
    train_files: list[Path]
    test_file: Path
    run_config: dict[str, Any]

    def encode(self, max_seq_len: int) -> tuple[Any, Any]:
        """(train, test) as ``EncodedData`` with the bundle's tokenizer, truncated to ``max_seq_len`` tokens."""
        from edge_runtime.data import TextEncoder, encode_examples

        if self.manifest.model.modality != "text":
            raise ReferenceError(f"{self.bundle_dir}: the references read text rows; this bundle's model takes images")
        encoder = TextEncoder(self.bundle_dir / Path(self.manifest.tokenizer_files[0].path).parent, max_seq_len)
        return encode_examples(self.train, encoder), encode_examples(self.test, encoder)


def read_plan(run_dir: Path) -> dict[str, Any]:
    """The run folder's ``plan.json``; ReferenceError naming the file when it is missing or not a simulation plan."""
    from coordinator.simulate import PLAN_FILE, PLAN_FORMAT

    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        raise ReferenceError(f"{path}: no simulation plan; --out must be a run folder written by `fftmoe-coordinator simulate --out {run_dir}`")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReferenceError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("nodes"), list):
        raise ReferenceError(f"{path}: not a {PLAN_FORMAT} file")
    return plan


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run config the simulation submitted (``--max-seq-len``, ``--lr``, ``--batch-size``, ...), or {} when the run
    has not started or the file cannot be read. Only used for defaults, so that a reference tokenises and trains
    as the federated run did."""
    import tomllib

    try:
        doc = tomllib.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    config = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return config if isinstance(config, dict) else {}


def load_run_data(run_dir: Path, bundle: Optional[Path] = None) -> RunData:
    """Read a run folder's plan, bundle (``bundle``, default the one the plan names), client training files and the
    global test file; ReferenceError naming the file on any problem."""
    from edge_runtime.bundle import BundleError, load_manifest
    from edge_runtime.data import DataError, DataSpec, Examples, load_examples

    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    where = run_dir / "plan.json"
    bundle_dir = Path(bundle) if bundle is not None else Path(str(plan.get("bundle", "")))
    try:
        manifest = load_manifest(bundle_dir)
    except BundleError as exc:
        raise ReferenceError(f"bundle {bundle_dir} (named by {where if bundle is None else '--bundle'}): {exc}") from exc
    labels = list(plan.get("labels") or manifest.labels)
    if labels != list(manifest.labels):
        raise ReferenceError(f"{where}: labels {labels} differ from the bundle's {manifest.labels} ({bundle_dir})")
    if not plan.get("global_test") or not plan.get("global_test_rows"):
        raise ReferenceError(f"{where}: the run holds no global test set (simulated with --global-test-fraction 0); the references need one")
    if not plan["nodes"]:
        raise ReferenceError(f"{where}: the plan has no clients")
    parts, files = [], []
    try:
        for node in plan["nodes"]:
            cfg = node["node_config"]
            spec = DataSpec(tuple(c for c in str(cfg.get("text-columns", "text")).split(",") if c), str(cfg.get("label-column", "label")))
            files.append(Path(cfg["data"]))
            parts.append(load_examples(files[-1], spec, labels))
        test_file = Path(plan["global_test"])
        test = load_examples(test_file, DataSpec(), labels)
    except (KeyError, TypeError) as exc:
        raise ReferenceError(f"{where}: a client entry lacks its node config or data file ({exc!r})") from exc
    except DataError as exc:
        raise ReferenceError(f"{exc} (listed in {where})") from exc
    train = Examples([t for p in parts for t in p.texts], np.concatenate([p.labels for p in parts]), [w for p in parts for w in p.where])
    return RunData(run_dir, plan, bundle_dir, manifest, train, test, files, test_file, read_run_config(run_dir))


def _setting(given: float, run_config: dict[str, Any], key: str, fallback: float, kind: type) -> tuple[Any, str]:
    """(value, where from): the option when given (> 0), else the run's config when it sets it (> 0), else ``fallback``."""
    if given:
        return kind(given), "option"
    value = run_config.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return kind(value), "run config"
    return kind(fallback), "default"


def _check(conditions: list[tuple[bool, str]]) -> None:
    for ok, message in conditions:
        if not ok:
            raise ReferenceError(message)


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edge_runtime.console import progress_bar

    return progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=not enabled, transient=False)  # fmt: skip


def _write(run_dir: Path, kind: str, result: dict[str, Any]) -> Path:
    path = Path(run_dir) / REFERENCE_FILES[kind]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _header(kind: str, data: RunData) -> dict[str, Any]:
    from edge_runtime.update import manifest_id

    return {
        "format": REFERENCE_FORMAT, "format_version": REFERENCE_VERSION, "kind": kind, "name": REFERENCE_LABELS[kind],
        "run": str(data.run_dir.resolve()), "data_digest": data.plan.get("data_digest"), "bundle": str(data.bundle_dir.resolve()),
        "manifest_id": manifest_id(data.manifest), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_files": [str(f) for f in data.train_files], "test_file": str(data.test_file),
    }  # fmt: skip


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# -- linear probe ---------------------------------------------------------------------------------------------------


@dataclass
class LogisticRegression:
    """A fitted multinomial logistic regression on standardised features: logits = ((x - mean) / scale) W + b."""

    weight: np.ndarray  # [d, C]
    bias: np.ndarray  # [C]
    mean: np.ndarray  # [d]
    scale: np.ndarray  # [d]
    l2: float  # lambda of the objective mean CE + lambda / 2 ||W||^2 (= 1 / (C n))
    objective: float  # the objective at the fitted weights (training rows)
    grad_max: float  # max |gradient| of the objective there
    iterations: int
    converged: bool

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per feature, as scikit-learn's StandardScaler: the population std, 1 where a feature is constant."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return mean, scale


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, c: float = 1.0, max_iter: int = 1000,
                            tol: float = PROBE_TOL) -> LogisticRegression:  # fmt: skip
    """Multinomial logistic regression, L2 on the weights, on standardised features, fitted by full-batch L-BFGS
    (PyTorch's, strong-Wolfe line search, float64) until max |gradient| <= ``tol`` or ``max_iter`` iterations.

    The objective is scikit-learn's ``LogisticRegression(C=c)`` (lbfgs, multinomial) divided by n:
    ``mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 c n)``; the bias is not penalised.
    """
    import torch

    x = np.asarray(x, np.float64)
    n, d = x.shape
    _check([(n > 0, "no training rows"), (c > 0 and math.isfinite(c), f"--probe-c must be a positive number, got {c}"),
            (num_classes >= 2, f"need at least two classes, got {num_classes}")])  # fmt: skip
    mean, scale = standardise(x)
    xs = torch.from_numpy((x - mean) / scale)
    ys = torch.from_numpy(np.asarray(y, np.int64))
    l2 = 1.0 / (c * n)
    w = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def objective() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(xs @ w + b, ys) + 0.5 * l2 * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    loss = closure().detach()
    grad_max = float(max(w.grad.abs().max(), b.grad.abs().max()))
    iterations = int(opt.state[w].get("n_iter", 0))  # LBFGS keeps its state on the first parameter
    return LogisticRegression(w.detach().numpy().copy(), b.detach().numpy().copy(), mean, scale, l2, float(loss), grad_max,
                              iterations, grad_max <= tol)  # fmt: skip


def frozen_encoder(bundle_dir: Path, manifest: Any) -> tuple[Any, str]:
    """(encoder, pooling): the bundle's frozen encoder without adapters, its ``encoder/`` folder loaded and checked
    (files against the manifest's sha256, weights against ``model.sha256``) as ``edge_runtime.backends.model_from_bundle``
    loads it, and the bundle's pooling (``mean`` over real tokens, or ``cls``: the first token)."""
    from edge_runtime.bundle import BundleError, verify_files
    from exporter.model import load_encoder, weights_sha256

    if not manifest.encoder_files:
        raise ReferenceError(f"{bundle_dir}: the bundle has no encoder/ folder, which the references need; re-export it with this fftmoe")
    verify_files(bundle_dir, list(manifest.encoder_files))
    encoder_dir = Path(bundle_dir) / Path(manifest.encoder_files[0].path).parts[0]
    encoder, _, _, _ = load_encoder(str(encoder_dir))
    if weights_sha256(encoder) != manifest.model.sha256:
        raise BundleError(f"{encoder_dir}: the encoder's weights differ from the manifest's model.sha256")
    return encoder.eval(), manifest.pooling


def pooled_embeddings(encoder: Any, pooling: str, data: Any, batch_size: int = EMBED_BATCH, on_batch: Any = None) -> np.ndarray:
    """[N, d] pooled last hidden states of ``data`` (``EncodedData``) in row order, float64, pooled as the bundle's
    model pools (``AdaptedEncoder.logits``). ``on_batch(rows)`` is called after each batch."""
    import torch

    out = []
    with torch.no_grad():
        for ids, mask, _ in data.batches(batch_size):
            hidden = encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state  # [B, S, d]
            if pooling.startswith("mean"):
                m = torch.from_numpy(mask).to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            else:
                pooled = hidden[:, 0]
            if pooling.endswith("-l2"):
                pooled = pooled / torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True) + 1e-12)
            out.append(pooled.numpy().astype(np.float64))
            if on_batch is not None:
                on_batch(len(ids))
    return np.concatenate(out)


def linear_probe(run_dir: Path, *, max_seq_len: int = 0, c: float = 1.0, max_iter: int = 1000, bundle: Optional[Path] = None,
                 threads: int = 0, progress: bool = True, write: bool = True) -> dict[str, Any]:  # fmt: skip
    """Fit the linear probe on the union of the run's client training files, test it on the global test file, and
    write ``reference-probe.json`` into the run folder (unless ``write`` is False); returns what it writes.

    ``max_seq_len`` 0 takes the run's ``--max-seq-len`` (from its run config), else the bundle's.
    """
    _check([(max_seq_len >= 0, f"--max-seq-len must be >= 0, got {max_seq_len}"), (c > 0 and math.isfinite(c), f"--probe-c must be a positive number, got {c}"),
            (max_iter >= 1, f"max_iter must be >= 1, got {max_iter}"), (threads >= 0, f"--threads must be >= 0, got {threads}")])  # fmt: skip
    start = time.monotonic()
    data = load_run_data(run_dir, bundle)
    seq_len, seq_from = _setting(max_seq_len, data.run_config, "max-seq-len", data.manifest.max_seq_len, int)
    _set_threads(threads)
    train, test = data.encode(seq_len)
    loaded = time.monotonic()
    with _progress(progress) as bar:
        task = bar.add_task("probe: embedding (frozen encoder)", total=len(train) + len(test))
        encoder, pooling = frozen_encoder(data.bundle_dir, data.manifest)
        x_train, x_test = (pooled_embeddings(encoder, pooling, d, on_batch=lambda n: bar.advance(task, n)) for d in (train, test))
    embedded = time.monotonic()
    num_classes = len(data.manifest.labels)
    model = fit_logistic_regression(x_train, train.labels, num_classes, c, max_iter)
    fitted = time.monotonic()
    accuracy, loss = _scores(model.logits(x_test), test.labels)
    train_accuracy, _ = _scores(model.logits(x_train), train.labels)
    result = {
        **_header("probe", data), "accuracy": accuracy, "loss": loss, "train_accuracy": train_accuracy,
        "rows_trained": len(train), "rows_tested": len(test), "seconds": round(fitted - start, 3),
        "seconds_by_phase": {"load": round(loaded - start, 3), "embed": round(embedded - loaded, 3), "fit": round(fitted - embedded, 3)},
        "settings": {"max_seq_len": seq_len, "max_seq_len_from": seq_from, "pooling": pooling, "features": int(x_train.shape[1]),
                     "standardised": True, "c": c, "l2": model.l2, "solver": "L-BFGS (torch.optim.LBFGS, strong Wolfe, float64, full batch)",
                     "max_iter": max_iter, "tol_grad": PROBE_TOL, "threads": threads or None},
        "fit": {"objective": model.objective, "grad_max": model.grad_max, "iterations": model.iterations, "converged": model.converged},
    }  # fmt: skip
    if write:
        result["file"] = str(_write(data.run_dir, "probe", result))
    return result


def _scores(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of logits [N, C] against labels [N]."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float((logits.argmax(axis=1) == labels).mean()), float(-log_p[np.arange(len(labels)), labels].mean())


# -- centralised MoE ------------------------------------------------------------------------------------------------


def centralised_moe(run_dir: Path, *, epochs: int = 3, max_steps: int = 0, lr: float = 0.0, batch_size: int = 0, max_seq_len: int = 0,
                    seed: int = 0, bundle: Optional[Path] = None, threads: int = 0, progress: bool = True,
                    write: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train the bundle's global model (all M experts, global routers, head; initial pool) on the union of the run's
    client training files with PyTorch AdamW and the model's own loss (routing target uniform over the M experts),
    evaluate it on the global test file before training and after every epoch (``evaluate_global``), and write
    ``reference-central.json`` (unless ``write`` is False); returns what it writes.

    ``lr``, ``batch_size`` and ``max_seq_len`` 0 take the run's (its run config), else 1e-3, 16 and the bundle's.
    ``max_steps`` > 0 stops after that many optimizer steps in all (the model is evaluated where it stops).
    AdamW has the federated clients' betas (0.9, 0.999), epsilon 1e-6 and no weight decay (``OrtAdamW``'s); PyTorch
    adds epsilon after the bias correction, ONNX Runtime before it. Batches are shuffled per epoch (seed + epoch).
    """
    _check([(epochs >= 1, f"--epochs must be >= 1, got {epochs}"), (max_steps >= 0, f"--max-steps must be >= 0, got {max_steps}"),
            (lr >= 0 and math.isfinite(lr), f"--lr must be >= 0 (0: the run's), got {lr}"), (batch_size >= 0, f"--batch-size must be >= 0, got {batch_size}"),
            (max_seq_len >= 0, f"--max-seq-len must be >= 0, got {max_seq_len}"), (threads >= 0, f"--threads must be >= 0, got {threads}")])  # fmt: skip
    import torch
    from safetensors.numpy import load_file

    from coordinator.global_model import build_global_model, evaluate_global
    from edge_runtime.backends import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY
    from edge_runtime.bundle import verify_files

    start = time.monotonic()
    data = load_run_data(run_dir, bundle)
    cfg, manifest = data.run_config, data.manifest
    seq_len, seq_from = _setting(max_seq_len, cfg, "max-seq-len", manifest.max_seq_len, int)
    lr, lr_from = _setting(lr, cfg, "lr", DEFAULT_LR, float)
    batch_size, batch_from = _setting(batch_size, cfg, "batch-size", DEFAULT_BATCH_SIZE, int)
    _set_threads(threads)
    train, test = data.encode(seq_len)
    verify_files(data.bundle_dir, [manifest.global_pool])
    model = build_global_model(data.bundle_dir, manifest, load_file(str(data.bundle_dir / manifest.global_pool.path)))
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
    width = int(getattr(model, "route_width", manifest.num_experts))  # M for the MoE global model
    target = torch.full((model.num_layers, width), 1.0 / width)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch
    loaded = time.monotonic()
    history = [{"epoch": 0, "steps": 0, **_evaluated(evaluate_global(model, test))}]
    eval_seconds, step = time.monotonic() - loaded, 0
    with _progress(progress) as bar:
        task = bar.add_task("central MoE: training", total=total)
        for epoch in range(1, epochs + 1):
            model.train()
            sums = {"loss": 0.0, "ce": 0.0, "correct": 0.0, "rows": 0}
            for ids, mask, labels in train.batches(batch_size, shuffle=True, seed=seed + epoch):
                y = torch.from_numpy(labels)
                loss, logits, ce, *_ = model(torch.from_numpy(ids), torch.from_numpy(mask), y, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                n = len(labels)
                sums["loss"] += float(loss.detach()) * n
                sums["ce"] += float(ce.detach()) * n
                sums["correct"] += float((logits.argmax(dim=1) == y).sum())
                sums["rows"] += n
                bar.update(task, advance=1, description=f"central MoE: epoch {epoch}/{epochs}, loss {sums['loss'] / sums['rows']:.4f}")
                if step >= total:
                    break
            mark = time.monotonic()
            evaluated = _evaluated(evaluate_global(model.eval(), test))
            eval_seconds += time.monotonic() - mark
            rows = max(1, sums["rows"])
            history.append({"epoch": epoch, "steps": step, **evaluated, "train_loss": sums["loss"] / rows, "train_ce": sums["ce"] / rows,
                            "train_accuracy": sums["correct"] / rows, "train_rows": sums["rows"]})  # fmt: skip
            if step >= total:
                break
    done = time.monotonic()
    final = history[-1]
    result = {
        **_header("central", data), "accuracy": final["accuracy"], "loss": final["loss"], "initial_accuracy": history[0]["accuracy"],
        "initial_loss": history[0]["loss"], "best_accuracy": max(h["accuracy"] for h in history[1:]),
        "rows_trained": len(train), "rows_tested": len(test), "steps": step, "epochs_done": final["epoch"], "seconds": round(done - start, 3),
        "seconds_by_phase": {"load": round(loaded - start, 3), "train": round(done - loaded - eval_seconds, 3), "evaluate": round(eval_seconds, 3)},
        "settings": {"epochs": epochs, "max_steps": max_steps, "lr": lr, "lr_from": lr_from, "batch_size": batch_size, "batch_size_from": batch_from,
                     "max_seq_len": seq_len, "max_seq_len_from": seq_from, "seed": seed, "optimizer": "torch.optim.AdamW",
                     "betas": list(ADAMW_BETAS), "eps": ADAMW_EPS, "weight_decay": ADAMW_WEIGHT_DECAY, "experts": manifest.num_experts,
                     "routing_target": "uniform", "aux_alpha": manifest.aux_alpha, "aux_beta": manifest.aux_beta,
                     "trainable_params": int(sum(p.numel() for p in params)), "threads": threads or None},
        "per_epoch": history,
    }  # fmt: skip
    if write:
        result["file"] = str(_write(data.run_dir, "central", result))
    return result


def _evaluated(figures: dict[str, float]) -> dict[str, float]:
    return {"accuracy": float(figures["accuracy"]), "loss": float(figures["loss"])}


# -- reading them back ----------------------------------------------------------------------------------------------


def load_references(run_dir: Path) -> dict[str, float]:
    """Kind (``probe``, ``central``) -> test accuracy, for the references written into a run folder; a kind not
    computed yet is absent. ReferenceError naming the file when one is damaged or was computed on other data (the
    plan's ``data_digest`` changed since)."""
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    digest = read_plan(run_dir).get("data_digest") if plan_path.is_file() else None
    out: dict[str, float] = {}
    for kind, name in REFERENCE_FILES.items():
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            ref = json.loads(path.read_text(encoding="utf-8"))
            if ref.get("format") != REFERENCE_FORMAT or ref.get("kind") != kind:
                raise ReferenceError(f"{path}: not a {REFERENCE_FORMAT} file of kind {kind}")
            accuracy = float(ref["accuracy"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ReferenceError):
                raise
            raise ReferenceError(f"{path}: damaged reference file ({exc!r})") from exc
        if digest is not None and ref.get("data_digest") != digest:
            raise ReferenceError(f"{path}: computed on other data than {plan_path} holds now; run `fftmoe-coordinator reference --out {run_dir}` again")
        out[kind] = accuracy
    return out


# -- the command ----------------------------------------------------------------------------------------------------

EPILOG = "Exit codes: 0 written; 1 a reference failed; 2 invalid arguments or run folder (plan or data files); 3 invalid bundle; 130 interrupted."


def reference_command(
    out: Path = typer.Option(..., help="Run folder written by `fftmoe-coordinator simulate --out` (holds plan.json and data/); the references are written into it."),
    kind: str = typer.Option("both", help="Which reference: probe (linear probe on the frozen encoder), central (centralised MoE), or both."),
    epochs: int = typer.Option(3, help="central: passes over the union of the clients' training rows (evaluated after each)."),
    max_steps: int = typer.Option(0, help="central: stop after this many optimizer steps in all (0: no limit)."),
    lr: float = typer.Option(0.0, help="central: AdamW learning rate (0: the run's --lr, else 1e-3)."),
    batch_size: int = typer.Option(0, help="central: batch size (0: the run's --batch-size, else 16)."),
    max_seq_len: int = typer.Option(0, help="Token limit per row (0: the run's --max-seq-len, else the bundle's)."),
    probe_c: float = typer.Option(1.0, help="probe: inverse L2 strength C, as scikit-learn's LogisticRegression (objective mean CE + |W|^2 / (2 C n))."),
    seed: int = typer.Option(0, help="central: seed of the batch order (epoch e shuffles with seed + e)."),
    bundle: Optional[Path] = typer.Option(None, help="The run's bundle (default: the one its plan.json names)."),
    threads: int = typer.Option(0, help="PyTorch threads (0: PyTorch's default, one per core)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON (no progress bars)."),
) -> None:
    """Compute the two centralised references of a simulation run on the same rows as its federated figures.

    probe: a logistic regression on the frozen encoder's pooled embeddings. central: the bundle's global MoE model
    trained with AdamW on all clients' training rows in one place. Both are trained on the union of the clients'
    training files and tested on the run's global test file; written to OUT/reference-probe.json and
    OUT/reference-central.json (see docs/references.md).
    """
    from edge_runtime.bundle import BundleError
    from edge_runtime.cli import _err, _fail

    if kind not in KINDS:
        _fail(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}", EXIT_BAD_ARGS, json_out)
    results = []
    try:
        if kind in ("probe", "both"):
            results.append(linear_probe(out, max_seq_len=max_seq_len, c=probe_c, bundle=bundle, threads=threads, progress=not json_out))
        if kind in ("central", "both"):
            results.append(centralised_moe(out, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, max_seq_len=max_seq_len,
                                           seed=seed, bundle=bundle, threads=threads, progress=not json_out))  # fmt: skip
    except KeyboardInterrupt:
        _fail("interrupted; the reference being computed was not written", EXIT_INTERRUPTED, json_out, "interrupted")
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "bundle")
    except ReferenceError as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out, "reference")
    except (RuntimeError, OSError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED, json_out, "failed")
    if json_out:
        print(json.dumps({"ok": True, "references": results}))
        return
    _print_references(results)
    _err().print(f"written: {', '.join(r['file'] for r in results)}", highlight=False)


def _print_references(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("reference", "accuracy", "loss", "rows trained", "rows tested", "seconds"):
        table.add_column(col, justify="left" if col == "reference" else "right")
    notes = []
    for r in results:
        s = r["settings"]
        table.add_row(r["name"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", str(r["rows_trained"]), str(r["rows_tested"]), f"{r['seconds']:.1f}")
        if r["kind"] == "probe":
            fit = r["fit"]
            notes.append(f"{r['name']}: C={s['c']:g}, {s['features']} features, L-BFGS {fit['iterations']} iterations"
                         f"{'' if fit['converged'] else ' (not converged: max |grad| ' + format(fit['grad_max'], '.1e') + ')'}, "
                         f"train accuracy {r['train_accuracy']:.4f}, max_seq_len {s['max_seq_len']}")  # fmt: skip
        else:
            notes.append(f"{r['name']}: {r['epochs_done']} epoch(s), {r['steps']} steps, lr {s['lr']:g}, batch {s['batch_size']}, "
                         f"max_seq_len {s['max_seq_len']}; initial accuracy {r['initial_accuracy']:.4f}, best {r['best_accuracy']:.4f}")  # fmt: skip
    console = Console()
    console.print(table)
    for line in notes:
        console.print(line, highlight=False)
