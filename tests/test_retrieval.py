"""Tests for retrieval.py: both engines (faiss, torch) against a dense stable sort, ties, input checks."""

from pathlib import Path

import pytest
import torch

import cirr_test_submission
import feature_cache
import retrieval
import retrieve
import validate
from retrieval import cirr_rankings, ranked_names, resolve_engine, topk_retrieval, use_engine

HAS_FAISS = retrieval.faiss_module() is not None
ENGINES = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed"))]


# ---------------------------------------------------------------------------------------------
# topk_retrieval
# ---------------------------------------------------------------------------------------------


def dense_topk(query, gallery, k, exclude=None):
    """Reference: the full score matrix (float64 dot products rounded to the score dtype), stable
    descending sort (ties -> lower gallery index)."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    scores = (query.double() @ gallery.double().T).to(dtype)  # [Q, G]
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
    elif kind == "float32":
        query = torch.randn(num_q, dim, generator=gen)
        gallery = torch.randn(num_g, dim, generator=gen)
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


def assert_dense(query, gallery, k, exclude=None, **kwargs):
    scores, indices = topk_retrieval(query, gallery, k, exclude, **kwargs)
    ref_scores, ref_indices = dense_topk(query, gallery, k, exclude)
    assert indices.shape == ref_indices.shape
    assert torch.equal(indices, ref_indices)
    if scores.dtype == torch.float32:
        assert torch.equal(scores, ref_scores)  # the same numbers, not just close ones
    else:  # float64 sums depend on the summation order in their last bits
        torch.testing.assert_close(scores, ref_scores, rtol=1e-14, atol=1e-14)
    return indices


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["gaussian", "float32", "ties"])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
@pytest.mark.parametrize("k", [1, 4, 17, 30])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_topk_matches_dense(engine, kind, chunk_size, k, use_exclude):
    query, gallery, exclude = random_case(kind)
    exclude = exclude if use_exclude else None
    indices = assert_dense(query, gallery, k, exclude, chunk_size=chunk_size, engine=engine)
    assert indices.shape == (11, min(k, 17 - (1 if use_exclude else 0)))
    if use_exclude:
        for row, excluded in zip(indices.tolist(), exclude.tolist()):
            assert excluded not in row


def duplicated_gallery(copies=40, others=30, dim=8, seed=0):
    """Random unit vectors with ``copies`` identical rows spread through the gallery; the first query is
    the copied row (the copies tie first), random ones meet the tied band at other ranks."""
    gen = torch.Generator().manual_seed(seed)
    gallery = torch.nn.functional.normalize(torch.randn(others + copies, dim, generator=gen), dim=-1)
    positions = torch.randperm(others + copies, generator=gen)[:copies]
    gallery[positions] = gallery[positions[0]].clone()
    queries = torch.cat([gallery[positions[:1]], torch.randn(5, dim, generator=gen)])
    return queries, gallery


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 10, 45, 200])
def test_duplicates_tied_past_the_candidate_list_are_ranked_by_index(engine, k):
    """40 identical gallery rows: for k = 10 the tie at the k-th score reaches past k + margin
    candidates, so the engine's list must be widened; k = 200 exceeds the gallery."""
    queries, gallery = duplicated_gallery()
    exclude = torch.tensor([-1, 3, -1, 0, -1, 69])
    assert_dense(queries, gallery, k, engine=engine)
    assert_dense(queries, gallery, k, exclude, engine=engine)
    assert_dense(queries.half(), gallery.half(), k, engine=engine)  # fp16 features: float32 scores


@pytest.mark.parametrize("engine", ENGINES)
def test_widening_without_margin(engine, monkeypatch):
    """With no margin every tie at the k-th score is past the first candidate list."""
    monkeypatch.setattr(retrieval, "MIN_MARGIN", 0)
    queries, gallery = duplicated_gallery(copies=25, others=300)
    assert_dense(queries, gallery, 3, engine=engine, chunk_size=7)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_alone_orders_ties_otherwise():
    """The case above has teeth: faiss's own order among the tied rows is not the dense order."""
    faiss = retrieval.faiss_module()
    queries, gallery = duplicated_gallery()
    _, raw = faiss.knn(queries[:1].numpy(), gallery.numpy(), 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert raw.tolist() != dense_topk(queries[:1], gallery, 10)[1].tolist()


@pytest.mark.parametrize("engine", ENGINES)
def test_near_ties_within_float32_rounding(engine):
    """Gallery rows whose scores differ by a few float32 ulps, in many blocks: the engines' float32
    products may misorder them; the re-scored order must still be the dense one."""
    gen = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(1, 96, generator=gen), dim=-1)
    gallery = base + 1e-7 * torch.randn(3000, 96, generator=gen)
    gallery[::7] = torch.nn.functional.normalize(torch.randn(429, 96, generator=gen), dim=-1)
    queries = torch.cat([base, base + 1e-6 * torch.randn(8, 96, generator=gen)])
    assert_dense(queries, gallery, 50, engine=engine, chunk_size=512)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("kind", ["float32", "ties"])
def test_engines_agree_across_gallery_blocks(kind, monkeypatch):
    """faiss's gallery blocks merged (block of 5 rows) give the torch engine's result, bit for bit."""
    monkeypatch.setattr(retrieval, "FAISS_GALLERY_BLOCK", 5)
    query, gallery, exclude = random_case(kind, num_q=23, num_g=41, dim=6, seed=4)
    ours = topk_retrieval(query, gallery, 9, exclude, engine="faiss")
    torch_result = topk_retrieval(query, gallery, 9, exclude, engine="torch", chunk_size=6)
    assert torch.equal(ours[0], torch_result[0]) and torch.equal(ours[1], torch_result[1])
    assert_dense(query, gallery, 9, exclude, engine="faiss")


def test_engine_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_engine("torch", cpu) == "torch"
    assert resolve_engine("auto", cpu) == ("faiss" if HAS_FAISS else "torch")
    with pytest.raises(ValueError, match="unknown retrieval engine 'numpy'"):
        resolve_engine("numpy", cpu)
    with use_engine("torch"):
        assert resolve_engine(None, cpu) == "torch"
    assert retrieval.default_engine() == "auto"
    # Without faiss: auto falls back to torch, an explicit faiss is a clear error.
    monkeypatch.setattr(retrieval, "faiss_module", lambda: None)
    assert resolve_engine("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        topk_retrieval(torch.randn(2, 3), torch.randn(4, 3), 1, engine="faiss")
    query, gallery, exclude = random_case("ties")
    assert_dense(query, gallery, 5, exclude)  # the fallback ranks as the dense sort


@pytest.mark.parametrize("engine", ENGINES)
def test_topk_ties_prefer_lower_index(engine):
    gallery = torch.tensor([[0.0], [1.0], [1.0], [0.5], [1.0]])
    query = torch.tensor([[1.0], [1.0]])
    # query 1 excludes gallery 1, so its tied best are 2 then 4.
    _, idx = topk_retrieval(query, gallery, 4, torch.tensor([-1, 1]), chunk_size=2, engine=engine)
    assert idx.tolist() == [[1, 2, 4, 3], [2, 4, 3, 0]]


@pytest.mark.parametrize("engine", ENGINES)
def test_topk_rejects_bad_input(engine):
    q, g = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="feature dims differ"):
        topk_retrieval(q, torch.randn(4, 2), 1, engine=engine)
    with pytest.raises(ValueError, match="k must be"):
        topk_retrieval(q, g, 0, engine=engine)
    with pytest.raises(ValueError, match="exclude_indices"):
        topk_retrieval(q, g, 1, torch.tensor([0, 4]), engine=engine)
    for bad in (float("nan"), float("inf")):
        g[1, 0] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            topk_retrieval(q, g, 1, engine=engine)
        with pytest.raises(ValueError, match="NaN or inf"):
            topk_retrieval(g, q, 1, engine=engine)


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


# ---------------------------------------------------------------------------------------------
# the scripts' --retrieval_engine
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_cirr_run: Path, tiny_cirr_root: Path) -> tuple[Path, Path]:
    """(checkpoint, data root) of the session's tiny trained run (its synthetic CIRR has a test1 gallery > 50)."""
    return tiny_cirr_run / "checkpoints" / "best.pt", tiny_cirr_root.parent


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_validation_and_submission_are_the_same_with_either_engine(tiny_run, tmp_path, monkeypatch):
    checkpoint, _ = tiny_run
    used = []
    for name in ("_faiss_candidates", "_torch_candidates"):
        real = getattr(retrieval, name)
        monkeypatch.setattr(retrieval, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a))
    results = {}
    for engine in ("faiss", "torch"):
        used.clear()
        metrics = validate.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--no_cache",
                                 "--output", str(tmp_path / f"{engine}.json"), "--retrieval_engine", engine])
        files = cirr_test_submission.main(["--checkpoint", str(checkpoint), "--submission_name", engine, "--device", "cpu",
                                           "--output_dir", str(tmp_path / engine), "--retrieval_engine", engine])
        assert set(used) == {f"_{engine}_candidates"}  # the flag chose the engine
        assert retrieval.default_engine() == "auto"  # and was scoped to the script
        results[engine] = metrics, [f.read_bytes() for f in files]
    assert results["faiss"] == results["torch"]


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_retrieve_builds_the_index_once_beside_the_feature_cache(tiny_run, tmp_path, monkeypatch):
    """retrieve.py --ann: the first run encodes the gallery and saves the index next to its cache entry
    (same key); the next run loads the index and never touches the gallery features.  On a folder of a few
    dozen images HNSW finds the exact ranking, which both exact engines give too."""
    checkpoint, data = tiny_run
    gallery = data / "cirr_dataset" / "dev"
    cache = tmp_path / "cache"
    argv = ["--checkpoint", str(checkpoint), "--reference", str(sorted(gallery.glob("*.png"))[0]),
            "--text", "make the circle blue", "--gallery_dir", str(gallery), "--top_k", "5", "--cache_dir", str(cache),
            "--device", "cpu"]
    exact = {engine: retrieve.main(argv + ["--retrieval_engine", engine]) for engine in ("torch", "faiss")}
    assert exact["torch"] == exact["faiss"] and len(exact["torch"]) == 5
    first = retrieve.main(argv + ["--ann", "hnsw"])
    (entry,) = cache.glob("gallery_*.pt")
    (index_file,) = cache.glob("gallery_*.faiss")
    assert index_file.name.startswith(entry.stem + ".hnsw")
    assert [p for p, _ in first] == [p for p, _ in exact["torch"]]
    for (_, a), (_, b) in zip(first, exact["torch"]):
        assert a == pytest.approx(b, abs=1e-5)

    def no_features(*args, **kwargs):
        raise AssertionError("the gallery features were read")

    monkeypatch.setattr(feature_cache, "cached_gallery_features", no_features)  # retrieve.py reads it from there
    assert retrieve.main(argv + ["--ann", "hnsw"]) == first
