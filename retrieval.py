"""Exact retrieval: the top-k gallery items of each query by dot product, in bounded memory.

Every ranking of the project (metrics, submissions, retrieval grids, ``retrieve.py``, CVSI) comes from
:func:`topk_retrieval`, so ties are broken the same way everywhere: by the lower gallery index.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["topk_retrieval", "ranked_names", "cirr_rankings", "name_to_index", "check_lengths"]


def topk_retrieval(
    query_feats: Tensor,
    gallery_feats: Tensor,
    k: int,
    exclude_indices: Tensor | None = None,
    chunk_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """Exact top-k gallery items per query by dot product, in bounded memory.

    score(q, g) = <query_feats[q], gallery_feats[g]> (cosine similarity when both are L2-normalised;
    nothing is normalised here). The result is identical to a dense stable sort of the full [Q, G]
    score matrix by descending score, ties broken by the lower gallery index.

    Queries and gallery are both processed in blocks of ``chunk_size``; a running top-k per query is
    merged with each gallery block, so peak memory is O(chunk_size * (chunk_size + k) + Q * k).

    Args:
        query_feats: [Q, D] query features.
        gallery_feats: [G, D] gallery features (same D, finite values).
        k: number of results wanted (>= 1).
        exclude_indices: optional [Q] long tensor; entry q is a gallery index removed from query q's
            ranking (CIRR removes the reference image), or -1 to remove nothing.
        chunk_size: block size for both queries and gallery.

    Returns:
        (scores [Q, k'], indices [Q, k']) with k' = min(k, G - 1) if ``exclude_indices`` is given,
        else min(k, G). Scores are computed in at least float32.
    """
    if query_feats.ndim != 2 or gallery_feats.ndim != 2:
        raise ValueError(
            f"expected 2-D features, got query {tuple(query_feats.shape)} and gallery {tuple(gallery_feats.shape)}"
        )
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"feature dims differ: query D={query_feats.shape[1]}, gallery D={gallery_feats.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # -inf marks excluded items below every real score, which only holds for finite features.
    # Checked block by block: isfinite over a whole 1M x 512 gallery would allocate gigabytes.
    if not all(
        bool(torch.isfinite(feats[start : start + chunk_size]).all())
        for feats in (query_feats, gallery_feats)
        for start in range(0, feats.shape[0], chunk_size)
    ):
        raise ValueError("query or gallery features contain NaN or inf")

    num_q, num_g = query_feats.shape[0], gallery_feats.shape[0]
    device = query_feats.device
    if exclude_indices is not None:
        if exclude_indices.shape != (num_q,):
            raise ValueError(f"exclude_indices must have shape ({num_q},), got {tuple(exclude_indices.shape)}")
        exclude_indices = exclude_indices.to(device=device, dtype=torch.long)
        if num_q and (exclude_indices.min() < -1 or exclude_indices.max() >= num_g):
            raise ValueError(f"exclude_indices must lie in [-1, {num_g - 1}]")
    k_out = max(0, min(k, num_g - (1 if exclude_indices is not None else 0)))

    dtype = torch.promote_types(query_feats.dtype, torch.float32)
    out_scores = torch.empty(num_q, k_out, dtype=dtype, device=device)
    out_indices = torch.empty(num_q, k_out, dtype=torch.long, device=device)
    if k_out == 0 or num_q == 0:
        return out_scores, out_indices

    for q0 in range(0, num_q, chunk_size):
        queries = query_feats[q0 : q0 + chunk_size].to(dtype)  # [cq, D]
        cq = queries.shape[0]
        best_scores = queries.new_empty(cq, 0)  # running top-k, [cq, <=k_out]
        best_indices = torch.empty(cq, 0, dtype=torch.long, device=device)
        for g0 in range(0, num_g, chunk_size):
            gallery = gallery_feats[g0 : g0 + chunk_size].to(device=device, dtype=dtype)  # [cg, D]
            cg = gallery.shape[0]
            sims = queries @ gallery.T  # [cq, cg]
            if exclude_indices is not None:
                local = exclude_indices[q0 : q0 + cq] - g0  # [cq]
                rows = ((local >= 0) & (local < cg)).nonzero().squeeze(1)
                sims[rows, local[rows]] = float("-inf")
            block_indices = _block_topk_indices(sims, k_out)  # [cq, <=k_out], ascending
            cand_scores = torch.cat([best_scores, sims.gather(1, block_indices)], dim=1)  # [cq, <=2k]
            cand_indices = torch.cat([best_indices, block_indices + g0], dim=1)
            # Candidates are laid out with equal scores in ascending gallery index (the running
            # top-k holds only earlier blocks, already tie-ordered; the block's own candidates are
            # in ascending index), so a stable sort keeps the lower index first among ties:
            # exactly the dense order.
            order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices[:, :k_out]
            best_scores = cand_scores.gather(1, order)
            best_indices = cand_indices.gather(1, order)
        out_scores[q0 : q0 + cq] = best_scores
        out_indices[q0 : q0 + cq] = best_indices
    return out_scores, out_indices


def _block_topk_indices(sims: Tensor, k: int) -> Tensor:
    """Column indices [R, min(k, C)] of each row's top k of ``sims`` [R, C] in the dense order (score
    descending, ties by lower column), returned in ascending column order.

    ``torch.topk`` selects the top-k set in one pass, far cheaper than sorting every column; its choice
    among values tied with the k-th best is unspecified, so rows with such a tie (more than k values
    at or above the k-th best) are redone with a stable sort.
    """
    if sims.shape[1] <= k:
        return torch.arange(sims.shape[1], device=sims.device).expand(sims.shape[0], -1)
    top = sims.topk(k, dim=1)
    indices = top.indices.sort(dim=1).values
    tied = ((sims >= top.values[:, -1:]).sum(dim=1) > k).nonzero().squeeze(1)
    if tied.numel():
        stable = torch.sort(sims[tied], dim=1, descending=True, stable=True).indices[:, :k]
        indices[tied] = stable.sort(dim=1).values
    return indices


def name_to_index(names: Sequence[Hashable]) -> dict[Hashable, int]:
    """Map gallery name -> position; gallery names must be unique."""
    index: dict[Hashable, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise ValueError(f"duplicate gallery name {name!r} at positions {index[name]} and {i}")
        index[name] = i
    return index


def check_lengths(num_queries: int, **lists: Sequence) -> None:
    """Raise ValueError naming the first per-query list whose length is not ``num_queries``."""
    for arg, values in lists.items():
        if len(values) != num_queries:
            raise ValueError(f"{arg} has {len(values)} entries but there are {num_queries} queries")


def ranked_names(
    query_feats: Tensor, gallery_feats: Tensor, gallery_names: Sequence[str], k: int,
    exclude_indices: Tensor | None = None, chunk_size: int = 4096,
) -> list[list[str]]:
    """Per query, the names of its top-``k`` gallery items, best first (:func:`topk_retrieval`'s order)."""
    if gallery_feats.shape[0] != len(gallery_names):
        raise ValueError(f"{gallery_feats.shape[0]} gallery features but {len(gallery_names)} gallery names")
    _, top = topk_retrieval(query_feats, gallery_feats, k, exclude_indices, chunk_size)
    return [[gallery_names[i] for i in row] for row in top.tolist()]


def cirr_rankings(
    query_feats: Tensor,
    gallery_feats: Tensor,
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    members: Sequence[Sequence[str]],
    k_full: int,
    k_subset: int,
    chunk_size: int,
) -> tuple[list[list[str]], list[list[str]]]:
    """CIRR rankings per query: the whole gallery, and the query's members; reference removed from both.

    The subset ranking is the full ranking restricted to the members (same similarity, ties again
    broken by the lower gallery index), as in the official evaluation.
    """
    num_q = query_feats.shape[0]
    check_lengths(num_q, reference_names=reference_names, members=members)
    name_index = name_to_index(gallery_names)
    # A reference outside the gallery has nothing to remove (-1).
    exclude = torch.tensor([name_index.get(ref, -1) for ref in reference_names], dtype=torch.long)
    full = ranked_names(query_feats, gallery_feats, gallery_names, k_full, exclude, chunk_size)

    # Candidate gallery indices per query, ascending so that a stable sort breaks ties by index.
    candidates: list[list[int]] = []
    for q, (ref, group) in enumerate(zip(reference_names, members)):
        missing = [m for m in group if m not in name_index]
        if missing:
            raise ValueError(f"query {q}: members {missing} are not in the gallery")
        candidates.append(sorted({name_index[m] for m in group if m != ref}))
    width = max((len(c) for c in candidates), default=0)
    dtype = torch.promote_types(query_feats.dtype, torch.float32)
    subset: list[list[str]] = []
    for q0 in range(0, num_q, chunk_size):
        block = candidates[q0 : q0 + chunk_size]
        cand = torch.zeros(len(block), width, dtype=torch.long)  # [cq, M], padded with index 0
        valid = torch.zeros(len(block), width, dtype=torch.bool)  # [cq, M]
        for row, idx in enumerate(block):
            cand[row, : len(idx)] = torch.tensor(idx, dtype=torch.long)
            valid[row, : len(idx)] = True
        queries = query_feats[q0 : q0 + len(block)].to(dtype)  # [cq, D]
        cand_feats = gallery_feats[cand.to(gallery_feats.device)].to(device=queries.device, dtype=dtype)  # [cq, M, D]
        scores = torch.einsum("qd,qmd->qm", queries, cand_feats)  # [cq, M]
        scores = scores.masked_fill(~valid.to(scores.device), float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices.cpu()
        ranked = cand.gather(1, order).tolist()
        for row, idx in zip(ranked, block):
            subset.append([gallery_names[i] for i in row[: min(k_subset, len(idx))]])
    return full, subset
