"""Hypothesis settings shared by the fuzz tests: the same cases in CI every run, more and fresh ones on request."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("FFTMOE_FUZZ_SCALE", "1"))
"""``FFTMOE_FUZZ_SCALE=10`` runs ten times as many cases, with a fresh seed (CI's cases are derandomised)."""


def fuzz(cases: int) -> settings:
    """Hypothesis settings for ``cases`` generated cases (times FFTMOE_FUZZ_SCALE)."""
    return settings(
        max_examples=max(1, int(cases * SCALE)),
        deadline=None,
        derandomize="FFTMOE_FUZZ_SCALE" not in os.environ,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],  # fmt: skip
    )
