"""``fftmoe-coordinator``: the federation's side. So far: show what a bundle holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edge_runtime.bundle import BundleError, load_manifest

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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fftmoe-coordinator")


if __name__ == "__main__":
    sys.exit(main())
