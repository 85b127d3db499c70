"""The coordinator's Flower ServerApp: the FFT-MoE strategy driving rounds over Flower's Message API.

The strategy is thin, in the manner of Flower's own (``configure_train`` builds messages, ``aggregate_train``
merges replies); the maths are the pure functions of ``coordinator.plan``, ``coordinator.merge`` and
``coordinator.rounds``. One round:

0. with ``--head ridge`` or ``ridge-frozen``, once before round 1: every connected node sums the closed-form head's
   statistics over its training rows (``query.statistics``); the checked sums are added and the head solved
   (``coordinator.ridge_head``);
1. wait until at least ``min-clients`` nodes are connected (at most ``wait-seconds``), sample ``fraction`` of them;
2. ask nodes not seen before for their tier (``query.hello``), and send them the tier's files they lack
   (``query.artifacts``, in chunks, verified on the device);
3. assign global experts to each node's slots and send each node its instruction (``train``);
4. collect replies until all arrived or ``round-timeout`` passed; screen them (failed, stale, invalid: named and
   logged, never merged); with at least ``min-clients`` valid updates merge them, else retry the round;
5. every ``eval-every`` rounds, federated evaluation on the nodes' held-out shares, and centralised evaluation on
   ``eval-data`` if given;
6. checkpoint the global state atomically (``coordinator.state``), and write ``history.json`` and ``progress.png``.

Settings come from the run config (``[tool.flwr.app.config]`` of the app, overridden by ``fftmoe-coordinator
serve``), read and checked by ``RunSettings``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.merge import WEIGHTINGS
from coordinator.plan import sample_nodes
from coordinator.ridge_head import DEFAULT_HEAD, DEFAULT_LOGIT_ADJUST, DEFAULT_RESOLVE_SERVE, HEAD_MODES, combine_statistics, global_view_tiers, head_values, resolved_at, ridge_lambda, screen_statistics, solve_head
from coordinator.rounds import (
    NORM_ACTIONS,
    NormBound,
    Screened,
    Screening,
    apply_round,
    check_merged,
    plan_round,
    reply_limits,
    screen_replies,
    seen_digests,
)
from coordinator.server_opt import ServerOptimizer
from coordinator.state import LATEST, GlobalState
from edge_runtime.bundle import Manifest, load_manifest, verify_files
from edge_runtime.checkpoints import atomic_write_text
from edge_runtime.faults import reach
from edge_runtime.records import (
    DeviceInfo,
    MessageError,
    artifacts_to_record,
    device_info_from_hello_reply,
    evaluation_from_record,
    metrics_from_record,
    hello_to_record,
    instruction_to_record,
    printable,
    statistics_from_record,
    update_from_record,
)
from edge_runtime.update import Update, manifest_id

log = logging.getLogger("flwr.fftmoe")
HISTORY_FILE = "history.json"
PLOT_FILE = "progress.png"
BEFORE_RESOLVE = "before-resolve"
"""With --ridge-resolve, the state dir's subfolder holding the last round's state as it was before the head was
re-solved: a state dir of its own (``fftmoe-coordinator export --state-dir STATE/before-resolve``)."""
STATUS_FILE = "run-status.json"
SETTINGS_FILE = "run-settings.json"
"""STATE_DIR/run-settings.json: the run config of the last start (``RunSettings`` fields), for the report."""
UPDATES_DIR = "updates"


def write_status(path: Path, status: dict[str, Any]) -> None:
    """How the last run ended, for ``fftmoe-coordinator serve`` (``flwr run`` exits 0 even when the ServerApp failed)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(status) + "\n", encoding="utf-8")
    tmp.replace(path)


class RoundFailure(RuntimeError):
    """The federation cannot go on (too few nodes or valid replies, too often); the last saved round stays."""


@dataclass(frozen=True)
class RunSettings:
    """The run config of a federation; each field is an option of ``fftmoe-coordinator serve``."""

    bundle: str
    """Bundle folder on the coordinator's host (--bundle)."""
    state_dir: str
    """Folder of the global state's checkpoints, history.json and progress.png (--state-dir)."""
    rounds: int = 3
    min_clients: int = 2
    """Nodes needed to start a round, and valid updates needed to complete one (--min-clients)."""
    fraction: float = 1.0
    """Share of the connected nodes sampled each round, at least min-clients (--fraction)."""
    wait_seconds: float = 300.0
    """How long a round waits for min-clients nodes to be connected (--wait-seconds)."""
    round_timeout: float = 600.0
    """Seconds a round waits for replies; nodes that have not replied by then are left out (--round-timeout)."""
    max_failed_rounds: int = 3
    """Give up after this many failed attempts in a row (too few nodes or valid updates) (--max-failed-rounds)."""
    epochs: int = 1
    max_steps: int = 0
    """Local steps per round at most; 0: no limit, the epochs decide (--local-steps)."""
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    max_seq_len: int = 0
    """Token limit per row on the devices; 0: the bundle's maximum (--max-seq-len)."""
    weighting: str = "examples"
    max_update_norm: str = "auto"
    """Bound on the L2 norm of each expert's (router's, LoRA module's, head's) change per round: auto (what AdamW can
    move it in the node's steps), a number, or off (--max-update-norm; ``rounds.NormBound``)."""
    norm_action: str = "clip"
    """What an update over the bound gets: clip (scaled down to the bound) or reject (left out) (--norm-action)."""
    max_share: float = 0.5
    """Largest share of any one node in the mean of an expert, router row, LoRA module or the head; 1: no bound
    (--max-share). With n holders the bound is never below 1/n."""
    head: str = DEFAULT_HEAD
    """How the head is set (--head; ``coordinator.ridge_head.HEAD_MODES``): fedavg (random start, trained and merged),
    ridge (solved in closed form from every node's statistics before round 1, then trained and merged), ridge-frozen
    (solved before round 1 and kept fixed: devices put it back after each step and the merge leaves it), the default
    (``ridge_head.DEFAULT_HEAD``)."""
    ridge: float = 0.1
    """The ridge head's lambda as a fraction of the mean eigenvalue of the features' Gram matrix (--ridge)."""
    ridge_scale: float = 6.0
    """The ridge head's logits are this times its least-squares outputs (near 0 and 1) (--ridge-scale)."""
    ridge_resolve: bool = DEFAULT_RESOLVE_SERVE
    """After the last round, solve the head again on the adapted features, every node summing over the global
    model's features through a tier that computes them (``ridge_head.global_view_tiers``) (--ridge-resolve)."""
    logit_adjust: float = DEFAULT_LOGIT_ADJUST
    """tau of the devices' logit-adjusted loss CE(z + tau log pi_device, y); 0: the plain loss (--logit-adjust)."""
    server_opt: str = "fedavgm"
    """The server optimiser on the merged units (--server-opt; ``coordinator.server_opt``): fedavgm or fedadam."""
    server_lr: float = 1.0
    """eta, the server learning rate (--server-lr; 1 with momentum 0 and damping 0: the plain merge)."""
    server_momentum: float = 0.0
    """beta: FedAvgM's momentum, FedAdam's first-moment decay (--server-momentum)."""
    server_damping: float = 0.0
    """lambda of the damped sparse merge: how much the round's nodes that did not train an expert hold it back (--server-damping)."""
    keep_checkpoints: int = 3
    """Committed rounds kept in --state-dir, the newest last; --resume-round goes back to any of them (--keep-checkpoints)."""
    resume_round: int = 0
    """With --resume: continue from this kept round instead of the last (--resume-round; 0: the last)."""
    eval_every: int = 1
    """Federated and centralised evaluation every this many rounds, and after the last; 0: never (--eval-every)."""
    eval_data: str = ""
    """A data file on the coordinator for centralised evaluation of the global model; empty: none (--eval-data)."""
    eval_text_columns: str = "text"
    eval_label_column: str = "label"
    eval_label_map: str = ""
    resume: bool = False
    serve_artifacts: bool = True
    """Send devices the tier files they lack (--serve-artifacts/--no-serve-artifacts)."""
    chunk_mb: int = 32
    """Largest piece of a file in one artifacts message, MB."""
    keep_updates: bool = False
    """Keep every merged update as STATE_DIR/updates/round-NNNNN/node-ID.safetensors, for audit (--keep-updates)."""
    sim_plan: str = ""
    """Set by ``fftmoe-coordinator simulate``: the plan whose entries give each virtual node its settings."""

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> RunSettings:
        """Read the run config (keys with dashes); unknown keys are refused, naming them."""
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; known: {sorted(names)}")
        kwargs = {}
        for key, f in names.items():
            if key in cfg:
                kind = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
                kwargs[f.name] = kind(cfg[key])
        return cls(**kwargs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_update_norm", str(self.max_update_norm))  # a number given from Python, or the run config
        if not self.bundle or not self.state_dir:
            raise ValueError("--bundle and --state-dir are required")
        checks = [
            (self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}"),
            (self.min_clients >= 1, f"--min-clients must be >= 1, got {self.min_clients}"),
            (0 < self.fraction <= 1, f"--fraction must be in (0, 1], got {self.fraction}"),
            (self.round_timeout > 0 and self.wait_seconds >= 0, "--round-timeout must be > 0 and --wait-seconds >= 0"),
            (self.epochs >= 1 and self.max_steps >= 0 and self.batch_size >= 1, "--epochs and --batch-size must be >= 1, --local-steps >= 0"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (self.weighting in WEIGHTINGS, f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"),
            (self.eval_every >= 0 and self.max_failed_rounds >= 1 and self.chunk_mb >= 1, "--eval-every must be >= 0"),
            (self.norm_action in NORM_ACTIONS, f"--norm-action must be one of {', '.join(NORM_ACTIONS)}, got {self.norm_action!r}"),
            (math.isfinite(self.max_share) and 0 < self.max_share <= 1, f"--max-share must be in (0, 1] (1: no bound), got {self.max_share}"),
            (math.isfinite(self.logit_adjust) and 0 <= self.logit_adjust <= 10, f"--logit-adjust must be in [0, 10], got {self.logit_adjust}"),
            (self.head in HEAD_MODES, f"--head must be one of {', '.join(HEAD_MODES)}, got {self.head!r}"),
            (math.isfinite(self.ridge) and self.ridge > 0 and math.isfinite(self.ridge_scale) and self.ridge_scale > 0,
             f"--ridge and --ridge-scale must be positive numbers, got {self.ridge} and {self.ridge_scale}"),
            (self.keep_checkpoints >= 2, f"--keep-checkpoints must be >= 2 (the last round and one before it), got {self.keep_checkpoints}"),
            (self.resume_round >= 0 and (self.resume or not self.resume_round), f"--resume-round needs --resume and must be >= 0, got {self.resume_round}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        NormBound.parse(self.max_update_norm)  # raises naming --max-update-norm
        self.server_optimizer  # raises naming the --server-* flag

    @property
    def screening(self) -> Screening:
        """How replies are screened: the update bound, what an update over it gets, the learning rate it assumes."""
        return Screening(NormBound.parse(self.max_update_norm), self.norm_action, self.lr)

    @property
    def server_optimizer(self) -> ServerOptimizer:
        return ServerOptimizer(self.server_opt, self.server_lr, self.server_momentum, self.server_damping)

    @property
    def frozen_head(self) -> bool:
        return self.head == "ridge-frozen"

    def train_settings(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.lr, "max_steps": self.max_steps,
                "seed": self.seed, "max_seq_len": self.max_seq_len, **({"freeze_head": True} if self.frozen_head else {}),
                **({"logit_adjust": self.logit_adjust} if self.logit_adjust else {})}  # fmt: skip


def message_to(node: int, content: Any, message_type: str, group_id: str = "") -> Any:
    """A Flower message for one node. The destination is also written into the content: Flower derives a message's
    id from its content, so identical contents for several nodes (a hello) would otherwise share one id."""
    from flwr.app import ConfigRecord, Message

    content["to"] = ConfigRecord({"node_id": int(node)})
    return Message(content, int(node), message_type, group_id=group_id)


def artifact_batches(bundle_dir: Path, paths: list[str], limit: int) -> list[list[tuple[str, int, int]]]:
    """Pieces (path, offset, size) of the files, grouped into messages of at most ``limit`` bytes, in order."""
    batches: list[list[tuple[str, int, int]]] = [[]]
    room = limit
    for path in paths:
        size, off = (bundle_dir / path).stat().st_size, 0
        while off < size or (size == 0 and off == 0):
            if room == 0:
                batches.append([])
                room = limit
            take = min(room, size - off)
            batches[-1].append((path, off, take))
            off += take
            room -= take
            if size == 0:
                break
    return [b for b in batches if b]


CLIENT_METRICS = ("train_loss", "train_seconds", "seconds", "steps", "rss_mb", "peak_rss_mb", "start_rss_mb", "peak_scope")
"""What the history keeps of each device's own report, per round (wall time and memory by tier)."""


def expert_tokens(num_experts: int, assignment: list[list[int]], route_counts: np.ndarray) -> list[float]:
    """Tokens a device routed to each global expert this round, summed over layers ([M]): slot j of layer l holds
    expert ``assignment[l][j]``, and ``route_counts[l, j]`` counts the tokens routed to that slot."""
    out = np.zeros(num_experts, np.float64)
    for layer, experts in enumerate(assignment):
        np.add.at(out, np.asarray(experts, np.int64), np.asarray(route_counts[layer], np.float64))
    return out.tolist()


def _nbytes(values: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in values.values()))


class FFTMoEStrategy:
    """Tier-aware rounds with per-expert assignment and the sparse per-expert merge (see the module docstring)."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.bundle_dir = Path(settings.bundle)
        self.manifest: Manifest = load_manifest(self.bundle_dir)
        self.manifest_id = manifest_id(self.manifest)
        self.state_dir = Path(settings.state_dir)
        self.devices: dict[int, DeviceInfo] = {}  # node id -> its checked hello reply (tier, batch, backend, examples)
        self.refused: dict[str, str] = {}  # node -> why its hello or evaluation was refused, for the next history entry
        self.central = None  # (global-model builder inputs, encoded eval data) when eval_data is set

    # -- set-up ------------------------------------------------------------------------------------------------

    def initial_state(self) -> GlobalState:
        from safetensors.numpy import load_file

        if self.settings.resume:
            state = GlobalState.load(self.state_dir, self.manifest_id, self.settings.resume_round or None)
            log.info("resuming from %s: %d round(s) done", self.state_dir, state.round)
            return state
        if (self.state_dir / LATEST).exists():
            raise RoundFailure(f"{self.state_dir} already holds a global state; continue it with --resume or choose another --state-dir")
        verify_files(self.bundle_dir, [self.manifest.global_pool])
        pool = load_file(str(self.bundle_dir / self.manifest.global_pool.path))
        state = GlobalState.initial(self.manifest_id, pool, self.manifest.num_layers, self.manifest.num_experts)
        state.save(self.state_dir, self.settings.keep_checkpoints)
        return state

    # -- messaging ---------------------------------------------------------------------------------------------

    def exchange(self, grid: Any, messages: dict[int, Any], timeout: float, what: str, sent_point: str = "") -> dict[int, Any]:
        """Send one message per node and collect replies until all arrived or ``timeout``; node -> reply Message or
        an error text (the node's error reply, or no reply in time). ``sent_point``: the fault point reached once
        the messages are out."""
        if not messages:
            return {}
        ids = list(grid.push_messages(list(messages.values())))
        if sent_point:
            reach(sent_point)
        node_of = {i: n for i, n in zip(ids, messages) if i}
        if any(not i for i in ids):
            refused = [n for i, n in zip(ids, messages) if not i]
            log.warning("%s: the SuperLink refused the message(s) to node(s) %s (see its log)", what, refused)
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < len(node_of) and time.monotonic() < deadline:
            pending = [i for i, n in node_of.items() if n not in out]
            for reply in grid.pull_messages(pending):
                node = node_of.get(reply.metadata.reply_to_message_id)
                if node is None or node in out:
                    continue
                out[node] = f"error reply: {printable(reply.error.reason)}" if reply.has_error() else reply
                log.info("%s: %d/%d node(s) replied (node %s%s) after %.1f s", what, len(out), len(node_of), node,
                         ", failed" if isinstance(out[node], str) else "", timeout - (deadline - time.monotonic()))  # fmt: skip
            if len(out) < len(node_of):
                time.sleep(1.0)
        for node in node_of.values():
            out.setdefault(node, f"no reply within {timeout:.0f} s")
        for node in messages:
            out.setdefault(node, "the SuperLink refused the message (node unknown or gone)")
        return out

    def wait_for_nodes(self, grid: Any) -> list[int]:
        deadline = time.monotonic() + self.settings.wait_seconds
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.settings.min_clients:
                return nodes
            if time.monotonic() >= deadline:
                raise RoundFailure(f"only {len(nodes)} node(s) connected after {self.settings.wait_seconds:.0f} s; --min-clients is {self.settings.min_clients}")
            log.info("waiting for nodes: %d connected, %d needed", len(nodes), self.settings.min_clients)
            time.sleep(2.0)

    def learn_devices(self, grid: Any, nodes: list[int]) -> dict[int, int]:
        """Node -> tier for the sampled nodes that can train now: new nodes are asked (hello) and sent what they lack.
        A hello reply that fails its checks leaves that node out (named in the log and in the next history entry)."""
        new = [n for n in nodes if n not in self.devices]
        replies = self.exchange(grid, {n: message_to(n, hello_to_record(self.manifest), "query.hello") for n in new},
                                self.settings.round_timeout, "hello")  # fmt: skip
        for node, reply in replies.items():
            self.accept_hello(node, reply)
        lacking = {n: list(self.devices[n].missing) for n in new if n in self.devices and self.devices[n].missing}
        if lacking:
            if not self.settings.serve_artifacts:
                for n in lacking:
                    log.warning("node %s lacks its tier's files and --no-serve-artifacts is set; provision it with --bundle", n)
                    self.devices.pop(n)
            else:
                self.serve_artifacts(grid, lacking)
        return {n: self.devices[n].tier for n in nodes if n in self.devices}

    def accept_hello(self, node: int, reply: Any) -> DeviceInfo | None:
        """Read one hello reply (a Flower message, or the text of a failure): the node's checked ``DeviceInfo``, also
        kept in ``devices``; None when it cannot join, with the reason logged and, for a malformed reply, recorded
        under ``refused`` for the next history entry. Nothing a reply holds raises out of here."""
        try:
            info = reply if isinstance(reply, str) else device_info_from_hello_reply(reply.content, self.manifest)
        except Exception as exc:  # noqa: BLE001  # a malformed reply rejects its node, never the run
            info = printable(exc, 400) if isinstance(exc, MessageError) else f"unreadable hello reply ({type(exc).__name__}: {printable(exc)})"
            self.refused[str(node)] = f"hello: {info}"
        if isinstance(info, str):
            log.warning("node %s did not join: %s", node, info)
            return None
        log.info("node %s%s: tier %s (%s), batch %s, backend %s, %s training examples%s%s", node, f" ({info.name})" if info.name else "",
                 info.tier, info.tier_reason, info.batch_size, info.backend, info.train_examples,
                 f", lacks {len(info.missing)} file(s), {info.missing_bytes / 1e6:.1f} MB" if info.missing else "",
                 f" (ignored {len(info.ignored)} listed file(s) its tier does not need)" if info.ignored else "")  # fmt: skip
        self.devices[node] = info
        return info

    def serve_artifacts(self, grid: Any, lacking: dict[int, list[str]]) -> None:
        """Send each node the files it lacks, in messages of at most ``chunk_mb`` (large files in pieces); a node
        whose transfer fails is dropped until it is seen again."""
        queues = {n: artifact_batches(self.bundle_dir, paths, self.settings.chunk_mb << 20) for n, paths in lacking.items()}
        while queues:
            messages = {}
            for n, queue in queues.items():
                pieces = []
                for path, off, size in queue.pop(0):
                    with open(self.bundle_dir / path, "rb") as fh:
                        fh.seek(off)
                        pieces.append((path, off, fh.read(size)))
                messages[n] = message_to(n, artifacts_to_record(self.manifest_id, pieces), "query.artifacts")
            for n, reply in self.exchange(grid, messages, self.settings.round_timeout, "artifacts").items():
                if isinstance(reply, str):
                    log.warning("node %s: sending its tier's files failed (%s); it is left out until it rejoins", n, reply)
                    self.devices.pop(n, None)
                    queues.pop(n)
            queues = {n: q for n, q in queues.items() if q}
        for n in lacking:
            if n in self.devices:
                self.devices[n] = replace(self.devices[n], missing=(), missing_bytes=0)

    # -- one round (Flower's strategy shape) ------------------------------------------------------------------

    def configure_train(self, state: GlobalState, tiers: dict[int, int]) -> tuple[dict[int, Any], dict[int, Any]]:
        """(node -> instruction, node -> Message) for round ``state.round + 1``."""
        sent = plan_round(state, self.manifest, tiers, self.settings.train_settings())
        messages = {n: message_to(n, instruction_to_record(ins), "train", str(ins.round)) for n, ins in sent.items()}
        return sent, messages

    def aggregate_train(self, state: GlobalState, sent: dict[int, Any], replies: dict[int, Any]) -> tuple[GlobalState | None, Screened, str]:
        """(the next state, the screened replies, ""), or (None, screened, why) when fewer than ``min_clients`` valid
        updates arrived or the merged state failed its check (nothing changes then)."""
        parsed: dict[int, tuple[Update, int] | str] = {}
        for node, reply in replies.items():
            if isinstance(reply, str):
                parsed[node] = reply
                continue
            try:
                parsed[node] = update_from_record(reply.content, f"reply of node {node}")
            except Exception as exc:  # noqa: BLE001  # MessageError, or anything a hostile record raises while read
                parsed[node] = f"malformed reply: {printable(exc)}"
        s = self.settings
        limits = {n: reply_limits(self.devices[n].train_examples, self.devices[n].batch_size, sent[n].train, self.manifest)
                  for n in sent if n in self.devices}  # fmt: skip
        screened = screen_replies(self.manifest, sent, parsed, s.screening, seen_digests(state), limits)
        if len(screened.accepted) < s.min_clients:
            return None, screened, f"{len(screened.accepted)} valid update(s), --min-clients is {s.min_clients}"
        accepted = screened.accepted
        weights = {n: u.num_examples for n, u in accepted.items()}
        total = sum(weights.values())
        record = {
            "tiers": {str(n): sent[n].tier for n in sent},
            "sent_bytes": {str(n): _nbytes(sent[n].values) for n in sent},
            "received_bytes": {str(n): _nbytes(u.tensors) for n, u in accepted.items()},
            "examples": {str(n): w for n, w in weights.items()},
            "train_loss": sum(float(u.metrics.get("train_loss", 0.0)) * (weights[n] / total) for n, u in accepted.items()),
            "assignment": {str(n): sent[n].assignment for n in sent},
            "names": {str(n): self.devices[n].name if n in self.devices else "" for n in sent},
            "client_metrics": {str(n): {k: float(u.metrics[k]) for k in CLIENT_METRICS if k in u.metrics} for n, u in accepted.items()},
            "expert_tokens": {str(n): expert_tokens(self.manifest.num_experts, sent[n].assignment, u.route_counts) for n, u in accepted.items()},
        }  # fmt: skip
        if self.refused:
            record["refused"], self.refused = dict(self.refused), {}
        new = apply_round(state, self.manifest, screened, s.weighting, record, s.max_share, keep_head=s.frozen_head, optimizer=s.server_optimizer)
        problem = check_merged(state.pool, new.pool, self.manifest, screened)
        if problem:
            log.error("round %d: the merged state is refused and not saved: %s", new.round, problem)
            return None, screened, f"the merged state was refused ({problem})"
        return new, screened, ""

    def configure_evaluate(self, state: GlobalState, tiers: dict[int, int]) -> dict[int, Any]:
        plan = plan_round(state, self.manifest, tiers, self.settings.train_settings())
        for ins in plan.values():
            ins.round = state.round
            if state.round >= self.settings.rounds:  # the last: devices that hold global test rows score on them too
                ins.train = {**ins.train, "global_eval": True}
        return {n: message_to(n, instruction_to_record(ins), "evaluate", f"eval-{state.round}") for n, ins in plan.items()}

    def configure_statistics(self, state: GlobalState, tiers: dict[int, int]) -> dict[int, Any]:
        """A ``query.statistics`` for each node: the values of its tier as a round would send them (before round 1
        every adapter is zero, so each tier computes the frozen encoder's features)."""
        plan = plan_round(state, self.manifest, tiers, self.settings.train_settings())
        for ins in plan.values():
            ins.round = state.round
        return {n: message_to(n, instruction_to_record(ins), "query.statistics", f"stats-{state.round}") for n, ins in plan.items()}

    def aggregate_statistics(self, state: GlobalState, replies: dict[int, Any]) -> tuple[GlobalState | None, dict[str, Any]]:
        """The state with the ridge head solved from the valid replies, and the record of what was used; (None,
        record) when no valid statistics arrived. A reply that fails its checks (``statistics_from_record``) or
        whose feature scale is far off the fleet's (``screen_statistics``) is left out and named."""
        stats, rejected = {}, {}
        for node, reply in replies.items():
            if isinstance(reply, str):
                rejected[str(node)] = printable(reply, 400)
                continue
            try:
                held = self.devices[node].train_examples if node in self.devices else 0
                st, r = statistics_from_record(reply.content, self.manifest, f"statistics of node {node}", max(held, 1))
                if r != state.round:
                    raise MessageError(f"statistics of node {node}: answer round {r}, asked for round {state.round}")
                stats[node] = st
            except Exception as exc:  # noqa: BLE001  # a malformed reply rejects its node, never the run
                rejected[str(node)] = printable(exc, 400) if isinstance(exc, MessageError) else f"unreadable ({type(exc).__name__}: {printable(exc)})"
        for node, why in screen_statistics(stats).items():
            rejected[str(node)] = why
            stats.pop(node)
        for node, why in rejected.items():
            log.warning("head statistics of node %s left out: %s", node, why)
        record: dict[str, Any] = {"round": state.round, "ridge_head": {"mode": self.settings.head, "ridge": self.settings.ridge,
                                  "scale": self.settings.ridge_scale, "nodes": sorted(stats), "rejected": rejected}}  # fmt: skip
        if not stats:
            return None, record
        combined = combine_statistics(stats, self.settings.max_share)
        weight, bias = solve_head(combined.gram, combined.cross, self.settings.ridge, self.settings.ridge_scale)
        record["ridge_head"].update(examples=combined.examples, label_counts=[int(round(c)) for c in combined.cross[-1]],
                                    ridge_lambda=ridge_lambda(combined.gram, self.settings.ridge),
                                    received_bytes={str(n): int(s.gram.nbytes + s.cross.nbytes) for n, s in stats.items()})  # fmt: skip
        pool = {**state.pool, **head_values(weight, bias)}
        return GlobalState(state.manifest_id, pool, state.usage, state.round, state.preferences, [*state.history, record], state.moments), record

    def solve_ridge_head(self, grid: Any, state: GlobalState, final: bool = False) -> GlobalState:
        """Before round 1 (or with ``final`` after the last): ask every connected node for its statistics, solve
        and commit the head, once. ``final`` asks each node to sum over the global model's features: its
        instruction is for a tier that computes them (``ridge_head.global_view_tiers``: FFT-MoE's tier M, with every
        expert), which the node opens for this forward pass only; a node that lacks that tier's files answers with
        the error and is left out."""
        nodes = self.wait_for_nodes(grid)
        tiers = self.learn_devices(grid, nodes)
        if final:
            view = global_view_tiers(self.manifest)
            if view:
                tiers = {n: t if t in view else max(view) for n, t in tiers.items()}
            else:
                log.warning("no tier of this bundle computes the global model's features; the head is re-solved on each node's own tier")
        replies = self.exchange(grid, self.configure_statistics(state, tiers), self.settings.round_timeout, "head statistics")
        new, record = self.aggregate_statistics(state, replies)
        if new is None:
            raise RoundFailure(f"no node sent valid head statistics (--head {self.settings.head}): {record['ridge_head']['rejected']}")
        info = record["ridge_head"]
        if final:
            info["resolve"] = True
            central = self.evaluate_central(new)
            if central is not None:
                record["central"] = central
                log.info("round %d (re-solved head): central accuracy %.4f, loss %.4f", new.round, central["accuracy"], central["loss"])
        log.info("ridge head solved from %d node(s), %d example(s), labels %s (lambda %.4g)", len(info["nodes"]), info["examples"],
                 info["label_counts"], info["ridge_lambda"])  # fmt: skip
        if final:  # the re-solved head replaces the last round's checkpoint: the state it replaces stays loadable
            state.save(self.state_dir / BEFORE_RESOLVE, keep=1)
        new.save(self.state_dir, self.settings.keep_checkpoints)
        return new

    def aggregate_evaluate(self, round_: int, replies: dict[int, Any]) -> dict[str, Any] | None:
        """Example-weighted accuracy and loss over the nodes that evaluated; None when none did. A reply that fails
        its checks (``evaluation_from_record``: counts above the node's hello figure, accuracy outside [0, 1], a
        missing field) is left out and named in the log and in ``rejected``."""
        results, rejected, global_scores = [], {}, {}
        for node, reply in replies.items():
            if isinstance(reply, str):
                log.warning("evaluation on node %s failed: %s", node, reply)
                continue
            try:
                held = self.devices[node].eval_examples if node in self.devices else 0
                evaluation, r = evaluation_from_record(reply.content, f"evaluate reply of node {node}", held)
            except Exception as exc:  # noqa: BLE001  # a malformed reply rejects its node, never the round
                rejected[str(node)] = printable(exc) if isinstance(exc, MessageError) else f"unreadable ({type(exc).__name__}: {printable(exc)})"
                log.warning("evaluation of node %s rejected: %s", node, rejected[str(node)])
                continue
            if r != round_:
                continue
            if evaluation.examples > 0:
                results.append((node, evaluation))
            extra = metrics_from_record(reply.content)[0].get("global_accuracy")  # self-reported, as its own accuracy is
            if extra is not None and 0.0 <= extra <= 1.0:
                global_scores[str(node)] = extra
        if not results:
            return {"rejected": rejected} if rejected else None
        n = sum(e.examples for _, e in results)
        out: dict[str, Any] = {
            "accuracy": sum(e.accuracy * (e.examples / n) for _, e in results), "loss": sum(e.loss * (e.examples / n) for _, e in results),
            "examples": n, "nodes": float(len(results)),
            "per_node": {str(node): {"accuracy": e.accuracy, "loss": e.loss, "examples": float(e.examples)} for node, e in results},
        }  # fmt: skip
        if global_scores:  # each node's personalised model on the same global test rows: a plain mean over nodes
            out["personal_global_accuracy"] = float(np.mean(list(global_scores.values())))
            out["personal_global_by_node"] = global_scores
        if rejected:
            out["rejected"] = rejected
        return out

    def evaluate_central(self, state: GlobalState) -> dict[str, float] | None:
        if not self.settings.eval_data:
            return None
        from coordinator.global_model import build_global_model, evaluate_global

        if self.central is None:
            from edge_runtime.data import DataSpec, TextEncoder, encode_examples, load_examples, parse_label_map

            s = self.settings
            spec = DataSpec(tuple(c for c in s.eval_text_columns.split(",") if c), s.eval_label_column, parse_label_map(s.eval_label_map))
            examples = load_examples(s.eval_data, spec, self.manifest.labels)
            encoder = TextEncoder(self.bundle_dir / Path(self.manifest.tokenizer_files[0].path).parent, s.max_seq_len or self.manifest.max_seq_len)
            self.central = encode_examples(examples, encoder)
        return evaluate_global(build_global_model(self.bundle_dir, self.manifest, state.pool), self.central)

    # -- the run ----------------------------------------------------------------------------------------------

    def start(self, grid: Any) -> GlobalState:
        s = self.settings
        state = self.initial_state()
        if s.head != "fedavg" and state.round == 0 and not any("ridge_head" in h for h in state.history):
            state = self.solve_ridge_head(grid, state)
        if state.round == 0 and s.eval_data and not any("central" in h for h in state.history):
            central = self.evaluate_central(state)
            log.info("round 0 (initial global model): central accuracy %.4f, loss %.4f", central["accuracy"], central["loss"])
            state.history.append({"round": 0, "central": central})
            state.save(self.state_dir, s.keep_checkpoints)
        failures = 0
        while state.round < s.rounds:
            r = state.round + 1
            started = time.monotonic()
            nodes = self.wait_for_nodes(grid)
            reach("round.start")
            sampled = sample_nodes(nodes, s.fraction, s.min_clients, s.seed * 100003 + r * 101 + failures)
            phases = {"wait": time.monotonic() - started}
            mark = time.monotonic()
            tiers = self.learn_devices(grid, sampled)
            phases["hello"], mark = time.monotonic() - mark, time.monotonic()
            if len(tiers) < s.min_clients:
                failures = self._failed(r, failures, f"only {len(tiers)} of the sampled node(s) {sampled} can train")
                continue
            log.info("round %d/%d: training on %d node(s), tiers %s", r, s.rounds, len(tiers), dict(sorted(tiers.items())))
            sent, messages = self.configure_train(state, tiers)
            replies = self.exchange(grid, messages, s.round_timeout, f"round {r} train", sent_point="round.sent")
            phases["train"], mark = time.monotonic() - mark, time.monotonic()
            reach("round.replies")
            new, screened, why = self.aggregate_train(state, sent, replies)
            phases["merge"], mark = time.monotonic() - mark, time.monotonic()
            for node, reason in screened.rejected.items():
                if "no reply" in reason or "error reply" in reason:
                    self.devices.pop(node, None)  # ask again (tier, files) if it comes back
            if new is None:
                failures = self._failed(r, failures, why)
                continue
            failures = 0
            reach("round.merged")
            if s.keep_updates:
                self.save_updates(r, screened)
            entry = new.history[-1]
            if s.eval_every and (r % s.eval_every == 0 or r == s.rounds):  # and always after the last round
                fed = self.aggregate_evaluate(r, self.exchange(grid, self.configure_evaluate(new, {n: tiers[n] for n in screened.accepted}),
                                                               s.round_timeout, f"round {r} evaluate"))  # fmt: skip
                if fed is not None and "accuracy" in fed:
                    entry["federated"] = fed
                elif fed is not None:
                    entry["evaluate_rejected"] = fed["rejected"]
                phases["evaluate"], mark = time.monotonic() - mark, time.monotonic()
                central = self.evaluate_central(new)
                if central is not None:
                    entry["central"] = central
                phases["central"], mark = time.monotonic() - mark, time.monotonic()
            entry["seconds"] = round(time.monotonic() - started, 2)
            entry["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
            new.save(self.state_dir, s.keep_checkpoints)
            reach("round.saved")
            state = new
            self.write_progress(state)
            reach("round.done")
            log.info("%s", round_line(entry, s.rounds, len(sent)))
        if s.ridge_resolve and state.round >= s.rounds and not resolved_at(state.history, state.round):
            state = self.solve_ridge_head(grid, state, final=True)
            self.write_progress(state)
        log.info("done: %d round(s); global state in %s", state.round, self.state_dir)
        return state

    def _failed(self, r: int, failures: int, why: str) -> int:
        failures += 1
        log.warning("round %d failed (attempt %d of %d): %s; the global state is unchanged", r, failures, self.settings.max_failed_rounds, why)
        if failures >= self.settings.max_failed_rounds:
            raise RoundFailure(f"round {r} failed {failures} times in a row ({why}); the state of round {r - 1} is saved in "
                               f"{self.state_dir}: fix the fleet and continue with --resume")  # fmt: skip
        return failures

    def save_updates(self, round_: int, screened: Screened) -> Path:
        """Write the round's merged updates (after any clipping) to ``updates/round-NNNNN/node-ID.safetensors``,
        replacing what an interrupted attempt at this round left there."""
        import shutil

        folder = self.state_dir / UPDATES_DIR / f"round-{round_:05d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for node, update in screened.accepted.items():
            update.save(folder / f"node-{node}.safetensors")
        return folder

    def write_progress(self, state: GlobalState) -> None:
        atomic_write_text(self.state_dir / HISTORY_FILE, json.dumps(state.history, indent=1) + "\n", fault_point="")
        plot_progress(state.history, self.state_dir / PLOT_FILE)


def round_line(entry: dict[str, Any], rounds: int, expected: int) -> str:
    """One line per completed round: nodes done / expected, loss, accuracy, bytes sent and received."""
    parts = [f"round {entry['round']}/{rounds}: {len(entry['accepted'])}/{expected} node(s) merged"]
    if entry.get("rejected"):
        parts.append(f"{len(entry['rejected'])} rejected")
    parts.append(f"train loss {entry['train_loss']:.4f}")
    for key in ("federated", "central"):
        if key in entry:
            parts.append(f"{key} accuracy {entry[key]['accuracy']:.4f} loss {entry[key]['loss']:.4f}")
    parts.append(f"sent {sum(entry['sent_bytes'].values()) / 1e6:.2f} MB, received {sum(entry['received_bytes'].values()) / 1e6:.2f} MB")
    parts.append(f"{entry.get('seconds', 0):.0f} s")
    return ", ".join(parts)


def plot_progress(history: list[dict[str, Any]], path: Path) -> bool:
    """Train loss and evaluation accuracy per round as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounds = [h for h in history if "train_loss" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([h["round"] for h in rounds], [h["train_loss"] for h in rounds], marker="o", label="train loss (devices)")
    for key, style in (("federated", "s-"), ("central", "^-")):
        pts = [(h["round"], h[key]) for h in history if key in h]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1]["loss"] for p in pts], style, label=f"{key} eval loss")
            ax2.plot([p[0] for p in pts], [p[1]["accuracy"] for p in pts], style, label=f"{key} eval accuracy")
    ax1.set_xlabel("round"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.set_xlabel("round"), ax2.set_ylabel("accuracy"), ax2.legend() if ax2.lines else None
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def _build_app():  # noqa: ANN202
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flwr_logger = logging.getLogger("flwr")
        for name in ("coordinator", "edge_runtime"):  # the pure functions' warnings (rejected replies) go to the run's log
            logging.getLogger(name).handlers = flwr_logger.handlers
            logging.getLogger(name).setLevel(logging.INFO)
        settings = RunSettings.from_run_config(dict(context.run_config))
        status = Path(settings.state_dir) / STATUS_FILE
        status.parent.mkdir(parents=True, exist_ok=True)
        write_status(status, {"ok": False, "running": True, "run_id": context.run_id})
        write_status(status.with_name(SETTINGS_FILE), asdict(settings))
        try:
            state = FFTMoEStrategy(settings).start(grid)
        except Exception as exc:
            write_status(status, {"ok": False, "running": False, "run_id": context.run_id, "error": type(exc).__name__, "message": str(exc)})
            raise
        write_status(status, {"ok": True, "running": False, "run_id": context.run_id, "rounds": state.round})

    return app


app = _build_app()
