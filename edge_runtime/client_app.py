"""The device's Flower ClientApp: what a SuperNode started by ``fftmoe-edge join`` runs for each message.

Messages (contents defined in ``edge_runtime.records``, documented in ``docs/update-format.md``):

- ``query.hello``: the coordinator's manifest; the device answers with its tier, its backend, how many training
  examples it holds, and which of its tier's files it lacks (when it has no pre-provisioned bundle).
- ``query.artifacts``: chunks of those files; the device writes them into its cache and verifies each completed
  file against the manifest's sha256 before it is used.
- ``train``: a train instruction (assigned experts, their values, router rows, head, target q, settings); the
  device trains its tier on its local data and replies with the sparse update.
- ``evaluate``: the same kind of instruction without training; the device replies with accuracy and loss on its
  held-out share.
- ``query.statistics``: the same kind of instruction; the device runs its training rows through the eval model once
  and replies with the closed-form head's sums (``edge_runtime/head_stats.py``).

Every setting of the device comes from the SuperNode's ``--node-config`` (``NodeSettings``); a virtual device of
``fftmoe-coordinator simulate`` gets them from the simulation plan named in the run config, by its partition id.
On a SuperNode a new ClientApp process starts for every message, so what must persist (the tier choice,
downloaded files) lives in the cache folder. In a simulation the process lives on: the tokenised data and the
evaluation session of the last tier evaluated is kept in memory (``_CACHE``; dropped when a train message or
another tier comes), and every train message opens its tier afresh, so that no optimizer state leaks from one round
or device to the next.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import BundleError, FileEntry, IntegrityError, Manifest, ManifestError, load_manifest, needed_files, sha256_file
from edge_runtime.records import (
    MessageError,
    artifacts_from_record,
    check_manifest_id,
    hello_reply_to_record,
    instruction_from_record,
    manifest_from_hello,
    metrics_to_record,
    printable,
    statistics_to_record,
    update_to_record,
)

log = logging.getLogger(__name__)

TIER_FILE = "tier-choice.json"


@dataclass(frozen=True)
class NodeSettings:
    """A device's settings, passed by ``fftmoe-edge join`` as the SuperNode's ``--node-config``."""

    data: Path
    """Local training data file (CSV, TSV, JSONL, Parquet)."""
    cache_dir: Path
    """Where downloaded bundle files are kept, one folder per bundle (manifest id)."""
    bundle: Path | None = None
    """A pre-provisioned bundle folder; when set, nothing is downloaded."""
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    label_map: str = ""
    skip_bad_rows: bool = False
    eval_fraction: float = 0.1
    """Share of the local data held out for federated evaluation (never trained on)."""
    tier: int | None = None
    """The tier this device trains; None: chosen from the manifest's measurements and this device's memory."""
    batch_size: int = 16
    """The largest batch this device affords; a round's batch size is capped by it."""
    max_memory: float | None = None
    device: str = ""
    backend: str = "auto"
    threads: int | None = None
    seed: int = 0
    eval_data: Path | None = None
    """A separate held-out data file for federated evaluation; when set, all of ``data`` is trained on."""
    name: str = ""
    """How the device names itself in the coordinator's log and history.json (a simulation: ``client-07 rpi-4-2gb``)."""
    keep_model: Path | None = None
    """Where the device writes its personalised model after each evaluation: the experts, router rows and head the
    coordinator sent it, as an ONNX inference model optimum loads, with ``evaluation.json`` (``--keep-model``)."""
    global_eval_data: Path | None = None
    """A data file the device also scores its personalised model on when the coordinator asks (``global_eval`` in
    the instruction; ``simulate`` sets it to the global test rows for the last round)."""

    @classmethod
    def from_context(cls, node_config: dict[str, Any], run_config: dict[str, Any]) -> NodeSettings:
        """The settings of this node: its node config, or for a simulation's virtual node (which has only a
        ``partition-id``) the plan entry of its partition."""
        plan = run_config.get("sim-plan")
        if plan and "partition-id" in node_config:
            nodes = _read_plan(str(plan))
            pid = int(node_config["partition-id"])
            if not 0 <= pid < len(nodes):
                raise ValueError(f"simulation plan {plan} has {len(nodes)} node(s); there is no partition {pid}")
            return cls.from_node_config(nodes[pid])
        return cls.from_node_config(node_config)

    @classmethod
    def from_node_config(cls, cfg: dict[str, Any]) -> NodeSettings:
        def opt(key: str, default: Any = None) -> Any:
            v = cfg.get(key, default)
            return default if v in ("", None) else v

        if not opt("data"):
            raise ValueError("node config lacks 'data' (the local data file); start the node with fftmoe-edge join --data FILE")
        tier = opt("tier", "auto")
        return cls(
            data=Path(str(cfg["data"])), cache_dir=Path(str(opt("cache-dir", Path.home() / ".cache" / "fftmoe" / "bundles"))),
            bundle=Path(str(opt("bundle"))) if opt("bundle") else None,
            text_columns=tuple(c for c in str(opt("text-columns", "text")).split(",") if c),
            label_column=str(opt("label-column", "label")), label_map=str(opt("label-map", "")),
            skip_bad_rows=bool(opt("skip-bad-rows", False)), eval_fraction=float(opt("eval-fraction", 0.1)),
            tier=None if str(tier) == "auto" else int(tier), batch_size=int(opt("batch-size", 16)),
            max_memory=float(opt("max-memory")) if opt("max-memory") else None, device=str(opt("device", "")),
            backend=str(opt("backend", "auto")), threads=int(opt("threads")) if opt("threads") else None,
            seed=int(opt("seed", 0)), eval_data=Path(str(opt("eval-data"))) if opt("eval-data") else None,
            name=str(opt("name", "")), keep_model=Path(str(opt("keep-model"))) if opt("keep-model") else None,
            global_eval_data=Path(str(opt("global-eval-data"))) if opt("global-eval-data") else None,
        )  # fmt: skip

    def to_node_config(self) -> str:
        """The ``--node-config`` string (TOML values) that ``from_node_config`` reads back."""
        items: dict[str, Any] = {
            "data": str(self.data), "cache-dir": str(self.cache_dir), "bundle": str(self.bundle or ""),
            "text-columns": ",".join(self.text_columns), "label-column": self.label_column, "label-map": self.label_map,
            "skip-bad-rows": self.skip_bad_rows, "eval-fraction": self.eval_fraction, "tier": "auto" if self.tier is None else self.tier,
            "batch-size": self.batch_size, "max-memory": self.max_memory or 0.0, "device": self.device, "backend": self.backend,
            "threads": self.threads or 0, "seed": self.seed, "eval-data": str(self.eval_data or ""), "name": self.name,
            "keep-model": str(self.keep_model or ""), "global-eval-data": str(self.global_eval_data or ""),
        }  # fmt: skip
        return " ".join(f"{k}={_toml(v)}" for k, v in items.items())


def _read_plan(path: str) -> list[dict[str, Any]]:
    """The node configs of a simulation plan (``coordinator.simulate``), read once per process."""
    key = ("plan", path)
    if key not in _CACHE:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        _CACHE[key] = [dict(n["node_config"]) for n in data["nodes"]]
    return _CACHE[key]


_CACHE: dict[Any, Any] = {}
"""What a long-lived ClientApp process (a simulation's) keeps between messages: the plan, tokenised data,
evaluation sessions. A SuperNode's ClientApp process handles one message, so there it never hits."""


def _toml(v: Any) -> str:
    """A TOML value for Flower's ``--node-config 'k=v k2=v2'``. Flower splits that string with a regular expression
    in which a double-quoted value ends at the next ``"`` (``flwr.common.config.parse_config_args``), so a string is
    a TOML basic string with ``"`` and ``\\`` and every control character written as ``\\uXXXX``: any path or
    option reaches the device unchanged (checked against Flower's parser in tests/edge_runtime/test_client_app.py)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                         for c in str(v)) + '"'  # fmt: skip


# -- the device's bundle ---------------------------------------------------------------------------------------


def bundle_dir_for(node: NodeSettings, manifest: Manifest | None, mid: str) -> Path:
    """The pre-provisioned bundle, or this bundle's cache folder (with its manifest written on first contact).
    ``mid`` must be a bundle id (16 hex digits): it names a folder inside the cache, never a path out of it."""
    if node.bundle is not None:
        return node.bundle
    folder = node.cache_dir / check_manifest_id(mid, "bundle id")
    if manifest is not None and not (folder / "manifest.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        manifest.save(folder)
    return folder


def missing_files(bundle_dir: Path, entries: list[FileEntry]) -> list[FileEntry]:
    """Entries whose file is absent or differs from the manifest (a damaged cached file is fetched again)."""
    out = []
    for e in entries:
        path = bundle_dir / e.path
        if not path.is_file() or path.stat().st_size != e.size or sha256_file(path) != e.sha256:
            out.append(e)
    return out


def choose_node_tier(node: NodeSettings, manifest: Manifest, bundle_dir: Path, backend: str) -> tuple[int, int, str]:
    """(tier, batch size, reason): the node's fixed tier, or the choice remembered for this bundle, or a new choice
    from the manifest's measurements and this device's memory (remembered in the bundle folder)."""
    from edge_runtime.profile import choose_tier

    if node.tier is not None:
        manifest.tier(node.tier)
        return node.tier, node.batch_size, "fixed when the device joined (--tier, or chosen then from --bundle)"
    remembered = bundle_dir / TIER_FILE
    if remembered.is_file():
        d = json.loads(remembered.read_text(encoding="utf-8"))
        return int(d["tier"]), int(d["batch_size"]), str(d["reason"])
    device = _device_profile(node)
    choice = choose_tier(manifest, device, backend, node.batch_size, node.max_memory)
    remembered.write_text(json.dumps({"tier": choice.slots, "batch_size": choice.batch_size, "reason": choice.reason}) + "\n")
    return choice.slots, choice.batch_size, choice.reason


def write_chunks(folder: Path, mid: str, listed: list[dict[str, Any]], chunks: dict[str, bytes]) -> list[str]:
    """Write received pieces of bundle files into ``folder``; a file whose last piece arrived is checked against the
    manifest's size and sha256 and only then put in place (a mismatch deletes it and raises IntegrityError).
    Returns the files completed and verified."""
    entries = {e.path: e for e in load_manifest(folder).all_files()}
    done = []
    for c in listed:
        entry = entries.get(c["path"])
        if entry is None:
            raise ManifestError(f"artifact {printable(repr(c['path']), 80)} is not a file of bundle {mid}")
        data = chunks[c["key"]]
        if c["offset"] + len(data) > entry.size or (c["offset"] >= entry.size and entry.size > 0):
            raise MessageError(f"artifact {entry.path}: a piece of {len(data)} bytes at offset {c['offset']} does not fit its {entry.size} bytes")
        target = folder / entry.path
        part = target.with_name(target.name + ".part")
        _safe_parents(folder, part)
        part.parent.mkdir(parents=True, exist_ok=True)
        _write_piece(part, c["offset"], data)
        if c["offset"] + len(data) >= entry.size:
            actual = sha256_file(part)
            if part.stat().st_size != entry.size or actual != entry.sha256:
                part.unlink()
                raise IntegrityError(f"received {entry.path}: sha256 {actual} differs from the manifest's {entry.sha256}; discarded")
            os.replace(part, target)
            done.append(entry.path)
    return done


def _safe_parents(root: Path, path: Path) -> None:
    """Refuse to write ``path`` when a folder between ``root`` and it is a symbolic link (which could point out of
    the cache)."""
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise IntegrityError(f"{current} is a symbolic link; a bundle's folders in the cache must be real folders (delete it)")


def _write_piece(part: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the ``.part`` file, never following a symbolic link there (O_NOFOLLOW): a
    link planted in the cache cannot redirect the write to another file."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if offset == 0:
        flags |= os.O_TRUNC
    try:
        fd = os.open(part, flags, 0o644)
    except OSError as exc:
        raise IntegrityError(f"{part}: cannot be written ({exc}); a symbolic link there is refused") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.seek(offset)
        fh.write(data)


def _device_profile(node: NodeSettings):  # noqa: ANN202
    from devices import load_profile
    from edge_runtime.profile import measure_device

    return load_profile(node.device) if node.device else measure_device(1.0)


def _examples(node: NodeSettings, manifest: Manifest):  # noqa: ANN202
    """(train, held-out) examples of the node: its eval-data file, or a share of its data split with its seed."""
    from edge_runtime.data import DataSpec, load_examples, parse_label_map

    spec = DataSpec(node.text_columns, node.label_column, parse_label_map(node.label_map), skip_bad_rows=node.skip_bad_rows)
    examples = load_examples(node.data, spec, manifest.labels)
    if node.eval_data is not None:
        return examples, load_examples(node.eval_data, spec, manifest.labels)
    if node.eval_fraction > 0:
        return examples.split(node.eval_fraction, node.seed)
    return examples, None


def _encoded(node: NodeSettings, manifest: Manifest, bundle_dir: Path, max_len: int):  # noqa: ANN202
    """(train, held-out) examples tokenised, kept per process while the files are unchanged."""
    from edge_runtime.data import TextEncoder, encode_examples

    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (node.data, node.eval_data) if p is not None)
    key = ("data", node, stamp, str(bundle_dir), max_len)
    if key not in _CACHE:
        train_ex, held = _examples(node, manifest)
        encoder = TextEncoder(bundle_dir / Path(manifest.tokenizer_files[0].path).parent, max_len)
        _CACHE[key] = (encode_examples(train_ex, encoder), None if held is None else encode_examples(held, encoder))
    return _CACHE[key]


def _global_rows(node: NodeSettings, manifest: Manifest, bundle_dir: Path, max_len: int):  # noqa: ANN202
    """The node's ``global_eval_data`` tokenised, kept per process while the file is unchanged."""
    from edge_runtime.data import DataSpec, TextEncoder, encode_examples, load_examples, parse_label_map

    path = node.global_eval_data
    key = ("global", str(path), path.stat().st_mtime_ns, str(bundle_dir), max_len)
    if key not in _CACHE:
        spec = DataSpec(node.text_columns, node.label_column, parse_label_map(node.label_map))
        encoder = TextEncoder(bundle_dir / Path(manifest.tokenizer_files[0].path).parent, max_len)
        _CACHE[key] = encode_examples(load_examples(path, spec, manifest.labels), encoder)
    return _CACHE[key]


def keep_personal_model(session: Any, bundle_dir: Path, out: Path, round_: int, metrics: dict[str, float]) -> Path:
    """Write the session's tier (the personalised model) to ``out`` as an ONNX inference model with the bundle's
    config and tokenizer (``local.write_inference_model``, atomic), and ``evaluation.json`` beside it."""
    from edge_runtime.local import write_inference_model

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_inference_model(session, bundle_dir, out, {"evaluation.json": json.dumps({"round": round_, **metrics}, indent=1) + "\n"})


def reset_peak_rss() -> bool:
    """Start a new peak-memory window for this process (Linux: write 5 to /proc/self/clear_refs, which resets
    VmHWM to the current RSS). In a long-lived simulation worker this makes the peak that of one message, not of the
    worker's life. False where the kernel does not allow it; the peak then covers the process's life."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory(window: bool) -> dict[str, float]:
    """This process's resident memory now and its peak, MB: since ``reset_peak_rss`` when ``window`` (the message's
    own peak), else over the process's life (``peak_scope`` 1.0 for the message, 0.0 for the process)."""
    import resource

    import psutil

    from edge_runtime.measure import peak_rss_mb

    rss = psutil.Process().memory_info().rss / 2**20
    peak = peak_rss_mb() if window else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_mb": rss, "peak_rss_mb": max(rss, peak), "peak_scope": 1.0 if window else 0.0}


# -- the Flower app ----------------------------------------------------------------------------------------------


def _build_app():  # noqa: ANN202
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        from edge_runtime.backends import resolve_backend

        node = NodeSettings.from_context(dict(context.node_config), dict(context.run_config))
        manifest, mid = manifest_from_hello(msg.content)
        bundle_dir = bundle_dir_for(node, manifest, mid)
        if node.bundle is not None:
            mine = load_manifest(bundle_dir)
            from edge_runtime.update import manifest_id

            if manifest_id(mine) != mid:
                raise BundleError(f"{bundle_dir} is bundle {manifest_id(mine)}, but the coordinator serves bundle {mid}")
        backend, why = resolve_backend(node.backend)
        tier, batch, reason = choose_node_tier(node, manifest, bundle_dir, backend)
        train_ex, held = _examples(node, manifest)
        lacking = missing_files(bundle_dir, needed_files(manifest, tier, backend))
        if lacking and node.bundle is not None:
            raise BundleError(f"{bundle_dir}: {lacking[0].path} is missing or changed (pre-provisioned bundle; fix or drop --bundle)")
        reply = {
            "tier": tier, "batch_size": batch, "backend": backend, "tier_reason": reason, "backend_reason": why,
            "train_examples": len(train_ex), "eval_examples": 0 if held is None else len(held),
            "missing": [e.path for e in lacking], "missing_bytes": sum(e.size for e in lacking), "name": node.name,
        }  # fmt: skip
        return Message(hello_reply_to_record(reply), reply_to=msg)

    @app.query("artifacts")
    def artifacts(msg: Message, context: Context) -> Message:
        node = NodeSettings.from_context(dict(context.node_config), dict(context.run_config))
        meta, chunks = artifacts_from_record(msg.content)
        if node.bundle is not None:
            raise BundleError(f"this device uses the pre-provisioned bundle {node.bundle} (--bundle) and accepts no files from the coordinator")
        folder = bundle_dir_for(node, None, str(meta["manifest_id"]))
        done = write_chunks(folder, str(meta["manifest_id"]), meta["chunks"], chunks)
        return Message(hello_reply_to_record({"verified": done}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from edge_runtime.faults import reach

        reach("client.train")
        return Message(_run(msg.content, NodeSettings.from_context(dict(context.node_config), dict(context.run_config)), training=True), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(_run(msg.content, NodeSettings.from_context(dict(context.node_config), dict(context.run_config)), training=False), reply_to=msg)

    @app.query("statistics")
    def statistics(msg: Message, context: Context) -> Message:
        node = NodeSettings.from_context(dict(context.node_config), dict(context.run_config))
        return Message(_run(msg.content, node, training=False, statistics=True), reply_to=msg)

    return app


def drop_eval_sessions(keep: Any = None) -> None:
    """Release the cached evaluation sessions except ``keep``. A simulation worker serves devices of every tier; kept
    sessions of other tiers would add their memory to the next message's peak (measured: per-message peaks grew from
    0.7-0.9 GB to 1.4-1.8 GB after the first evaluation round of a MiniLM run), which no real device would see."""
    dropped = [k for k in _CACHE if isinstance(k, tuple) and k[:1] == ("eval-session",) and k != keep]
    for k in dropped:
        del _CACHE[k]
    if dropped:
        from edge_runtime.backends import trim_heap

        gc.collect()
        trim_heap()


def _run(content: Any, node: NodeSettings, training: bool, statistics: bool = False) -> Any:
    """One train, evaluate or statistics message: open the tier, load the instruction's values, then train, evaluate
    on the held-out share, or sum the closed-form head's statistics over the training rows."""
    import time

    from edge_runtime.backends import resolve_backend
    from edge_runtime.session import TierSession, TrainConfig
    from edge_runtime.update import manifest_id

    started = time.perf_counter()
    window = reset_peak_rss()
    start_rss = _memory(window)["rss_mb"]
    ins = instruction_from_record(content)
    bundle_dir = bundle_dir_for(node, None, ins.manifest_id)
    manifest = load_manifest(bundle_dir)
    if manifest_id(manifest) != ins.manifest_id:
        raise MessageError(f"instruction is for bundle {ins.manifest_id}; {bundle_dir} holds {manifest_id(manifest)}")
    backend, _ = resolve_backend(node.backend)
    # Training needs a fresh session: ONNX Runtime keeps AdamW's moments in the session and cannot reset them. An
    # evaluation changes nothing, so a long-lived process reuses one session per tier for it.
    key = ("eval-session", str(bundle_dir), ins.manifest_id, ins.tier, backend, node.threads)
    drop_eval_sessions(keep=None if training else key)  # a device holds one tier's session at a time, and none while training
    session = None if training else _CACHE.get(key)
    if session is None:
        session = TierSession(bundle_dir, manifest, ins.tier, backend, node.threads, with_pool=False)
        if not training:
            _CACHE[key] = session
    session.load_global(ins.values, ins.assignment, ins.routing_target)
    s = ins.train
    max_len = int(s.get("max_seq_len") or manifest.max_seq_len)
    train_data, held = _encoded(node, manifest, bundle_dir, max_len)
    received = sum(int(v.nbytes) for v in ins.values.values())
    _, device_batch, _ = choose_node_tier(node, manifest, bundle_dir, backend)  # the batch its memory affords (as its hello said)
    batch = max(1, min(int(s.get("batch_size", 16)), device_batch))
    if statistics:
        stats = session.head_statistics(train_data, batch)
        return statistics_to_record(stats, ins.round, {"seconds": time.perf_counter() - started, "received_bytes": float(received)})
    if not training:
        metrics = session.evaluate(held, batch) if held is not None else {"examples": 0.0}
        if s.get("global_eval") and node.global_eval_data is not None:
            rows = _global_rows(node, manifest, bundle_dir, max_len)
            metrics.update({f"global_{k}": v for k, v in session.evaluate(rows, batch).items()})
        if node.keep_model is not None:
            keep_personal_model(session, bundle_dir, node.keep_model, ins.round, metrics)
        return metrics_to_record(ins.round, {**metrics, "received_bytes": float(received), "seconds": time.perf_counter() - started})
    config = TrainConfig(
        epochs=int(s.get("epochs", 1)), max_steps=int(s["max_steps"]) if s.get("max_steps") else None, batch_size=batch,
        learning_rate=float(s.get("learning_rate", 1e-3)), seed=int(s.get("seed", 0)) + ins.round, max_seq_len=max_len,
    )  # fmt: skip
    frozen = tuple(n for n in session.tier.trainable_names if n.startswith("head.")) if s.get("freeze_head") else ()
    session.set_label_prior(train_data.labels, float(s.get("logit_adjust") or 0.0))
    result = session.train(train_data, config, frozen=frozen)
    metrics = {"train_loss": result.mean_loss, "train_seconds": result.seconds, "steps": float(result.steps),
               "received_bytes": float(received), "seconds": time.perf_counter() - started, "start_rss_mb": start_rss, **_memory(window)}  # fmt: skip
    update = session.update(result.examples, result.stats, metrics)
    return update_to_record(update, ins.round)


app = _build_app()
