"""How close honest training comes to ``NormBound("auto")``, the per-unit bound the coordinator clips updates to.

    python benchmarks/update_bound_bench.py                      # runs/minilm-bundle, ../shared AG News, tiers 2,4,8
    python benchmarks/update_bound_bench.py --tiers 2 --lrs 1e-3 --json runs/update_bound.json

The coordinator bounds how far one update may move each unit (an expert's w1, b1, w2, b2; a layer's router rows; the
head) by sqrt(numel) * lr * adamw_reach(steps): the most AdamW can move it for ANY gradients. This trains honestly,
as a federated device does (ORT backend, a fresh session and fresh AdamW moments per round, the default assignment,
the bundle's global pool), on a label-skewed AG News shard of ``--rows`` rows (Dirichlet 0.5 like ``make demo``, or
``--sample iid``), and reports per tier, learning rate, setting and unit kind the largest and median ratio of the
honest move to its bound, how many units would be clipped (ratio > 1; there must be none), the absolute norms and
the largest per-parameter ratio |dtheta| / (lr * adamw_reach(steps)).

Settings per tier and learning rate: one epoch over the rows (ceil(rows / batch) steps), whose first step and first
``--local-steps`` steps are also what a device limited to 1 or to that many steps sends (same batches, same
moments); then ``--rounds`` - 1 more rounds of ``--local-steps`` steps, each starting from the previous round's
trained values with fresh moments and the next round's data order (seed + round), as ``client_app`` trains. The
ratio after every step of the epoch goes to the JSON output. Exits 1 if any unit would be clipped.

Needs ``make demo``'s bundle; export it first if it is missing (several minutes):

    HF_HUB_OFFLINE=1 fftmoe-export --tiers 2,4,8 --labels World,Sports,Business,Sci/Tech --out runs/minilm-bundle --force
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import typer  # noqa: E402

from coordinator.rounds import NormBound, adamw_reach, change_norms, unit_bounds  # noqa: E402
from edge_runtime.backends import trim_heap  # noqa: E402
from edge_runtime.bundle import Manifest, load_manifest  # noqa: E402
from edge_runtime.data import DataSpec, EncodedData, TextEncoder, encode_examples, load_examples, parse_label_map  # noqa: E402
from edge_runtime.session import RoutingStats, StepResult, TierSession, TrainConfig  # noqa: E402
from edge_runtime.update import default_assignment, tier_values_to_global  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ag_news" / "ag_news_6000.csv"
AG_NEWS_COLUMNS = ("title", "description")
AG_NEWS_LABELS = "1=World,2=Sports,3=Business,4=Sci/Tech"
KINDS = ("expert", "router", "head")
EXPORT_HINT = (
    "run `make demo` (it exports the bundle first), or export only the bundle:\n"
    "  HF_HUB_OFFLINE=1 fftmoe-export --tiers 2,4,8 "
    "--labels World,Sports,Business,Sci/Tech --out runs/minilm-bundle --force"
)


@dataclass
class KindFigures:
    """One unit kind in one honest update: how its units' moves compare with their auto bounds."""

    tier: int
    lr: float
    setting: str
    steps: int
    kind: str
    units: int
    max_ratio: float
    median_ratio: float
    clipped: int
    max_norm: float
    median_norm: float
    bound: float  # the largest bound of the kind (all units of a kind have the same size within a tier)
    max_param_ratio: float  # max |dtheta| / (lr * adamw_reach(steps)) over the kind's parameters


def unit_kind(unit: str) -> str:
    """expert / router / head for a unit name of ``coordinator.rounds.update_unit``."""
    return "expert" if ".experts." in unit else "router" if ".router_rows" in unit else "head"


def load_rows(data: Path, manifest: Manifest, bundle: Path, rows: int, sample: str, seed: int, max_seq_len: int) -> tuple[EncodedData, list[int]]:
    """``rows`` AG News rows tokenised as ``client_app._examples``/``_encoded`` do, and their label counts: from a
    Dirichlet(0.5) shard of 20 clients like ``make demo`` (the first shard holding that many), or uniformly."""
    from coordinator.partition import dirichlet_partition

    spec = DataSpec(AG_NEWS_COLUMNS, "label", parse_label_map(AG_NEWS_LABELS))
    examples = load_examples(data, spec, manifest.labels)
    if sample == "dirichlet":
        shards = dirichlet_partition(examples.labels, 20, 0.5, seed=seed, min_partition_size=10)
        shard = next((s for s in shards if len(s) >= rows), max(shards, key=len))
        index = np.asarray(shard[:rows])
    else:
        index = np.random.default_rng(seed).permutation(len(examples))[:rows]
    chosen = examples.subset(index)
    encoder = TextEncoder(bundle / Path(manifest.tokenizer_files[0].path).parent, max_seq_len)
    counts = np.bincount(chosen.labels, minlength=len(manifest.labels)).tolist()
    return encode_examples(chosen, encoder), counts


def figures(session: TierSession, sent: dict[str, np.ndarray], lr: float, steps: int, tier: int, setting: str) -> list[KindFigures]:
    """Per unit kind, the session's current values against ``sent`` (global names) and ``NormBound("auto")``,
    through the coordinator's own ``change_norms`` and ``unit_bounds``."""
    update = session.update(1, RoutingStats.zeros(session.manifest.num_layers, session.width))
    norms = change_norms(update, sent)
    bounds = unit_bounds(sent, NormBound("auto"), lr, steps)
    reach = lr * adamw_reach(steps)
    param_ratio: dict[str, float] = {}
    for key, value in update.tensors.items():
        if not key.startswith("stats."):
            kind = unit_kind(key.rsplit(".", 1)[0])
            moved = float(np.abs(value.astype(np.float64) - sent[key].astype(np.float64)).max()) / reach
            param_ratio[kind] = max(param_ratio.get(kind, 0.0), moved)
    out = []
    for kind in KINDS:
        units = [u for u in norms if unit_kind(u) == kind]
        if not units:  # tier 1 has no router rows
            continue
        ratio = np.array([norms[u] / bounds[u] for u in units])
        norm = np.array([norms[u] for u in units])
        out.append(KindFigures(tier, lr, setting, steps, kind, len(units), float(ratio.max()), float(np.median(ratio)),
                               int((ratio > 1).sum()), float(norm.max()), float(np.median(norm)),
                               max(bounds[u] for u in units), param_ratio[kind]))  # fmt: skip
    return out


def open_session(bundle: Path, manifest: Manifest, tier: int, threads: int, sent: dict[str, np.ndarray], assignment: list[list[int]]) -> TierSession:
    """A fresh ORT session (fresh AdamW moments, as every federated round opens one) loaded as ``client_app`` loads
    an instruction: ``sent`` under global names, through ``load_global``."""
    session = TierSession(bundle, manifest, tier, "ort", threads, verify=False, with_pool=False)
    session.load_global(sent, assignment)
    return session


def release() -> None:
    """Return a dropped session's memory before the next opens (a device holds one at a time)."""
    gc.collect()
    trim_heap()


def run_tier_lr(bundle: Path, manifest: Manifest, data: EncodedData, tier: int, lr: float, args: dict[str, Any]) -> tuple[list[KindFigures], list[dict[str, Any]]]:
    """The epoch (with its step-1 and local-steps snapshots) and the later rounds of one tier at one lr."""
    from safetensors.numpy import load_file

    batch, local, threads, seed = args["batch_size"], args["local_steps"], args["threads"], args["seed"]
    assignment = default_assignment(manifest, tier)
    pool = load_file(str(bundle / manifest.global_pool.path))
    session = TierSession(bundle, manifest, tier, "ort", threads, verify=False)
    session.load(pool, assignment)
    start = session.values()
    sent = tier_values_to_global(manifest, tier, assignment, start)
    epoch_steps = -(-len(data) // batch)
    rows: list[KindFigures] = []
    curve: list[dict[str, Any]] = []
    snapshot: dict[str, np.ndarray] = {}

    def on_step(step: StepResult) -> None:
        found = figures(session, sent, lr, step.step, tier, f"epoch, step {step.step}")
        curve.append({"tier": tier, "lr": lr, "steps": step.step, "loss": step.loss,
                      **{f"{f.kind}_max_ratio": f.max_ratio for f in found}, "clipped": sum(f.clipped for f in found)})  # fmt: skip
        if step.step == 1:
            rows.extend(_named(found, "1 step (epoch's first)"))
        if step.step == local:
            rows.extend(_named(found, f"{local} steps, round 1"))
            snapshot.update(session.values())
        if step.step == epoch_steps:
            rows.extend(_named(found, f"1 epoch, {len(data)} rows"))

    result = session.train(data, TrainConfig(epochs=1, batch_size=batch, learning_rate=lr, seed=seed + 1), on_step=on_step)
    assert result.steps == epoch_steps, (result.steps, epoch_steps)
    session = None  # type: ignore[assignment]
    release()
    values = snapshot
    for round_ in range(2, args["rounds"] + 1):
        sent_r = tier_values_to_global(manifest, tier, assignment, values)
        later = open_session(bundle, manifest, tier, threads, sent_r, assignment)
        config = TrainConfig(epochs=1, max_steps=local, batch_size=batch, learning_rate=lr, seed=seed + round_)
        done = later.train(data, config)
        rows.extend(figures(later, sent_r, lr, done.steps, tier, f"{local} steps, round {round_}"))
        values = later.values()
        later = None  # type: ignore[assignment]
        release()
    return rows, curve


def _named(found: list[KindFigures], setting: str) -> list[KindFigures]:
    for f in found:
        f.setting = setting
    return found


def print_table(rows: list[KindFigures]) -> None:
    """One line per tier, lr, setting and unit kind."""
    head = f"{'tier':>4} {'lr':>6} {'setting':<24} {'steps':>5} {'kind':<6} {'units':>5} {'max ratio':>9} {'median':>7} " \
           f"{'clipped':>7} {'max |d|':>9} {'median |d|':>10} {'bound':>9} {'param max':>9}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.tier:>4} {r.lr:>6g} {r.setting:<24} {r.steps:>5} {r.kind:<6} {r.units:>5} {r.max_ratio:>9.4f} {r.median_ratio:>7.4f} "
              f"{r.clipped:>7} {r.max_norm:>9.4g} {r.median_norm:>10.4g} {r.bound:>9.4g} {r.max_param_ratio:>9.4f}")  # fmt: skip


def main(
    bundle: Path = typer.Option(ROOT / "runs" / "minilm-bundle", help="make demo's MiniLM bundle (tiers 2,4,8, AG News labels)."),
    data: Path = typer.Option(DEFAULT_DATA, help="AG News CSV (columns label,title,description)."),
    tiers: str = typer.Option("2,4,8", help="Tiers to train, comma-separated."),
    lrs: str = typer.Option("1e-3,5e-3", help="Learning rates, comma-separated."),
    rows: int = typer.Option(300, help="Rows of the device's shard (one epoch = ceil(rows / batch) steps)."),
    sample: str = typer.Option("dirichlet", help="dirichlet: a Dirichlet(0.5) shard of 20 like make demo; iid: uniform."),
    local_steps: int = typer.Option(8, help="Local steps per round (make demo's --local-steps)."),
    rounds: int = typer.Option(3, help="Rounds of --local-steps in a row, each from the previous round's values."),
    batch_size: int = typer.Option(16, help="Batch size."),
    max_seq_len: int = typer.Option(64, help="Token limit per row (make demo's --max-seq-len)."),
    threads: int = typer.Option(2, help="ONNX Runtime threads."),
    seed: int = typer.Option(0, help="Seed of the shard and the data order (round r uses seed + r, as client_app)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the figures (and the per-step ratios) here."),
) -> None:
    """Train honestly per tier and learning rate; print how close each unit kind comes to its auto bound."""
    if not (bundle / "manifest.json").is_file():
        typer.echo(f"{bundle / 'manifest.json'} is missing: {EXPORT_HINT}", err=True)
        raise typer.Exit(2)
    if sample not in ("dirichlet", "iid"):
        raise typer.BadParameter("--sample must be dirichlet or iid")
    manifest = load_manifest(bundle)
    tier_list, lr_list = [int(t) for t in tiers.split(",")], [float(x) for x in lrs.split(",")]
    args = {"batch_size": batch_size, "local_steps": local_steps, "rounds": rounds, "threads": threads, "seed": seed}
    started = time.perf_counter()
    encoded, counts = load_rows(data, manifest, bundle, rows, sample, seed, max_seq_len)
    typer.echo(f"{len(encoded)} rows ({sample}), labels {dict(zip(manifest.labels, counts))}; "
               f"adamw_reach: 1 -> {adamw_reach(1):.4f}, {local_steps} -> {adamw_reach(local_steps):.4f}, "
               f"{-(-len(encoded) // batch_size)} -> {adamw_reach(-(-len(encoded) // batch_size)):.4f}", err=True)  # fmt: skip
    table: list[KindFigures] = []
    curve: list[dict[str, Any]] = []
    for tier in tier_list:
        for lr in lr_list:
            t0 = time.perf_counter()
            found, steps = run_tier_lr(bundle, manifest, encoded, tier, lr, args)
            table.extend(found)
            curve.extend(steps)
            worst = max(found, key=lambda f: f.max_ratio)
            typer.echo(f"tier {tier} lr {lr:g}: {time.perf_counter() - t0:.0f} s, tightest {worst.max_ratio:.4f} "
                       f"({worst.kind}, {worst.setting})", err=True)  # fmt: skip
    print_table(table)
    worst = max(table, key=lambda f: f.max_ratio)
    clipped = sum(f.clipped for f in table)
    per_kind = {k: max((f.max_ratio for f in table if f.kind == k), default=float("nan")) for k in KINDS}
    print(f"\ntightest ratio (max honest move / auto bound): {worst.max_ratio:.4f} ({worst.kind}, tier {worst.tier}, "
          f"lr {worst.lr:g}, {worst.setting}); per kind: " + ", ".join(f"{k} {v:.4f}" for k, v in per_kind.items()))  # fmt: skip
    print(f"units that would be clipped: {clipped}; {time.perf_counter() - started:.0f} s")
    if json_out is not None:
        meta = {"bundle": str(bundle), "data": str(data), "rows": len(encoded), "sample": sample, "label_counts": counts,
                "tiers": tier_list, "lrs": lr_list, **args, "max_seq_len": max_seq_len, "seconds": time.perf_counter() - started}  # fmt: skip
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"meta": meta, "figures": [asdict(f) for f in table], "per_step": curve,
                                        "tightest": asdict(worst), "clipped": clipped}, indent=2))  # fmt: skip
    if clipped:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
