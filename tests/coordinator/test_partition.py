"""Client partitioning: row-for-row equal to flwr-datasets / Hugging Face datasets where they are installed, and the
properties (disjoint, covering, reproducible, skew grows as alpha shrinks, clear errors) everywhere."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from coordinator.partition import PartitionError, dirichlet_partition, iid_partition, label_counts, train_test_split


def synthetic_labels(n: int, num_classes: int, seed: int, balanced: bool) -> np.ndarray:
    """n labels in 0..num_classes-1; unbalanced: class c drawn with weight 2**-c (class 0 most common)."""
    rng = np.random.default_rng(seed)
    weights = np.ones(num_classes) if balanced else 0.5 ** np.arange(num_classes)
    return rng.choice(num_classes, size=n, p=weights / weights.sum())


def flwr_partitions(labels: np.ndarray, num_partitions: int, **kwargs: object) -> list[np.ndarray]:
    """Row indices of every partition, as flwr-datasets' DirichletPartitioner returns them (via a row-id column)."""
    datasets = pytest.importorskip("datasets")
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    part = partitioner_mod.DirichletPartitioner(num_partitions=num_partitions, partition_by="label", **kwargs)
    part.dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified min_partition_size")  # its retry notices
        return [np.asarray(part.load_partition(i)["row"], dtype=np.int64) for i in range(num_partitions)]


def assert_same(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.array_equal(a, b), f"partition {i} differs: {a[:10]} vs {b[:10]}"


CASES = [  # (rows, classes, balanced, num_partitions, alpha, seed, min_partition_size, self_balancing, shuffle)
    (600, 4, True, 5, 0.5, 42, 10, False, True),
    (600, 4, False, 5, 0.5, 7, 10, True, True),
    (800, 10, True, 8, 0.1, 42, 5, False, False),
    (800, 10, False, 8, 0.1, 3, 5, True, True),
    (500, 10, False, 10, 10.0, 0, 10, False, True),
    (500, 4, True, 3, 10, 11, 10, True, False),  # int alpha
    (700, 10, True, 4, [0.1, 0.5, 1.0, 10.0], 5, 2, False, True),  # per-partition alpha
    (700, 4, False, 4, [0.2, 0.2, 5.0, 5.0], 9, 10, True, True),
    (300, 10, False, 20, 0.3, 1, 0, True, True),  # tiny partitions, empty ones allowed
    (120, 10, False, 7, np.full(7, 0.5), 13, 1, False, False),  # numpy alpha
]


@pytest.mark.parametrize("rows,classes,balanced,k,alpha,seed,min_size,balancing,shuffle", CASES)
def test_dirichlet_matches_flwr_datasets(
    rows: int, classes: int, balanced: bool, k: int, alpha: object, seed: int, min_size: int, balancing: bool,
    shuffle: bool,
) -> None:
    labels = synthetic_labels(rows, classes, 100 + rows + classes, balanced)
    kwargs = dict(alpha=alpha, seed=seed, min_partition_size=min_size, self_balancing=balancing, shuffle=shuffle)
    ours = dirichlet_partition(labels, k, **kwargs)  # type: ignore[arg-type]
    assert_same(ours, flwr_partitions(labels, k, **kwargs))


def test_retries_and_string_labels_match_flwr_datasets() -> None:
    labels = synthetic_labels(1000, 10, 1, True)
    kw = dict(alpha=0.05, seed=0, min_partition_size=20, self_balancing=False, shuffle=True)
    first_draw = dirichlet_partition(labels, 10, **{**kw, "min_partition_size": 0})  # type: ignore[arg-type]
    assert min(len(p) for p in first_draw) < 20  # so this case really goes through the retry loop
    assert_same(dirichlet_partition(labels, 10, **kw), flwr_partitions(labels, 10, **kw))  # type: ignore[arg-type]
    names = np.array(["cat", "dog", "Zebra", "ant", "bee"])[synthetic_labels(500, 5, 2, False)]  # "Zebra" sorts first
    kw = dict(alpha=0.3, seed=4, min_partition_size=5, self_balancing=True, shuffle=True)
    assert_same(dirichlet_partition(names, 6, **kw), flwr_partitions(names, 6, **kw))  # type: ignore[arg-type]


def test_self_balancing_zero_over_zero_matches_flwr_datasets() -> None:
    """With alpha 0.0005 a class's Dirichlet shares can all sit on partitions already above average (the others are
    exactly 0): flwr-datasets then divides 0/0 and splits at NaN, giving the whole class to the last partition."""
    labels = synthetic_labels(400, 10, 510, True)
    kw = dict(alpha=0.0005, seed=0, min_partition_size=0, self_balancing=True, shuffle=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = flwr_partitions(labels, 3, **kw)
    assert any(issubclass(w.category, RuntimeWarning) and "invalid value" in str(w.message) for w in caught)
    assert_same(dirichlet_partition(labels, 3, **kw), theirs)  # type: ignore[arg-type]


def test_unreachable_min_size_fails_like_flwr_datasets() -> None:
    labels = synthetic_labels(400, 10, 3, True)
    kw = dict(alpha=0.01, seed=1, min_partition_size=35, self_balancing=False, shuffle=True)
    with pytest.raises(PartitionError, match=r"min_partition_size=35 was not reached in 11 Dirichlet draws.*alpha"):
        dirichlet_partition(labels, 10, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max number of attempts"):
        flwr_partitions(labels, 10, **kw)


def test_federated_dataset_order_is_reproduced_through_the_shuffle_permutation() -> None:
    """FederatedDataset shuffles the split (Dataset.shuffle(seed)) before partitioning; mapping through it matches."""
    datasets = pytest.importorskip("datasets")
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    labels = synthetic_labels(500, 4, 8, False)
    ds = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(500))}).shuffle(seed=42)
    part = partitioner_mod.DirichletPartitioner(num_partitions=5, partition_by="label", alpha=0.5, seed=42)
    part.dataset = ds
    perm = np.random.default_rng(42).permutation(500)
    ours = [perm[p] for p in dirichlet_partition(labels[perm], 5, 0.5, seed=42)]
    assert_same(ours, [np.asarray(part.load_partition(i)["row"]) for i in range(5)])


def test_iid_matches_federated_dataset_shuffle_then_iid_partitioner() -> None:
    datasets = pytest.importorskip("datasets")
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    for n, k, seed in ((103, 10, 42), (50, 7, 0), (64, 64, 5)):
        part = partitioner_mod.IidPartitioner(num_partitions=k)
        part.dataset = datasets.Dataset.from_dict({"row": list(range(n))}).shuffle(seed=seed)
        assert_same(iid_partition(n, k, seed), [np.asarray(part.load_partition(i)["row"]) for i in range(k)])
        unshuffled = partitioner_mod.IidPartitioner(num_partitions=k)  # on its own: contiguous, unrandomised blocks
        unshuffled.dataset = datasets.Dataset.from_dict({"row": list(range(n))})
        blocks = [np.asarray(unshuffled.load_partition(i)["row"]) for i in range(k)]
        assert_same(np.array_split(np.arange(n), k), blocks)


def test_train_test_split_matches_hugging_face() -> None:
    datasets = pytest.importorskip("datasets")
    shard = np.random.default_rng(0).permutation(1000)[:137]
    ds = datasets.Dataset.from_dict({"row": shard.tolist()})
    for frac, seed in ((0.2, 42), (0.1, 3), (0.5, 0), (0.33, 9)):
        train, test = train_test_split(shard, frac, seed)
        hf = ds.train_test_split(test_size=frac, seed=seed)
        assert np.array_equal(train, hf["train"]["row"]) and np.array_equal(test, hf["test"]["row"])


# --- properties (no flwr-datasets needed) ---


@pytest.mark.parametrize("alpha,balancing", [(0.1, False), (0.5, True), (100.0, False)])
def test_dirichlet_parts_are_disjoint_cover_all_rows_and_are_reproducible(alpha: float, balancing: bool) -> None:
    labels = synthetic_labels(2000, 10, 0, False)
    parts = dirichlet_partition(labels, 12, alpha, seed=3, min_partition_size=5, self_balancing=balancing)
    allrows = np.concatenate(parts)
    assert len(allrows) == 2000 and np.array_equal(np.sort(allrows), np.arange(2000)) and min(map(len, parts)) >= 5
    assert all(p.dtype == np.int64 for p in parts)
    assert_same(dirichlet_partition(labels, 12, alpha, seed=3, min_partition_size=5, self_balancing=balancing), parts)
    other = dirichlet_partition(labels, 12, alpha, seed=4, min_partition_size=5, self_balancing=balancing)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
    counts = label_counts(labels, parts, 10)
    assert counts.shape == (12, 10) and np.array_equal(counts.sum(axis=0), np.bincount(labels, minlength=10))
    assert np.array_equal(counts.sum(axis=1), [len(p) for p in parts])


def test_without_shuffle_each_partition_lists_its_rows_class_by_class() -> None:
    labels = synthetic_labels(500, 4, 1, True)
    for part in dirichlet_partition(labels, 5, 1.0, seed=0, shuffle=False):
        assert np.all(np.diff(labels[part]) >= 0)
        for c in range(4):
            rows = part[labels[part] == c]
            assert np.all(np.diff(rows) > 0)


def mean_skew(alpha: float, seeds: range) -> float:
    """Average total-variation distance between a partition's label mix and the global one."""
    labels = synthetic_labels(3000, 10, 0, True)
    overall = np.bincount(labels, minlength=10) / len(labels)
    tv = []
    for seed in seeds:
        counts = label_counts(labels, dirichlet_partition(labels, 10, alpha, seed=seed, min_partition_size=1), 10)
        mix = counts / counts.sum(axis=1, keepdims=True)
        tv.extend(0.5 * np.abs(mix - overall).sum(axis=1))
    return float(np.mean(tv))


def test_smaller_alpha_gives_more_skewed_partitions() -> None:
    skew = {a: mean_skew(a, range(5)) for a in (0.1, 1.0, 100.0)}
    # Measured (seeds 0-4): 0.68, 0.33, 0.04; other seed blocks vary by ~0.03, far inside these margins.
    assert skew[0.1] > skew[1.0] + 0.15 and skew[1.0] > skew[100.0] + 0.15 and skew[100.0] < 0.1


def test_bad_dirichlet_arguments_name_the_argument() -> None:
    labels = synthetic_labels(100, 4, 0, True)
    for kwargs, pattern in (
        ({"num_partitions": 0}, "num_partitions must be an integer >= 1"),
        ({"num_partitions": 101}, r"num_partitions=101 is larger than the data set \(100 rows\)"),
        ({"alpha": 0.0}, "alpha values must be finite and > 0"),
        ({"alpha": -1.0}, "alpha values must be finite and > 0"),
        ({"alpha": [1.0, 1.0]}, "alpha has 2 values but num_partitions=5"),
        ({"alpha": float("nan")}, "alpha values must be finite"),
        ({"min_partition_size": 21}, r"min_partition_size=21 x num_partitions=5 exceeds the 100 rows.* at most 20"),
        ({"min_partition_size": -1}, "min_partition_size must be an integer >= 0"),
    ):  # fmt: skip
        args = {"num_partitions": 5, "alpha": 0.5, **kwargs}
        with pytest.raises(PartitionError, match=pattern):
            dirichlet_partition(labels, **args)  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="labels must be 1-D"):
        dirichlet_partition(labels.reshape(20, 5), 5, 0.5)
    assert issubclass(PartitionError, ValueError)


def test_iid_partition_properties() -> None:
    parts = iid_partition(103, 10, seed=1)
    assert [len(p) for p in parts] == [11, 11, 11] + [10] * 7
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert_same(iid_partition(103, 10, seed=1), parts)
    assert not np.array_equal(np.concatenate(iid_partition(103, 10, seed=2)), np.concatenate(parts))
    with pytest.raises(PartitionError, match="num_partitions=11 is larger than the data set"):
        iid_partition(10, 11, seed=0)
    with pytest.raises(PartitionError, match="num_rows must be an integer >= 1"):
        iid_partition(0, 1, seed=0)


def test_train_test_split_properties() -> None:
    shard = np.arange(500, 550)
    train, test = train_test_split(shard, 0.2, seed=7)
    assert (len(train), len(test)) == (40, 10) and np.array_equal(np.sort(np.concatenate([train, test])), shard)
    again = train_test_split(shard, 0.2, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(train_test_split(shard, 0.2, seed=8)[1], test)
    assert [len(x) for x in train_test_split(np.arange(2), 0.01, 0)] == [1, 1]  # at least one test row
    assert [len(x) for x in train_test_split(np.arange(2), 0.9, 0)] == [1, 1]  # and at least one train row
    assert [len(x) for x in train_test_split(np.arange(1), 0.5, 0)] == [1, 0]
    assert [len(x) for x in train_test_split(shard, 0.0, 0)] == [50, 0]
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(PartitionError, match="test_fraction must be in"):
            train_test_split(shard, bad, 0)


def test_label_counts_checks_num_classes() -> None:
    labels = np.array([0, 1, 1, 3])
    assert label_counts(labels, [np.array([0, 1]), np.array([2, 3])], 4).tolist() == [[1, 1, 0, 0], [0, 1, 0, 1]]
    with pytest.raises(PartitionError, match="num_classes=3; pass num_classes > 3"):
        label_counts(labels, [np.arange(4)], 3)
