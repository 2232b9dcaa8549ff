"""Exact retrieval: the top-k gallery items of each query by dot product, in bounded memory.

Every ranking of the project (metrics, submissions, retrieval grids, ``retrieve.py``, CVSI) comes from
:func:`topk_retrieval`.  Its order is defined by the scores alone, whichever engine computes it:

    s(q, g) = <q, g> accumulated in float64, rounded to the score dtype (float32 for float32, float16 and
    bfloat16 features, float64 for float64 features),

by descending s, ties broken by the lower gallery index: a dense stable sort of the [Q, G] score matrix.
A float32 s is the exact dot product to within float64 error before its one rounding, so it does not
depend on summation order, BLAS kernel, thread count or block size, and items whose dot products tie
exactly (duplicated images) get equal scores (float64 features get float64 sums, whose last bits do
depend on the summation order).

Two engines find the candidates (``engine=``, or a :func:`use_engine` block):

* ``"faiss"``: faiss's exact brute-force inner-product search (the computation ``IndexFlatIP.search``
  runs: BLAS blocks and a heap per query, without copying the gallery into an index), on CPU, or on
  CUDA features with ``faiss-gpu``;
* ``"torch"``: blocks of ``queries @ gallery.T`` and a running ``torch.topk``;
* ``"auto"`` (default): faiss when it is installed (for CUDA features: when it has GPU support), else torch.

Either engine returns the k + margin best items by its own float32 scores; they are re-scored by s and
re-ranked by (-s, index).  That top k is the dense order once the candidates certainly contain every item
that belongs in it.  The engine's and the re-scoring's rounding errors are bounded by
eps = (gamma_{D+2}(u_engine) + gamma_D(2^-53) + u_score) * ||q|| * max_g ||g||, gamma_n(u) = n u / (1 - n u)
(any summation order), so an item left out has s <= (lowest engine score of the candidates) + eps; a k-th
re-scored score strictly above that bound certifies the query.  Queries without the certificate (ties or
near-ties at the k-th score that reach past the candidates, e.g. many duplicated images) are searched
again with four times as many candidates, up to the whole gallery.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Hashable, Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor

from search_choices import ENGINES

__all__ = [
    "topk_retrieval", "ranked_names", "cirr_rankings", "name_to_index", "check_lengths", "pair_scores",
    "resolve_engine", "use_engine", "default_engine", "faiss_module",
]

MIN_MARGIN = 16  # candidates beyond k per query (at least; k // 4 for large k)
WIDEN = 4  # growth of an uncertified query's candidate list
FAISS_GALLERY_BLOCK = 1 << 18  # gallery rows per faiss call (bounds the float32 copy of fp16 / bf16 galleries)
# Gallery rows per BLAS product inside faiss's search (its default, 1024, is ~10 % slower here: measured
# 1.20 s vs 1.33 s for 1,000 x 200,000 x 512, docs/performance.md); [4096 queries, 4096] float32 scores = 64 MiB.
FAISS_BLAS_GALLERY_BLOCK = 4096
RESCORE_ELEMENTS = 1 << 19  # float64 values gathered at once when re-scoring candidates (4 MiB: stays in cache)
NORM_HEADROOM = 1e-3  # relative slack on the feature norms of the error bound (their own rounding is ~D * 2^-24)
# The engine of rankings that name none: scoped by use_engine (a context variable, so threads and async
# tasks each see their own, and nothing outside the block is changed).
_ENGINE: contextvars.ContextVar[str] = contextvars.ContextVar("retrieval_engine", default="auto")


@functools.cache
def faiss_module() -> ModuleType | None:
    """The ``faiss`` package, or None when it is not installed (``pip install faiss-cpu``)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def _faiss_gpu(faiss: ModuleType) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown retrieval engine {engine!r}; choose one of {', '.join(ENGINES)}")


def resolve_engine(engine: str | None, device: torch.device | str) -> str:
    """``"faiss"`` or ``"torch"``: the engine that ranks features on ``device`` for the choice ``engine``
    (None: the default, see :func:`use_engine`).

    Raises:
        ValueError: an unknown engine, or ``"faiss"`` where faiss cannot run (not installed; CUDA features
            without faiss GPU support).
    """
    engine = _ENGINE.get() if engine is None else engine
    _check_engine(engine)
    if engine == "torch":
        return "torch"
    device = torch.device(device)
    faiss = faiss_module()
    if faiss is not None and (device.type == "cpu" or (device.type == "cuda" and _faiss_gpu(faiss))):
        return "faiss"
    if engine == "faiss":
        need = "the faiss package (pip install faiss-cpu)" if faiss is None else f"faiss with GPU support for {device} features (faiss-gpu)"
        raise ValueError(f"retrieval engine 'faiss' needs {need}; use engine 'auto' or 'torch'")
    return "torch"


def default_engine() -> str:
    """The engine rankings use when they name none: ``"auto"`` outside any :func:`use_engine` block."""
    return _ENGINE.get()


@contextlib.contextmanager
def use_engine(engine: str | None) -> Iterator[None]:
    """Within the block, rankings that name no engine use ``engine`` (None: keep the current one).

    Scripts wrap their work in it (``--retrieval_engine``), so validation, submissions and CVSI pick the
    engine without passing it through every call; the choice ends with the block.
    """
    if engine is None:
        yield
        return
    _check_engine(engine)
    token = _ENGINE.set(engine)
    try:
        yield
    finally:
        _ENGINE.reset(token)


def _score_dtype(features: Tensor) -> torch.dtype:
    return torch.promote_types(features.dtype, torch.float32)


def pair_scores(query_feats: Tensor, gallery_feats: Tensor, candidates: Tensor) -> Tensor:
    """s(q, g) of each query with its candidates: float64 dot products rounded to the score dtype.

    Args:
        query_feats: [R, D] features of R queries.
        gallery_feats: [G, D] gallery features (any device).
        candidates: [R, C] gallery indices (on the queries' device).

    Returns:
        [R, C] scores in ``promote_types(query dtype, float32)``.
    """
    num_rows, width = candidates.shape
    out = torch.empty(num_rows, width, dtype=_score_dtype(query_feats), device=query_feats.device)
    step = max(1, RESCORE_ELEMENTS // max(1, width * query_feats.shape[1]))
    for r0 in range(0, num_rows, step):
        cand = candidates[r0 : r0 + step]
        feats = gallery_feats.index_select(0, cand.reshape(-1).to(gallery_feats.device))  # [r·C, D]
        feats = feats.view(*cand.shape, -1).to(device=query_feats.device, dtype=torch.float64)  # [r, C, D]
        queries = query_feats[r0 : r0 + step].to(torch.float64)
        out[r0 : r0 + step] = torch.bmm(feats, queries[:, :, None]).squeeze(2)
    return out


def _row_norms(feats: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """[N] L2 norms of the rows of ``feats`` [N, D], in blocks; ValueError on NaN or inf.

    (One pass that also checks finiteness: ``torch.isfinite`` over a 1M x 512 gallery would allocate
    gigabytes at once, and block by block it costs more than the norms.)
    """
    norms = torch.empty(feats.shape[0], dtype=dtype, device=feats.device)
    for start in range(0, feats.shape[0], chunk_size):
        norms[start : start + chunk_size] = torch.linalg.vector_norm(feats[start : start + chunk_size].to(dtype), dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("query or gallery features contain NaN or inf")
    return norms


def _gamma(n: int, unit: float) -> float:
    """gamma_n = n u / (1 - n u): relative error bound of an n-term dot product in any summation order."""
    return n * unit / (1 - n * unit) if n * unit < 1 else float("inf")


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """float32 matrix products without TF32 / bf16 shortcuts, so the error bound of the docstring holds."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _merge(best_scores: Tensor, best_indices: Tensor, scores: Tensor, indices: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The ``width`` highest of two candidate lists [R, *] (order and choice among ties irrelevant)."""
    scores, indices = torch.cat([best_scores, scores], 1), torch.cat([best_indices, indices], 1)
    if scores.shape[1] <= width:
        return scores, indices
    top = scores.topk(width, dim=1, sorted=False)
    return top.values, indices.gather(1, top.indices)


def _torch_candidates(queries: Tensor, gallery_feats: Tensor, width: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The ``width`` best gallery indices per query [R, width] by blocked matmul, and their scores [R, width]."""
    device = queries.device
    best_scores = queries.new_empty(queries.shape[0], 0)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.long, device=device)
    with _full_precision_matmul():
        for g0 in range(0, gallery_feats.shape[0], chunk_size):
            sims = queries @ gallery_feats[g0 : g0 + chunk_size].to(device=device, dtype=queries.dtype).T  # [R, cg]
            if sims.shape[1] > width:
                top = sims.topk(width, dim=1, sorted=False)
                scores, indices = top.values, top.indices + g0
            else:
                scores = sims
                indices = torch.arange(g0, g0 + sims.shape[1], device=device).expand(sims.shape[0], -1)
            best_scores, best_indices = _merge(best_scores, best_indices, scores, indices, width)
    return best_indices, best_scores


@functools.cache
def _gpu_resources(faiss: ModuleType) -> object:
    return faiss.StandardGpuResources()


@contextlib.contextmanager
def _faiss_blas_block(faiss: ModuleType) -> Iterator[None]:
    """faiss's BLAS gallery block set to :data:`FAISS_BLAS_GALLERY_BLOCK` within the block (a faiss global)."""
    previous = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = FAISS_BLAS_GALLERY_BLOCK
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous


def _faiss_candidates(queries: Tensor, gallery_feats: Tensor, width: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The ``width`` best gallery indices per query [R, width] by faiss's exact inner-product search, and
    their float32 scores [R, width].  The gallery goes to faiss in blocks of :data:`FAISS_GALLERY_BLOCK`
    rows (zero-copy for contiguous float32 CPU features)."""
    faiss = faiss_module()
    device = queries.device
    if device.type == "cuda":
        import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take and return CUDA tensors)
    else:
        faiss.omp_set_num_threads(torch.get_num_threads())  # as many threads as torch's intra-op pool
    query_block = queries.detach().to(torch.float32).contiguous()
    best_scores = torch.empty(queries.shape[0], 0, dtype=torch.float32, device=device)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.long, device=device)
    with _faiss_blas_block(faiss):
        for g0 in range(0, gallery_feats.shape[0], FAISS_GALLERY_BLOCK):
            block = gallery_feats[g0 : g0 + FAISS_GALLERY_BLOCK].detach().to(device=device, dtype=torch.float32).contiguous()
            k = min(width, block.shape[0])
            if device.type == "cuda":
                scores, indices = faiss.knn_gpu(_gpu_resources(faiss), query_block, block, k,
                                                metric=faiss.METRIC_INNER_PRODUCT, device=device.index or 0)
            else:
                scores, indices = faiss.knn(query_block.numpy(), block.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
                scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
            best_scores, best_indices = _merge(best_scores, best_indices, scores, indices + g0, width)
    return best_indices, best_scores


def _prune(candidates: Tensor, engine_scores: Tensor, needed: int, bound: Tensor) -> Tensor:
    """The candidates [R, M] worth re-scoring: M is the most any row has within 2·bound of its
    ``needed``-th best engine score.  Any other candidate has s below that of ``needed`` candidates, so it
    cannot enter the top k (``needed`` = k, plus one where an excluded item may be among them)."""
    if needed >= candidates.shape[1]:
        return candidates
    threshold = engine_scores.topk(needed, dim=1).values[:, -1].double() - 2 * bound  # [R]
    keep = int((engine_scores.double() >= threshold[:, None]).sum(dim=1).max())
    if keep >= candidates.shape[1]:
        return candidates
    return candidates.gather(1, engine_scores.topk(keep, dim=1).indices)


def _rerank(queries: Tensor, gallery_feats: Tensor, candidates: Tensor, exclude: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` candidates [R, C] by (-s, index) with s = :func:`pair_scores`; excluded items last."""
    candidates = candidates.sort(dim=1).values  # ascending index, so that a stable sort breaks ties by it
    scores = pair_scores(queries, gallery_feats, candidates)
    if exclude is not None:
        scores = scores.masked_fill(candidates == exclude[:, None], float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), candidates.gather(1, order)


def topk_retrieval(
    query_feats: Tensor,
    gallery_feats: Tensor,
    k: int,
    exclude_indices: Tensor | None = None,
    chunk_size: int = 4096,
    engine: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k gallery items per query by dot product, in bounded memory.

    score(q, g) = <query_feats[q], gallery_feats[g]> (cosine similarity when both are L2-normalised;
    nothing is normalised here), computed as the module docstring says.  The result is identical to a
    dense stable sort of the full [Q, G] score matrix by descending score, ties broken by the lower gallery
    index, whatever the engine.

    Queries are processed in blocks of ``chunk_size`` (the torch engine also cuts the gallery into such
    blocks), so peak memory is the gallery plus O(chunk_size * (chunk_size + k)) (torch) or
    O(chunk_size * k) (faiss; plus a float32 copy of one gallery block of :data:`FAISS_GALLERY_BLOCK` rows
    when the gallery is not float32).

    Args:
        query_feats: [Q, D] query features.
        gallery_feats: [G, D] gallery features (same D, finite values).
        k: number of results wanted (>= 1).
        exclude_indices: optional [Q] long tensor; entry q is a gallery index removed from query q's
            ranking (CIRR removes the reference image), or -1 to remove nothing.
        chunk_size: block size for queries (and, for the torch engine, the gallery).
        engine: ``"auto"``, ``"faiss"`` or ``"torch"`` (None: :func:`default_engine`); see :func:`resolve_engine`.

    Returns:
        (scores [Q, k'], indices [Q, k']) with k' = min(k, G - 1) if ``exclude_indices`` is given,
        else min(k, G). Scores are in ``promote_types(query dtype, float32)``.
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
    device = query_feats.device
    search = _faiss_candidates if resolve_engine(engine, device) == "faiss" else _torch_candidates
    dtype = _score_dtype(query_feats)
    # Excluded items score -inf, below every real score; that, and the error bound, need finite features.
    query_norms = _row_norms(query_feats, chunk_size, dtype)
    gallery_norm = float(_row_norms(gallery_feats, chunk_size, dtype).amax()) if gallery_feats.shape[0] else 0.0

    num_q, num_g, dim = query_feats.shape[0], gallery_feats.shape[0], query_feats.shape[1]
    if exclude_indices is not None:
        if exclude_indices.shape != (num_q,):
            raise ValueError(f"exclude_indices must have shape ({num_q},), got {tuple(exclude_indices.shape)}")
        exclude_indices = exclude_indices.to(device=device, dtype=torch.long)
        if num_q and (exclude_indices.min() < -1 or exclude_indices.max() >= num_g):
            raise ValueError(f"exclude_indices must lie in [-1, {num_g - 1}]")
    k_out = max(0, min(k, num_g - (1 if exclude_indices is not None else 0)))

    out_scores = torch.empty(num_q, k_out, dtype=dtype, device=device)
    out_indices = torch.empty(num_q, k_out, dtype=torch.long, device=device)
    if k_out == 0 or num_q == 0:
        return out_scores, out_indices

    engine_unit = 2.0**-53 if search is _torch_candidates and dtype == torch.float64 else 2.0**-24
    relative_error = _gamma(dim + 2, engine_unit) + _gamma(dim, 2.0**-53) + torch.finfo(dtype).eps / 2
    extra = int(exclude_indices is not None)  # a candidate slot the excluded item may take
    first_width = min(num_g, k_out + max(MIN_MARGIN, k_out // 4) + extra)
    for q0 in range(0, num_q, chunk_size):
        queries = query_feats[q0 : q0 + chunk_size].to(dtype)  # [cq, D]
        bound = relative_error * (1 + NORM_HEADROOM) * gallery_norm * query_norms[q0 : q0 + chunk_size].double()  # [cq]
        exclude = None if exclude_indices is None else exclude_indices[q0 : q0 + chunk_size]
        rows, width = torch.arange(queries.shape[0], device=device), first_width
        while rows.numel():
            candidates, engine_scores = search(queries[rows], gallery_feats, width, chunk_size)
            floor = engine_scores.amin(dim=1).double()
            candidates = _prune(candidates, engine_scores, k_out + extra, bound[rows])
            scores, indices = _rerank(queries[rows], gallery_feats, candidates, None if exclude is None else exclude[rows], k_out)
            certified = scores[:, -1].double() > floor + bound[rows]
            done = torch.ones_like(certified) if width >= num_g else certified
            out_scores[q0 + rows[done]] = scores[done]
            out_indices[q0 + rows[done]] = indices[done]
            rows, width = rows[~done], min(num_g, width * WIDEN)
    return out_scores, out_indices


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
    exclude_indices: Tensor | None = None, chunk_size: int = 4096, engine: str | None = None,
) -> list[list[str]]:
    """Per query, the names of its top-``k`` gallery items, best first (:func:`topk_retrieval`'s order)."""
    if gallery_feats.shape[0] != len(gallery_names):
        raise ValueError(f"{gallery_feats.shape[0]} gallery features but {len(gallery_names)} gallery names")
    _, top = topk_retrieval(query_feats, gallery_feats, k, exclude_indices, chunk_size, engine)
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
    engine: str | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    """CIRR rankings per query: the whole gallery, and the query's members; reference removed from both.

    The subset ranking is the full ranking restricted to the members (the same scores, :func:`pair_scores`,
    ties again broken by the lower gallery index), as in the official evaluation.
    """
    num_q = query_feats.shape[0]
    check_lengths(num_q, reference_names=reference_names, members=members)
    name_index = name_to_index(gallery_names)
    # A reference outside the gallery has nothing to remove (-1).
    exclude = torch.tensor([name_index.get(ref, -1) for ref in reference_names], dtype=torch.long)
    full = ranked_names(query_feats, gallery_feats, gallery_names, k_full, exclude, chunk_size, engine)

    # Candidate gallery indices per query, ascending so that a stable sort breaks ties by index.
    candidates: list[list[int]] = []
    for q, (ref, group) in enumerate(zip(reference_names, members)):
        missing = [m for m in group if m not in name_index]
        if missing:
            raise ValueError(f"query {q}: members {missing} are not in the gallery")
        candidates.append(sorted({name_index[m] for m in group if m != ref}))
    width = max((len(c) for c in candidates), default=0)
    subset: list[list[str]] = []
    for q0 in range(0, num_q, chunk_size):
        block = candidates[q0 : q0 + chunk_size]
        cand = torch.zeros(len(block), width, dtype=torch.long)  # [cq, M], padded with index 0
        valid = torch.zeros(len(block), width, dtype=torch.bool)  # [cq, M]
        for row, idx in enumerate(block):
            cand[row, : len(idx)] = torch.tensor(idx, dtype=torch.long)
            valid[row, : len(idx)] = True
        queries = query_feats[q0 : q0 + len(block)]  # [cq, D]
        scores = pair_scores(queries, gallery_feats, cand.to(queries.device))  # [cq, M]
        scores = scores.masked_fill(~valid.to(scores.device), float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices.cpu()
        ranked = cand.gather(1, order).tolist()
        for row, idx in zip(ranked, block):
            subset.append([gallery_names[i] for i in row[: min(k_subset, len(idx))]])
    return full, subset
