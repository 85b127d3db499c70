"""A training session on one tier: setup (verify, open the backend, load the assigned experts), train, evaluate,
produce the sparse update, close. The same lifecycle serves standalone training and federated rounds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.backends import TierBackend, open_backend
from edge_runtime.bundle import Manifest, backend_files, verify_files
from edge_runtime.data import EncodedData
from edge_runtime.head_stats import HeadStatistics
from edge_runtime.update import Update, UpdateError, check_assignment, tier_values_from_global, tier_values_from_pool

from edge_runtime.bundle import OUTPUTS

OUT = {name: i for i, name in enumerate(OUTPUTS)}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); what was saved before stays."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of local training; every field is a flag of ``fftmoe-edge train``."""

    epochs: int = 1
    """Passes over the local training data (--epochs)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total, even inside an epoch (--max-steps)."""
    batch_size: int = 16
    """Examples per step (--batch-size); the tier choice may lower it to fit the memory budget."""
    learning_rate: float = 1e-3
    """AdamW learning rate of the experts, routers and head (--lr)."""
    seed: int = 0
    """Seed of the data order (--seed); the same seed gives the same batches, also after --resume."""
    max_seq_len: int | None = None
    """Rows are truncated to this many tokens (--max-seq-len; None: the bundle's maximum); part of the batches."""
    save_optimizer: bool = True
    """Save AdamW's state with every checkpoint, so that --resume continues exactly (--optimizer-state). With ONNX
    Runtime this writes the whole model and briefly needs about twice its size; the CLI turns it off by default
    where the memory budget has no room for that."""
    eval_batch_size: int | None = None
    """Examples per evaluation batch; None: the training batch size, which the tier choice made fit in memory."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--lr must be a positive number, got {self.learning_rate}")


@dataclass
class RoutingStats:
    """Per-slot routing statistics summed over the real tokens of the training batches."""

    route_counts: np.ndarray  # [L, t] top-k assignments
    route_prob_sum: np.ndarray  # [L, t] summed router probabilities

    @classmethod
    def zeros(cls, num_layers: int, slots: int) -> RoutingStats:
        return cls(np.zeros((num_layers, slots), np.float64), np.zeros((num_layers, slots), np.float64))

    def add(self, outputs: list[np.ndarray]) -> None:
        self.route_counts += outputs[OUT["route_counts"]]
        self.route_prob_sum += outputs[OUT["route_prob_sum"]]


@dataclass
class StepResult:
    epoch: int
    step: int  # optimizer steps so far, in total
    batch_in_epoch: int  # batches of this epoch done
    batches_per_epoch: int
    loss: float
    ce_loss: float
    examples: int


@dataclass
class TrainResult:
    steps: int
    examples: int
    mean_loss: float
    stats: RoutingStats
    interrupted: bool = False  # should_stop() asked to stop (Ctrl-C); max_steps reached is not an interruption
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


class TierSession:
    """One tier of a bundle, opened on a backend, with global experts assigned to its slots."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        slots: int,
        backend: str = "ort",
        threads: int | None = None,
        verify: bool = True,
        with_pool: bool = True,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.slots = slots
        self.tier = manifest.tier(slots)
        if verify:  # a changed or truncated artifact must never be trained on
            # a federated device gets its starting values in each instruction and holds no global pool
            entries = [*backend_files(manifest, slots, backend), *([manifest.global_pool] if with_pool else []), *manifest.tokenizer_files]
            verify_files(self.bundle_dir, entries)
        self.backend: TierBackend = open_backend(backend, self.bundle_dir, manifest, slots, threads)
        self.width = manifest.route_width(slots)  # routing target and statistics: [L, width]
        self.assignment = [list(range(self.width)) for _ in range(manifest.num_layers)]
        self.routing_target = np.full((manifest.num_layers, self.width), 1.0 / self.width, np.float32)
        self.logit_adjustment = np.zeros(len(manifest.labels), np.float32)
        """Added to the logits in the training loss only (``set_label_prior``); zeros: the plain cross-entropy."""

    # -- setup -------------------------------------------------------------------------------------------------

    def load(self, pool: dict[str, np.ndarray], assignment: list[list[int]], routing_target: np.ndarray | None = None) -> None:
        """Fill the slots with the assigned global experts, router rows and head (by name)."""
        self.assignment = check_assignment(self.manifest, self.slots, assignment)
        self.set_values(tier_values_from_pool(self.manifest, self.slots, pool, self.assignment))
        self._set_target(routing_target)

    def load_global(self, values: dict[str, np.ndarray], assignment: list[list[int]], routing_target: np.ndarray | None = None) -> None:
        """Fill the slots from values under global names (a federated round's instruction: assigned experts,
        router rows, head), checking that every tensor is there with the tier's shape and finite."""
        self.assignment = check_assignment(self.manifest, self.slots, assignment)
        tier_values = tier_values_from_global(self.manifest, self.slots, self.assignment, values)
        for name, value in tier_values.items():
            want = tuple(self.backend.get(name).shape)
            if tuple(np.shape(value)) != want or not np.isfinite(value).all():
                raise UpdateError(f"starting value {name!r}: shape {list(np.shape(value))}, expected {list(want)}, and must be finite")
        self.set_values({k: np.ascontiguousarray(v, np.float32) for k, v in tier_values.items()})
        self._set_target(routing_target)

    def _set_target(self, routing_target: np.ndarray | None) -> None:
        if routing_target is not None:
            q = np.asarray(routing_target, np.float32)
            if q.shape != (self.manifest.num_layers, self.width) or not np.isfinite(q).all() or (q <= 0).any():
                raise ValueError(f"routing target must be positive, finite, shape [{self.manifest.num_layers}, {self.width}]")
            self.routing_target = q / q.sum(axis=1, keepdims=True)

    def set_values(self, values: dict[str, np.ndarray]) -> None:
        names = set(self.tier.trainable_names)
        if set(values) != names:
            raise ValueError(f"values do not match tier {self.slots}'s tensors: {sorted(set(values) ^ names)[:5]}")
        for name, value in values.items():
            self.backend.set(name, value)

    def values(self) -> dict[str, np.ndarray]:
        """The current values of the tier's trainable tensors, by name."""
        return {name: self.backend.get(name) for name in self.tier.trainable_names}

    # -- train / evaluate --------------------------------------------------------------------------------------

    def set_label_prior(self, labels: np.ndarray, tau: float) -> np.ndarray:
        """Train with the logit-adjusted loss CE(z + tau log pi, y) (Menon et al.), ``pi`` this device's label
        prior from its training ``labels`` with add-one smoothing; tau 0: the plain loss. Returns the adjustment."""
        c = len(self.manifest.labels)
        counts = np.bincount(np.asarray(labels, np.int64), minlength=c)[:c].astype(np.float64)
        prior = (counts + 1.0) / (counts.sum() + c)
        self.logit_adjustment = (tau * np.log(prior)).astype(np.float32) if tau else np.zeros(c, np.float32)
        return self.logit_adjustment

    def inputs(self, batch: tuple[np.ndarray, ...], training: bool = False) -> list[np.ndarray]:
        """The graph's inputs for a batch; the logit adjustment only when ``training`` (evaluation reads plain logits
        and the plain cross-entropy)."""
        adjust = self.logit_adjustment if training else np.zeros_like(self.logit_adjustment)
        return [*batch, self.routing_target, adjust]

    def train(
        self,
        data: EncodedData,
        config: TrainConfig,
        start_epoch: int = 0,
        start_batch: int = 0,
        start_step: int = 0,
        on_step: Callable[[StepResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        frozen: tuple[str, ...] = (),
    ) -> TrainResult:
        """Train for ``config.epochs`` epochs (or ``max_steps``), from a position (for resuming). ``frozen``: tensors
        (tier names, e.g. the head's) put back to their starting values after every step: the artifacts train every
        tensor, so this is how a frozen head stays fixed while the experts learn against it."""
        self.backend.set_learning_rate(config.learning_rate)
        kept = {name: self.backend.get(name) for name in frozen}
        stats = RoutingStats.zeros(self.manifest.num_layers, self.width)
        per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
        step, examples, losses, stopped, interrupted = start_step, 0, [], False, False
        start = time.perf_counter()
        for epoch in range(start_epoch, config.epochs):
            first = start_batch if epoch == start_epoch else 0
            for b, batch in enumerate(data.batches(config.batch_size, True, config.seed + epoch, first), first):
                if config.max_steps is not None and step >= config.max_steps:
                    stopped = True
                    break
                if should_stop and should_stop():
                    stopped = interrupted = True
                    break
                outputs = self.backend.train_step(self.inputs(batch, training=True))
                for name, value in kept.items():
                    self.backend.set(name, value)
                loss = float(outputs[OUT["loss"]])
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; lower --lr (now {config.learning_rate})"
                    )
                stats.add(outputs)
                step += 1
                examples += len(batch[-1])
                losses.append(loss)
                if on_step:
                    on_step(StepResult(epoch, step, b + 1, per_epoch, loss, float(outputs[OUT["ce_loss"]]), examples))
            if stopped:
                break
        return TrainResult(step - start_step, examples, float(np.mean(losses)) if losses else float("nan"), stats,
                           interrupted, time.perf_counter() - start, losses)  # fmt: skip

    def evaluate(self, data: EncodedData, batch_size: int = 64, on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Accuracy and mean cross-entropy on ``data`` with the eval model (no update)."""
        correct, ce_sum, n = 0, 0.0, 0
        total = (len(data) + batch_size - 1) // batch_size
        for b, batch in enumerate(data.batches(batch_size)):
            outputs = self.backend.evaluate(self.inputs(batch))
            labels = batch[-1]
            correct += int((outputs[OUT["logits"]].argmax(axis=1) == labels).sum())
            ce_sum += float(outputs[OUT["ce_loss"]]) * len(labels)
            n += len(labels)
            if on_batch:
                on_batch(b + 1, total)
        return {"accuracy": correct / n, "loss": ce_sum / n, "examples": float(n)}

    def head_statistics(self, data: EncodedData, batch_size: int = 64) -> HeadStatistics:
        """The closed-form head's sums over ``data`` (``edge_runtime/head_stats.py``) from the eval model's
        ``features``, with the values loaded now (no update)."""
        stats = HeadStatistics.zeros(self.manifest.hidden_size, len(self.manifest.labels))
        for batch in data.batches(batch_size):
            outputs = self.backend.evaluate(self.inputs(batch))
            stats.add(outputs[OUT["features"]], batch[-1])
        return stats.symmetrised()

    # -- the update --------------------------------------------------------------------------------------------

    def update(self, num_examples: int, stats: RoutingStats, metrics: dict[str, float] | None = None) -> Update:
        """The sparse update: this tier's trained tensors under their global expert ids, plus routing statistics."""
        return Update.from_tier_values(
            self.manifest, self.slots, self.assignment, self.values(), num_examples,
            stats.route_counts, stats.route_prob_sum, metrics,
        )  # fmt: skip
