"""``fftmoe-edge``: the device side: profile the device, verify a bundle, train a tier locally, evaluate."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from edge_runtime.bundle import BundleError, IntegrityError, load_manifest, verify_bundle

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGS = 2
EXIT_INVALID = 3
EXIT_NO_FIT = 5
EXIT_INTERRUPTED = 130

app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


@app.callback()
def _root() -> None:
    """fftmoe edge runtime: train a tier of MoE experts on this device."""


@app.command(epilog="Exit codes: 0 the bundle is intact; 3 the manifest is invalid or a file is missing or changed.")
def verify(
    bundle: Path = typer.Option(..., help="Bundle folder written by fftmoe-export."),
    tier: Optional[list[int]] = typer.Option(None, help="Verify only this tier's files (repeatable); default all tiers."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check the manifest and the sha256 of every file of the bundle (or of the given tiers and the shared files)."""
    try:
        manifest = verify_bundle(bundle, tier or None)
    except BundleError as exc:
        kind = "integrity" if isinstance(exc, IntegrityError) else "manifest"
        if json_out:
            print(json.dumps({"ok": False, "error": kind, "message": str(exc)}))
        else:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_INVALID) from None
    tiers = sorted(tier) if tier else sorted(manifest.tiers)
    if json_out:
        print(json.dumps({"ok": True, "bundle": str(bundle), "tiers": tiers}))
    else:
        Console().print(f"ok: {bundle} ({manifest.model.model_type}, tiers {', '.join(map(str, tiers))} verified)", highlight=False)


# ---------------------------------------------------------------------------------------------------------------
# Shared option handling


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int, json_out: bool = False, kind: str = "error") -> None:
    if json_out:
        print(json.dumps({"ok": False, "error": kind, "message": message}))
    else:
        _err().print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _device(device: Optional[str], compute_seconds: float = 1.0):
    from devices import ProfileError, load_profile
    from edge_runtime.profile import measure_device

    if device is None:
        return measure_device(compute_seconds)
    try:
        return load_profile(device)
    except ProfileError as exc:
        _fail(str(exc), EXIT_BAD_ARGS)


def _profile_dict(dev) -> dict:
    return {
        "name": dev.name, "description": dev.description, "arch": dev.arch, "cores": dev.cores,
        "max_freq_mhz": round(dev.max_freq_mhz), "memory_total_mb": round(dev.memory_total_mb),
        "memory_available_mb": round(dev.memory_available_mb), "compute_gflops": round(dev.compute_gflops, 2),
        "ort_training": dev.ort_training_wheel, "source": "measured" if dev.measured else "profile",
    }  # fmt: skip


def _choice_dict(choice) -> dict:
    return {
        "tier": choice.slots, "batch_size": choice.batch_size, "backend": choice.backend,
        "budget_mb": round(choice.budget_mb), "reason": choice.reason,
        "estimates": [
            {"tier": e.slots, "batch_size": e.batch_size, "memory_mb": None if e.memory_mb is None else round(e.memory_mb),
             "step_time_s": None if e.step_time_s is None else round(e.step_time_s, 3), "fits": e.fits, "reason": e.reason}
            for e in choice.estimates
        ],
    }  # fmt: skip


BUNDLE_HELP = "Bundle folder written by fftmoe-export."
DEVICE_HELP = "Use a board profile instead of measuring this machine: a name (see docs/devices.md, e.g. rpi-4-4gb) or a .json file."
MAX_MEMORY_HELP = "Cap the memory budget (MB) below what is available, e.g. to leave room for other programs."
BACKEND_HELP = "Training backend: auto (ONNX Runtime where its training API imports, else PyTorch), ort or torch."


@app.command(epilog="Exit codes: 0 done; 2 invalid arguments; 3 invalid bundle; 5 no tier of the bundle fits this device.")
def profile(
    bundle: Optional[Path] = typer.Option(None, help=BUNDLE_HELP + " With it, also say which tier this device would train and why."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    max_memory: Optional[float] = typer.Option(None, help=MAX_MEMORY_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    batch_size: int = typer.Option(16, help="Batch size to plan for (halved down to 4 when no tier fits at it)."),
    max_seq_len: Optional[int] = typer.Option(None, help="Plan for rows truncated to this many tokens (default: the bundle's maximum)."),
    compute_seconds: float = typer.Option(1.0, help="How long to measure the compute rate (matrix multiplies), seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Measure this device's memory, cores and compute (or read a board profile) and, with --bundle, choose a tier.

    A tier's expected memory and step time are scaled from the figures the exporter measured; the largest tier whose
    memory fits the budget (available memory less a 15% safety margin) is chosen. The rule is in docs/edge-runtime.md.
    """
    from edge_runtime.backends import resolve_backend
    from edge_runtime.bundle import load_manifest
    from edge_runtime.profile import SAFETY_MARGIN, TierChoiceError, choose_tier

    dev = _device(device, compute_seconds)
    out: dict = {"ok": True, "device": _profile_dict(dev)}
    choice_error = None
    if device is not None:
        backend_name = "ort" if (dev.ort_training_wheel and backend != "torch") else "torch"
        why = "profile: " + ("ONNX Runtime training wheel exists" if backend_name == "ort" else "no ONNX Runtime training wheel, PyTorch")
    else:
        from edge_runtime.ort_backend import ort_build

        try:
            backend_name, why = resolve_backend(backend)
        except (ValueError, RuntimeError) as exc:
            _fail(str(exc), EXIT_BAD_ARGS, json_out)
        out["onnxruntime"] = ort_build().describe()
    out["backend"], out["backend_reason"] = backend_name, why
    if bundle is not None:
        try:
            manifest = load_manifest(bundle)
        except BundleError as exc:
            _fail(str(exc), EXIT_INVALID, json_out, "manifest")
        try:
            choice = choose_tier(manifest, dev, backend_name, batch_size, max_memory, seq_len=max_seq_len)
            out["choice"] = _choice_dict(choice)
        except TierChoiceError as exc:
            choice_error = str(exc)
            out.update(ok=False, error="no_fit", message=choice_error)
    if json_out:
        print(json.dumps(out, indent=2))
    else:
        con = Console()
        d = out["device"]
        table = Table(title=f"device: {d['name']} ({d['source']})", show_header=False)
        for key, label in (("description", "system"), ("arch", "architecture"), ("cores", "cores"),
                           ("max_freq_mhz", "max frequency, MHz"), ("memory_total_mb", "memory total, MB"),
                           ("memory_available_mb", "memory available, MB"), ("compute_gflops", "fp32 matmul, GFLOP/s"),
                           ("ort_training", "ONNX Runtime training")):  # fmt: skip
            table.add_row(label, str(d[key]))
        if "onnxruntime" in out:
            table.add_row("onnxruntime", out["onnxruntime"])
        # the ORT line above already says what was found; a PyTorch choice says why
        table.add_row("backend", out["backend"] if out["backend"] == "ort" else f"{out['backend']}: {out['backend_reason']}")
        con.print(table)
        if "choice" in out:
            c = out["choice"]
            t = Table(title=f"tiers (backend {c['backend']}, budget {c['budget_mb']} MB = available less {SAFETY_MARGIN:.0%})")
            for col in ("tier", "batch", "expected MB", "expected step s", "fits"):
                t.add_column(col, justify="right")
            for e in c["estimates"]:
                t.add_row(str(e["tier"]), str(e["batch_size"]), str(e["memory_mb"]), str(e["step_time_s"]), "yes" if e["fits"] else "no")
            con.print(t)
            con.print(f"chosen: tier {c['tier']}, batch {c['batch_size']} — {c['reason']}", highlight=False)
        if choice_error:
            _err().print(f"[red]no tier fits:[/red] {choice_error}", highlight=False)
    if choice_error:
        raise typer.Exit(EXIT_NO_FIT)


def _load_data(manifest, bundle: Path, data: Path, text_column: list[str], label_column: str, label_map: Optional[str],
               skip_bad_rows: bool, json_out: bool):  # fmt: skip
    from edge_runtime.data import DataError, DataSpec, load_examples, parse_label_map

    if manifest.model.modality != "text":
        _fail(f"{bundle}: a {manifest.model.modality} bundle; local data files are text classification only for now", EXIT_BAD_ARGS, json_out)
    try:
        spec = DataSpec(tuple(text_column), label_column, parse_label_map(label_map), skip_bad_rows=skip_bad_rows)
        return load_examples(data, spec, manifest.labels)
    except DataError as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out, "data")


def optimizer_state_fits(manifest, choice, backend: str) -> tuple[bool, str]:  # noqa: ANN001
    """Whether saving ORT's full checkpoint (about twice its size, transiently) fits the budget beside training."""
    if backend != "ort":
        return True, ""
    estimate = next((e for e in choice.estimates if e.slots == choice.slots), None)
    if estimate is None or estimate.memory_mb is None:
        return True, ""
    need = estimate.memory_mb + 2 * manifest.tier(choice.slots).files["checkpoint"].size / 1e6
    if need <= choice.budget_mb:
        return True, ""
    return False, f"it would need ~{need:.0f} MB against a budget of {choice.budget_mb:.0f} MB; --optimizer-state forces it"


TEXT_COLUMN_HELP = "Column(s) holding the text; repeat to join several (e.g. --text-column title --text-column description)."
LABEL_MAP_HELP = "Map data label values to the bundle's labels, e.g. 1=World,2=Sports,3=Business,4=Sci/Tech."


@app.command(epilog="Exit codes: 0 done; 1 training failed; 2 invalid arguments or data; 3 invalid bundle or state; "
                    "5 no tier fits this device; 130 interrupted (state saved; continue with --resume).")  # fmt: skip
def train(
    bundle: Path = typer.Option(..., help=BUNDLE_HELP),
    data: Path = typer.Option(..., help="Training data: .csv, .tsv, .jsonl or .parquet with a text and a label column."),
    out: Path = typer.Option(Path("runs/edge-train"), help="Run folder: resumable state, the update, the trained inference model, history.png."),
    text_column: list[str] = typer.Option(["text"], help=TEXT_COLUMN_HELP),
    label_column: str = typer.Option("label", help="Column holding the label."),
    label_map: Optional[str] = typer.Option(None, help=LABEL_MAP_HELP),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count malformed rows instead of stopping at the first."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out data file (same columns); default: --eval-fraction of --data."),
    eval_fraction: float = typer.Option(0.1, help="Share of --data held out for evaluation when --eval-data is not given (0 turns it off)."),
    epochs: int = typer.Option(1, help="Passes over the training data."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps in total."),
    batch_size: int = typer.Option(16, help="Examples per step (lowered automatically if the chosen tier needs it)."),
    max_seq_len: Optional[int] = typer.Option(None, help="Truncate rows to this many tokens (default and upper bound: the bundle's maximum); shorter rows need less memory."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    seed: int = typer.Option(0, help="Seed of the data order and of the hold-out split."),
    tier: Optional[int] = typer.Option(None, help="Train this tier instead of the largest that fits (no memory check)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    max_memory: Optional[float] = typer.Option(None, help=MAX_MEMORY_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, help="Compute threads (default: all cores)."),
    save_every: int = typer.Option(200, help="Also save the state every this many steps (0: only per epoch and on Ctrl-C)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out (same bundle, tier, batch size and seed)."),
    optimizer_state: Optional[bool] = typer.Option(
        None, "--optimizer-state/--no-optimizer-state",
        help="Save AdamW's moments with each checkpoint so that --resume continues exactly. With ONNX Runtime that writes "
             "the whole model and briefly needs about twice its size; default: on when the memory budget has room for it.",
    ),  # fmt: skip
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (no progress bars)."),
) -> None:
    """Fine-tune a tier of the bundle's experts on local data, without a server.

    Picks the largest tier that fits this device (or --tier), loads global experts 0..t-1 into the slots, trains
    with ONNX Runtime (PyTorch where ORT training is unavailable), evaluates after each epoch, and writes
    OUT/update.safetensors, OUT/model/ (ONNX inference model) and OUT/history.png. Ctrl-C saves the state.
    """
    import signal

    from safetensors.numpy import load_file

    from edge_runtime.backends import resolve_backend
    from edge_runtime.data import TextEncoder, encode_examples
    from edge_runtime.local import StateError, train_local
    from edge_runtime.profile import TierChoiceError, choose_tier
    from edge_runtime.session import TierSession, TrainConfig, TrainingError
    from edge_runtime.update import default_assignment

    err = _err()
    try:
        config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, learning_rate=lr, seed=seed, max_seq_len=max_seq_len)
        backend_name, backend_why = resolve_backend(backend)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out)
    except RuntimeError as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out, "backend")
    try:
        manifest = load_manifest(bundle)
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "manifest")
    examples = _load_data(manifest, bundle, data, text_column, label_column, label_map, skip_bad_rows, json_out)
    if eval_data is not None:
        held = _load_data(manifest, bundle, eval_data, text_column, label_column, label_map, skip_bad_rows, json_out)
        train_ex = examples
    elif eval_fraction > 0:
        from edge_runtime.data import DataError

        try:
            train_ex, held = examples.split(eval_fraction, seed)
        except DataError as exc:
            _fail(str(exc), EXIT_BAD_ARGS, json_out, "data")
    else:
        train_ex, held = examples, None
    if not json_out:
        if backend_name != "ort" or backend != "auto":
            err.print(f"backend: {backend_why}", highlight=False)
        if examples.skipped:
            err.print(f"[yellow]skipped {len(examples.skipped)} malformed row(s)[/yellow], first: {examples.skipped[0]}", highlight=False)
    dev = _device(device)
    try:
        if max_seq_len is not None and not 2 <= max_seq_len <= manifest.max_seq_len:
            _fail(f"--max-seq-len must be in 2..{manifest.max_seq_len} (the bundle's maximum), got {max_seq_len}", EXIT_BAD_ARGS, json_out)
        choice = choose_tier(manifest, dev, backend_name, batch_size, max_memory, tier, seq_len=max_seq_len)
    except TierChoiceError as exc:
        _fail(str(exc), EXIT_NO_FIT, json_out, "no_fit")
    except BundleError as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out)
    if choice.batch_size != config.batch_size:
        config = dataclasses.replace(config, batch_size=choice.batch_size)
    if optimizer_state is None:
        optimizer_state, why_not = optimizer_state_fits(manifest, choice, backend_name)
        if not optimizer_state and not json_out:
            err.print(f"optimizer state not saved with checkpoints ({why_not}); --resume restarts AdamW's moments", highlight=False)
    config = dataclasses.replace(config, save_optimizer=optimizer_state)
    if not json_out:
        err.print(f"tier {choice.slots}, batch {config.batch_size}: {choice.reason}", highlight=False)
    try:
        session = TierSession(bundle, manifest, choice.slots, backend_name, threads)
        pool = load_file(str(bundle / manifest.global_pool.path))
        session.load(pool, default_assignment(manifest, choice.slots))
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "integrity")
    encoder = TextEncoder(bundle / Path(manifest.tokenizer_files[0].path).parent, max_seq_len or manifest.max_seq_len)
    train_enc = encode_examples(train_ex, encoder)
    eval_enc = encode_examples(held, encoder) if held is not None else None

    stop = {"requested": False}

    def on_sigint(_sig, _frame) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        err.print("\nstopping after this step and saving the state (Ctrl-C again to abort without saving)", highlight=False)

    previous = signal.signal(signal.SIGINT, on_sigint)
    per_epoch = (len(train_enc) + config.batch_size - 1) // config.batch_size
    try:
        if json_out:
            state = train_local(session, bundle, out, train_enc, eval_enc, config, resume, save_every,
                                should_stop=lambda: stop["requested"])  # fmt: skip
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            from edge_runtime.console import progress_bar

            with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                              TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False) as bar:  # fmt: skip
                tasks: dict[int, int] = {}

                def on_step(r) -> None:
                    if r.epoch not in tasks:
                        tasks[r.epoch] = bar.add_task(f"epoch {r.epoch + 1}/{config.epochs}", total=r.batches_per_epoch,
                                                      completed=r.batch_in_epoch - 1, loss="-")  # fmt: skip
                    bar.update(tasks[r.epoch], completed=r.batch_in_epoch, loss=f"{r.loss:.4f}")
                    if not bar.console.is_terminal and r.batch_in_epoch % max(1, r.batches_per_epoch // 10) == 0:
                        # no live bar in a log file: a line every tenth of an epoch instead
                        bar.console.print(f"epoch {r.epoch + 1}: batch {r.batch_in_epoch}/{r.batches_per_epoch}, "
                                          f"step {r.step}, loss {r.loss:.4f}", highlight=False)  # fmt: skip

                def on_epoch(h) -> None:
                    acc = f", eval accuracy {h['eval_accuracy']:.4f}, eval loss {h['eval_loss']:.4f}" if "eval_accuracy" in h else ""
                    bar.console.print(f"epoch {int(h['epoch'])}: train loss {h['train_loss']:.4f}{acc} ({h['seconds']:.0f} s)", highlight=False)

                state = train_local(session, bundle, out, train_enc, eval_enc, config, resume, save_every,
                                    on_step=on_step, on_epoch=on_epoch, should_stop=lambda: stop["requested"])  # fmt: skip
    except StateError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "state")
    except TrainingError as exc:
        _fail(f"{exc}; the state saved before is in {out}", EXIT_FAILED, json_out, "training")
    finally:
        signal.signal(signal.SIGINT, previous)
    result = {
        "ok": True, "finished": state.finished, "tier": choice.slots, "backend": backend_name, "backend_reason": backend_why,
        "batch_size": config.batch_size,
        "train_examples": len(train_enc), "eval_examples": len(eval_enc) if eval_enc is not None else 0,
        "skipped_rows": len(examples.skipped), "steps": state.step, "epochs_done": state.epoch, "history": state.history,
        "out": str(out), "batches_per_epoch": per_epoch,
    }  # fmt: skip
    if not state.finished:
        result.update(ok=False, error="interrupted", message=f"state saved in {out}; continue with --resume")
        if json_out:
            print(json.dumps(result))
        else:
            err.print(f"interrupted at epoch {state.epoch + 1}, batch {state.batch_in_epoch}: state saved in {out}; continue with --resume",
                      highlight=False)  # fmt: skip
        raise typer.Exit(EXIT_INTERRUPTED)
    if json_out:
        print(json.dumps(result))
    else:
        Console().print(f"done: {out}/update.safetensors, {out}/model/ (ONNX inference model), {out}/history.png", highlight=False)


@app.command(epilog="Exit codes: 0 done; 2 invalid arguments or data; 3 invalid bundle.")
def evaluate(
    bundle: Path = typer.Option(..., help=BUNDLE_HELP),
    data: Path = typer.Option(..., help="Data file to evaluate on (.csv, .tsv, .jsonl, .parquet)."),
    weights: Optional[Path] = typer.Option(None, help="A run folder of `fftmoe-edge train` (its weights and tier) or an update file; default: the bundle's initial weights."),
    tier: Optional[int] = typer.Option(None, help="Tier to evaluate with when --weights is not given (default: the smallest)."),
    text_column: list[str] = typer.Option(["text"], help=TEXT_COLUMN_HELP),
    label_column: str = typer.Option("label", help="Column holding the label."),
    label_map: Optional[str] = typer.Option(None, help=LABEL_MAP_HELP),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count malformed rows."),
    batch_size: int = typer.Option(64, help="Examples per evaluation batch."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, help="Compute threads (default: all cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Accuracy and cross-entropy of a tier on a data file, with the bundle's eval model."""
    from safetensors.numpy import load_file

    from edge_runtime.backends import resolve_backend
    from edge_runtime.data import TextEncoder, encode_examples
    from edge_runtime.local import STATE_FILE, StateError, read_run
    from edge_runtime.session import TierSession
    from edge_runtime.update import Update, UpdateError, default_assignment

    try:
        backend_name, _ = resolve_backend(backend)
        manifest = load_manifest(bundle)
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "manifest")
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out)
    examples = _load_data(manifest, bundle, data, text_column, label_column, label_map, skip_bad_rows, json_out)
    values = None
    if weights is not None and (weights / STATE_FILE).is_file():
        try:
            run, values, _ = read_run(weights)
        except StateError as exc:
            _fail(str(exc), EXIT_INVALID, json_out, "state")
        tier, assignment = run.tier, run.assignment
    elif weights is not None:
        try:
            upd = Update.load(weights).validate(manifest)
        except UpdateError as exc:
            _fail(str(exc), EXIT_INVALID, json_out, "update")
        tier, assignment = upd.tier, upd.assignment
    else:
        tier = tier or min(manifest.tiers)
        assignment = default_assignment(manifest, tier)
    try:
        session = TierSession(bundle, manifest, tier, backend_name, threads)
        session.load(load_file(str(bundle / manifest.global_pool.path)), assignment)
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "integrity")
    if values is not None:
        session.set_values(values)
    elif weights is not None:  # an update: its experts, router rows and head replace the pool's
        session.set_values(upd.tier_values(manifest))
    encoder = TextEncoder(bundle / Path(manifest.tokenizer_files[0].path).parent, manifest.max_seq_len)
    metrics = session.evaluate(encode_examples(examples, encoder), batch_size)
    result = {"ok": True, "tier": tier, "backend": backend_name, "examples": int(metrics["examples"]),
              "accuracy": metrics["accuracy"], "loss": metrics["loss"], "skipped_rows": len(examples.skipped)}  # fmt: skip
    if json_out:
        print(json.dumps(result))
    else:
        Console().print(f"tier {tier}: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} on {result['examples']} examples",
                        highlight=False)  # fmt: skip


@app.command(epilog="Exit codes: 1 no connection to the coordinator for --retry-seconds; 2 invalid arguments or data; "
                    "3 invalid bundle; 5 no tier fits this device; 130 stopped with Ctrl-C or SIGTERM.")  # fmt: skip
def join(
    server: str = typer.Option(..., help="The coordinator's SuperLink as HOST:PORT (what `fftmoe-coordinator serve` prints)."),
    data: Path = typer.Option(..., help="Local training data: .csv, .tsv, .jsonl or .parquet with a text and a label column."),
    text_column: list[str] = typer.Option(["text"], help=TEXT_COLUMN_HELP),
    label_column: str = typer.Option("label", help="Column holding the label."),
    label_map: Optional[str] = typer.Option(None, help=LABEL_MAP_HELP),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count malformed rows instead of refusing the data."),
    eval_fraction: float = typer.Option(0.1, help="Share of --data held out for federated evaluation (never trained on)."),
    tier: str = typer.Option("auto", help="auto: the largest tier that fits this device (from the bundle's measurements), or a tier number."),
    bundle: Optional[Path] = typer.Option(None, help="A pre-provisioned bundle; without it the device fetches only its tier's files from the coordinator."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "fftmoe" / "bundles", help="Where fetched bundle files are kept and verified."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    max_memory: Optional[float] = typer.Option(None, help=MAX_MEMORY_HELP),
    batch_size: int = typer.Option(16, help="Largest local batch (lowered automatically when the chosen tier needs it)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, help="Compute threads (default: all cores)."),
    seed: int = typer.Option(0, help="Seed of the held-out split."),
    insecure: bool = typer.Option(False, "--insecure", help="Connect without TLS (only for a coordinator started with --insecure)."),
    root_certificates: Optional[Path] = typer.Option(None, help="The CA certificate (PEM) that signed the coordinator's certificate."),
    auth_key: Optional[Path] = typer.Option(None, help="This device's private key (ECDSA) when the coordinator authenticates devices."),
    local_port: int = typer.Option(0, help="Port of this SuperNode's local runtime API (0: a free one; several nodes on one host need distinct ports)."),
    home: Optional[Path] = typer.Option(None, help="Flower's working folder for this node (default: CACHE_DIR/supernode-PORT)."),
    retry_seconds: float = typer.Option(120.0, help="Keep retrying this long when the coordinator refuses or cannot be reached yet."),
    name: str = typer.Option("", help="A name for this device in the coordinator's log and history.json (default: none; the coordinator shows node ids)."),
    keep_model: Optional[Path] = typer.Option(None, help="Write this device's personalised model here after each federated evaluation (the last one stays): its experts, router rows and head as an ONNX inference model that optimum loads, with evaluation.json."),
    json_out: bool = typer.Option(False, "--json", help="Print the device's choice as JSON before the SuperNode starts."),
) -> None:
    """Join a federation: profile this device, pick its tier, and run a Flower SuperNode with fftmoe's client app.

    Each round the coordinator sends the experts assigned to this device's slots; the device trains them on
    --data with ONNX Runtime (PyTorch where that is unavailable) and sends back only its tier's tensors. Runs
    until Ctrl-C; when the coordinator goes away (a restart with --resume), it reconnects.
    """
    import signal

    from coordinator.deploy import free_port, stop, supernode_command
    from edge_runtime.backends import resolve_backend
    from edge_runtime.client_app import NodeSettings
    from edge_runtime.profile import TierChoiceError, choose_tier

    err = _err()
    if insecure == (root_certificates is not None):
        _fail("give either --insecure or --root-certificates CA.pem (the coordinator's CA)", EXIT_BAD_ARGS, json_out)
    for flag, path in (("--root-certificates", root_certificates), ("--auth-key", auth_key)):
        if path is not None and not path.is_file():
            _fail(f"{flag} {path}: no such file", EXIT_BAD_ARGS, json_out)
    if ":" not in server:
        _fail(f"--server must be HOST:PORT, got {server!r}", EXIT_BAD_ARGS, json_out)
    if not 0 <= eval_fraction < 1:
        _fail(f"--eval-fraction must be in [0, 1), got {eval_fraction}", EXIT_BAD_ARGS, json_out)
    try:
        tier_n = None if tier == "auto" else int(tier)
        backend_name, backend_why = resolve_backend(backend)
    except ValueError:
        _fail(f"--tier must be auto or a number, got {tier!r}", EXIT_BAD_ARGS, json_out)
    except RuntimeError as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out, "backend")
    dev = _device(device)
    info: dict = {"ok": True, "device": _profile_dict(dev), "backend": backend_name, "backend_reason": backend_why}
    if bundle is not None:  # check everything locally now rather than at the first round
        try:
            manifest = verify_bundle(bundle, [tier_n] if tier_n else None, encoder=backend_name == "torch")
            choice = choose_tier(manifest, dev, backend_name, batch_size, max_memory, tier_n)
        except BundleError as exc:
            _fail(str(exc), EXIT_INVALID, json_out, "bundle")
        except TierChoiceError as exc:
            _fail(str(exc), EXIT_NO_FIT, json_out, "no_fit")
        examples = _load_data(manifest, bundle, data, text_column, label_column, label_map, skip_bad_rows, json_out)
        tier_n, batch_size = choice.slots, choice.batch_size
        info.update(choice=_choice_dict(choice), examples=len(examples))
    elif not data.is_file():
        _fail(f"--data {data}: no such file", EXIT_BAD_ARGS, json_out, "data")
    node = NodeSettings(
        data=data.resolve(), cache_dir=cache_dir.resolve(), bundle=bundle.resolve() if bundle else None, text_columns=tuple(text_column),
        label_column=label_column, label_map=label_map or "", skip_bad_rows=skip_bad_rows, eval_fraction=eval_fraction, tier=tier_n,
        batch_size=batch_size, max_memory=max_memory, device=device or "", backend=backend, threads=threads, seed=seed, name=name,
        keep_model=keep_model.resolve() if keep_model else None,
    )  # fmt: skip
    port = local_port or free_port()
    home = home or cache_dir / f"supernode-{port}"
    cmd = supernode_command(server, node.to_node_config(), port, root_certificates.resolve() if root_certificates else None,
                            auth_key.resolve() if auth_key else None, max_wait=retry_seconds)  # fmt: skip
    if json_out:
        print(json.dumps({**info, "tier": tier_n, "batch_size": batch_size, "server": server, "home": str(home)}))
    else:
        what = f"tier {tier_n}, batch {batch_size}" if tier_n else "tier chosen when the coordinator's manifest arrives"
        err.print(f"device {dev.name}: {dev.memory_available_mb:.0f} MB available, {dev.cores} cores; backend {backend_name}; {what}", highlight=False)
        err.print(f"joining {server} ({'insecure' if insecure else 'TLS'}{', authenticated' if auth_key else ''}); Flower's log: {home}/supernode.log", highlight=False)
    stopping = {"flag": False}
    running: dict[str, subprocess.Popen] = {}

    def on_signal(_sig, _frame) -> None:
        stopping["flag"] = True
        stop(running.get("proc"))

    previous = signal.signal(signal.SIGINT, on_signal)
    previous_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        code = _keep_supernode_running(cmd, home, retry_seconds, lambda: stopping["flag"], running)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        stop(running.get("proc"))
    if stopping["flag"]:
        raise typer.Exit(EXIT_INTERRUPTED)
    _fail(f"no connection to {server} for {retry_seconds:.0f} s (last SuperNode exit code {code}); see {home}/supernode.log",
          EXIT_FAILED, json_out, "supernode")


RESTART_PAUSE_S = 3.0
"""How long ``join`` waits between a SuperNode's exit and its restart."""


def _keep_supernode_running(cmd: list[str], home: Path, retry_seconds: float, stopping: Callable[[], bool],
                            running: dict[str, subprocess.Popen]) -> int:  # fmt: skip
    """Run the SuperNode ``cmd`` (log: HOME/supernode.log) and start it again each time it exits; the last exit code.

    A SuperNode serves run after run; it exits only when it lost the SuperLink (a coordinator restarting with
    --resume, a network outage) or was refused. It is restarted until ``stopping()``, until Flower's own retries
    (``--max-wait-time``) ran out, or until ``retry_seconds`` passed since the last start that got a node ID.
    ``running["proc"]`` is the live process, for a signal handler to stop."""
    import time

    from coordinator.deploy import flower_env

    deadline = time.monotonic() + retry_seconds
    while True:
        env = flower_env(home)  # also creates the folder
        log_path = home / "supernode.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            running["proc"] = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            code = _wait_supernode(running["proc"], log_path, log_start)
        if stopping() or _gave_up(log_path, log_start):
            return code
        if _connected(log_path, log_start):  # it had been connected: a fresh retry window
            deadline = time.monotonic() + retry_seconds
        if time.monotonic() > deadline:
            return code
        _err().print(f"the SuperNode exited (code {code}; see {log_path}); reconnecting", highlight=False)
        time.sleep(RESTART_PAUSE_S)


GAVE_UP_GRACE_S = 15.0
"""How long a SuperNode may linger after logging its end (``_finished``) before ``join`` stops it."""

# Lines of Flower 1.41's SuperNode log that ``join`` acts on.
GAVE_UP = b"Giving up reconnection"  # its retries (--max-wait-time) ran out (the SuperExec logs it too: ``_gave_up``)
TERMINATED = b"SuperNode terminated"  # it stopped: the SuperLink forgot the node (a restart answers its heartbeat 401)
NODE_ID = b"SuperNode ID:"  # the SuperLink gave it a node ID


def _log_tail(log_path: Path, log_start: int) -> bytes:
    """The SuperNode's log after byte ``log_start``: what this start of it wrote."""
    with open(log_path, "rb") as log_file:
        log_file.seek(log_start)
        return log_file.read()


def _logged(log_path: Path, log_start: int, *texts: bytes) -> bool:
    """Whether the SuperNode's log holds any of ``texts`` after byte ``log_start`` (this start of it)."""
    tail = _log_tail(log_path, log_start)
    return any(t in tail for t in texts)


def _gave_up(log_path: Path, log_start: int) -> bool:
    """Whether this start of the SuperNode ended because its retries (``--max-wait-time``) ran out: Flower's line
    logged since ``log_start`` and not followed by ``TERMINATED``. The SuperExec logs the same line into the same log
    when a coordinator killed mid-task leaves its ClientApp unanswered; the SuperNode then ends on ``TERMINATED``
    (the restarted SuperLink answers its heartbeat 401), which is a restart, not a give-up (CI saw a device leave the
    federation that way)."""
    tail = _log_tail(log_path, log_start)
    last = tail.rfind(GAVE_UP)
    return last >= 0 and last > tail.rfind(TERMINATED)


def _connected(log_path: Path, log_start: int) -> bool:
    """Whether the SuperNode got a node ID from the SuperLink since ``log_start``. How long it then stayed does not
    matter: a coordinator restarted with ``--resume`` a few times in a row ends each SuperNode within seconds, and
    each was a connection, so each restart opens a fresh ``--retry-seconds`` window."""
    return _logged(log_path, log_start, NODE_ID)


def _finished(log_path: Path, log_start: int) -> bool:
    """Whether the SuperNode logged that it is ending: gave up reconnecting, or terminated (the SuperLink forgot the
    node: a restarted coordinator answers its heartbeat 401)."""
    return _logged(log_path, log_start, GAVE_UP, TERMINATED)


def _wait_supernode(proc: subprocess.Popen, log_path: Path, log_start: int) -> int:
    """Wait for the SuperNode to exit; its exit code. A SuperNode that gave up reconnecting can hang in Python's
    thread shutdown instead of exiting (seen on an emulated aarch64 board: still alive an hour later), so once it has
    logged that it is ending (``_finished``), it gets ``GAVE_UP_GRACE_S`` to exit and is then stopped."""
    import time

    from coordinator.deploy import stop

    gave_up_at: float | None = None
    while True:
        try:
            return proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        if gave_up_at is None and _finished(log_path, log_start):
            gave_up_at = time.monotonic()
        if gave_up_at is not None and time.monotonic() - gave_up_at > GAVE_UP_GRACE_S:
            stop(proc)
            return proc.wait()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fftmoe-edge")


if __name__ == "__main__":
    sys.exit(main())
