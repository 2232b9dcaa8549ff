"""Retrieval at scale: the project's exact top-k next to faiss's exact search on the same features, and
optionally an approximate index with its recall against exact search.

The features (``features=``), filled block by block (building them never holds more than the gallery plus
one block; fp32 storage of 1M x 512 is 2 GiB, ``float16`` storage halves that):

* ``"random"``: random unit vectors, queries as well: the worst case for an approximate index (no
  neighbourhoods, near-equal distances);
* ``"clustered"``: a stand-in for the neighbourhood structure of real image features (not CLIP features):
  gallery items around ``G / 100`` random centres, each query a perturbed copy of one gallery item.

Timed, as medians of interleaved repetitions:

* ``project``: :func:`retrieval.topk_retrieval` with the default engine (faiss when installed): checks,
  search, re-ranking into the dense stable-sort order;
* ``torch``: the same function on the torch engine (the fallback without faiss);
* ``faiss``: ``faiss.IndexFlatIP.search`` alone, on an index holding the same vectors (its ``add``, a copy
  of the gallery, is not timed).

The project's results are checked bit-identical to the torch engine's, and their top-k sets against
faiss's (faiss orders tied and near-tied scores its own way, so only sets are compared).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ann import ANNConfig, ann_search, index_file_name, load_or_build_index
from retrieval import faiss_module, resolve_engine, topk_retrieval

from .common import current_rss_bytes, interleaved_medians, peak_rss_bytes

FILL_BLOCK = 65536


@dataclass(frozen=True)
class ANNResult:
    kind: str
    build_s: float  # build + save
    load_s: float  # a second run: the saved index read back
    search_s: float  # median search time of the loaded index
    recall: float  # mean fraction of the exact top-k found
    file_bytes: int  # size of the saved index


@dataclass(frozen=True)
class RetrievalResult:
    features: str  # "random" or "clustered"
    gallery_size: int
    num_queries: int
    dim: int
    k: int
    dtype: str
    chunk_size: int
    repeats: int
    engine: str  # the engine of the project's default ("faiss" or "torch")
    project_s: float
    torch_s: float
    faiss_s: float | None  # None: faiss not installed
    equal_to_torch: bool  # project and torch engine: identical indices and scores
    same_sets_as_faiss: int | None  # queries whose top-k set equals faiss's
    same_order_as_faiss: int | None  # ... and in the same order
    rss_before_bytes: int  # resident memory with the gallery built, before ranking
    peak_rss_bytes: int  # process peak after the run
    ann: ANNResult | None = None

    @property
    def faiss_ratio(self) -> float | None:
        """Project time over faiss's exact search time (1.0 = parity; below 1 = faster)."""
        return None if self.faiss_s is None else self.project_s / self.faiss_s


def random_gallery(size: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """[size, dim] random unit vectors, generated block by block into one preallocated tensor."""
    gen = torch.Generator().manual_seed(seed)
    gallery = torch.empty(size, dim, dtype=dtype)
    for start in range(0, size, FILL_BLOCK):
        block = torch.randn(min(FILL_BLOCK, size - start), dim, generator=gen)
        gallery[start : start + block.shape[0]] = F.normalize(block, dim=-1).to(dtype)
    return gallery


def clustered_features(gallery_size: int, num_queries: int, dim: int, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gallery [G, D] and queries [Q, D] with neighbourhoods, all unit vectors.

    With centres c_j (j < max(1, G / 100)) and noise n ~ N(0, I_D / D) (so ||n|| ~ 1):
    gallery item i = normalize(c_{i mod C} + n_i) (cosine ~0.7 to its centre); query q =
    normalize(g_{m_q} + 0.5 n_q) for a random gallery item m_q (cosine ~0.9 to it).
    """
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, gallery_size // 100), dim, generator=gen), dim=-1)
    gallery = torch.empty(gallery_size, dim, dtype=dtype)
    for start in range(0, gallery_size, FILL_BLOCK):
        rows = torch.arange(start, min(start + FILL_BLOCK, gallery_size))
        noise = torch.randn(len(rows), dim, generator=gen) / dim**0.5
        gallery[rows] = F.normalize(centres[rows % len(centres)] + noise, dim=-1).to(dtype)
    anchors = gallery[torch.randint(gallery_size, (num_queries,), generator=gen)].float()
    queries = F.normalize(anchors + 0.5 * torch.randn(num_queries, dim, generator=gen) / dim**0.5, dim=-1)
    return gallery, queries


FEATURES = ("random", "clustered")


def recall_vs_exact(approximate: Tensor, exact: Tensor) -> float:
    """Mean over queries of |approximate ∩ exact| / k (both [Q, k] index tensors)."""
    hits = [len(set(a) & set(e)) for a, e in zip(approximate.tolist(), exact.tolist())]
    return sum(hits) / exact.numel()


def _ann_result(
    gallery: Tensor, queries: Tensor, exact: Tensor, k: int, config: ANNConfig, index_dir: Path, repeats: int
) -> ANNResult:
    """Build and save the index, read it back as a second run would, time its search, measure recall."""
    size, dim = gallery.shape
    path = index_dir / index_file_name(f"benchmark_{size}x{dim}", config, size, dim)
    start = time.perf_counter()
    load_or_build_index(path, config, size, dim, lambda: gallery)
    build_s = time.perf_counter() - start

    def never() -> Tensor:
        raise AssertionError("the saved index was not found")

    start = time.perf_counter()
    index, _ = load_or_build_index(path, config, size, dim, never)
    load_s = time.perf_counter() - start
    search_s = interleaved_medians({"ann": lambda: ann_search(index, queries, k, config)}, repeats, torch.device("cpu"))["ann"]
    _, found = ann_search(index, queries, k, config)
    return ANNResult(config.kind, build_s, load_s, search_s, recall_vs_exact(found, exact), path.stat().st_size)


def run_retrieval_benchmark(
    gallery_size: int = 200_000,
    num_queries: int = 1000,
    dim: int = 512,
    k: int = 50,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 4096,
    repeats: int = 3,
    ann: str | None = None,
    seed: int = 0,
    features: str = "random",
) -> RetrievalResult:
    """Time the project's exact top-k, its torch engine and faiss ``IndexFlatIP`` on the same features
    (``features``: one of :data:`FEATURES`, module docstring; interleaved medians of ``repeats``), check the
    results agree, and optionally build an approximate index (``ann``: ``"hnsw"`` / ``"ivfpq"``), save it to a
    temporary folder and read it back."""
    if features == "clustered":
        gallery, queries = clustered_features(gallery_size, num_queries, dim, dtype, seed)
    elif features == "random":
        gallery = random_gallery(gallery_size, dim, dtype, seed)
        queries = random_gallery(num_queries, dim, torch.float32, seed + 1)
    else:
        raise ValueError(f"unknown features {features!r}; choose one of {', '.join(FEATURES)}")
    rss_before = current_rss_bytes()
    device = torch.device("cpu")
    candidates = {
        "project": lambda: topk_retrieval(queries, gallery, k, chunk_size=chunk_size),
        "torch": lambda: topk_retrieval(queries, gallery, k, chunk_size=chunk_size, engine="torch"),
    }
    faiss = faiss_module()
    if faiss is not None:
        index = faiss.IndexFlatIP(dim)
        for start in range(0, gallery_size, FILL_BLOCK):
            index.add(gallery[start : start + FILL_BLOCK].float().numpy())
        query_array = queries.numpy()
        candidates["faiss"] = lambda: index.search(query_array, k)
    medians = interleaved_medians(candidates, repeats, device)

    project, torch_engine = candidates["project"](), candidates["torch"]()
    equal = torch.equal(project[0], torch_engine[0]) and torch.equal(project[1], torch_engine[1])
    same_sets = same_order = None
    if faiss is not None:
        _, faiss_indices = candidates["faiss"]()
        faiss_indices = torch.from_numpy(faiss_indices)
        same_order = int((faiss_indices == project[1]).all(dim=1).sum())
        same_sets = int((faiss_indices.sort(dim=1).values == project[1].sort(dim=1).values).all(dim=1).sum())
        del index
    ann_result = None
    if ann is not None:
        with tempfile.TemporaryDirectory() as scratch:
            ann_result = _ann_result(gallery, queries, project[1], k, ANNConfig(kind=ann), Path(scratch), repeats)
    return RetrievalResult(
        features=features, gallery_size=gallery_size, num_queries=num_queries, dim=dim, k=k, dtype=str(dtype).removeprefix("torch."),
        chunk_size=chunk_size, repeats=repeats, engine=resolve_engine(None, device), project_s=medians["project"],
        torch_s=medians["torch"], faiss_s=medians.get("faiss"), equal_to_torch=equal, same_sets_as_faiss=same_sets,
        same_order_as_faiss=same_order, rss_before_bytes=rss_before, peak_rss_bytes=peak_rss_bytes(), ann=ann_result,
    )
