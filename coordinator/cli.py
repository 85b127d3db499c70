"""``fftmoe-coordinator``: the federation's side: show a bundle, serve a federation on Flower, export the global model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from coordinator.ridge_head import DEFAULT_HEAD, DEFAULT_LOGIT_ADJUST, DEFAULT_RESOLVE_SERVE, DEFAULT_RESOLVE_SIMULATE, resolved_at
from edge_runtime.bundle import BundleError, load_manifest
from edge_runtime.cli import _err, _fail  # one error style for both CLIs

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGS = 2
EXIT_INVALID = 3
EXIT_INTERRUPTED = 130

MAX_UPDATE_NORM_HELP = ("Robustness: how far one update may move each expert, router, LoRA module or the head (L2 norm of the change). "
                        "auto: the most AdamW can move it in the device's local steps at --lr (an honest device never exceeds it); "
                        "a number: that bound; off: none.")
HEAD_HELP = ("How the classification head is set. fedavg: the bundle's random head, trained by the devices and "
             "merged by FedAvg. ridge: solved in closed form before round 1 from every device's feature statistics "
             "(Fed3R; about 0.6 MB per device, once), then trained and merged. ridge-frozen: solved before round 1 and "
             "kept fixed while the devices train their adapters against it (the default: under label skew a FedAvg head "
             "collapsed; docs/benchmarks.md).")
RIDGE_HELP = "The ridge head's lambda, as a fraction of the mean eigenvalue of the features' Gram matrix (with --head ridge*)."
RIDGE_RESOLVE_HELP = ("After the last round, solve the head again in closed form on the adapted features: every device sums over the "
                      "global model's features (FFT-MoE: through tier M, all experts; it needs that tier's files). Running a finished "
                      "simulation again with it re-solves without retraining. On by default in simulate; off in serve, where a device that fetched only its own tier's files would be left out (provision devices with join --bundle, then turn it on).")
RIDGE_SCALE_HELP = "The ridge head's logits are this times its least-squares outputs, which lie near 0 and 1 (with --head ridge*)."
LOGIT_ADJUST_HELP = ("tau of the logit-adjusted local loss: each device trains on CE(z + tau log pi, y), pi its own label prior "
                     "(add-one smoothed), and predicts with z, so a device holding one label does not learn that every row is "
                     "that label; 0: the plain loss. 1 is the usual choice (Menon et al.).")
SERVER_OPT_HELP = "Server optimiser on each merged expert, router row, LoRA module and the head: fedavgm (with --server-lr 1, --server-momentum 0 and --server-damping 0 the plain merge) or fedadam."
SERVER_LR_HELP = "Server learning rate eta: the merged change is applied times this."
SERVER_MOMENTUM_HELP = "Server momentum beta (FedAvgM), or FedAdam's first-moment decay; kept per unit in the state (survives --resume)."
SERVER_DAMPING_HELP = "lambda of the damped sparse merge: an expert's change is scaled by W_holders / (W_holders + lambda W_others), so an expert trained by few of the round's devices moves less."
MAX_SHARE_HELP = ("Robustness: the largest share any one device may have in the mean of an expert, router row, LoRA module or the head "
                  "(its example count is its own claim); 1: no bound. Never below 1/n for n devices.")

app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


@app.callback()
def _root() -> None:
    """fftmoe coordinator: plan rounds and merge sparse expert updates (on Flower)."""


@app.command(epilog="Exit codes: 0 shown; 3 the bundle's manifest is missing or invalid.")
def show(
    bundle: Path = typer.Option(..., help="Bundle folder written by fftmoe-export."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show the model, the adapter settings and each tier of a bundle."""
    try:
        m = load_manifest(bundle)
    except BundleError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(3) from None
    if json_out:
        print(json.dumps(m.to_dict(), indent=2))
        return
    console = Console()
    console.print(
        f"{bundle}: {m.model.model_type} ({m.model.source}), {m.num_layers} layers, d={m.hidden_size}; "
        f"M={m.num_experts} experts of width r={m.expert_dim}, top-k={m.top_k}, alpha={m.aux_alpha}, beta={m.aux_beta}, "
        f"balance {m.balance_loss}, adapter {m.adapter_placement}, pooling {m.pooling}; "
        f"labels {', '.join(m.labels)}",
        highlight=False,
    )
    table = Table()
    for col in ("tier", "top-k", "trainable params", "upload MB/round", "artifacts MB", "step s (ref)", "peak RSS MB"):
        table.add_column(col, justify="right")
    for slots, t in sorted(m.tiers.items()):
        ms = t.measured
        table.add_row(
            str(slots), str(t.top_k), f"{t.trainable_params:,}", f"{t.trainable_bytes / 1e6:.2f}",
            f"{sum(f.size for f in t.files.values()) / 1e6:.1f}",
            "-" if ms is None else f"{ms.step_time_s:.3f} ({ms.batch_size}x{ms.seq_len}, {ms.threads} thr)",
            "-" if ms is None else f"{ms.peak_rss_mb:.0f}",
        )  # fmt: skip
    console.print(table)



@app.command(epilog="Exit codes: 0 all rounds done; 1 the run failed (the last completed round stays saved: continue with "
                    "--resume); 2 invalid arguments; 3 invalid bundle or saved state; 130 interrupted.")  # fmt: skip
def serve(
    bundle: Path = typer.Option(..., help="Bundle folder written by fftmoe-export (devices that lack their tier's files get them from here)."),
    state_dir: Path = typer.Option(Path("runs/federation"), help="Global state checkpoints (one per round), history.json, progress.png, logs."),
    rounds: int = typer.Option(3, help="Federated rounds to complete (with --resume: in total, counting those done)."),
    min_clients: int = typer.Option(2, help="Nodes needed to start a round, and valid updates needed to complete it."),
    fraction: float = typer.Option(1.0, help="Share of the connected nodes sampled per round (at least --min-clients)."),
    wait_seconds: float = typer.Option(300.0, help="How long a round waits for --min-clients nodes to connect."),
    round_timeout: float = typer.Option(600.0, help="Seconds a round waits for replies; late or vanished nodes are left out of it."),
    max_failed_rounds: int = typer.Option(3, help="Stop after this many failed attempts at a round in a row."),
    local_epochs: int = typer.Option(1, help="Passes over its local data each device makes per round."),
    local_steps: int = typer.Option(0, help="At most this many local steps per round (0: no limit)."),
    batch_size: int = typer.Option(16, help="Local batch size (each device caps it at what its memory affords)."),
    lr: float = typer.Option(1e-3, help="Devices' AdamW learning rate."),
    seed: int = typer.Option(0, help="Seed of node sampling and of the devices' data order."),
    max_seq_len: int = typer.Option(0, help="Token limit per row on the devices (0: the bundle's maximum)."),
    weighting: str = typer.Option("examples", help="Merge weights: examples (each device's examples this round) or tokens (tokens it routed to the expert)."),
    max_update_norm: str = typer.Option("auto", help=MAX_UPDATE_NORM_HELP),
    norm_action: str = typer.Option("clip", help="An update over --max-update-norm: clip (scale the change down to the bound) or reject (leave the update out)."),
    max_share: float = typer.Option(0.5, help=MAX_SHARE_HELP),
    head: str = typer.Option(DEFAULT_HEAD, help=HEAD_HELP),
    ridge: float = typer.Option(0.1, help=RIDGE_HELP),
    ridge_scale: float = typer.Option(6.0, help=RIDGE_SCALE_HELP),
    ridge_resolve: bool = typer.Option(DEFAULT_RESOLVE_SERVE, "--ridge-resolve/--no-ridge-resolve", help=RIDGE_RESOLVE_HELP),
    logit_adjust: float = typer.Option(DEFAULT_LOGIT_ADJUST, help=LOGIT_ADJUST_HELP),
    server_opt: str = typer.Option("fedavgm", help=SERVER_OPT_HELP),
    server_lr: float = typer.Option(1.0, help=SERVER_LR_HELP),
    server_momentum: float = typer.Option(0.0, help=SERVER_MOMENTUM_HELP),
    server_damping: float = typer.Option(0.0, help=SERVER_DAMPING_HELP),
    keep_checkpoints: int = typer.Option(3, help="Completed rounds kept in --state-dir (the newest, and that many minus one before it; at least 2): --resume-round can go back to any of them."),
    eval_every: int = typer.Option(1, help="Federated evaluation on the devices' held-out data (and central evaluation with --eval-data) every N rounds and after the last (0: never)."),
    eval_data: Optional[Path] = typer.Option(None, help="Data file on this host for centralised evaluation of the global model (needs torch: the export extra)."),
    eval_text_column: list[str] = typer.Option(["text"], help="Text column(s) of --eval-data."),
    eval_label_column: str = typer.Option("label", help="Label column of --eval-data."),
    eval_label_map: Optional[str] = typer.Option(None, help="Label mapping of --eval-data, e.g. 1=World,2=Sports."),
    serve_artifacts: bool = typer.Option(True, "--serve-artifacts/--no-serve-artifacts", help="Send devices the tier files they lack."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last completed round saved in --state-dir."),
    resume_round: int = typer.Option(0, help="With --resume: continue from this earlier kept round instead (see `fftmoe-coordinator checkpoints`); the rounds after it are dropped at the next save."),
    keep_updates: bool = typer.Option(False, "--keep-updates", help="Audit: keep every merged update in --state-dir/updates/round-N/ (disk grows by each device's upload per round)."),
    host: str = typer.Option("127.0.0.1", help="Address the SuperLink listens on; 0.0.0.0 to accept devices from the network."),
    port: int = typer.Option(9092, help="The SuperLink's port (devices join with --server HOST:PORT)."),
    ssl_ca_certfile: Optional[Path] = typer.Option(None, help="TLS: the CA certificate (PEM) the devices trust."),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS: this server's certificate (PEM), signed by the CA, with the host's name or address."),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS: this server's private key (PEM)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS (loopback and tests only): traffic is unencrypted."),
    authorized_key: list[Path] = typer.Option([], help="SuperNode authentication: a device's public key (ssh-keygen -t ecdsa -b 384); repeat per device. Needs TLS. Only registered devices may join."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end instead of the run's log."),
) -> None:
    """Run a federation: start a Flower SuperLink, submit the fftmoe run, stream its per-round log, stop.

    Devices join with `fftmoe-edge join --server HOST:PORT`. Each round assigns global experts to the devices'
    slots by tier, merges their sparse updates per expert, and saves the global state atomically in --state-dir,
    so that --resume continues after a crash or Ctrl-C. Either TLS (--ssl-*) or --insecure is required.
    """
    from coordinator import deploy
    from coordinator.server_app import RunSettings
    from coordinator.state import LATEST, GlobalState, GlobalStateError
    from edge_runtime.update import manifest_id

    tls_files = (ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    if insecure == any(f is not None for f in tls_files):
        _fail("give either --insecure or all three of --ssl-ca-certfile, --ssl-certfile, --ssl-keyfile", EXIT_BAD_ARGS, json_out)
    if not insecure and not all(f is not None for f in tls_files):
        _fail("TLS needs all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile", EXIT_BAD_ARGS, json_out)
    if authorized_key and insecure:
        _fail("--authorized-key (SuperNode authentication) needs TLS; Flower refuses it with --insecure", EXIT_BAD_ARGS, json_out)
    try:
        manifest = load_manifest(bundle)
        tls = None if insecure else deploy.Tls(*(f.resolve() for f in tls_files)).check()  # type: ignore[union-attr]
        for key in authorized_key:
            if not key.is_file():
                raise deploy.DeployError(f"--authorized-key {key}: no such file")
        settings = RunSettings(
            bundle=str(bundle.resolve()), state_dir=str(state_dir.resolve()), rounds=rounds, min_clients=min_clients, fraction=fraction,
            wait_seconds=wait_seconds, round_timeout=round_timeout, max_failed_rounds=max_failed_rounds, epochs=local_epochs,
            max_steps=local_steps, batch_size=batch_size, lr=lr, seed=seed, max_seq_len=max_seq_len, weighting=weighting,
            max_update_norm=max_update_norm, norm_action=norm_action, max_share=max_share, keep_checkpoints=keep_checkpoints,
            head=head, ridge=ridge, ridge_scale=ridge_scale, ridge_resolve=ridge_resolve, logit_adjust=logit_adjust, server_opt=server_opt, server_lr=server_lr,
            server_momentum=server_momentum, server_damping=server_damping,
            resume_round=resume_round, eval_every=eval_every, eval_data=str(eval_data.resolve()) if eval_data else "", eval_text_columns=",".join(eval_text_column),
            eval_label_column=eval_label_column, eval_label_map=eval_label_map or "", resume=resume, serve_artifacts=serve_artifacts,
            keep_updates=keep_updates,
        )  # fmt: skip
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "manifest")
    except (ValueError, deploy.DeployError) as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out)
    if eval_data is not None and not eval_data.is_file():
        _fail(f"--eval-data {eval_data}: no such file", EXIT_BAD_ARGS, json_out)
    if resume:
        try:
            done = GlobalState.load(state_dir, manifest_id(manifest), resume_round or None).round
        except GlobalStateError as exc:
            _fail(str(exc), EXIT_INVALID, json_out, "state")
        if done >= rounds:
            _fail(f"{state_dir} already holds {done} completed round(s); ask for more with --rounds", EXIT_BAD_ARGS, json_out)
    elif (state_dir / LATEST).exists():
        _fail(f"{state_dir} already holds a global state: continue it with --resume, or choose another --state-dir", EXIT_BAD_ARGS, json_out)

    if deploy.port_in_use(host, port):
        _fail(f"{host}:{port} is already in use (another coordinator?): stop it or choose another --port", EXIT_BAD_ARGS, json_out)
    state_dir.mkdir(parents=True, exist_ok=True)
    err = _err()

    def announce(address: str) -> None:
        if not json_out:
            err.print(f"Fleet API on {host}:{port} ({'TLS' if tls else 'insecure'}{', node authentication' if authorized_key else ''}; "
                      "the SuperLink's Control and Runtime APIs listen on loopback only); "
                      f"devices join with: fftmoe-edge join --server {address if host not in ('0.0.0.0', '') else 'THIS_HOST:' + str(port)} ...",
                      highlight=False)  # fmt: skip

    try:
        outcome = deploy.run_federation(settings, state_dir, (lambda line: None) if json_out else sys.stderr.write, host, port, tls,
                                        authorized_key, announce=announce)  # fmt: skip
    except deploy.DeployError as exc:
        _fail(f"{exc} (see {state_dir / 'superlink.log'})", EXIT_FAILED, json_out, "deploy")
    status = outcome.status
    try:
        final = GlobalState.load(state_dir, manifest_id(manifest))
    except GlobalStateError:
        final = None
    summary = {"ok": bool(status.get("ok")), "rounds_done": final.round if final else 0, "state_dir": str(state_dir),
               "history": str(state_dir / "history.json"), "plot": str(state_dir / "progress.png")}  # fmt: skip
    if outcome.interrupted:
        summary.update(ok=False, error="interrupted", message=f"stopped; {summary['rounds_done']} round(s) saved: continue with --resume")
    elif not status.get("ok"):
        summary.update(error=status.get("error", "failed"), message=status.get("message", f"the run ended without a result; see {state_dir / 'run.log'}"))
    if json_out:
        print(json.dumps(summary))
    elif summary["ok"]:
        Console().print(f"done: {summary['rounds_done']} round(s); state in {state_dir}, plot {summary['plot']}", highlight=False)
    else:
        err.print(f"[red]{summary.get('error')}:[/red] {summary['message']}", highlight=False)
    if outcome.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not summary["ok"]:
        raise typer.Exit(EXIT_FAILED)


@app.command(epilog="Exit codes: 0 all rounds done; 1 the run failed (what completed stays saved: run the same command "
                    "again to continue); 2 invalid arguments or data; 3 invalid bundle or saved state; 130 interrupted.")  # fmt: skip
def simulate(
    bundle: Path = typer.Option(..., help="Bundle folder written by fftmoe-export."),
    data: str = typer.Option(..., help="Labelled data file (CSV, TSV, JSONL, Parquet), or `ag_news` from the Hugging Face hub (needs network)."),
    out: Path = typer.Option(Path("runs/simulation"), help="Run folder: plan, client data, global state, metrics.jsonl, summary.json, plots."),
    clients: int = typer.Option(20, help="Virtual devices."),
    fleet: str = typer.Option("mixed-edge", help="Fleet: a name in devices/fleets (mixed-edge, three-tiers) or a .json file."),
    partition: str = typer.Option("dirichlet", help="dirichlet (label skew, flwr-datasets' DirichletPartitioner convention) or iid."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration: smaller, more skewed clients."),
    min_partition_size: int = typer.Option(10, help="Rows each client gets at least (the Dirichlet draw is repeated until it holds)."),
    test_fraction: float = typer.Option(0.2, help="Share of each client's rows kept as its local test part."),
    global_test_fraction: float = typer.Option(0.1, help="Share of all rows held out before partitioning, to test the global model."),
    text_column: list[str] = typer.Option(["text"], help="Text column(s) of --data, joined (repeat for several)."),
    label_column: str = typer.Option("label", help="Label column of --data."),
    label_map: Optional[str] = typer.Option(None, help="Label mapping of --data, e.g. 1=World,2=Sports."),
    rounds: int = typer.Option(5, help="Federated rounds (in total: running again continues up to this many)."),
    fraction: float = typer.Option(1.0, help="Share of the clients sampled per round."),
    min_clients: int = typer.Option(2, help="Valid updates needed to complete a round."),
    local_epochs: int = typer.Option(1, help="Passes over its local training part each client makes per round."),
    local_steps: int = typer.Option(0, help="At most this many local steps per round (0: no limit)."),
    batch_size: int = typer.Option(16, help="Local batch size (a client caps it at what its board's memory affords)."),
    lr: float = typer.Option(1e-3, help="Clients' AdamW learning rate."),
    max_seq_len: int = typer.Option(0, help="Token limit per row (0: the bundle's maximum)."),
    eval_every: int = typer.Option(1, help="Evaluate (global and personalised) every N rounds and after the last; evaluation is about a third of a round's time."),
    weighting: str = typer.Option("examples", help="Merge weights: examples or tokens."),
    max_update_norm: str = typer.Option("auto", help=MAX_UPDATE_NORM_HELP),
    norm_action: str = typer.Option("clip", help="An update over --max-update-norm: clip or reject."),
    max_share: float = typer.Option(0.5, help=MAX_SHARE_HELP),
    head: str = typer.Option(DEFAULT_HEAD, help=HEAD_HELP),
    ridge: float = typer.Option(0.1, help=RIDGE_HELP),
    ridge_scale: float = typer.Option(6.0, help=RIDGE_SCALE_HELP),
    ridge_resolve: bool = typer.Option(DEFAULT_RESOLVE_SIMULATE, "--ridge-resolve/--no-ridge-resolve", help=RIDGE_RESOLVE_HELP),
    logit_adjust: float = typer.Option(DEFAULT_LOGIT_ADJUST, help=LOGIT_ADJUST_HELP),
    server_opt: str = typer.Option("fedavgm", help=SERVER_OPT_HELP),
    server_lr: float = typer.Option(1.0, help=SERVER_LR_HELP),
    server_momentum: float = typer.Option(0.0, help=SERVER_MOMENTUM_HELP),
    server_damping: float = typer.Option(0.0, help=SERVER_DAMPING_HELP),
    seed: int = typer.Option(0, help="Seed of the hold-out, partition, fleet order, sampling and data order."),
    parallel: int = typer.Option(0, help="Clients training at once (0: this machine's cores); each uses one thread."),
    keep_models: bool = typer.Option(False, "--keep-models", help="Each client writes its personalised model (ONNX, loads with optimum) to OUT/models/CLIENT after each evaluation; about 90 MB per client for MiniLM."),
    verbose: bool = typer.Option(False, "--verbose", help="Echo the whole run log (it is always in OUT/run.log)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a whole federation on this machine: the coordinator and --clients virtual devices of a --fleet.

    Uses Flower's simulation runtime with the same ServerApp and ClientApp as `serve` and `fftmoe-edge join`. The
    data is split over the clients (--partition, --alpha) and each client gets the tier its board would choose.
    Running the same command again continues a stopped run from its last completed round. Writes OUT/metrics.jsonl,
    OUT/summary.json and plots (accuracy.png, accuracy-vs-upload.png, expert-usage.png, memory.png, partition.png).
    """
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from edge_runtime.console import progress_bar

    from coordinator import deploy
    from coordinator.report import ReportError, write_report
    from coordinator.simulate import SimSettings, SimulationError, prepare, run_settings
    from coordinator.state import LATEST, GlobalState, GlobalStateError
    from edge_runtime.update import manifest_id

    err = _err()
    try:
        manifest = load_manifest(bundle)
        run = {"rounds": rounds, "fraction": fraction, "min_clients": min_clients, "epochs": local_epochs, "max_steps": local_steps,
               "batch_size": batch_size, "lr": lr, "max_seq_len": max_seq_len, "eval_every": eval_every, "weighting": weighting,
               "max_update_norm": max_update_norm, "norm_action": norm_action, "max_share": max_share,
               "head": head, "ridge": ridge, "ridge_scale": ridge_scale, "ridge_resolve": ridge_resolve, "logit_adjust": logit_adjust, "server_opt": server_opt, "server_lr": server_lr,
               "server_momentum": server_momentum, "server_damping": server_damping}  # fmt: skip
        settings = SimSettings(bundle=bundle, data=data, out=out, clients=clients, fleet=fleet, partition=partition, alpha=alpha,
                               min_partition_size=min_partition_size, test_fraction=test_fraction, global_test_fraction=global_test_fraction,
                               text_columns=tuple(text_column), label_column=label_column, label_map=label_map or "", seed=seed,
                               parallel=parallel, keep_models=keep_models, run=run)  # fmt: skip
        if not json_out:
            err.print(f"preparing {clients} clients in {out} ...", highlight=False)
        plan = prepare(settings)
        resume = (out / "state" / LATEST).exists()
        saved = GlobalState.load(out / "state", manifest_id(manifest)) if resume else None
        done = saved.round if saved else 0
        resolve_pending = ridge_resolve and not (saved and resolved_at(saved.history, max(saved.round, rounds)))
        rs = run_settings(settings, plan, resume)
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "manifest")
    except GlobalStateError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "state")
    except (SimulationError, ValueError) as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out)
    if not json_out:
        tiers = {}
        for n in plan["nodes"]:
            tiers[n["tier"]] = tiers.get(n["tier"], 0) + 1
        err.print(f"{len(plan['nodes'])} clients of fleet {plan['fleet']['name']}, tiers {dict(sorted(tiers.items()))}; "
                  f"{plan['rows']} rows from {plan['source']} ({plan['global_test_rows']} held out for the global test)"
                  + (f"; continuing after round {done}" if done else ""), highlight=False)  # fmt: skip
    if done < rounds or resolve_pending:
        import re

        pattern = re.compile(r"round (\d+)/(\d+): ")
        progress = progress_bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                                TimeElapsedColumn(), console=err, disable=json_out or verbose, transient=False)  # fmt: skip

        with progress:
            task = progress.add_task("federated rounds", total=rounds, completed=done)

            def on_line(line: str) -> None:
                if verbose:
                    sys.stderr.write(line)
                m = pattern.search(line)
                if m and "merged" in line:
                    progress.update(task, completed=int(m.group(1)), description=line.split("INFO :", 1)[-1].strip()[:90], refresh=True)

            for attempt in (1, 2):
                log_start = (out / "run.log").stat().st_size if (out / "run.log").is_file() else 0
                try:
                    outcome = deploy.run_federation(rs, out, on_line, simulation_nodes=len(plan["nodes"]), simulation_cpus=parallel)
                except deploy.DeployError as exc:
                    _fail(f"{exc} (see {out / 'superlink.log'})", EXIT_FAILED, json_out, "deploy")
                why = _last_error(out / "run.log", log_start)
                # Ray gives its processes a fixed 30 s to start; on a loaded machine that can pass. The run is
                # resumable, so one more attempt continues it from the last completed round.
                if outcome.status.get("ok") or outcome.interrupted or "timed out during startup" not in why or attempt == 2:
                    break
                err.print(f"Ray did not start in time ({why}); trying once more", highlight=False)
                rs = run_settings(settings, plan, (out / "state" / LATEST).exists())
        ok, interrupted = bool(outcome.status.get("ok")), outcome.interrupted
    else:
        ok, interrupted, outcome = True, False, None
    try:
        summary = write_report(out, manifest)
    except ReportError as exc:
        summary = {"error": str(exc)}
    summary.update(ok=ok and not interrupted)
    if interrupted:
        summary.update(error="interrupted", message=f"stopped; run the same command again to continue ({out})")
    elif not ok and outcome is not None:
        summary.update(error=outcome.status.get("error", "failed"),
                       message=outcome.status.get("message") or f"{_last_error(out / 'run.log', 0) or 'no error recorded'} (see {out / 'run.log'})")
    if json_out:
        print(json.dumps(summary))
    else:
        if "method" in summary:
            _print_summaries([summary])
        if summary["ok"]:
            Console().print(f"metrics, summary and plots in {out}", highlight=False)
        else:
            err.print(f"[red]{summary.get('error')}:[/red] {summary.get('message', '')}", highlight=False)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not summary["ok"]:
        raise typer.Exit(EXIT_FAILED)


def _last_error(log: Path, start: int) -> str:
    """The root cause of a crash in the run's log after byte ``start``: the first exception line (Python prints the
    root of a chain of exceptions first); empty when there is none."""
    import re

    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            fh.seek(start)
            lines = fh.read().splitlines()
    except OSError:
        return ""
    hits = [ln.strip() for ln in lines if re.match(r"^[\w.]*(Error|Exception|Failure): ", ln)]
    return hits[0][:300] if hits else ""


SUMMARY_COLUMNS = [
    ("run", "run", lambda v: Path(str(v)).name), ("method", "method", str), ("partition", "data", lambda v: str(v)),
    ("alpha", "alpha", lambda v: "-" if v is None else f"{v:g}"), ("seed", "seed", str), ("head", "head", str), ("rounds", "rounds", str),
    ("final_global_accuracy", "global acc", lambda v: "-" if v is None else f"{v:.3f}"),
    ("final_global_accuracy_before_resolve", "before re-solve", lambda v: "-" if v is None else f"{v:.3f}"),
    ("last_two_global_delta", "last-two delta", lambda v: "-" if v is None else f"{v:.3f}"),
    ("final_personal_accuracy", "personal acc", lambda v: "-" if v is None else f"{v:.3f}"),
    ("final_personal_global_accuracy", "personal on global test", lambda v: "-" if v is None else f"{v:.3f}"),
    ("rounds_to_target", "rounds to 80%", lambda v: "-" if v is None else str(v)),
    ("upload_mb_per_client_round", "up MB/client-round", lambda v: "-" if v is None else f"{v:.3f}"),
    ("peak_rss_mb_by_tier", "peak RSS MB by tier", lambda v: ", ".join(f"t{k}: {x:.0f}" for k, x in sorted(v.items(), key=lambda kv: int(kv[0]))) if v else "-"),
    ("wall_seconds", "wall s", lambda v: "-" if v is None else f"{v:.0f}"),
]  # fmt: skip


def summary_cells(summary: dict) -> list[str]:
    """One run's row of the comparison table, formatted as the columns of ``SUMMARY_COLUMNS``."""
    return [fmt(summary.get(key)) if summary.get(key) is not None or key == "alpha" else "-" for key, _, fmt in SUMMARY_COLUMNS]


def markdown_table(summaries: list[dict]) -> str:
    """The comparison table in GitHub Markdown (for docs/benchmarks.md)."""
    lines = ["| " + " | ".join(title for _, title, _ in SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(summary_cells(s)) + " |" for s in summaries]
    return "\n".join(lines)


def _print_summaries(summaries: list[dict]) -> None:
    table = Table()
    for _, title, _ in SUMMARY_COLUMNS:
        table.add_column(title, justify="right")
    for s in summaries:
        table.add_row(*summary_cells(s))
    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


@app.command(epilog="Exit codes: 0 written; 3 a run folder or its bundle cannot be read.")
def report(
    out: Path = typer.Option(..., help="Run folder of `simulate`."),
    bundle: Optional[Path] = typer.Option(None, help="The run's bundle (default: the one its plan names)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """(Re)write a run folder's metrics.jsonl, summary.json and plots from its saved history (also mid-run)."""
    from coordinator.report import ReportError, write_report

    try:
        if bundle is None:
            plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
            bundle = Path(plan["bundle"])
        summary = write_report(out, load_manifest(bundle))
    except (OSError, KeyError, ValueError, BundleError, ReportError) as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "report")
    if json_out:
        print(json.dumps(summary))
    else:
        _print_summaries([summary])


@app.command(epilog="Exit codes: 0 compared; 3 a run folder cannot be read.")
def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders of `simulate` (reported)."),
    plot: Path = typer.Option(Path("runs/compare.png"), help="Where to write the comparison plot."),
    json_out: bool = typer.Option(False, "--json", help="Print the summaries as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as GitHub Markdown (for a report)."),
    paired: bool = typer.Option(False, "--paired", help="Also pair the runs by seed (same partition and alpha): each method's final global accuracy per seed, and its difference to the first run's method with mean, standard deviation and every seed."),
) -> None:
    """Compare runs: one table (final and personalised accuracy, rounds to 80%, upload per client-round, peak memory
    per tier, wall time) and one plot (global accuracy against round and against cumulative upload)."""
    from coordinator.report import ReportError, load_run, paired_seeds, plot_compare

    loaded = []
    try:
        for folder in runs:
            loaded.append(load_run(folder))
    except ReportError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "compare")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_compare([(f"{s['method']} {s.get('partition')}{'' if s.get('alpha') is None else ' a=' + format(s['alpha'], 'g')} ({Path(s['run']).name})", rows)
                  for s, rows in loaded], plot)  # fmt: skip
    summaries = [s for s, _ in loaded]
    try:
        pairs = paired_seeds(summaries) if paired else None
    except ValueError as exc:
        _fail(f"--paired: {exc}", EXIT_BAD_ARGS, json_out)
    if json_out:
        print(json.dumps({"runs": summaries, "plot": str(plot), **({"paired": pairs} if pairs else {})}))
    elif markdown:
        print(markdown_table(summaries))
        if pairs:
            print("\n" + paired_markdown(pairs))
    else:
        _print_summaries(summaries)
        if pairs:
            Console(width=200).print(paired_markdown(pairs), highlight=False)
        Console().print(f"plot: {plot}", highlight=False)


def paired_markdown(pairs: dict) -> str:
    """The per-seed table of ``report.paired_seeds`` and the differences to the first method, in Markdown."""
    labels, first = pairs["labels"], pairs["against"]
    lines = ["| seed | " + " | ".join(labels) + "".join(f" | {lab} - {first}" for lab in labels[1:]) + " |", "|" + "---|" * (2 * len(labels))]
    for seed, row in pairs["seeds"].items():
        cells = [f"{row[lab]:.3f}" if lab in row else "-" for lab in labels]
        cells += [f"{100 * (row[lab] - row[first]):+.1f}" if lab in row and first in row else "-" for lab in labels[1:]]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    sd = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    cells = [f"{pairs['means'][lab]['mean']:.3f} (sd {sd(pairs['means'][lab]['sd'])})" for lab in labels]
    for lab in labels[1:]:
        d = pairs["differences"][lab]
        cells.append("-" if d["mean"] is None else f"{100 * d['mean']:+.1f} (sd {'-' if d['sd'] is None else format(100 * d['sd'], '.1f')})")
    lines.append("| mean | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@app.command(epilog="Exit codes: 0 written; 1 export failed; 3 invalid bundle or saved state.")
def export(
    bundle: Path = typer.Option(..., help="The federation's bundle folder."),
    state_dir: Path = typer.Option(Path("runs/federation"), help="State folder of `serve`."),
    out: Path = typer.Option(..., help="Folder for the ONNX inference model (model.onnx, config.json, tokenizer, labels.json)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write the merged global model (all experts, the full routers, the head) of the last completed round as an
    ONNX inference model with its tokenizer and labels (loads with optimum's ORTModelForSequenceClassification)."""
    from coordinator.global_model import export_global
    from coordinator.state import GlobalState, GlobalStateError
    from edge_runtime.update import manifest_id

    try:
        manifest = load_manifest(bundle)
        state = GlobalState.load(state_dir, manifest_id(manifest))
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "manifest")
    except GlobalStateError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "state")
    try:
        export_global(bundle, manifest, state.pool, out, state.round)
    except (RuntimeError, BundleError) as exc:
        _fail(str(exc), EXIT_FAILED, json_out, "export")
    if json_out:
        print(json.dumps({"ok": True, "out": str(out), "round": state.round}))
    else:
        Console().print(f"wrote {out}/model.onnx: the global model after round {state.round}", highlight=False)


@app.command(epilog="Exit codes: 0 listed; 3 the state folder has no readable checkpoint.")
def checkpoints(
    state_dir: Path = typer.Option(Path("runs/federation"), help="State folder of `serve` (or a simulation's OUT/state)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the completed rounds kept in a state folder (newest first), each checked against its recorded SHA-256:
    `serve --resume --resume-round N` continues from any round marked ok."""
    from coordinator.state import GlobalState, GlobalStateError, kept_checkpoints

    rows = []
    for entry in kept_checkpoints(state_dir):
        try:
            state = GlobalState.load(state_dir, round=entry["round"])
            rows.append({"round": entry["round"], "checkpoint": entry["checkpoint"], "ok": True, "history_entries": len(state.history)})
        except GlobalStateError as exc:
            rows.append({"round": entry["round"], "checkpoint": entry["checkpoint"], "ok": False, "error": str(exc)})
    if not rows:
        _fail(f"{state_dir}: no committed checkpoint (latest.json missing or unreadable)", EXIT_INVALID, json_out, "state")
    if json_out:
        print(json.dumps({"state_dir": str(state_dir), "checkpoints": rows}))
        return
    table = Table()
    for col in ("round", "checkpoint", "status"):
        table.add_column(col)
    for i, r in enumerate(rows):
        status = ("ok" + (" (latest)" if i == 0 else "")) if r["ok"] else f"damaged: {r['error']}"
        table.add_row(str(r["round"]), r["checkpoint"], status)
    Console().print(table)


from coordinator.reference import EPILOG as REFERENCE_EPILOG, reference_command  # noqa: E402

app.command("reference", epilog=REFERENCE_EPILOG)(reference_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fftmoe-coordinator")


if __name__ == "__main__":
    sys.exit(main())
