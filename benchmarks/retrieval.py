"""Retrieval at scale: exact chunked top-k of many queries against a large random gallery, optionally
compared with a FAISS index.

The gallery is filled block by block (random, L2-normalised), so building it never holds more than
the gallery plus one block.  fp32 storage of 1M x 512 is 2 GiB; ``float16`` storage halves that at a
score error of about 1e-3 (scores are still accumulated in fp32, block by block).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval import topk_retrieval

from .common import current_rss_bytes, peak_rss_bytes

FILL_BLOCK = 65536


@dataclass(frozen=True)
class RetrievalResult:
    gallery_size: int
    num_queries: int
    dim: int
    k: int
    dtype: str
    chunk_size: int
    seconds: float
    rss_before_bytes: int  # resident memory with the gallery built, before ranking
    peak_rss_bytes: int  # process peak after ranking
    faiss_seconds: float | None = None
    faiss_recall: float | None = None  # mean fraction of the exact top-k that FAISS returns
    faiss_index: str | None = None


def random_gallery(size: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """[size, dim] random unit vectors, generated block by block into one preallocated tensor."""
    gen = torch.Generator().manual_seed(seed)
    gallery = torch.empty(size, dim, dtype=dtype)
    for start in range(0, size, FILL_BLOCK):
        block = torch.randn(min(FILL_BLOCK, size - start), dim, generator=gen)
        gallery[start : start + block.shape[0]] = F.normalize(block, dim=-1).to(dtype)
    return gallery


def faiss_topk(queries: Tensor, gallery: Tensor, k: int, index_type: str) -> tuple[Tensor, float]:
    """Top-k indices from a FAISS inner-product index and the build + search seconds.

    ``flat`` is exact (``IndexFlatIP``); ``hnsw`` is approximate (``IndexHNSWFlat``, M=32, efSearch=128).
    FAISS is imported here so that it stays optional.
    """
    import faiss  # optional dependency: pip install faiss-cpu

    gallery_np = gallery.float().numpy()
    start = time.perf_counter()
    if index_type == "flat":
        index = faiss.IndexFlatIP(gallery_np.shape[1])
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(gallery_np.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown FAISS index {index_type!r}; choose 'flat' or 'hnsw'")
    index.add(gallery_np)
    _, indices = index.search(queries.float().numpy(), k)
    return torch.from_numpy(indices), time.perf_counter() - start


def recall_vs_exact(approximate: Tensor, exact: Tensor) -> float:
    """Mean over queries of |approximate ∩ exact| / k (both [Q, k] index tensors)."""
    hits = [len(set(a) & set(e)) for a, e in zip(approximate.tolist(), exact.tolist())]
    return sum(hits) / exact.numel()


def run_retrieval_benchmark(
    gallery_size: int = 1_000_000,
    num_queries: int = 1000,
    dim: int = 512,
    k: int = 50,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 4096,
    faiss_index: str | None = None,
    seed: int = 0,
) -> RetrievalResult:
    """Rank ``num_queries`` random queries against a random gallery with :func:`utils.topk_retrieval`."""
    gallery = random_gallery(gallery_size, dim, dtype, seed)
    queries = random_gallery(num_queries, dim, torch.float32, seed + 1)
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    _, exact = topk_retrieval(queries, gallery, k, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    result = RetrievalResult(
        gallery_size=gallery_size, num_queries=num_queries, dim=dim, k=k, dtype=str(dtype).removeprefix("torch."),
        chunk_size=chunk_size, seconds=seconds, rss_before_bytes=rss_before, peak_rss_bytes=peak_rss_bytes(),
    )
    if faiss_index is None:
        return result
    approximate, faiss_seconds = faiss_topk(queries, gallery, k, faiss_index)
    return RetrievalResult(
        **{**result.__dict__, "faiss_seconds": faiss_seconds, "faiss_recall": recall_vs_exact(approximate, exact),
           "faiss_index": faiss_index}
    )
