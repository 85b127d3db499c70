"""Splitting a labelled data set over simulated clients, in pure numpy (the coordinator does not need flwr-datasets).

``dirichlet_partition`` reproduces ``flwr_datasets.partitioner.DirichletPartitioner`` of flwr-datasets 0.6.1 row for
row: same arguments and seed, same index lists (checked against the library in ``tests/coordinator/test_partition.py``).
The label-skew scheme is the one of Hsu, Qi and Brown (2019), "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification" (arXiv:1909.06335): for every class, the shares of that class's
rows held by each client are drawn from Dirichlet(alpha); smaller alpha, more skewed clients. flwr-datasets' optional
self-balancing comes from the code of Yurochkin et al. (2019), arXiv:1905.12022.

The random-number use, in order, from one ``np.random.default_rng(seed)`` (as flwr-datasets):

1. for each attempt (at most 11), for each class in sorted order of its label value: one ``rng.dirichlet(alpha)``;
2. after the first attempt whose every partition has at least ``min_partition_size`` rows, if ``shuffle``: one
   ``rng.shuffle`` of each partition's indices, partition 0 first.

``iid_partition`` and ``train_test_split`` follow Hugging Face ``datasets`` (``Dataset.shuffle`` + contiguous
``shard``, as flwr-datasets' ``FederatedDataset`` + ``IidPartitioner`` do; ``Dataset.train_test_split``): see their
docstrings for where they agree and where they deliberately do not.

Note: ``FederatedDataset`` (flwr-datasets) shuffles the whole split with ``Dataset.shuffle(seed)`` (seed 42 by
default) *before* any partitioner sees it. To reproduce a ``FederatedDataset`` + ``DirichletPartitioner`` run, pass
the labels in that shuffled order and map back: ``perm = np.random.default_rng(fds_seed).permutation(n)``,
``[perm[p] for p in dirichlet_partition(labels[perm], ...)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np

MAX_DIRICHLET_ATTEMPTS = 11  # flwr-datasets 0.6.1: sampling_try 0..10, raises when the 11th draw still fails


class PartitionError(ValueError):
    """A partitioning argument is invalid or cannot be satisfied; the message names the argument and the fix."""


def _check_num_partitions(num_partitions: int, num_rows: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, Integral) or num_partitions < 1:
        raise PartitionError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions > num_rows:
        raise PartitionError(
            f"num_partitions={num_partitions} is larger than the data set ({num_rows} rows); use at most {num_rows} "
            "partitions or more data"
        )


def _alpha_vector(alpha: float | Sequence[float] | np.ndarray, num_partitions: int) -> np.ndarray:
    """One concentration value per partition (a scalar is repeated, as flwr-datasets does)."""
    try:
        arr = np.asarray(alpha, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PartitionError(f"alpha must be a positive number or one per partition, got {alpha!r}") from exc
    if arr.ndim == 0:
        arr = np.repeat(arr.reshape(1), num_partitions)
    else:
        arr = arr.ravel()
        if arr.shape[0] != num_partitions:
            raise PartitionError(
                f"alpha has {arr.shape[0]} values but num_partitions={num_partitions}; give one value per partition "
                "or a single number"
            )
    if not (np.isfinite(arr).all() and (arr > 0).all()):
        raise PartitionError(f"alpha values must be finite and > 0, got {arr.tolist()}; e.g. 0.1 (skewed), 100 (~IID)")
    return arr


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float | Sequence[float],
    seed: int | None = 42,
    min_partition_size: int = 10,
    self_balancing: bool = False,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """Label-skewed split: for each partition, the row indices (into ``labels``) it holds.

    Identical to flwr-datasets 0.6.1 ``DirichletPartitioner(num_partitions, partition_by, alpha, min_partition_size,
    self_balancing, shuffle, seed)`` on a data set whose label column is ``labels``. Per class (sorted label values),
    the class's rows, in row order, are cut into consecutive runs at ``floor(cumsum(p) * n_k)``, p ~ Dirichlet(alpha).
    With ``self_balancing`` a partition already holding more than ``len(labels) / num_partitions`` rows gets p = 0 for
    later classes (the rest renormalised). The whole draw is repeated until every partition has at least
    ``min_partition_size`` rows (at most 11 draws, then PartitionError). ``shuffle`` then shuffles each partition's
    indices; without it, a partition lists its rows class by class, each class in row order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be 1-D (one label per row), got shape {labels.shape}; pass the label column")
    num_rows = int(labels.shape[0])
    _check_num_partitions(num_partitions, num_rows)
    alphas = _alpha_vector(alpha, num_partitions)
    if isinstance(min_partition_size, bool) or not isinstance(min_partition_size, Integral) or min_partition_size < 0:
        raise PartitionError(f"min_partition_size must be an integer >= 0, got {min_partition_size!r}")
    if min_partition_size * num_partitions > num_rows:
        raise PartitionError(
            f"min_partition_size={min_partition_size} x num_partitions={num_partitions} exceeds the {num_rows} rows; "
            f"lower min_partition_size to at most {num_rows // num_partitions} or use fewer partitions"
        )

    rng = np.random.default_rng(seed)
    class_rows = [np.nonzero(labels == k)[0] for k in np.unique(labels)]  # np.unique sorts, like sorted(ds.unique())
    average = num_rows / num_partitions  # self-balancing threshold, as in flwr-datasets
    smallest = 0
    for _attempt in range(MAX_DIRICHLET_ATTEMPTS):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes = [0] * num_partitions
        for rows in class_rows:
            props = rng.dirichlet(alphas)
            if self_balancing:
                kept = [0.0 if sizes[i] > average else p for i, p in enumerate(props.tolist())]
                total = sum(kept)  # left-to-right float sum, as flwr-datasets' sum(dict.values())
                if total == 0.0:
                    # flwr-datasets divides 0/0 here; the NaN split points put the whole class on the last partition.
                    cuts = np.zeros(num_partitions - 1, dtype=np.int64)
                else:
                    cuts = (np.cumsum([p / total for p in kept]) * len(rows)).astype(int)[:-1]
            else:
                cuts = (np.cumsum(props) * len(rows)).astype(int)[:-1]
            for i, part in enumerate(np.split(rows, cuts)):
                pieces[i].append(part)
                sizes[i] += len(part)
        smallest = min(sizes)
        if smallest >= min_partition_size:
            break
    else:
        raise PartitionError(
            f"min_partition_size={min_partition_size} was not reached in {MAX_DIRICHLET_ATTEMPTS} Dirichlet draws "
            f"(smallest partition: {smallest} rows); raise alpha, lower min_partition_size or use fewer partitions"
        )

    parts = [np.concatenate(p).astype(np.int64, copy=False) for p in pieces]
    if shuffle:
        for part in parts:  # same permutation as flwr-datasets' rng.shuffle on its Python list
            rng.shuffle(part)
    return parts


def iid_partition(num_rows: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Uniform random split of rows ``0..num_rows-1`` into ``num_partitions`` near-equal parts.

    ``np.random.default_rng(seed).permutation(num_rows)`` cut with ``np.array_split`` (the first ``num_rows %
    num_partitions`` parts get one row more). flwr-datasets' ``IidPartitioner`` itself draws nothing: it takes
    contiguous ``Dataset.shard(contiguous=True)`` blocks (the same sizes as ``np.array_split``) of whatever order it is
    given; the randomness comes from ``FederatedDataset``, which first calls ``Dataset.shuffle(seed)`` (=
    ``default_rng(seed).permutation``). So this function equals ``FederatedDataset(shuffle=True, seed=seed)`` +
    ``IidPartitioner``, and equals ``IidPartitioner`` alone only on a data set shuffled that way beforehand.
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows, Integral) or num_rows < 1:
        raise PartitionError(f"num_rows must be an integer >= 1, got {num_rows!r}")
    _check_num_partitions(num_partitions, int(num_rows))
    perm = np.random.default_rng(seed).permutation(int(num_rows))
    return [p.astype(np.int64, copy=False) for p in np.array_split(perm, num_partitions)]


def train_test_split(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's shard into (local train, local test), both in shuffled order.

    Same as Hugging Face ``Dataset.train_test_split(test_size=test_fraction, seed=seed)`` on the shard (what the
    flwr-datasets examples do): ``perm = default_rng(seed).permutation(n)``, ``n_test = ceil(test_fraction * n)``,
    test = ``indices[perm[:n_test]]``, train = the rest. Where that library refuses (it would leave train empty, or
    ``test_fraction == 0``) this one still splits: ``n_test`` is capped at ``n - 1`` (a 1-row shard stays all
    train), and ``test_fraction = 0`` gives an empty test part.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise PartitionError(f"indices must be 1-D (one client's row indices), got shape {indices.shape}")
    if not isinstance(test_fraction, Real) or not 0.0 <= float(test_fraction) < 1.0:
        raise PartitionError(f"test_fraction must be in [0, 1), got {test_fraction!r}; e.g. 0.2 for a 80/20 split")
    n = int(indices.shape[0])
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(math.ceil(float(test_fraction) * n), max(n - 1, 0))
    return indices[perm[n_test:]], indices[perm[:n_test]]


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """[partitions, classes] row counts per label, for reports and plots; labels are integers in 0..num_classes-1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise PartitionError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(
            f"labels span {labels.min()}..{labels.max()} but num_classes={num_classes}; "
            f"pass num_classes > {labels.max()}"
        )
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        out[i] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return out
