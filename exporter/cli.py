"""``fftmoe-export``: build a bundle of per-tier ONNX Runtime training artifacts from a Hugging Face encoder."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from exporter.config import DEFAULT_LORA_TARGETS, ConfigError, LoraAdapterConfig, MoEAdapterConfig, parse_ranks, parse_tiers

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGS = 2
EXIT_BAD_MODEL = 3
EXIT_OUTPUT_EXISTS = 4

EPILOG = (
    "Exit codes: 0 done; 1 the export failed (nothing is left at --out); 2 invalid arguments; "
    "3 the model is missing, unreadable or of an unsupported architecture; 4 --out already holds files (use --force)."
)

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


@app.command(epilog=EPILOG)
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the bundle into (created; refused if it holds files, unless --force)."),
    tiers: str = typer.Option("2,4,8", help="Expert-budget tiers: experts per layer held and trained on a device, comma-separated, each 1..--experts. For the LoRA baselines the tiers are the same budget levels, each training a LoRA rank (--ranks)."),
    method: str = typer.Option("fftmoe", help="What the tiers train: fftmoe (MoE experts), or a baseline with PEFT LoRA: fedit (one rank for every tier, merged by FedAvg) or hetlora (a rank per tier, zero-padded, sparsity-weighted merge, truncated back)."),
    ranks: Optional[str] = typer.Option(None, help="LoRA baselines: one rank for every tier (--ranks 32) or one per tier in tier order (--ranks 14,29,58). With the default targets on MiniLM, 14/29/58 match the trainable parameters of FFT-MoE tiers 2/4/8."),
    lora_targets: str = typer.Option(",".join(DEFAULT_LORA_TARGETS), help="LoRA baselines: PEFT target_modules, comma-separated (default: every linear layer of each block)."),
    lora_scale: float = typer.Option(2.0, help="LoRA baselines: lora_alpha / rank, the same on every tier."),
    model: Optional[str] = typer.Option(None, help="Hugging Face encoder folder or hub id (BERT, RoBERTa, XLM-R, ELECTRA, ViT, DeiT). Default: the offline all-MiniLM-L6-v2."),
    experts: int = typer.Option(8, help="M: global experts per layer."),
    expert_dim: int = typer.Option(64, help="r: width of each expert FFN (d -> r -> d)."),
    top_k: int = typer.Option(2, help="Experts active per token (a tier with fewer slots uses all of them)."),
    labels: Optional[str] = typer.Option(None, help="Class labels, comma-separated, in the order of the head's outputs, e.g. World,Sports,Business,Sci/Tech."),
    num_labels: Optional[int] = typer.Option(None, help="Number of classes when the labels are just 0..N-1 (default 2 when --labels is not given)."),
    max_seq_len: int = typer.Option(128, help="Tokens per example (text models); longer texts are truncated on the device."),
    pooling: str = typer.Option("", help="The head's input: mean (over real tokens; text's default), mean-l2 (that mean at unit L2 norm, as MiniLM's sentence-transformers pipeline ends) or cls (the first token; images' default)."),
    alpha: float = typer.Option(0.01, help="Weight of the load-balance auxiliary loss; 0 turns it off."),
    beta: float = typer.Option(0.01, help="Weight of the heterogeneity (KL to target q) auxiliary loss; 0 turns it off."),
    balance_loss: str = typer.Option("switch", help="FFT-MoE's load-balance term: switch (t * sum_j f_j p_j; a constant with no gradient on a tier whose every slot is active, tier 2 at top-k 2) or switch-soft (t * sum_j p_j^2 on such a tier, Switch's on the others)."),
    adapter_placement: str = typer.Option("post-ln", help="Where each block's MoE adapter adds its output: post-ln (after the FFN output's LayerNorm) or pre-ln (inside the residual, before that LayerNorm, as a parallel branch of the FFN; BERT-style post-LN encoders only)."),
    seed: int = typer.Option(0, help="Seed of the adapter's initial weights."),
    measure: bool = typer.Option(True, help="Measure each tier's ORT step time and peak memory (batch 16 x 64 tokens, 2 threads) for tier selection on devices."),
    force: bool = typer.Option(False, "--force", help="Replace a bundle already at --out (the old one is kept until the new one is complete)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout instead of a table."),
) -> None:
    """Export a frozen encoder with MoE adapters as ONNX Runtime on-device training artifacts, one set per tier.

    Writes OUT/manifest.json, the initial global expert pool, the tokenizer, tiers/tN/ training artifacts and an
    inference model that loads with optimum's ORTModelForSequenceClassification.
    """
    from exporter.export import ExportOptions, OutputExistsError, export_bundle
    from exporter.model import ModelLoadError, UnsupportedArchitectureError

    err = Console(stderr=True, soft_wrap=True)
    try:
        adapter = MoEAdapterConfig(
            num_experts=experts, expert_dim=expert_dim, top_k=top_k, aux_alpha=alpha, aux_beta=beta, seed=seed,
            balance_loss=balance_loss, placement=adapter_placement,
        )
        lora = None
        if method not in ("fftmoe", "fedit", "hetlora"):
            raise ConfigError(f"--method {method!r}: choose fftmoe, fedit or hetlora")
        if method == "fftmoe":
            tier_list = parse_tiers(tiers, experts)
            if ranks is not None:
                raise ConfigError("--ranks is for the LoRA baselines; add --method fedit or --method hetlora")
        else:
            for flag, value, default in (("--balance-loss", balance_loss, "switch"), ("--adapter-placement", adapter_placement, "post-ln")):
                if value != default:
                    raise ConfigError(f"{flag} is FFT-MoE's (the MoE adapter's); drop it with --method {method}")
            tier_list = parse_tiers(tiers, 1 << 30)
            if ranks is None:
                raise ConfigError(f"--method {method} needs --ranks: one rank (fedit), or one per tier (hetlora), e.g. --ranks 14,29,58")
            lora = LoraAdapterConfig(method=method, ranks=parse_ranks(ranks, tier_list), scale=lora_scale, seed=seed,
                                     target_modules=tuple(t.strip() for t in lora_targets.split(",") if t.strip()))  # fmt: skip
        opts = ExportOptions(
            out=out, tiers=tier_list, adapter=adapter, lora=lora, model=model,
            labels=labels.split(",") if labels is not None else None, num_labels=num_labels,
            max_seq_len=max_seq_len, pooling=pooling, force=force, measure=measure,
        )  # fmt: skip
        opts.resolved_labels()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_ARGS) from None

    start = time.perf_counter()
    try:
        with err.status("starting", spinner="dots") as status:

            def progress(msg: str) -> None:
                status.update(msg)
                err.print(f"[dim]{time.perf_counter() - start:6.1f}s[/dim] {msg}", highlight=False)

            manifest, reports = export_bundle(opts, progress)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_ARGS) from None
    except (ModelLoadError, UnsupportedArchitectureError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_MODEL) from None
    except OutputExistsError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_OUTPUT_EXISTS) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/yellow] nothing was written to --out")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - report, exit 1, leave nothing half-written
        err.print(f"[red]export failed:[/red] {type(exc).__name__}: {exc}", highlight=False)
        if os.environ.get("FFTMOE_DEBUG"):
            raise
        raise typer.Exit(EXIT_FAILED) from None

    total = time.perf_counter() - start
    if json_out:
        print(json.dumps({"out": str(opts.out), "seconds": round(total, 1), "tiers": [asdict(r) for r in reports]}, indent=2))
        return
    if manifest.is_lora:
        title = f"bundle {opts.out} ({manifest.model.model_type}, {manifest.method}: PEFT LoRA on {','.join(manifest.lora.target_modules)})"
    else:
        title = f"bundle {opts.out} ({manifest.model.model_type}, M={manifest.num_experts}, r={manifest.expert_dim}, top-k={manifest.top_k})"
    table = Table(title=title)
    for col in ("tier", "rank" if manifest.is_lora else "top-k", "trainable params", "artifact MB", "export s", "step s (16x64, 2 thr)", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in reports:
        table.add_row(
            str(r.slots), str(r.rank if manifest.is_lora else r.top_k), f"{r.trainable_params:,}", f"{r.artifact_mb:.1f}", f"{r.export_s:.1f}",
            "-" if r.step_time_s is None else f"{r.step_time_s:.3f}",
            "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
        )  # fmt: skip
    Console().print(table)
    Console().print(f"done in {total:.0f} s: {opts.out}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="fftmoe-export")


if __name__ == "__main__":
    sys.exit(main())
