"""Standalone local fine-tuning on a device (no server): resumable state, an update file and an inference model.

The run folder (``--out``) holds:

- ``state.json``: position (epoch, batch, step), settings, the per-epoch history, and the name and SHA-256 of the
  checkpoint folder it belongs to; ``ckpt-<step>-<tag>/``: ``weights.safetensors`` (the tier's trainable tensors)
  and the optimizer's state (AdamW's moments and step; ``optimizer.ckpt`` or ``optimizer.safetensors`` by backend).
  A save writes a new checkpoint folder completely, then replaces ``state.json`` (the one atomic commit), then
  deletes older folders: a crash at any point leaves a complete, consistent pair, so ``--resume`` continues exactly
  where training stopped (same batches, same AdamW moments) and nothing saved before is lost. Saves happen after
  every epoch, every ``save_every`` steps and on Ctrl-C;
- when training finishes: ``update.safetensors`` (the sparse update, ``docs/update-format.md``), ``model/``
  (ONNX inference model + config + tokenizer, loadable with optimum) and ``history.png`` (loss and accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_runtime.backends import TierBackend
from edge_runtime.bundle import Manifest
from edge_runtime.checkpoints import commit_checkpoint, read_pointer
from edge_runtime.data import EncodedData
from edge_runtime.faults import reach
from edge_runtime.session import RoutingStats, StepResult, TierSession, TrainConfig, TrainResult
from edge_runtime.update import manifest_id

STATE_FORMAT = "fftmoe-train-state"
STATE_VERSION = 2
STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
CHECKPOINT_PREFIX = "ckpt-"


class StateError(RuntimeError):
    """The run folder's state cannot be resumed (other bundle, tier or settings, or damaged files)."""


@dataclass
class RunState:
    manifest_id: str
    tier: int
    assignment: list[list[int]]
    config: dict[str, Any]
    epoch: int = 0  # epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch done
    step: int = 0  # optimizer steps in total
    examples: int = 0
    history: list[dict[str, float]] = None  # type: ignore[assignment]
    finished: bool = False
    route_counts: list[list[float]] = None  # type: ignore[assignment]
    route_prob_sum: list[list[float]] = None  # type: ignore[assignment]
    step_losses: list[float] = None  # type: ignore[assignment]  # training loss of every step, for the plot
    checkpoint: str = ""  # folder (in the run folder) holding the weights and optimizer state of this position
    checkpoint_files: dict[str, str] = None  # type: ignore[assignment]  # file name -> SHA-256

    def __post_init__(self) -> None:
        self.history = self.history or []
        self.step_losses = self.step_losses or []

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, **asdict(self)}


def save_state(out: Path, state: RunState, values: dict[str, np.ndarray], backend: TierBackend | None = None) -> None:
    """Write a new checkpoint folder (weights, optimizer state), commit it by replacing state.json, drop older ones."""
    from safetensors.numpy import save_file

    def write(folder: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in values.items()}, str(folder / WEIGHTS_FILE), metadata={"step": str(state.step)})
        if backend is not None:
            backend.save_optimizer(folder / backend.optimizer_file)

    def pointer_text(name: str, files: dict[str, str]) -> str:
        state.checkpoint, state.checkpoint_files = name, files
        return json.dumps(state.to_dict(), indent=2) + "\n"

    commit_checkpoint(out, CHECKPOINT_PREFIX, f"{state.step:08d}", write, out / STATE_FILE, pointer_text)


def read_run(out: Path) -> tuple[RunState, dict[str, np.ndarray], Path]:
    """The committed state of a run folder, its weights (hash-checked) and its checkpoint folder."""
    from safetensors.numpy import load_file

    raw, folder = read_pointer(out / STATE_FILE, STATE_FORMAT, STATE_VERSION, StateError,
                               "no saved state to resume from (start without --resume)", files_key="checkpoint_files")  # fmt: skip
    try:
        raw.pop("format"), raw.pop("format_version")
        state = RunState(**raw)
        values = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, TypeError) as exc:
        raise StateError(f"{out}: saved state is damaged ({exc})") from exc
    return state, values, folder


def load_state(out: Path, manifest: Manifest, tier: int, config: TrainConfig) -> tuple[RunState, dict[str, np.ndarray], Path]:
    """``read_run``, refused when the bundle, tier or the settings that fix the batches differ."""
    state, values, folder = read_run(out)
    if state.manifest_id != manifest_id(manifest):
        raise StateError(f"{out} was trained from another bundle ({state.manifest_id}, this one is {manifest_id(manifest)})")
    if state.tier != tier:
        raise StateError(f"{out} trained tier {state.tier}; resume it with --tier {state.tier}")
    for key in ("batch_size", "seed", "max_seq_len"):
        if state.config.get(key) != getattr(config, key):
            raise StateError(f"{out} was trained with --{key.replace('_', '-')} {state.config.get(key)}; resume with the same value")
    return state, values, folder


def plot_history(history: list[dict[str, float]], path: Path, step_losses: list[float] | None = None) -> bool:
    """Training loss per step (with a moving average) and held-out loss and accuracy after each epoch, as a PNG;
    False when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps_at = [h["steps"] for h in history]
    if step_losses:
        x = np.arange(1, len(step_losses) + 1)
        ax1.plot(x, step_losses, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (step)")
        window = max(1, len(step_losses) // 20)
        if window > 1:
            smooth = np.convolve(step_losses, np.ones(window) / window, mode="valid")
            ax1.plot(x[window - 1 :], smooth, color="tab:blue", lw=1.8, label=f"train loss ({window}-step mean)")
    if all("eval_loss" in h for h in history):
        ax1.plot(steps_at, [h["eval_loss"] for h in history], "s", color="tab:orange", ms=7, label="held-out loss")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.legend(fontsize=8)
    if all("eval_accuracy" in h for h in history):
        ax2.plot([h["epoch"] for h in history], [h["eval_accuracy"] for h in history], "s-", color="tab:green")
        for h in history:
            ax2.annotate(f"{h['eval_accuracy']:.3f}", (h["epoch"], h["eval_accuracy"]), textcoords="offset points",
                         xytext=(0, 8), ha="center", fontsize=8)  # fmt: skip
    ax2.set_xlabel("epoch"), ax2.set_ylabel("held-out accuracy"), ax2.set_ylim(0, 1)
    ax2.set_xticks([h["epoch"] for h in history])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_inference_model(session: TierSession, bundle_dir: Path, out_dir: Path, extra: dict[str, str] | None = None) -> Path:
    """The trained tier as an ONNX inference model (logits), with the bundle's config and tokenizer beside it and
    ``extra`` text files (name -> content); the folder appears whole or not at all (written aside, then renamed)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    session.backend.export_inference(tmp / "model.onnx")
    manifest = session.manifest
    for entry in [*manifest.inference_files, *manifest.tokenizer_files]:
        src = bundle_dir / entry.path
        if not (tmp / src.name).exists():
            shutil.copy2(src, tmp / src.name)
    config_path = tmp / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["fftmoe"] = {**config.get("fftmoe", {}), "tier": session.slots, "assignment": session.assignment}
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def train_local(
    session: TierSession,
    bundle_dir: Path,
    out: Path,
    train_data: EncodedData,
    eval_data: EncodedData | None,
    config: TrainConfig,
    resume: bool = False,
    save_every: int = 200,
    on_step: Callable[[StepResult], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_eval_batch: Callable[[int, int], None] | None = None,
) -> RunState:
    """Train ``session`` (already loaded) on ``train_data`` epoch by epoch, saving state; see the module docstring."""
    manifest = session.manifest
    if resume:
        state, values, folder = load_state(out, manifest, session.slots, config)
        session.assignment = state.assignment
        optimizer_state = folder / session.backend.optimizer_file
        if optimizer_state.is_file():
            session.backend.load_optimizer(optimizer_state)
        session.set_values(values)
        state.config = asdict(config)
        if state.finished and state.epoch >= config.epochs:
            return state
        state.finished = False
    else:
        state = RunState(manifest_id(manifest), session.slots, session.assignment, asdict(config))
    stats = RoutingStats.zeros(manifest.num_layers, session.width)
    if state.route_counts is not None:
        stats.route_counts += np.array(state.route_counts)
        stats.route_prob_sum += np.array(state.route_prob_sum)
    per_epoch = (len(train_data) + config.batch_size - 1) // config.batch_size

    def checkpoint() -> None:
        state.route_counts = stats.route_counts.tolist()
        state.route_prob_sum = stats.route_prob_sum.tolist()
        save_state(out, state, session.values(), session.backend if config.save_optimizer else None)

    def step_hook(r: StepResult) -> None:
        state.epoch, state.batch_in_epoch, state.step = r.epoch, r.batch_in_epoch, r.step
        state.step_losses.append(r.loss)
        if on_step:
            on_step(r)
        if save_every and r.step % save_every == 0:
            checkpoint()
        reach("local.step")

    while state.epoch < config.epochs:
        if state.batch_in_epoch >= per_epoch:  # the saved position is the end of an epoch
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        epoch = state.epoch
        examples_before = state.examples
        result = _train_one_epoch(session, train_data, config, epoch, state, step_hook, should_stop)
        stats.route_counts += result.stats.route_counts
        stats.route_prob_sum += result.stats.route_prob_sum
        state.examples = examples_before + result.examples
        if result.interrupted:
            checkpoint()
            return state
        entry: dict[str, float] = {"epoch": epoch + 1, "train_loss": result.mean_loss, "steps": state.step, "seconds": result.seconds}
        if eval_data is not None and len(eval_data):
            metrics = session.evaluate(eval_data, config.eval_batch_size or config.batch_size, on_eval_batch)
            entry.update(eval_accuracy=metrics["accuracy"], eval_loss=metrics["loss"])
        state.history.append(entry)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        checkpoint()
        if on_epoch:
            on_epoch(entry)
        if config.max_steps is not None and state.step >= config.max_steps:
            break
    state.finished = True
    checkpoint()
    last = state.history[-1] if state.history else {}
    update = session.update(max(state.examples, 1), stats, {k: float(v) for k, v in last.items()})
    update.save(out / "update.safetensors")
    write_inference_model(session, bundle_dir, out / "model")
    if state.history:
        plot_history(state.history, out / "history.png", state.step_losses)
    return state


def _train_one_epoch(
    session: TierSession, data: EncodedData, config: TrainConfig, epoch: int, state: RunState,
    step_hook: Callable[[StepResult], None], should_stop: Callable[[], bool],
) -> TrainResult:
    """One epoch (or its rest, when resuming) of ``TierSession.train``."""
    return session.train(data, dataclasses.replace(config, epochs=epoch + 1), start_epoch=epoch, start_batch=state.batch_in_epoch, start_step=state.step,
                         on_step=step_hook, should_stop=should_stop)  # fmt: skip
