"""SphereDistanceWeightedMiner against pytorch-metric-learning's DistanceWeightedMiner."""

import torch
from pytorch_metric_learning.miners import DistanceWeightedMiner

from glassmetric.losses.miners import SphereDistanceWeightedMiner

LABELS = torch.arange(8).repeat_interleave(4)


def _mine(miner, x):
    torch.manual_seed(11)
    return [t.tolist() for t in miner(x, LABELS)]


def test_same_triplets_as_pml_on_plain_embeddings():
    x = torch.nn.functional.normalize(torch.randn(len(LABELS), 16, generator=torch.Generator().manual_seed(0)), dim=1)
    assert _mine(SphereDistanceWeightedMiner(), x) == _mine(DistanceWeightedMiner(), x)


def test_packed_embeddings_sample_as_their_sphere_dimension():
    """Zero-padded embeddings have the same distances; with ``dimension`` the miner samples as
    on the 16-d sphere (PML, reading the width, would use 24)."""
    x = torch.nn.functional.normalize(torch.randn(len(LABELS), 16, generator=torch.Generator().manual_seed(1)), dim=1)
    padded = torch.cat([x, torch.zeros(len(x), 8)], dim=1)
    assert _mine(SphereDistanceWeightedMiner(dimension=16), padded) == _mine(DistanceWeightedMiner(), x)
    assert _mine(DistanceWeightedMiner(), padded) != _mine(DistanceWeightedMiner(), x)
