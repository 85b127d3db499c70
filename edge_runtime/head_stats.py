"""Sufficient statistics of the closed-form head (Fed3R, arXiv 2406.01116), summed on a device, checked on read.

A device runs its training rows through the model once (no update) and sums, over examples i with pooled features
``phi_i`` [d] (the head's input, the eval model's ``features`` output) and labels ``y_i``::

    z_i   = [phi_i; 1]                      # [d + 1]: the 1 carries the bias
    gram  = sum_i z_i z_i^T                 # [d + 1, d + 1]
    cross = sum_i z_i onehot(y_i)^T         # [d + 1, C]

The coordinator adds the devices' sums and solves one ridge system (``coordinator/ridge_head.py``). With the same
features, the sum of the devices' statistics is the statistics of the pooled rows, so the solution is the
centralised ridge head whatever the label skew.

The sums carry their own consistency: ``gram[d, d]`` is the number of examples, ``cross[d]`` the label counts (they
sum to it), ``gram[d, :d] = cross[:d].sum(1)`` (both are ``sum_i phi_i``), ``gram`` is symmetric and positive
semi-definite, and every entry obeys Cauchy-Schwarz (``|gram_jk| <= sqrt(gram_jj gram_kk)``, ``|cross_jc| <=
sqrt(gram_jj n_c)``). ``HeadStatistics.validate`` checks all of it, so a hostile device cannot send a matrix that
no set of rows could produce; it can still send rows of its own choosing (``ridge_head.screen_statistics`` bounds
their scale and share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.update import MAX_COUNT

STATS_FORMAT = "fftmoe-head-stats"
STATS_VERSION = 1
TOLERANCE = 1e-6
"""Relative tolerance of the consistency checks: float64 sums of float32 features over up to 2**53 rows are far
inside it; a matrix off by more was not summed from rows."""


class StatisticsError(ValueError):
    """Head statistics that no set of rows could produce, or of the wrong shape or count; names what is wrong."""


@dataclass
class HeadStatistics:
    """Sums over a device's training rows: ``gram`` [d + 1, d + 1] and ``cross`` [d + 1, C], float64."""

    gram: np.ndarray
    cross: np.ndarray
    examples: int

    @classmethod
    def zeros(cls, dim: int, num_labels: int) -> HeadStatistics:
        return cls(np.zeros((dim + 1, dim + 1), np.float64), np.zeros((dim + 1, num_labels), np.float64), 0)

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch: ``features`` [B, d] (pooled), ``labels`` [B] in 0..C-1."""
        z = np.concatenate([np.asarray(features, np.float64), np.ones((len(labels), 1))], axis=1)  # [B, d + 1]
        onehot = np.zeros((len(labels), self.cross.shape[1]))
        onehot[np.arange(len(labels)), np.asarray(labels, np.int64)] = 1.0
        self.gram += z.T @ z
        self.cross += z.T @ onehot
        self.examples += len(labels)

    def symmetrised(self) -> HeadStatistics:
        """The same sums with ``gram`` exactly symmetric (BLAS may round its two triangles differently)."""
        return HeadStatistics((self.gram + self.gram.T) / 2, self.cross, self.examples)

    @property
    def label_counts(self) -> np.ndarray:
        return self.cross[-1]

    @property
    def mean_square_norm(self) -> float:
        """The mean of ``|phi_i|^2`` over the rows: the scale of the features this device summed."""
        return float(np.trace(self.gram[:-1, :-1]) / max(self.examples, 1))

    def validate(self, dim: int, num_labels: int, max_examples: int = MAX_COUNT) -> HeadStatistics:
        """Self, if it could have been summed from at most ``max_examples`` rows of ``dim`` features and
        ``num_labels`` labels; else ``StatisticsError`` naming the first rule broken."""
        g, b, n = self.gram, self.cross, self.examples
        for name, a, shape in (("gram", g, (dim + 1, dim + 1)), ("cross", b, (dim + 1, num_labels))):
            if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.shape != shape:
                got = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise StatisticsError(f"head statistics: {name!r} must be float64 of shape {list(shape)}, got {got}")
            if not np.isfinite(a).all():
                raise StatisticsError(f"head statistics: {name!r} holds NaN or Inf")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_examples:
            raise StatisticsError(f"head statistics: 'examples' must be an integer in 1..{max_examples} (the device's training rows), got {n!r}")
        tol = TOLERANCE * n
        if abs(g[-1, -1] - n) > tol:
            raise StatisticsError(f"head statistics: gram[d, d] must equal the {n} examples, got {g[-1, -1]:.6g}")
        counts = b[-1]
        if (counts < -tol).any() or np.abs(counts - np.round(counts)).max() > tol or abs(counts.sum() - n) > tol:
            raise StatisticsError(f"head statistics: the label counts (cross[d]) must be whole numbers >= 0 summing to {n}")
        scale = max(1.0, float(np.abs(g).max()))
        if np.abs(g - g.T).max() > TOLERANCE * scale:
            raise StatisticsError("head statistics: 'gram' is not symmetric")
        if np.abs(g[-1, :-1] - b[:-1].sum(axis=1)).max() > TOLERANCE * max(1.0, float(np.abs(b).max()) * num_labels):
            raise StatisticsError("head statistics: gram[d, :d] and the sum of cross[:d] must both be the sum of the features")
        diag = np.diag(g)
        if (diag < 0).any():
            raise StatisticsError("head statistics: 'gram' has a negative diagonal entry")
        root = np.sqrt(diag)
        if (np.abs(g) > np.outer(root, root) * (1 + TOLERANCE) + TOLERANCE).any():
            raise StatisticsError("head statistics: 'gram' breaks Cauchy-Schwarz (|G_jk| > sqrt(G_jj G_kk))")
        if (np.abs(b) > np.outer(root, np.sqrt(np.maximum(counts, 0))) * (1 + TOLERANCE) + TOLERANCE).any():
            raise StatisticsError("head statistics: 'cross' breaks Cauchy-Schwarz (|B_jc| > sqrt(G_jj n_c))")
        smallest = float(np.linalg.eigvalsh(g)[0])
        if smallest < -TOLERANCE * float(diag.max()) * (dim + 1):
            raise StatisticsError(f"head statistics: 'gram' is not positive semi-definite (eigenvalue {smallest:.3g})")
        return self
