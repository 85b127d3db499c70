"""Fleet descriptions: shares to counts, a reproducible order, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devices.fleet import FleetError, list_fleets, load_fleet


def test_shipped_fleets_load() -> None:
    assert {"mixed-edge", "three-tiers"} <= set(list_fleets())
    fleet = load_fleet("mixed-edge")
    assert [m.profile.name for m in fleet.members] == ["rpi-4-2gb", "rpi-5-4gb", "laptop-x86-16gb"]


@pytest.mark.parametrize(("n", "want"), [(20, [8, 8, 4]), (10, [4, 4, 2]), (3, [1, 1, 1]), (4, [2, 1, 1]), (7, [3, 3, 1])])
def test_counts_follow_the_shares_by_largest_remainder(n: int, want: list[int]) -> None:
    counts = load_fleet("mixed-edge").counts(n)
    assert counts == want and sum(counts) == n


def test_assignment_is_reproducible_and_keeps_the_counts() -> None:
    fleet = load_fleet("mixed-edge")
    a, b, c = fleet.assign(20, 0), fleet.assign(20, 0), fleet.assign(20, 1)
    assert [m.profile.name for m in a] == [m.profile.name for m in b]
    assert [m.profile.name for m in a] != [m.profile.name for m in c]
    assert sorted(m.profile.name for m in a) == sorted(m.profile.name for m in c)
    assert sum(m.profile.name == "laptop-x86-16gb" for m in a) == 4


@pytest.mark.parametrize(
    ("devices", "match"),
    [
        ([], "'devices' must be a non-empty list"),
        ([{"profile": "rpi-4-2gb", "share": 0}], "'share' must be a positive number"),
        ([{"profile": "rpi-4-2gb", "share": 1, "tier": 0}], "'tier' must be a positive integer"),
        ([{"profile": "no-such-board", "share": 1}], r"devices\[0\]: no device profile 'no-such-board'"),
        ([{"share": 1}], "needs 'profile'"),
    ],
)
def test_malformed_fleets_are_refused_naming_the_field(tmp_path: Path, devices: list, match: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"format": "fftmoe-fleet", "format_version": 1, "devices": devices}))
    with pytest.raises(FleetError, match=match):
        load_fleet(str(path))


def test_unknown_fleet_and_wrong_format(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="shipped fleets: .*mixed-edge"):
        load_fleet("nope")
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"devices": [{"profile": "rpi-4-2gb", "share": 1}]}))
    with pytest.raises(FleetError, match="not a fftmoe-fleet version 1 file"):
        load_fleet(str(path))
