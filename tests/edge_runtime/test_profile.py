"""Device measurement, board profiles and the tier choice (largest tier whose scaled memory fits the budget)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from devices import DeviceProfile, ProfileError, list_profiles, load_profile
from edge_runtime.bundle import Measurement, load_manifest
from edge_runtime.profile import (
    SAFETY_MARGIN,
    TORCH_LIBRARY_MB,
    TORCH_MEMORY_FACTOR,
    TierChoiceError,
    choose_tier,
    estimate,
    measure_device,
    memory_budget,
)

# Figures of the shape the exporter records (MiniLM, batch 16): load RSS and peak RSS grow with the tier.
MEASURED = {1: (150.0, 300.0), 2: (170.0, 340.0), 4: (190.0, 420.0)}


def measured_manifest(bundle: Path):
    manifest = load_manifest(bundle)
    tiers = {
        t: dataclasses.replace(
            tier,
            measured=Measurement(16, 16, 2, 5, 0.5 * t, MEASURED[t][1], "x86_64", 50.0, MEASURED[t][0], 20.0),
        )
        for t, tier in manifest.tiers.items()
    }
    return dataclasses.replace(manifest, tiers=tiers)


def device(available: float, gflops: float = 10.0) -> DeviceProfile:
    return DeviceProfile("test", "a test board", "aarch64", 4, 1500, available + 200, available, gflops, False)


def test_measure_device_reports_real_figures() -> None:
    dev = measure_device(compute_seconds=0.2)
    assert dev.measured and dev.cores >= 1 and dev.compute_gflops > 0
    assert 0 < dev.memory_available_mb <= dev.memory_total_mb


def test_every_shipped_profile_loads() -> None:
    names = list_profiles()
    for required in ("rpi-zero-2w", "rpi-3b", "rpi-4-2gb", "rpi-4-4gb", "rpi-4-8gb", "rpi-5-4gb", "rpi-5-8gb",
                     "jetson-orin-nano-8gb", "laptop-x86-16gb"):  # fmt: skip
        assert required in names
    for name in names:
        p = load_profile(name)
        assert p.sources, f"{name} cites no source"
        assert p.arch in ("aarch64", "x86_64") and p.ort_training_wheel == (p.arch == "x86_64")


def test_profile_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no device profile 'rpi-99'.*rpi-4-4gb"):
        load_profile("rpi-99")
    bad = json.loads((Path(load_profile.__globals__["PROFILES_DIR"]) / "rpi-4-4gb.json").read_text())
    bad["compute_gflops"] = -1
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match="'compute_gflops' must be a positive number"):
        load_profile(str(tmp_path / "b.json"))


def test_scaling_rule(tiny_bundle: Path) -> None:
    manifest = measured_manifest(tiny_bundle)
    e = estimate(manifest, 2, device(4000, gflops=10.0), "ort", 8, budget_mb=1000)
    assert e.memory_mb == pytest.approx(170 + (340 - 170) * 0.5)
    assert e.step_time_s == pytest.approx(1.0 * 20.0 / 10.0 * 0.5)
    # PyTorch: the ORT figure times the measured ratio, or plus the libraries' fixed cost where that is more
    # (small figures: a small batch must not shrink the estimate below what the loaded model holds)
    t = estimate(manifest, 2, device(4000), "torch", 16, budget_mb=1000)
    assert t.memory_mb == pytest.approx(max(340 * TORCH_MEMORY_FACTOR, 340 + TORCH_LIBRARY_MB)) == pytest.approx(340 + TORCH_LIBRARY_MB)
    big = estimate(manifest, 2, device(4000), "torch", 64, budget_mb=10_000)
    assert big.memory_mb == pytest.approx((170 + 170 * 4) * TORCH_MEMORY_FACTOR)
    # rows truncated to half the bundle's maximum halve what a step adds, as halving the batch does
    short = estimate(manifest, 2, device(4000), "ort", 16, budget_mb=1000, seq_len=8)
    assert short.memory_mb == pytest.approx(e.memory_mb)


@pytest.mark.parametrize(("available", "tier", "batch"), [(4000, 4, 16), (420, 2, 16), (330, 2, 8)])
def test_largest_tier_that_fits(tiny_bundle: Path, available: float, tier: int, batch: int) -> None:
    manifest = measured_manifest(tiny_bundle)
    choice = choose_tier(manifest, device(available), "ort", 16)
    assert (choice.slots, choice.batch_size) == (tier, batch)
    assert choice.budget_mb == pytest.approx(memory_budget(device(available), None))
    chosen = next(e for e in choice.estimates if e.slots == tier)
    assert chosen.fits and chosen.memory_mb <= choice.budget_mb


def test_a_small_board_is_refused_with_the_shortfall(tiny_bundle: Path) -> None:
    manifest = measured_manifest(tiny_bundle)
    with pytest.raises(TierChoiceError, match=r"smallest, tier 1, needs ~188 MB at batch 4 x 16 tokens.*short by \d+ MB"):
        choose_tier(manifest, device(200), "ort", 16)


def test_max_memory_caps_and_tier_overrides(tiny_bundle: Path) -> None:
    manifest = measured_manifest(tiny_bundle)
    assert choose_tier(manifest, device(8000), "ort", 16, max_memory_mb=420).slots == 2
    forced = choose_tier(manifest, device(100), "ort", 16, tier=4)
    assert forced.slots == 4 and "--tier" in forced.reason
    from edge_runtime.bundle import BundleError

    with pytest.raises(BundleError, match="no tier 3"):
        choose_tier(manifest, device(8000), "ort", 16, tier=3)


def test_a_512_mb_board_gets_the_smallest_tier_or_a_clear_refusal(tiny_bundle: Path) -> None:
    manifest = measured_manifest(tiny_bundle)
    zero = load_profile("rpi-zero-2w")
    assert zero.memory_total_mb <= 512
    try:
        choice = choose_tier(manifest, zero, "torch", 16)
    except TierChoiceError as exc:
        assert "short by" in str(exc)
    else:
        assert choice.slots == min(manifest.tiers)
    assert SAFETY_MARGIN > 0
