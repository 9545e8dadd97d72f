from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from glassmetric.data.sampler import MPerClassBatchSampler
from glassmetric.errors import ConfigError


def _labels(sizes):
    """Class c repeated sizes[c] times, shuffled so indices are not grouped by class."""
    labels = np.repeat(np.arange(len(sizes)) * 10, sizes)
    return np.random.default_rng(1).permutation(labels)


def _check_batches(batches, labels, m, batch_size):
    for batch in batches:
        assert len(batch) == batch_size
        counts = Counter(labels[batch].tolist())
        assert len(counts) == batch_size // m and set(counts.values()) == {m}


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=4, max_size=12),
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_every_batch_has_k_classes_m_times(sizes, m, k, seed):
    labels = _labels(sizes)
    batch_size = m * k
    assume(len(labels) >= batch_size)
    sampler = MPerClassBatchSampler(labels, m, batch_size, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // batch_size
    _check_batches(batches, labels, m, batch_size)


def test_small_classes_are_sampled_with_replacement():
    labels = _labels([1, 2, 3, 8, 8])
    batches = list(MPerClassBatchSampler(labels, 4, 8))
    _check_batches(batches, labels, 4, 8)
    by_class = [[i for i in b if labels[i] == labels[b[0]]] for b in batches]
    assert any(len(set(group)) < 4 for group in by_class)  # a small class repeated its images


def test_small_class_contributes_all_its_images():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    for batch in MPerClassBatchSampler(labels, 4, 8, drop_last=False):
        assert {0, 1, 2} <= set(batch)


def test_deterministic_per_seed_and_epoch():
    labels = _labels([6] * 20)
    a = MPerClassBatchSampler(labels, 3, 12, seed=5)
    b = MPerClassBatchSampler(labels, 3, 12, seed=5)
    epoch0 = list(a)
    assert epoch0 == list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0
    a.set_epoch(0)
    assert list(a) == epoch0
    assert list(MPerClassBatchSampler(labels, 3, 12, seed=6)) != epoch0


def test_classes_are_visited_evenly():
    labels = _labels([8] * 12)
    batches = list(MPerClassBatchSampler(labels, 2, 8))  # 12 batches x 4 classes = 4 rounds
    visits = Counter(int(labels[b[i]]) for b in batches for i in range(0, 8, 2))
    assert set(visits.values()) == {4}


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_ddp_replicas_split_the_global_sequence(num_replicas):
    labels = _labels([5] * 24)  # 120 images, batch 8: 15 global batches
    single = MPerClassBatchSampler(labels, 2, 8, seed=3)
    single.set_epoch(4)
    expected = list(single)[: 15 // num_replicas * num_replicas]
    replicas = []
    for rank in range(num_replicas):
        sampler = MPerClassBatchSampler(labels, 2, 8, seed=3, num_replicas=num_replicas, rank=rank)
        sampler.set_epoch(4)
        replicas.append(list(sampler))
        assert len(sampler) == len(replicas[-1]) == 15 // num_replicas
    for position, batch in enumerate(expected):
        assert replicas[position % num_replicas][position // num_replicas] == batch
    assert sorted(map(tuple, expected)) == sorted(tuple(b) for r in replicas for b in r)


def test_len_without_drop_last():
    labels = _labels([5] * 10)  # 50 images, batch 8: ceil -> 7 global batches
    assert len(MPerClassBatchSampler(labels, 2, 8, drop_last=False)) == 7
    ddp = [MPerClassBatchSampler(labels, 2, 8, num_replicas=3, rank=r, drop_last=False) for r in range(3)]
    assert [len(s) for s in ddp] == [len(list(s)) for s in ddp] == [3, 3, 3]
    assert len(MPerClassBatchSampler(labels, 2, 8, num_replicas=3)) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"m": 3, "batch_size": 8}, "batch_size=8, m=3"),
        ({"m": 0, "batch_size": 8}, "m=0"),
        ({"m": 2, "batch_size": 12}, "needs 6 classes per batch, but the labels hold only 5"),
        ({"m": 2, "batch_size": 8, "num_replicas": 2, "rank": 2}, "rank=2"),
        ({"m": 2, "batch_size": 8, "num_replicas": 2}, "no full batch"),
        ({"m": 2, "batch_size": 8, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MPerClassBatchSampler(_labels([3, 3, 3, 3, 3]), **kwargs)


def test_bad_epoch():
    with pytest.raises(ConfigError, match="epoch"):
        MPerClassBatchSampler(_labels([3, 3, 3, 3, 3]), 2, 8).set_epoch(-1)
