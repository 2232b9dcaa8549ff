"""Approximate nearest-neighbour search (faiss HNSW or IVF-PQ) for galleries too large for exact search.

Exact search (:func:`retrieval.topk_retrieval`) reads every gallery feature for every query block:
O(Q·G·D) work and the whole [G, D] gallery in memory.  The two faiss indexes here trade recall for that:

* ``"hnsw"`` (``IndexHNSWFlat``): a graph over the full vectors; each query visits a few thousand nodes
  instead of G.  Memory: the vectors plus ~2·M links per item (no saving); the gain is speed.
* ``"ivfpq"`` (``IndexIVFPQ``): k-means cells (``nlist``) and product-quantised codes (``pq_bytes``
  sub-quantisers of ``pq_bits`` bits per item: 64 bytes at D = 512 by default, 1/32 of float32); a query
  scans ``nprobe`` cells.  The gain is memory: a
  1M-image gallery takes ~70 MiB instead of 2 GiB, and the gallery can be added block by block (e.g. from a
  memory-mapped tensor), so it need not fit in memory at once.

Scores are the index's inner products (exact for HNSW, decoded from the codes for IVF-PQ); results are
ordered by (-score, index).  Recall@k against exact search is what ``benchmark.py --ann`` prints.  A built
index is saved to a file (``retrieve.py``: beside the gallery's feature cache entry, under the same key),
written atomically with a SHA-256 digest, so a second run loads it instead of building it; a damaged file
is rebuilt.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from search_choices import ANN_KINDS
from utils import atomic_write_bytes

__all__ = ["ANNConfig", "build_index", "load_or_build_index", "ann_search", "index_file_name"]

_logger = logging.getLogger("cir.ann")
ADD_BLOCK = 1 << 16  # gallery rows converted to float32 and added at once
TRAIN_POINTS_PER_CELL = 64  # IVF k-means sample: 64 points per cell (faiss warns below 39)
_DIGEST = hashlib.sha256().digest_size


@dataclass(frozen=True)
class ANNConfig:
    """Index kind and its parameters.

    Build parameters (``hnsw_m``, ``ef_construction``, ``nlist``, ``pq_bytes``, ``pq_bits``) are part of the
    saved file's name; search parameters (``ef_search``, ``nprobe``) are set at every search.
    """

    kind: str = "hnsw"
    hnsw_m: int = 32  # graph degree M
    ef_construction: int = 80  # candidate list while building
    ef_search: int = 128  # candidate list while searching (>= k is enforced)
    nlist: int = 0  # IVF cells; 0: 4·sqrt(G), at most G // 64 (at least 1)
    pq_bytes: int = 0  # PQ sub-quantisers; 0: D // 8
    pq_bits: int = 8  # bits per sub-quantiser code (2^bits centroids to train)
    nprobe: int = 32  # IVF cells scanned per query

    def __post_init__(self) -> None:
        if self.kind not in ANN_KINDS:
            raise ValueError(f"unknown approximate index {self.kind!r}; choose one of {', '.join(ANN_KINDS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0 or self.pq_bytes < 0:
            raise ValueError("nlist and pq_bytes must be >= 0 (0: automatic)")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"pq_bits must lie in [1, 16], got {self.pq_bits}")

    def cells(self, size: int) -> int:
        return self.nlist or max(1, min(int(4 * math.sqrt(size)), size // TRAIN_POINTS_PER_CELL))

    def code_bytes(self, dim: int) -> int:
        pq = self.pq_bytes or max(1, dim // 8)
        if dim % pq:
            raise ValueError(f"pq_bytes={pq} must divide the feature dimension {dim}")
        return pq

    def tag(self, size: int, dim: int) -> str:
        """Build parameters as a file-name part, e.g. ``hnsw32-efc80`` or ``ivf1788-pq64x8``."""
        if self.kind == "hnsw":
            return f"hnsw{self.hnsw_m}-efc{self.ef_construction}"
        return f"ivf{self.cells(size)}-pq{self.code_bytes(dim)}x{self.pq_bits}"


def _faiss() -> ModuleType:
    """faiss, with as many threads as torch's intra-op pool."""
    try:
        faiss = importlib.import_module("faiss")
    except ImportError as error:
        raise ValueError("approximate search needs the faiss package (pip install faiss-cpu)") from error
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _blocks(gallery: Tensor) -> Iterator[np.ndarray]:
    for start in range(0, gallery.shape[0], ADD_BLOCK):
        yield gallery[start : start + ADD_BLOCK].detach().to("cpu", torch.float32).contiguous().numpy()


def build_index(gallery: Tensor, config: ANNConfig, seed: int = 0) -> Any:
    """A faiss inner-product index over ``gallery`` [G, D] (rows added in blocks of :data:`ADD_BLOCK`)."""
    faiss = _faiss()
    size, dim = gallery.shape
    if size == 0:
        raise ValueError("cannot build an approximate index of an empty gallery")
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    else:
        centroids = 2**config.pq_bits
        if size < centroids:
            raise ValueError(f"IVF-PQ with {config.pq_bits}-bit codes needs at least {centroids} gallery items to train "
                             f"its codebooks, got {size}; use exact search or fewer pq_bits")
        cells = config.cells(size)
        spec = f"IVF{cells},PQ{config.code_bytes(dim)}x{config.pq_bits}"
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        # k-means wants ~64 points per cell, the PQ codebooks ~39 per centroid.
        wanted = max(TRAIN_POINTS_PER_CELL * cells, 39 * centroids)
        sample = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:wanted]
        index.train(gallery[sample.sort().values].detach().to("cpu", torch.float32).contiguous().numpy())
    for block in _blocks(gallery):
        index.add(block)
    return index


def index_file_name(stem: str, config: ANNConfig, size: int, dim: int) -> str:
    """``<stem>.<tag>.faiss``: the index file of a gallery whose cache entry is ``<stem>.pt``."""
    return f"{stem}.{config.tag(size, dim)}.faiss"


def _save(index: Any, path: Path) -> None:
    data = _faiss().serialize_index(index).tobytes()
    atomic_write_bytes(path, data + hashlib.sha256(data).digest())


def _load(path: Path, size: int, dim: int) -> Any | None:
    """The index saved at ``path`` if it is intact and holds ``size`` vectors of ``dim``; else None."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        _logger.warning("cannot read approximate index %s (%s); rebuilding it", path, error)
        return None
    data, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if len(raw) <= _DIGEST or hashlib.sha256(data).digest() != digest:
        _logger.warning("approximate index %s is damaged (digest mismatch); rebuilding it", path)
        return None
    index = _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != size or index.d != dim:
        _logger.warning("approximate index %s holds %d x %d vectors, not %d x %d; rebuilding it",
                        path, index.ntotal, index.d, size, dim)
        return None
    return index


def load_or_build_index(
    path: str | os.PathLike | None, config: ANNConfig, size: int, dim: int, gallery: Callable[[], Tensor],
) -> tuple[Any, bool]:
    """The index saved at ``path``, or one built from ``gallery()`` (then saved there).

    ``gallery`` is called only to build, so a run that finds the file never loads the gallery features.
    ``size`` and ``dim`` (G and D) check that a saved index belongs to the gallery.  Returns the index and
    whether it was built.
    """
    path = None if path is None else Path(path)
    if path is not None and path.is_file():
        index = _load(path, size, dim)
        if index is not None:
            _logger.info("approximate index loaded from %s", path)
            return index, False
    features = gallery()
    if tuple(features.shape) != (size, dim):
        raise ValueError(f"gallery features have shape {tuple(features.shape)}, expected ({size}, {dim})")
    index = build_index(features, config)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(index, path)
        _logger.info("approximate index built and saved to %s", path)
    return index, True


def ann_search(
    index: Any, query_feats: Tensor, k: int, config: ANNConfig, exclude_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Approximate top-k by inner product.

    Args:
        index: from :func:`build_index` / :func:`load_or_build_index`.
        query_feats: [Q, D] queries.
        k: results wanted per query (>= 1).
        config: its ``ef_search`` / ``nprobe`` are applied.
        exclude_indices: optional [Q] gallery index per query to leave out (-1: none), as in
            :func:`retrieval.topk_retrieval`.

    Returns:
        (scores [Q, k'], indices [Q, k']) with k' = min(k, G - 1 if excluding else G), ordered by
        (-score, index); a query for which the index finds fewer items is padded with -inf / -1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    faiss = _faiss()
    extra = 1 if exclude_indices is not None else 0
    k_out = max(0, min(k, index.ntotal - extra))
    fetch = min(index.ntotal, k_out + extra)
    if config.kind == "hnsw":
        index.hnsw.efSearch = max(config.ef_search, fetch)
    else:
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    queries = query_feats.detach().to("cpu", torch.float32).contiguous().numpy()
    scores, indices = (torch.from_numpy(a) for a in index.search(queries, fetch))
    scores = scores.masked_fill(indices < 0, float("-inf"))
    if exclude_indices is not None:
        dropped = indices == exclude_indices.to("cpu", torch.long)[:, None]
        scores, indices = scores.masked_fill(dropped, float("-inf")), indices.masked_fill(dropped, -1)
    # (-score, index) order; missing results (-1, -inf) last.
    indices = torch.where(indices < 0, torch.iinfo(torch.long).max, indices)
    order = indices.sort(dim=1)
    scores, indices = scores.gather(1, order.indices), order.values
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k_out]
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    return scores, indices.masked_fill(indices == torch.iinfo(torch.long).max, -1)
