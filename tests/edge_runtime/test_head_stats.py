"""Head statistics (Fed3R sums): what a device sums, and every rule a reader checks, each broken once."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from edge_runtime.head_stats import HeadStatistics, StatisticsError

D, C = 6, 3


def honest(n: int = 40, seed: int = 0) -> HeadStatistics:
    rng = np.random.default_rng(seed)
    stats = HeadStatistics.zeros(D, C)
    for _ in range(2):
        stats.add(rng.normal(size=(n // 2, D)).astype(np.float32), rng.integers(0, C, n // 2))
    return stats.symmetrised()


def test_sums_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    phi, y = rng.normal(size=(17, D)), rng.integers(0, C, 17)
    stats = HeadStatistics.zeros(D, C)
    stats.add(phi[:9], y[:9])
    stats.add(phi[9:], y[9:])
    z = np.hstack([phi, np.ones((17, 1))])
    np.testing.assert_allclose(stats.gram, z.T @ z, rtol=1e-12)
    np.testing.assert_allclose(stats.cross, z.T @ np.eye(C)[y], rtol=1e-12)
    assert stats.examples == 17 and stats.label_counts.sum() == 17
    assert stats.validate(D, C, 17) is stats


def _edit(fn: Callable[[HeadStatistics], None]) -> HeadStatistics:
    s = honest()
    s.gram, s.cross = s.gram.copy(), s.cross.copy()
    fn(s)
    return s


def _asymmetric(s: HeadStatistics) -> None:
    s.gram[0, 1] += 1.0


def _nan(s: HeadStatistics) -> None:
    s.gram[2, 2] = np.nan


def _count(s: HeadStatistics) -> None:
    s.examples = 10**6


def _fractional_label(s: HeadStatistics) -> None:
    s.cross[-1, 0] += 0.5
    s.cross[-1, 1] -= 0.5


def _bias_entry(s: HeadStatistics) -> None:
    s.gram[-1, -1] += 3


def _sum_mismatch(s: HeadStatistics) -> None:
    s.cross[0, 0] += 5.0


def _cauchy_schwarz(s: HeadStatistics) -> None:
    s.gram[0, 1] = s.gram[1, 0] = 10 * np.sqrt(s.gram[0, 0] * s.gram[1, 1])


def _not_psd(s: HeadStatistics) -> None:
    # each pair within Cauchy-Schwarz, yet the 3 x 3 block [[1, -.9, -.9], [-.9, 1, -.9], [-.9, -.9, 1]] x scale is not PSD
    scale = s.gram[0, 0]
    for i in range(3):
        for j in range(3):
            s.gram[i, j] = scale * (1.0 if i == j else -0.9)
    for i in range(3):
        s.gram[i, 3:] = s.gram[3:, i] = 0.0
    s.gram[-1, :3] = s.gram[:3, -1] = 0.0
    s.cross[:3] = 0.0


def _cross_cs(s: HeadStatistics) -> None:
    s.cross[0, 0] += 1e3
    s.cross[0, 1] -= 1e3


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: setattr(s, "gram", s.gram.astype(np.float32)), "float64"),
    (lambda s: setattr(s, "cross", s.cross[:, :2]), "shape"),
    (lambda s: setattr(s, "gram", s.gram[:-1, :-1]), "shape"),
    (_nan, "NaN"), (_count, "examples"), (lambda s: setattr(s, "examples", True), "examples"),
    (lambda s: setattr(s, "examples", 0), "examples"), (_bias_entry, "gram[d, d]"), (_fractional_label, "label counts"),
    (_asymmetric, "symmetric"), (_sum_mismatch, "sum of the features"), (_cauchy_schwarz, "Cauchy-Schwarz"),
    (_cross_cs, "Cauchy-Schwarz"), (_not_psd, "positive semi-definite"),
], ids=["float32", "cross-shape", "gram-shape", "nan", "count", "bool-count", "zero-count", "bias-entry", "fractional-label",
        "asymmetric", "sum-mismatch", "gram-cs", "cross-cs", "not-psd"])  # fmt: skip
def test_each_broken_rule_is_named(edit: Callable[[HeadStatistics], None], message: str) -> None:
    with pytest.raises(StatisticsError, match=re.escape(message)):
        _edit(edit).validate(D, C, 100)


def test_the_not_psd_case_passes_every_pairwise_check() -> None:
    """The PSD check is not redundant: this matrix breaks no other rule."""
    s = _edit(_not_psd)
    root = np.sqrt(np.diag(s.gram))
    assert (np.abs(s.gram) <= np.outer(root, root) * (1 + 1e-9)).all()
    assert np.linalg.eigvalsh(s.gram)[0] < 0


def test_more_examples_than_the_device_holds_are_refused() -> None:
    with pytest.raises(StatisticsError, match="examples"):
        honest(40).validate(D, C, 39)
