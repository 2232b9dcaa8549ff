"""Tests for ann.py: faiss HNSW / IVF-PQ recall against exact search, the saved index, exclusion."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from ann import ANNConfig, ann_search, build_index, index_file_name, load_or_build_index
from retrieval import topk_retrieval

faiss = pytest.importorskip("faiss")


def clustered(size, dim=32, clusters=40, seed=0):
    """Unit vectors around random centres: neighbourhoods an index can exploit, like image features."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen)
    points = centres[torch.randint(0, clusters, (size,), generator=gen)] + 0.5 * torch.randn(size, dim, generator=gen)
    return F.normalize(points, dim=-1)


def recall(approx, exact):
    return sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist())) / exact.numel()


@pytest.mark.parametrize("kind, floor", [("hnsw", 0.95), ("ivfpq", 0.55)])  # chance: 10 / 3000
def test_recall_against_exact(kind, floor):
    gallery, queries = clustered(3000), clustered(50, seed=1)
    config = ANNConfig(kind=kind, nprobe=8, pq_bytes=16, pq_bits=4)  # 4-bit codes: 16 centroids train in a blink
    scores, indices = ann_search(build_index(gallery, config), queries, 10, config)
    _, exact = topk_retrieval(queries, gallery, 10)
    assert indices.shape == (50, 10)
    assert recall(indices, exact) >= floor
    # Ordered by descending score; HNSW keeps the full vectors, so its scores are the exact products.
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    if kind == "hnsw":
        torch.testing.assert_close(scores, (queries[:, None] * gallery[indices]).sum(-1), rtol=0, atol=1e-5)


def test_exclusion_and_small_galleries():
    gallery, queries = clustered(300), clustered(6, seed=2)
    config = ANNConfig(kind="hnsw")
    index = build_index(gallery, config)
    _, best = ann_search(index, queries, 1, config)
    exclude = torch.cat([best[:3, 0], torch.full((3,), -1)])
    _, indices = ann_search(index, queries, 5, config, exclude)
    assert indices.shape == (6, 5)
    for row, excluded in zip(indices.tolist(), exclude.tolist()):
        assert excluded not in row and -1 not in row
    _, everything = ann_search(index, queries, 1000, config, exclude)
    assert everything.shape == (6, 299)  # k past the gallery: G - 1 results when excluding
    with pytest.raises(ValueError, match="at least 256 gallery items"):
        build_index(gallery[:100], ANNConfig(kind="ivfpq"))
    with pytest.raises(ValueError, match="unknown approximate index"):
        ANNConfig(kind="lsh")


def test_index_saved_and_loaded_instead_of_rebuilt(tmp_path, caplog):
    gallery, queries = clustered(2000, dim=16), clustered(20, dim=16, seed=3)
    config = ANNConfig(kind="ivfpq", nprobe=4, pq_bits=4)
    path = tmp_path / index_file_name("gallery_0123", config, *gallery.shape)
    assert config.cells(2000) == 31 and path.name == "gallery_0123.ivf31-pq2x4.faiss"  # 2000 // 64 cells, D // 8 codes
    calls = []

    def features():
        calls.append(1)
        return gallery

    first, built = load_or_build_index(path, config, *gallery.shape, features)
    assert built and path.is_file() and len(calls) == 1
    second, built = load_or_build_index(path, config, *gallery.shape, features)
    assert not built and len(calls) == 1  # the gallery features were not even read
    for a, b in zip(ann_search(first, queries, 7, config), ann_search(second, queries, 7, config)):
        assert torch.equal(a, b)

    # A damaged file, or one of another gallery, is rebuilt with a warning.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cir.ann"):
        _, built = load_or_build_index(path, config, *gallery.shape, features)
    assert built and "damaged" in caplog.text and len(calls) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cir.ann"):
        _, built = load_or_build_index(path, config, 1999, 16, lambda: gallery[:1999])
    assert built and "not 1999 x 16" in caplog.text


def test_without_faiss_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what an absent package looks like to import
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        build_index(clustered(10), ANNConfig())

