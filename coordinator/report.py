"""A run folder's results: per-round metrics (JSON lines), a summary, PNG plots, and the comparison of several runs.

Read from what the ServerApp saved (``state/history.json``) and the simulation plan (``plan.json``), so a report can
be rewritten at any time, also for a run that stopped half-way. The fields are documented in docs/simulation.md.

- ``metrics.jsonl``: one line per round: global accuracy and loss (the merged global model on the held-out global
  test set), personalised accuracy and loss (each device's sub-model, its tier's experts as assigned, on its own
  local test part: federated evaluation), train loss, bytes up and down per client, client wall time and peak
  memory per tier, expert-usage entropy;
- ``summary.json``: final and best accuracy, rounds to reach a target, upload per client-round, peak memory per
  tier, wall time;
- plots: ``accuracy.png`` (accuracy per round), ``accuracy-vs-upload.png``, ``expert-usage.png`` (expert x client
  heat map of routed tokens), ``memory.png`` (peak memory and wall time per tier), ``partition.png`` (label x client).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TARGET_ACCURACY = 0.8


class ReportError(ValueError):
    """A run folder cannot be reported on; the message names the file."""


def _client(name: str, node: str) -> str:
    return name.split(" ")[0] if name else f"node-{node}"


def method_name(manifest: Any) -> str:
    """The method a bundle trains: fftmoe, fftmoe-noaux when both auxiliary losses are off, fedit or hetlora."""
    if getattr(manifest, "is_lora", False):
        return str(manifest.method)
    return "fftmoe" if (manifest.aux_alpha or manifest.aux_beta) else "fftmoe-noaux"


def usage_entropy(tokens: np.ndarray) -> float | None:
    """Normalised entropy of the routed tokens over the experts (1: all experts used equally, 0: one expert)."""
    total = tokens.sum()
    if total <= 0 or len(tokens) < 2:
        return None
    p = tokens[tokens > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(tokens)))


def metrics_rows(history: list[dict[str, Any]], tiers: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per completed round (and round 0 when the initial model was evaluated)."""
    rows: list[dict[str, Any]] = []
    cumulative_up = 0.0
    for h in history:
        if "ridge_head" in h and "central" not in h:
            continue  # the closed-form head's record: in the summary (``head_statistics``), not a round
        if "ridge_head" in h and rows and rows[-1]["round"] == h["round"]:  # the head re-solved after the last round
            rows[-1]["global_accuracy_before_resolve"] = rows[-1].get("global_accuracy")
            rows[-1]["global_accuracy"], rows[-1]["global_loss"] = h["central"]["accuracy"], h["central"]["loss"]
            continue
        row: dict[str, Any] = {"round": int(h["round"])}
        if "central" in h:
            row["global_accuracy"], row["global_loss"] = h["central"]["accuracy"], h["central"]["loss"]
        if "train_loss" not in h:
            rows.append(row)
            continue
        names = h.get("names", {})
        client = {n: _client(names.get(n, ""), n) for n in h["tiers"]}
        up = {client[n]: float(b) for n, b in h["received_bytes"].items()}
        down = {client[n]: float(b) for n, b in h["sent_bytes"].items()}
        cumulative_up += sum(up.values())
        by_tier: dict[str, list[dict[str, float]]] = {}
        for n, m in h.get("client_metrics", {}).items():
            by_tier.setdefault(str(h["tiers"][n]), []).append(m)
        tokens = np.sum([np.asarray(t) for t in h.get("expert_tokens", {}).values()], axis=0) if h.get("expert_tokens") else np.zeros(0)
        row.update({
            "train_loss": h["train_loss"], "clients": sorted(up), "tiers": {client[n]: t for n, t in h["tiers"].items()},
            "upload_bytes": up, "download_bytes": down, "upload_mb_per_client": sum(up.values()) / max(1, len(up)) / 1e6,
            "download_mb_per_client": sum(down.values()) / max(1, len(down)) / 1e6, "cumulative_upload_mb": cumulative_up / 1e6,
            "client_seconds": {client[n]: m.get("seconds") for n, m in h.get("client_metrics", {}).items()},
            "tier_seconds": {t: float(np.mean([m.get("seconds", np.nan) for m in ms])) for t, ms in sorted(by_tier.items())},
            "tier_peak_rss_mb": {t: float(max(m.get("peak_rss_mb", 0.0) for m in ms)) for t, ms in sorted(by_tier.items())},
            "expert_usage_entropy": usage_entropy(tokens), "rejected": len(h.get("rejected", {})), "seconds": h.get("seconds"),
            "phase_seconds": h.get("phase_seconds", {}),
            "client_seconds_sum": float(sum(m.get("seconds", 0.0) for m in h.get("client_metrics", {}).values())),
            "client_train_seconds_sum": float(sum(m.get("train_seconds", 0.0) for m in h.get("client_metrics", {}).values())),
        })  # fmt: skip
        if "federated" in h:
            row["personal_accuracy"], row["personal_loss"] = h["federated"]["accuracy"], h["federated"]["loss"]
            if "personal_global_accuracy" in h["federated"]:
                row["personal_global_accuracy"] = h["federated"]["personal_global_accuracy"]
            per = h["federated"].get("per_node", {})
            if per:
                row["personal_accuracy_by_client"] = {client.get(n, _client(names.get(n, ""), n)): v["accuracy"] for n, v in per.items()}
        rows.append(row)
    return rows


def head_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """How the run set its head: the mode, and for a closed-form head what its statistics round used and cost."""
    info = next((h["ridge_head"] for h in history if "ridge_head" in h and not h["ridge_head"].get("resolve")), None)
    resolved = next((h for h in history if h.get("ridge_head", {}).get("resolve")), None)
    if info is None and resolved is None:
        return {"head": "fedavg"}
    if info is None:
        info = {"mode": "fedavg"}
    received = info.get("received_bytes", {})
    return {"head": info["mode"], "head_statistics": {"nodes": len(info.get("nodes", [])), "rejected": len(info.get("rejected", {})),
            "examples": info.get("examples"), "ridge": info.get("ridge"), "scale": info.get("scale"),
            "upload_mb_per_client": float(np.mean(list(received.values()))) / 1e6 if received else None},
            "head_resolved": None if resolved is None else {"nodes": len(resolved["ridge_head"].get("nodes", [])),
                                                            "global_accuracy": resolved.get("central", {}).get("accuracy")}}  # fmt: skip


def summarize(rows: list[dict[str, Any]], plan: dict[str, Any] | None, manifest: Any, target: float = TARGET_ACCURACY,
              history: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The figures of a run for the benchmark table."""
    trained = [r for r in rows if "train_loss" in r]
    glob = [(r["round"], r["global_accuracy"]) for r in rows if "global_accuracy" in r]
    pers = [(r["round"], r["personal_accuracy"]) for r in rows if "personal_accuracy" in r]
    reach = next((rnd for rnd, a in glob if a >= target and rnd > 0), None)
    peak: dict[str, float] = {}
    for r in trained:
        for t, v in r["tier_peak_rss_mb"].items():
            peak[t] = max(peak.get(t, 0.0), v)
    tier_counts: dict[str, int] = {}
    for n in (plan or {}).get("nodes", []):
        tier_counts[str(n["tier"])] = tier_counts.get(str(n["tier"]), 0) + 1
    return {
        "method": method_name(manifest), "rounds": len(trained), "clients": len((plan or {}).get("nodes", [])),
        "partition": (plan or {}).get("settings", {}).get("partition"), "alpha": (plan or {}).get("settings", {}).get("alpha"),
        "seed": (plan or {}).get("settings", {}).get("seed"), **head_summary(history or []),
        "fleet": (plan or {}).get("fleet", {}).get("name"), "tiers": tier_counts,
        "trainable_params_by_tier": {str(t): manifest.tiers[t].trainable_params for t in sorted(manifest.tiers)},
        "initial_global_accuracy": glob[0][1] if glob and glob[0][0] == 0 else None,
        "final_global_accuracy": glob[-1][1] if glob else None,
        "final_global_accuracy_before_resolve": next((r["global_accuracy_before_resolve"] for r in reversed(rows) if "global_accuracy_before_resolve" in r), None), "best_global_accuracy": max((a for _, a in glob), default=None),
        "last_two_global_delta": abs(glob[-1][1] - glob[-2][1]) if len(glob) >= 2 and glob[-2][0] > 0 else None,
        "final_personal_accuracy": pers[-1][1] if pers else None, "final_personal_global_accuracy": next((r["personal_global_accuracy"] for r in reversed(rows) if "personal_global_accuracy" in r), None), "target_accuracy": target, "rounds_to_target": reach,
        "upload_mb_per_client_round": float(np.mean([r["upload_mb_per_client"] for r in trained])) if trained else None,
        "download_mb_per_client_round": float(np.mean([r["download_mb_per_client"] for r in trained])) if trained else None,
        "total_upload_mb": trained[-1]["cumulative_upload_mb"] if trained else 0.0, "peak_rss_mb_by_tier": peak,
        "wall_seconds": float(sum(r.get("seconds") or 0.0 for r in trained)),
        "phase_seconds": {k: round(sum(r.get("phase_seconds", {}).get(k, 0.0) for r in trained), 1)
                          for k in sorted({k for r in trained for k in r.get("phase_seconds", {})})},
        "client_seconds_sum": float(sum(r["client_seconds_sum"] for r in trained)),
        "client_train_seconds_sum": float(sum(r["client_train_seconds_sum"] for r in trained)),
        "final_expert_usage_entropy": trained[-1]["expert_usage_entropy"] if trained else None,
    }  # fmt: skip


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".partial.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    _plt().close(fig)
    tmp.replace(path)


def plot_run(out: Path, rows: list[dict[str, Any]], history: list[dict[str, Any]], plan: dict[str, Any] | None, label: str) -> list[Path]:
    """The run's PNG plots; returns the files written."""
    plt = _plt()
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, name in (("global_accuracy", "o-", "global model, global test"), ("personal_accuracy", "s--", "personalised, local tests")):
        pts = [(r["round"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=name)
    ax.set_xlabel("round"), ax.set_ylabel("accuracy"), ax.set_title(label), ax.grid(alpha=0.3)
    ax.legend() if ax.lines else None
    _save(fig, out / "accuracy.png")
    written.append(out / "accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(r["cumulative_upload_mb"], r["global_accuracy"]) for r in rows if "global_accuracy" in r and "cumulative_upload_mb" in r]
    if pts:
        ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xlabel("cumulative upload, MB (all clients)"), ax.set_ylabel("global accuracy"), ax.grid(alpha=0.3)
    ax.legend() if ax.lines else None
    _save(fig, out / "accuracy-vs-upload.png")
    written.append(out / "accuracy-vs-upload.png")

    usage: dict[str, np.ndarray] = {}
    for h in history:
        for n, t in h.get("expert_tokens", {}).items():
            c = _client(h.get("names", {}).get(n, ""), n)
            usage[c] = usage.get(c, 0) + np.asarray(t, np.float64)
    if usage and len(next(iter(usage.values()))) > 1:  # a LoRA baseline has one adapter: nothing to show
        clients = sorted(usage)
        mat = np.stack([usage[c] for c in clients], axis=1)  # [M, clients]
        mat = mat / np.maximum(mat.sum(axis=0, keepdims=True), 1e-12)
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(clients) + 2), 4))
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(clients)), clients, rotation=90, fontsize=7)
        ax.set_ylabel("global expert"), ax.set_title("routed-token share per expert (all rounds, layers)", fontsize=9)
        fig.colorbar(im, ax=ax)
        _save(fig, out / "expert-usage.png")
        written.append(out / "expert-usage.png")

    trained = [r for r in rows if "tier_peak_rss_mb" in r]
    if trained:
        tiers = sorted({t for r in trained for t in r["tier_peak_rss_mb"]}, key=int)
        peak = [max(r["tier_peak_rss_mb"].get(t, 0.0) for r in trained) for t in tiers]
        secs = [float(np.nanmean([r["tier_seconds"].get(t, np.nan) for r in trained])) for t in tiers]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
        a1.bar(tiers, peak), a1.set_xlabel("tier (experts per layer)"), a1.set_ylabel("peak RSS, MB (client process)")
        a2.bar(tiers, secs), a2.set_xlabel("tier (experts per layer)"), a2.set_ylabel("mean client seconds per round")
        _save(fig, out / "memory.png")
        written.append(out / "memory.png")

    if plan and plan.get("nodes"):
        counts = np.array([n["label_counts"] for n in plan["nodes"]], np.float64).T  # [labels, clients]
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * counts.shape[1] + 2), 3.2))
        im = ax.imshow(counts, aspect="auto", cmap="magma")
        ax.set_yticks(range(len(plan["labels"])), plan["labels"])
        ax.set_xticks(range(counts.shape[1]), [f"{n['partition']}\nt{n['tier']}" for n in plan["nodes"]], fontsize=6)
        ax.set_xlabel("client (and its tier)"), ax.set_title("rows per label and client")
        fig.colorbar(im, ax=ax)
        _save(fig, out / "partition.png")
        written.append(out / "partition.png")
    return written


def write_report(out: Path, manifest: Any, plots: bool = True) -> dict[str, Any]:
    """Write metrics.jsonl, summary.json and the plots of a run folder; returns the summary."""
    history_path = out / "state" / "history.json"
    if not history_path.is_file():
        raise ReportError(f"{history_path}: no history (the run has not completed a round)")
    history = _read_json(history_path)
    plan = _read_json(out / "plan.json")
    rows = metrics_rows(history)
    summary = summarize(rows, plan, manifest, history=history)
    summary["settings"] = run_variant(manifest, _read_json(out / "state" / "run-settings.json"))
    summary["run"] = str(out)
    tmp = out / (METRICS_FILE + ".partial")
    tmp.write_text("".join(json.dumps({"method": summary["method"], **r}) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out / METRICS_FILE)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if plots:
        summary["plots"] = [str(p) for p in plot_run(out, rows, history, plan, summary["method"])]
    return summary


# -- several runs ------------------------------------------------------------------------------------------------


def load_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, metrics rows) of a reported run folder."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in (folder / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise ReportError(f"{folder}: no {Path(exc.filename).name} (run `fftmoe-coordinator report --out {folder}` first)") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{folder}: damaged summary or metrics ({exc})") from exc
    return summary, rows


def plot_compare(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Global accuracy against round and against cumulative upload, one line per run."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs:
        pts = [(r["round"], r["global_accuracy"]) for r in rows if "global_accuracy" in r]
        if pts:
            a1.plot(*zip(*pts), "o-", label=label, markersize=3)
        pts = [(r["cumulative_upload_mb"], r["global_accuracy"]) for r in rows if "global_accuracy" in r and "cumulative_upload_mb" in r]
        if pts:
            a2.plot(*zip(*pts), "o-", label=label, markersize=3)
    a1.set_xlabel("round"), a1.set_ylabel("global accuracy"), a1.grid(alpha=0.3)
    a2.set_xlabel("cumulative upload, MB (all clients)"), a2.set_ylabel("global accuracy"), a2.grid(alpha=0.3)
    for a in (a1, a2):
        a.legend(fontsize=7) if a.lines else None
    _save(fig, path)
    return path


VARIANT_DEFAULTS: dict[str, Any] = {
    "pooling": "mean", "balance_loss": "switch", "adapter_placement": "post-ln", "logit_adjust": 0.0,
    "ridge_resolve": False, "server_opt": "fedavgm", "server_lr": 1.0, "server_momentum": 0.0, "server_damping": 0.0,
}  # fmt: skip
"""The settings beside method and head that change what a run trains, with their defaults (for ``run_label``)."""


def run_variant(manifest: Any, run: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's and the run config's settings of ``VARIANT_DEFAULTS``; a run config written before
    STATE_DIR/run-settings.json existed leaves its keys out."""
    out = {k: getattr(manifest, k) for k in ("balance_loss", "adapter_placement") if hasattr(manifest, k)}
    if str(getattr(manifest, "pooling", "")).endswith("-l2"):  # mean and cls are the modalities' own poolings
        out["pooling"] = manifest.pooling
    if run is not None:
        out.update({k: run[k] for k in VARIANT_DEFAULTS if k in run})
    return out


def _read_json(path: Path) -> Any:
    """A run folder's JSON file, None when it is absent; a damaged one is a ReportError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: damaged ({exc})") from exc


def run_label(summary: dict[str, Any]) -> str:
    """What a run is, without its seed: the method, the head when it is not FedAvg's, and every setting of
    ``VARIANT_DEFAULTS`` that is not its default (e.g. ``fftmoe (ridge-frozen, logit_adjust=1)``)."""
    head = summary.get("head") or "fedavg"
    parts = [] if head == "fedavg" else [head]
    for key, default in VARIANT_DEFAULTS.items():
        value = (summary.get("settings") or {}).get(key, default)
        if value != default:
            parts.append(key if value is True else f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return summary["method"] if not parts else f"{summary['method']} ({', '.join(parts)})"


def paired_seeds(summaries: list[dict[str, Any]], key: str = "final_global_accuracy") -> dict[str, Any]:
    """Runs paired by seed (same data, partition and fleet): per seed each label's ``key``; and for each label after
    the first (the first run's), its difference to the first label at the seeds both ran, with mean and sample
    standard deviation. Runs of different data settings (partition, alpha) are not paired: raises ValueError."""
    settings = {(s.get("partition"), s.get("alpha")) for s in summaries}
    if len(settings) != 1:
        raise ValueError(f"paired runs must share partition and alpha, got {sorted(map(str, settings))}")
    labels = list(dict.fromkeys(run_label(s) for s in summaries))
    table: dict[int, dict[str, float]] = {}
    for s in summaries:
        if s.get(key) is not None and s.get("seed") is not None:
            table.setdefault(int(s["seed"]), {})[run_label(s)] = float(s[key])
    out: dict[str, Any] = {"key": key, "labels": labels, "seeds": {str(k): v for k, v in sorted(table.items())}, "against": labels[0], "differences": {}}
    for label in labels:
        values = [v[label] for v in table.values() if label in v]
        out.setdefault("means", {})[label] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                               "seeds": len(values)}  # fmt: skip
    for label in labels[1:]:
        diffs = [v[label] - v[labels[0]] for v in table.values() if label in v and labels[0] in v]
        out["differences"][label] = {"mean": float(np.mean(diffs)) if diffs else None, "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
                                     "seeds": len(diffs), "every_seed": diffs}  # fmt: skip
    return out
