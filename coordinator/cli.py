"""``fftmoe-coordinator``: the federation's side: show a bundle, serve a federation on Flower, export the global model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edge_runtime.bundle import BundleError, load_manifest
from edge_runtime.cli import _err, _fail  # one error style for both CLIs

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGS = 2
EXIT_INVALID = 3
EXIT_INTERRUPTED = 130

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
        f"M={m.num_experts} experts of width r={m.expert_dim}, top-k={m.top_k}, alpha={m.aux_alpha}, beta={m.aux_beta}; "
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
    eval_every: int = typer.Option(1, help="Federated evaluation on the devices' held-out data every N rounds (0: never)."),
    eval_data: Optional[Path] = typer.Option(None, help="Data file on this host for centralised evaluation of the global model (needs torch: the export extra)."),
    eval_text_column: list[str] = typer.Option(["text"], help="Text column(s) of --eval-data."),
    eval_label_column: str = typer.Option("label", help="Label column of --eval-data."),
    eval_label_map: Optional[str] = typer.Option(None, help="Label mapping of --eval-data, e.g. 1=World,2=Sports."),
    serve_artifacts: bool = typer.Option(True, "--serve-artifacts/--no-serve-artifacts", help="Send devices the tier files they lack."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last completed round saved in --state-dir."),
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
    import signal
    import time

    from coordinator import deploy
    from coordinator.server_app import STATUS_FILE, RunSettings
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
            eval_every=eval_every, eval_data=str(eval_data.resolve()) if eval_data else "", eval_text_columns=",".join(eval_text_column),
            eval_label_column=eval_label_column, eval_label_map=eval_label_map or "", resume=resume, serve_artifacts=serve_artifacts,
        )  # fmt: skip
    except BundleError as exc:
        _fail(str(exc), EXIT_INVALID, json_out, "manifest")
    except (ValueError, deploy.DeployError) as exc:
        _fail(str(exc), EXIT_BAD_ARGS, json_out)
    if eval_data is not None and not eval_data.is_file():
        _fail(f"--eval-data {eval_data}: no such file", EXIT_BAD_ARGS, json_out)
    if resume:
        try:
            done = GlobalState.load(state_dir, manifest_id(manifest)).round
        except GlobalStateError as exc:
            _fail(str(exc), EXIT_INVALID, json_out, "state")
        if done >= rounds:
            _fail(f"{state_dir} already holds {done} completed round(s); ask for more with --rounds", EXIT_BAD_ARGS, json_out)
    elif (state_dir / LATEST).exists():
        _fail(f"{state_dir} already holds a global state: continue it with --resume, or choose another --state-dir", EXIT_BAD_ARGS, json_out)

    state_dir.mkdir(parents=True, exist_ok=True)
    flwr = state_dir / "flower"
    (state_dir / STATUS_FILE).unlink(missing_ok=True)
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    err = _err()
    link = run = None
    interrupted = {"flag": False}

    def on_sigint(_sig, _frame) -> None:
        interrupted["flag"] = True
        deploy.stop(run)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        link = deploy.start_superlink(flwr / "superlink", host, port, tls, bool(authorized_key), state_dir / "superlink.log")
        deploy.wait_for_port(host, port, 60, link)
        deploy.write_cli_config(flwr / "cli", address, tls.ca_cert if tls else None)
        for i, key in enumerate(authorized_key):
            deploy.register_supernode(flwr / "cli", key.resolve(), key.stem or f"node{i}")
        app_dir = deploy.write_app(flwr, settings)
        if not json_out:
            err.print(f"SuperLink on {host}:{port} ({'TLS' if tls else 'insecure'}{', node authentication' if authorized_key else ''}); "
                      f"devices join with: fftmoe-edge join --server {address if host not in ('0.0.0.0', '') else 'THIS_HOST:' + str(port)} ...",
                      highlight=False)  # fmt: skip
        run = deploy.run_app(flwr / "cli", app_dir)
        with open(state_dir / "run.log", "a", encoding="utf-8", buffering=1) as log_file:
            assert run.stdout is not None
            for line in run.stdout:
                log_file.write(line)
                if not json_out:
                    sys.stderr.write(line)
        run.wait()
    except deploy.DeployError as exc:
        _fail(f"{exc} (see {state_dir / 'superlink.log'})", EXIT_FAILED, json_out, "deploy")
    finally:
        signal.signal(signal.SIGINT, previous)
        deploy.stop(run)
        deploy.stop(link)
    status = {}
    for _ in range(20):  # the ServerApp writes it as its last act; the stream can end just before
        if (state_dir / STATUS_FILE).is_file():
            status = json.loads((state_dir / STATUS_FILE).read_text(encoding="utf-8"))
            if not status.get("running"):
                break
        time.sleep(0.25)
    try:
        final = GlobalState.load(state_dir, manifest_id(manifest))
    except GlobalStateError:
        final = None
    summary = {"ok": bool(status.get("ok")), "rounds_done": final.round if final else 0, "state_dir": str(state_dir),
               "history": str(state_dir / "history.json"), "plot": str(state_dir / "progress.png")}  # fmt: skip
    if interrupted["flag"]:
        summary.update(ok=False, error="interrupted", message=f"stopped; {summary['rounds_done']} round(s) saved: continue with --resume")
    elif not status.get("ok"):
        summary.update(error=status.get("error", "failed"), message=status.get("message", f"the run ended without a result; see {state_dir / 'run.log'}"))
    if json_out:
        print(json.dumps(summary))
    elif summary["ok"]:
        Console().print(f"done: {summary['rounds_done']} round(s); state in {state_dir}, plot {summary['plot']}", highlight=False)
    else:
        err.print(f"[red]{summary.get('error')}:[/red] {summary['message']}", highlight=False)
    if interrupted["flag"]:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not summary["ok"]:
        raise typer.Exit(EXIT_FAILED)


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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fftmoe-coordinator")


if __name__ == "__main__":
    sys.exit(main())
