"""Scores of a given shortlist against the pairwise definitions they stand for."""

import pytest
import torch
import torch.nn.functional as F

from glassmetric.retrieval.shortlist import score_shortlist
from glassmetric.similarity.introspective import IntrospectiveParams, introspective_distance_matrix
from glassmetric.similarity.structural import explain_pair


def _fields(n, g):
    return {
        "embedding": F.normalize(torch.randn(n, 6, generator=g), dim=1),
        "local": F.normalize(torch.randn(n, 4, 6, generator=g), dim=-1),
        "uncertainty": torch.randn(n, 3, generator=g),
    }


def test_each_score_matches_its_pairwise_definition():
    g = torch.Generator().manual_seed(1)
    q, ref = _fields(3, g), _fields(7, g)
    idx = torch.tensor([[6, 0, 2], [1, 1, 5], [3, 4, 0]])
    params = IntrospectiveParams(alpha_scale=1.5, beta_offset=0.2)
    out = score_shortlist(q, ref, idx, epsilon=0.1, iters=50, introspective=params)
    for i in range(3):
        for j in range(3):
            gi = int(idx[i, j])
            e = explain_pair(
                q["local"][i], ref["local"][gi], q["embedding"][i], ref["embedding"][gi], epsilon=0.1, iters=50
            )
            assert float(out.global_scores[i, j]) == pytest.approx(float(e.s_global), abs=1e-5)
            assert float(out.structural_scores[i, j]) == pytest.approx(float(e.ss), abs=1e-4)
            assert float(out.multiscale_scores[i, j]) == pytest.approx(float(e.score), abs=1e-4)
            d = introspective_distance_matrix(
                q["embedding"][i : i + 1],
                q["uncertainty"][i : i + 1],
                ref["embedding"][gi : gi + 1],
                ref["uncertainty"][gi : gi + 1],
                params,
            )
            assert float(out.introspective_distances[i, j]) == pytest.approx(float(d), rel=1e-5)
            assert float(out.result_uncertainty[i, j]) == pytest.approx(float(ref["uncertainty"][gi].norm()), rel=1e-6)
    assert out.query_uncertainty.tolist() == pytest.approx(q["uncertainty"].norm(dim=1).tolist(), rel=1e-6)


def test_global_only_models_get_global_scores_only():
    g = torch.Generator().manual_seed(2)
    q, ref = _fields(2, g), _fields(4, g)
    out = score_shortlist(
        {"embedding": q["embedding"]}, {"embedding": ref["embedding"]}, torch.tensor([[0, 3], [2, 1]])
    )
    assert out.structural_scores is None and out.introspective_distances is None and out.query_uncertainty is None
    with pytest.raises(ValueError, match="indices"):
        score_shortlist(q, ref, torch.tensor([0, 1]))


def test_scores_of_a_query_are_its_row_by_name():
    g = torch.Generator().manual_seed(3)
    q, ref = _fields(2, g), _fields(5, g)
    out = score_shortlist(q, ref, torch.tensor([[4, 1], [0, 2]]))
    rows = out.scores(1)
    assert [set(r) for r in rows] == [{"global", "structural", "multiscale", "introspective", "uncertainty"}] * 2
    assert rows[1]["structural"] == pytest.approx(float(out.structural_scores[1, 1]))
    assert rows[0]["introspective"] == pytest.approx(float(out.introspective_distances[1, 0]))
    plain = score_shortlist({"embedding": q["embedding"]}, {"embedding": ref["embedding"]}, torch.tensor([[3], [1]]))
    assert plain.scores(0) == [{"global": pytest.approx(float(q["embedding"][0] @ ref["embedding"][3]))}]
