"""A whole federation on one machine: the coordinator and N virtual devices of a fleet, over Flower's simulation runtime.

``fftmoe-coordinator simulate`` runs the same ServerApp (``coordinator.server_app``) and ClientApp
(``edge_runtime.client_app``) as a real deployment. The only difference is the transport: a SuperLink started with
``--simulation`` runs the ClientApps of ``--clients`` virtual SuperNodes in Ray workers instead of waiting for
devices to connect. Virtual SuperNodes know only their partition id, so each gets its settings (data files, tier,
device profile) from the simulation plan written here (``plan.json``), named in the run config.

Set-up, in order (all written into ``--out``, reused when the settings are unchanged, so a stopped run resumes):

1. the data: a labelled file, or AG News from the Hugging Face hub (``--data ag_news``, needs network);
2. a global test set held out first (``--global-test-fraction``), for the centralised accuracy of the global model;
3. the other rows partitioned over the clients: Dirichlet(alpha) over labels, exactly as flwr-datasets'
   ``DirichletPartitioner`` (``coordinator.partition``), or IID; each client's shard split into its local train and
   test parts (``--test-fraction``), the test part for the personalised accuracy (federated evaluation);
4. the fleet (``devices/fleets/*.json``): each client gets a device profile and the tier that board would choose
   for this bundle (``edge_runtime.profile.choose_tier``, with the backend the board has), unless the fleet fixes it.

Every virtual device trains with ONNX Runtime on this machine whatever board it stands for: the board decides the
tier (how many experts it holds), not the speed of the simulation. See docs/simulation.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PLAN_FILE = "plan.json"
PLAN_FORMAT = "fftmoe-sim-plan"
PLAN_VERSION = 1
HUB_DATASETS = {"ag_news": ("ag_news", "test", "text", "label")}
"""Names ``--data`` accepts besides a file: Hugging Face dataset id, split, text column, label column."""


class SimulationError(ValueError):
    """The simulation cannot be set up; the message names the option or file and the fix."""


@dataclass(frozen=True)
class SimSettings:
    """A simulated federation; each field is an option of ``fftmoe-coordinator simulate``."""

    bundle: Path
    """Bundle folder written by fftmoe-export (--bundle)."""
    data: str
    """Labelled data file (CSV, TSV, JSONL, Parquet), or ``ag_news`` from the Hugging Face hub (--data)."""
    out: Path
    """Run folder: plan, client data, global state, metrics, plots (--out)."""
    clients: int = 20
    """Virtual devices (--clients)."""
    fleet: str = "mixed-edge"
    """Fleet description: a name in devices/fleets or a .json file (--fleet)."""
    partition: str = "dirichlet"
    """dirichlet (label skew, --alpha) or iid (--partition)."""
    alpha: float = 0.5
    """Dirichlet concentration: smaller is more skewed (--alpha)."""
    min_partition_size: int = 10
    """Rows each client must get at least (flwr-datasets' min_partition_size) (--min-partition-size)."""
    test_fraction: float = 0.2
    """Share of each client's rows kept as its local test part (--test-fraction)."""
    global_test_fraction: float = 0.1
    """Share of all rows held out before partitioning, for the global model's accuracy (--global-test-fraction)."""
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    label_map: str = ""
    seed: int = 0
    """Seed of the hold-out, the partition, the fleet order, the sampling and the local data order (--seed)."""
    parallel: int = 0
    """Virtual devices training at once (Ray CPUs); 0: the machine's cores (--parallel)."""
    keep_models: bool = False
    """Each client writes its personalised model to OUT/models/CLIENT after each evaluation (--keep-models)."""
    run: dict[str, Any] = field(default_factory=dict)
    """Federation settings passed to the ServerApp (rounds, fraction, epochs, ...: see ``RunSettings``)."""

    def __post_init__(self) -> None:
        checks = [
            (self.clients >= 2, f"--clients must be >= 2, got {self.clients}"),
            (self.partition in ("dirichlet", "iid"), f"--partition must be dirichlet or iid, got {self.partition!r}"),
            (math.isfinite(self.alpha) and self.alpha > 0, f"--alpha must be a positive number, got {self.alpha}"),
            (0 <= self.test_fraction < 1, f"--test-fraction must be in [0, 1), got {self.test_fraction}"),
            (0 <= self.global_test_fraction < 1, f"--global-test-fraction must be in [0, 1), got {self.global_test_fraction}"),
            (self.min_partition_size >= 1, f"--min-partition-size must be >= 1, got {self.min_partition_size}"),
            (self.parallel >= 0, f"--parallel must be >= 0, got {self.parallel}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise SimulationError(message)

    def data_key(self) -> dict[str, Any]:
        """What fixes the client data and the fleet: a plan is reused only when these are unchanged."""
        return {"data": self.data, "clients": self.clients, "fleet": self.fleet, "partition": self.partition,
                "alpha": self.alpha if self.partition == "dirichlet" else None, "min_partition_size": self.min_partition_size,
                "test_fraction": self.test_fraction, "global_test_fraction": self.global_test_fraction,
                "text_columns": list(self.text_columns), "label_column": self.label_column, "label_map": self.label_map,
                "seed": self.seed}  # fmt: skip


# -- data ---------------------------------------------------------------------------------------------------------


def load_rows(settings: SimSettings, labels: list[str]) -> tuple[list[str], np.ndarray, str]:
    """(texts, label indices into ``labels``, where from): the data file, or a Hugging Face hub data set by name."""
    from edge_runtime.data import DataError, DataSpec, load_examples, parse_label_map

    path = Path(settings.data)
    if not path.exists() and settings.data in HUB_DATASETS:
        return _load_hub(settings.data, labels)
    if not path.is_file():
        known = ", ".join(HUB_DATASETS)
        raise SimulationError(f"--data {settings.data}: no such file (give a labelled CSV/TSV/JSONL/Parquet file, or one of: {known})")
    try:
        spec = DataSpec(settings.text_columns, settings.label_column, parse_label_map(settings.label_map))
        ex = load_examples(path, spec, labels)
    except DataError as exc:
        raise SimulationError(str(exc)) from exc
    return ex.texts, ex.labels, str(path)


def _load_hub(name: str, labels: list[str]) -> tuple[list[str], np.ndarray, str]:
    hub_id, split, text_col, label_col = HUB_DATASETS[name]
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing package, hub errors: all mean "not available"
        raise SimulationError(
            f"--data {name}: the Hugging Face hub is not reachable or the `datasets` package is missing ({type(exc).__name__}: "
            f"{str(exc)[:200]}); give a labelled file instead, e.g. --data ag_news.csv with --text-column title "
            f"--text-column description --label-map 1=World,2=Sports,3=Business,4=Sci/Tech"
        ) from exc
    names = ds.features[label_col].names
    index = {n: i for i, n in enumerate(labels)}
    missing = [n for n in names if n not in index]
    if missing:
        raise SimulationError(f"--data {name}: labels {missing} are not among the bundle's labels {labels}; export the bundle with --labels {','.join(names)}")
    return list(ds[text_col]), np.array([index[names[v]] for v in ds[label_col]], np.int64), f"{hub_id} ({split} split, Hugging Face hub)"


def _write_csv(path: Path, texts: list[str], label_ids: np.ndarray, labels: list[str], index: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in index:
            w.writerow([texts[i], labels[label_ids[i]]])
    tmp.replace(path)


# -- the plan -----------------------------------------------------------------------------------------------------


def _tier_for(member: Any, manifest: Any, batch_size: int) -> tuple[int, int, str]:
    from edge_runtime.profile import TierChoiceError, choose_tier

    if member.tier is not None:
        if member.tier not in manifest.tiers:
            raise SimulationError(f"fleet member {member.profile.name}: tier {member.tier} is not one of the bundle's tiers {sorted(manifest.tiers)}")
        return member.tier, batch_size, "fixed by the fleet"
    backend = "ort" if member.profile.ort_training_wheel else "torch"
    try:
        choice = choose_tier(manifest, member.profile, backend, batch_size)
    except TierChoiceError as exc:
        if all(t.measured is None for t in manifest.tiers.values()):
            raise SimulationError(f"fleet member {member.profile.name}: the bundle holds no measurements to choose its tier from "
                                  "(exported with --no-measure); give each fleet entry a \"tier\", or export without --no-measure") from exc  # fmt: skip
        raise SimulationError(f"fleet member {member.profile.name}: {exc}; drop it from the fleet or give it a \"tier\"") from exc
    return choice.slots, choice.batch_size, f"{member.profile.name} with the {backend} backend: {choice.reason}"


def prepare(settings: SimSettings) -> dict[str, Any]:
    """Write (or reuse) the run folder's client data and ``plan.json``; returns the plan."""
    from devices.fleet import FleetError, load_fleet
    from coordinator.partition import PartitionError, dirichlet_partition, iid_partition, label_counts, train_test_split
    from edge_runtime.bundle import load_manifest
    from edge_runtime.update import manifest_id

    manifest = load_manifest(settings.bundle)
    plan_path = settings.out / PLAN_FILE
    key = settings.data_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        if plan.get("format") == PLAN_FORMAT and plan.get("format_version") == PLAN_VERSION and plan.get("data_digest") == digest \
                and plan.get("manifest_id") == manifest_id(manifest) and all(Path(n["node_config"]["data"]).is_file() for n in plan["nodes"]):  # fmt: skip
            return plan
        raise SimulationError(f"{settings.out} holds a simulation with other data, fleet or bundle settings; choose another --out")
    try:
        fleet = load_fleet(settings.fleet)
    except FleetError as exc:
        raise SimulationError(str(exc)) from exc
    texts, y, source = load_rows(settings, manifest.labels)
    everything = np.arange(len(texts))
    pool, global_test = train_test_split(everything, settings.global_test_fraction, settings.seed)
    try:
        if settings.partition == "dirichlet":
            parts = dirichlet_partition(y[pool], settings.clients, settings.alpha, settings.seed, settings.min_partition_size)
        else:
            parts = iid_partition(len(pool), settings.clients, settings.seed)
    except PartitionError as exc:
        raise SimulationError(f"{exc} (options: --alpha, --min-partition-size, --clients; or another --seed)") from exc
    parts = [pool[p] for p in parts]
    members = fleet.assign(settings.clients, settings.seed)
    batch = int(settings.run.get("batch_size", 16))
    data_dir = settings.out / "data"
    _write_csv(data_dir / "global-test.csv", texts, y, manifest.labels, global_test)
    nodes = []
    for k, (part, member) in enumerate(zip(parts, members)):
        train, test = train_test_split(part, settings.test_fraction, settings.seed + 1 + k)
        if len(train) == 0:
            raise SimulationError(f"client {k} has no training rows ({len(part)} in its shard); raise --min-partition-size or lower --test-fraction")
        tier, tier_batch, reason = _tier_for(member, manifest, batch)
        name = f"client-{k:02d}"
        _write_csv(data_dir / f"{name}-train.csv", texts, y, manifest.labels, train)
        if len(test):
            _write_csv(data_dir / f"{name}-test.csv", texts, y, manifest.labels, test)
        node_config = {
            "data": str((data_dir / f"{name}-train.csv").resolve()), "eval-data": str((data_dir / f"{name}-test.csv").resolve()) if len(test) else "",
            "eval-fraction": 0.0, "bundle": str(Path(settings.bundle).resolve()), "cache-dir": str((settings.out / "cache").resolve()),
            "tier": tier, "batch-size": tier_batch, "backend": "auto", "threads": 1, "seed": settings.seed, "device": member.profile.name,
            "name": f"{name} {member.profile.name}", "text-columns": "text", "label-column": "label",
            "global-eval-data": str((data_dir / "global-test.csv").resolve()) if len(global_test) else "",
            "keep-model": str((settings.out / "models" / name).resolve()) if settings.keep_models else "",
        }  # fmt: skip
        nodes.append({"partition": k, "name": name, "profile": member.profile.name, "tier": tier, "tier_reason": reason,
                      "train_rows": int(len(train)), "test_rows": int(len(test)),
                      "label_counts": label_counts(y, [part], len(manifest.labels))[0].tolist(), "node_config": node_config})  # fmt: skip
    plan = {
        "format": PLAN_FORMAT, "format_version": PLAN_VERSION, "data_digest": digest, "settings": key, "source": source,
        "manifest_id": manifest_id(manifest), "bundle": str(Path(settings.bundle).resolve()), "labels": manifest.labels, "rows": len(texts), "global_test_rows": int(len(global_test)),
        "global_test": str((data_dir / "global-test.csv").resolve()), "fleet": {"name": fleet.name, "description": fleet.description},
        "nodes": nodes,
    }  # fmt: skip
    settings.out.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(PLAN_FILE + ".partial")
    tmp.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    tmp.replace(plan_path)
    return plan


def run_settings(settings: SimSettings, plan: dict[str, Any], resume: bool) -> Any:
    """The ServerApp's run config for this simulation (``RunSettings``)."""
    from coordinator.server_app import RunSettings

    run = {"rounds": 5, "round_timeout": 7200.0, "wait_seconds": 120.0, "min_clients": 2, **settings.run}
    return RunSettings(
        bundle=str(Path(settings.bundle).resolve()), state_dir=str((settings.out / "state").resolve()), seed=settings.seed,
        eval_data=plan["global_test"] if plan["global_test_rows"] else "", resume=resume, serve_artifacts=False,
        sim_plan=str((settings.out / PLAN_FILE).resolve()), **run,
    )  # fmt: skip
