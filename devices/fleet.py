"""Fleets: the mix of boards a simulated federation stands for (``devices/fleets/*.json``).

A fleet is a list of device profiles with their shares, for example 40% Raspberry Pi 4 2 GB, 40% Pi 5 and 20%
laptops. ``assign`` turns it into one profile per virtual device, reproducibly; the simulation then gives each
virtual device the tier its board would choose (``edge_runtime.profile.choose_tier``), so the fleet's
heterogeneity comes from the same rule real devices follow. The format is documented in ``docs/devices.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devices import DeviceProfile, ProfileError, load_profile, read_named_json

FLEETS_DIR = Path(__file__).resolve().parent / "fleets"
FLEET_FORMAT = "fftmoe-fleet"
FLEET_VERSION = 1


class FleetError(ValueError):
    """A fleet description is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class FleetMember:
    """One kind of device in a fleet: its profile, its share of the devices, and optionally a fixed tier."""

    profile: DeviceProfile
    share: float
    tier: int | None = None  # None: the tier the board chooses for the bundle


@dataclass(frozen=True)
class Fleet:
    name: str
    description: str
    members: tuple[FleetMember, ...]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Fleet:
        if not isinstance(d, dict):
            raise FleetError(f"{where}: a fleet must be a JSON object")
        if d.get("format") != FLEET_FORMAT or d.get("format_version") != FLEET_VERSION:
            raise FleetError(f"{where}: not a {FLEET_FORMAT} version {FLEET_VERSION} file (set \"format\" and \"format_version\")")
        raw = d.get("devices")
        if not isinstance(raw, list) or not raw:
            raise FleetError(f"{where}: field 'devices' must be a non-empty list of {{\"profile\": NAME, \"share\": X}}")
        members = []
        for i, m in enumerate(raw):
            at = f"{where}: devices[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("profile"), str):
                raise FleetError(f"{at}: needs 'profile' (a shipped profile name or a .json path)")
            share = m.get("share")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0:
                raise FleetError(f"{at}: 'share' must be a positive number, got {share!r}")
            tier = m.get("tier")
            if tier is not None and (isinstance(tier, bool) or not isinstance(tier, int) or tier < 1):
                raise FleetError(f"{at}: 'tier' must be a positive integer or absent, got {tier!r}")
            try:
                profile = load_profile(m["profile"])
            except ProfileError as exc:
                raise FleetError(f"{at}: {exc}") from exc
            members.append(FleetMember(profile, float(share), tier))
        return cls(str(d.get("name", Path(where).stem)), str(d.get("description", "")), tuple(members))

    def counts(self, num_devices: int) -> list[int]:
        """Devices per member for ``num_devices`` devices: shares normalised, rounded by largest remainder (ties go to
        the earlier member), so the counts add up exactly."""
        if num_devices < 1:
            raise FleetError(f"the number of devices must be >= 1, got {num_devices}")
        shares = np.array([m.share for m in self.members], np.float64)
        exact = shares / shares.sum() * num_devices
        counts = np.floor(exact).astype(int)
        order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
        for i in order[: num_devices - int(counts.sum())]:
            counts[i] += 1
        return counts.tolist()

    def assign(self, num_devices: int, seed: int = 0) -> list[FleetMember]:
        """One member per virtual device (device k gets entry k), in an order shuffled with ``seed`` so that device
        kinds do not line up with data partitions."""
        members = [m for m, c in zip(self.members, self.counts(num_devices)) for _ in range(c)]
        order = np.random.default_rng(seed).permutation(num_devices)
        return [members[i] for i in order]


def list_fleets() -> list[str]:
    """Names of the shipped fleets."""
    return sorted(p.stem for p in FLEETS_DIR.glob("*.json"))


def load_fleet(name_or_path: str) -> Fleet:
    """A shipped fleet by name (``mixed-edge``) or a fleet file by path."""
    data, path = read_named_json(name_or_path, FLEETS_DIR, "fleet", "fleets", FleetError)
    return Fleet.from_dict(data, str(path))
