"""Profiles of real boards (``devices/profiles/*.json``): memory, cores, a compute figure, and their sources.

A profile stands in for measuring the device (``fftmoe-edge profile --device NAME|FILE``); the simulation uses
them to emulate a heterogeneous fleet on one machine. The fields are documented in ``docs/devices.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A device profile is missing or malformed; the message names the file and field."""


@dataclass(frozen=True)
class DeviceProfile:
    """What the tier choice needs to know about a device."""

    name: str
    description: str
    arch: str  # platform.machine(): aarch64, x86_64
    cores: int
    max_freq_mhz: float
    memory_total_mb: float
    memory_available_mb: float
    compute_gflops: float  # sustained fp32 matrix-multiply throughput on the CPU, all cores
    ort_training_wheel: bool
    cpu: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""
    measured: bool = False  # True when measured on this machine, False when read from a profile

    @classmethod
    def from_dict(cls, d: Any, where: str) -> DeviceProfile:
        if not isinstance(d, dict):
            raise ProfileError(f"{where}: a profile must be a JSON object")

        def num(key: str, positive: bool = True) -> float:
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
                raise ProfileError(f"{where}: field '{key}' must be a positive number, got {v!r}")
            return float(v)

        for key in ("name", "description", "arch"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ProfileError(f"{where}: field '{key}' must be a non-empty string")
        if not isinstance(d.get("ort_training_wheel"), bool):
            raise ProfileError(f"{where}: field 'ort_training_wheel' must be true or false")
        profile = cls(
            name=d["name"], description=d["description"], arch=d["arch"], cores=int(num("cores")),
            max_freq_mhz=num("max_freq_mhz"), memory_total_mb=num("memory_total_mb"),
            memory_available_mb=num("memory_available_mb"), compute_gflops=num("compute_gflops"),
            ort_training_wheel=d["ort_training_wheel"], cpu=str(d.get("cpu", "")),
            sources=list(d.get("sources", [])), notes=str(d.get("notes", "")),
        )  # fmt: skip
        if profile.memory_available_mb > profile.memory_total_mb:
            raise ProfileError(f"{where}: memory_available_mb exceeds memory_total_mb")
        return profile


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def read_named_json(name_or_path: str, folder: Path, what: str, plural: str, error: type[Exception]) -> tuple[Any, Path]:
    """(parsed JSON, its path) of a shipped file by name (``folder/NAME.json``) or of a ``.json`` file by path;
    ``error`` names what is missing (listing the shipped ones) or which file is not valid JSON."""
    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.is_file():
        path = folder / f"{name_or_path}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
        raise error(f"no {what} {name_or_path!r}; shipped {plural}: {shipped}, or give a .json file")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc


def load_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (``rpi-4-4gb``) or a profile file by path."""
    data, path = read_named_json(name_or_path, PROFILES_DIR, "device profile", "profiles", ProfileError)
    return DeviceProfile.from_dict(data, str(path))
