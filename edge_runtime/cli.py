"""``fftmoe-edge``: the device side. So far: verify a bundle's files before training from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from edge_runtime.bundle import BundleError, IntegrityError, verify_bundle

EXIT_OK = 0
EXIT_INVALID = 3

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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fftmoe-edge")


if __name__ == "__main__":
    sys.exit(main())
