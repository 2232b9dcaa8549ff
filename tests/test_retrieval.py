"""Tests for retrieval.py: exact chunked top-k against a dense sort, ties, input checks."""

import pytest
import torch

from retrieval import cirr_rankings, ranked_names, topk_retrieval


# ---------------------------------------------------------------------------------------------
# topk_retrieval
# ---------------------------------------------------------------------------------------------


def dense_topk(query, gallery, k, exclude=None):
    """Reference: full score matrix, stable descending sort (ties -> lower gallery index)."""
    scores = query @ gallery.T  # [Q, G]
    if exclude is not None:
        rows = (exclude >= 0).nonzero().squeeze(1)
        scores[rows, exclude[rows]] = float("-inf")
    k_out = min(k, gallery.shape[0] - (1 if exclude is not None else 0))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k_out]
    return scores.gather(1, order), order


def random_case(kind, num_q=11, num_g=17, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        query = torch.randn(num_q, dim, generator=gen, dtype=torch.float64)
        gallery = torch.randn(num_g, dim, generator=gen, dtype=torch.float64)
    else:
        # Small integers: every dot product is exact in float32, so ties are real and frequent;
        # duplicated gallery rows add more.
        query = torch.randint(-1, 2, (num_q, dim), generator=gen).float()
        gallery = torch.randint(-1, 2, (num_g, dim), generator=gen).float()
        gallery[5] = gallery[2]
        gallery[num_g - 1] = gallery[2]
    exclude = torch.randint(-1, num_g, (num_q,), generator=gen)
    exclude[0] = -1  # at least one query excludes nothing
    return query, gallery, exclude


@pytest.mark.parametrize("kind", ["gaussian", "ties"])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
@pytest.mark.parametrize("k", [1, 4, 17, 30])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_topk_matches_dense(kind, chunk_size, k, use_exclude):
    query, gallery, exclude = random_case(kind)
    exclude = exclude if use_exclude else None
    scores, indices = topk_retrieval(query, gallery, k, exclude, chunk_size=chunk_size)
    ref_scores, ref_indices = dense_topk(query, gallery, k, exclude)
    assert indices.shape == ref_indices.shape == (11, min(k, 17 - (1 if use_exclude else 0)))
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)
    if use_exclude:
        for row, excluded in zip(indices.tolist(), exclude.tolist()):
            assert excluded not in row


def test_topk_ties_prefer_lower_index():
    gallery = torch.tensor([[0.0], [1.0], [1.0], [0.5], [1.0]])
    query = torch.tensor([[1.0], [1.0]])
    # query 1 excludes gallery 1, so its tied best are 2 then 4.
    _, idx = topk_retrieval(query, gallery, 4, torch.tensor([-1, 1]), chunk_size=2)
    assert idx.tolist() == [[1, 2, 4, 3], [2, 4, 3, 0]]


def test_topk_rejects_bad_input():
    q, g = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError):
        topk_retrieval(q, torch.randn(4, 2), 1)
    with pytest.raises(ValueError):
        topk_retrieval(q, g, 0)
    with pytest.raises(ValueError):
        topk_retrieval(q, g, 1, torch.tensor([0, 4]))
    g[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_retrieval(q, g, 1)


def test_ranked_names_follow_topk_order():
    query, gallery, exclude = random_case("ties")
    names = [f"g{i}" for i in range(gallery.shape[0])]
    _, indices = topk_retrieval(query, gallery, 5, exclude)
    assert ranked_names(query, gallery, names, 5, exclude) == [[names[i] for i in row] for row in indices.tolist()]
    with pytest.raises(ValueError, match="gallery names"):
        ranked_names(query, gallery, names[:-1], 5)


def test_cirr_subset_ranking_is_the_full_ranking_restricted_to_the_members():
    query, gallery, _ = random_case("ties", num_q=6, num_g=12)
    names = [f"g{i}" for i in range(12)]
    references = [names[q] for q in range(6)]
    members = [[names[(q + j) % 12] for j in range(0, 10, 2)] for q in range(6)]
    full, subset = cirr_rankings(query, gallery, names, references, members, k_full=12, k_subset=3, chunk_size=4)
    for q in range(6):
        assert references[q] not in full[q] and len(full[q]) == 11
        dense = [n for n in ranked_names(query[q : q + 1], gallery, names, 12)[0] if n != references[q]]
        assert full[q] == dense
        allowed = set(members[q]) - {references[q]}
        assert subset[q] == [n for n in dense if n in allowed][:3]
