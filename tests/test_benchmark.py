"""Smoke tests of benchmark.py on tiny shapes (no timing assertions), and the pieces it relies on."""
from __future__ import annotations

import re

import pytest
import torch

import benchmark
import utils
from benchmarks.common import interleaved_medians
from benchmarks.official_head import official_ssn_loss
from benchmarks.official_ssn import official_optimizer
from ann import ANNConfig, ann_search, build_index
from benchmarks.retrieval import clustered_features, random_gallery, recall_vs_exact, run_retrieval_benchmark
from benchmarks.step import check_official_step_equal, hf_clip_config, official_and_ssn_models, synthetic_batch
from model import ssn_loss
from retrieval import faiss_module, topk_retrieval


def test_benchmark_main_runs_every_part_on_the_tiny_config(capsys):
    argv = [
        "--clip_model_name", "ViT-Tiny-P8-32", "--batch_size", "4", "--steps", "2", "--head_batch_size", "2",
        "--rank_gallery_size", "100", "--retrieval_gallery", "3000", "1000", "--retrieval_queries", "7",
        "--retrieval_chunk_size", "1024", "--retrieval_repeats", "1",
    ]
    if faiss_module() is not None:
        argv += ["--ann", "hnsw"]
    results = benchmark.main(argv)
    out = capsys.readouterr().out
    for heading in ("training step", "SSN head vs official head", "exact retrieval"):
        assert heading in out
    step, head, retrieval = results["step"], results["head"], results["retrieval"]
    assert step.peak_bytes > 0 and step.attention
    assert step.batch_size == 4 and step.rank_gallery_size == 100
    # The printed throughputs are the batch over the measured step times (4 triplets per step here).
    for label, seconds in (("SSN step", step.ssn_step_s), ("official step (HF towers)", step.official_step_s),
                           ("official on our backbone", step.official_ours_step_s),
                           ("backbone-only step", step.backbone_step_s)):
        line = next(line for line in out.splitlines() if line.startswith(label + " "))
        printed_s, printed_rate = (float(x) for x in re.fullmatch(rf"{re.escape(label)}\s+(\S+) s\s+(\S+) triplets/s", line).groups())
        assert seconds > 0
        assert printed_s == pytest.approx(seconds, abs=6e-4)  # printed with 3 decimals
        assert printed_rate == pytest.approx(4 / seconds, abs=6e-3)  # 2 decimals
    assert f"{step.official_ratio:8.3f} x" in out
    assert head.max_abs_diff < 1e-4 and head.ours_s > 0
    assert [r.gallery_size for r in retrieval] == [3000, 1000]
    for r in retrieval:
        assert r.project_s > 0 and r.torch_s > 0 and r.equal_to_torch
        if r.faiss_s is not None:
            assert r.same_sets_as_faiss == 7  # random features: no ties, faiss finds the same top-50 sets
            assert 0 <= r.ann.recall <= 1 and r.ann.file_bytes > 0 and r.ann.load_s >= 0


def test_clustered_features_have_neighbourhoods_that_an_approximate_index_finds():
    gallery, queries = clustered_features(2000, 30, 64, seed=1)
    assert gallery.shape == (2000, 64) and queries.shape == (30, 64)
    assert torch.allclose(gallery.norm(dim=1), torch.ones(2000), atol=1e-5)
    scores = queries @ gallery.T
    # Each query is a perturbed copy of one gallery item: far closer to it than to anything else.
    top2 = scores.topk(2, dim=1).values
    assert (top2[:, 0] > 0.85).all() and (top2[:, 0] - top2[:, 1] > 0.1).all()
    result = run_retrieval_benchmark(2000, 30, 64, 10, repeats=1, features="clustered")
    assert result.features == "clustered" and result.equal_to_torch
    with pytest.raises(ValueError, match="unknown features 'gaussian'"):
        run_retrieval_benchmark(10, 2, 4, 1, repeats=1, features="gaussian")
    if faiss_module() is None:
        return
    config = ANNConfig(kind="ivfpq", pq_bits=4)  # 16 centroids per sub-quantiser: trains in well under a second
    recalls = {}
    for features, (gallery, queries) in {"random": (random_gallery(2000, 64, seed=1), random_gallery(30, 64, seed=2)),
                                         "clustered": (gallery, queries)}.items():
        _, found = ann_search(build_index(gallery, config), queries, 10, config)
        recalls[features] = recall_vs_exact(found, topk_retrieval(queries, gallery, 10)[1])
    # Measured: IVF-PQ recall@10 0.11 on random features, 0.37 on clustered ones.
    assert recalls["clustered"] > recalls["random"] + 0.1, recalls


def test_official_model_and_ours_share_weights_and_loss():
    """The benchmark's official model (Hugging Face towers of the tiny config's size) and our SSN model hold
    the same weights and compute the same loss; a perturbed weight is noticed."""
    official, ours = official_and_ssn_models("ViT-Tiny-P8-32", torch.device("cpu"))
    config = hf_clip_config("ViT-Tiny-P8-32")
    assert (config.vision_config.hidden_size, config.vision_config.num_attention_heads, config.vision_config.patch_size) == (64, 2, 8)
    assert config.text_config.hidden_act == "quick_gelu" and ours.backbone.image_size == 32
    batch = synthetic_batch(ours, 4, torch.device("cpu"))
    assert check_official_step_equal(official, ours, batch) < 1e-4
    # The official step's captions: padded with the end-of-text id, masked; the same ids where unpadded.
    assert torch.equal(batch["input_ids"][batch["attention_mask"].bool()], batch["token_ids"][batch["attention_mask"].bool()])
    assert (batch["input_ids"][~batch["attention_mask"].bool()] == 49407).all()
    with torch.no_grad():
        proj = ours.backbone.clip.visual.proj
        proj.add_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(AssertionError, match="differs from the official model's loss"):
        check_official_step_equal(official, ours, batch)


def test_official_optimizer_groups():
    official, _ = official_and_ssn_models("ViT-Tiny-P8-32", torch.device("cpu"))
    groups = official_optimizer(official, lr=1.0, lr_ratio=0.5).param_groups
    names = {id(p): n for n, p in official.named_parameters()}
    assert [g["lr"] for g in groups] == [1.0, 2.0, 2.0, 1.0, 0.5]
    assert all("clip" in names[id(p)] for p in groups[4]["params"])
    assert {names[id(p)].split(".")[0] for p in groups[0]["params"]} == {"combiner_layer", "output_layer", "dynamic_scalar"}
    assert sum(len(g["params"]) for g in groups) == len(list(official.parameters()))


def test_official_probability_target_loss_equals_ours():
    gen = torch.Generator().manual_seed(0)
    q_pos, q_neg, target = (torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1).requires_grad_(True)
                            for _ in range(3))
    ours = ssn_loss(q_pos, q_neg, target)
    official = official_ssn_loss(q_pos, q_neg, target)
    torch.testing.assert_close(official, ours)
    for a, b in zip(torch.autograd.grad(ours, (q_pos, q_neg, target)), torch.autograd.grad(official, (q_pos, q_neg, target))):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_recall_vs_exact():
    exact = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert recall_vs_exact(torch.tensor([[3, 2, 1], [4, 9, 8]]), exact) == pytest.approx(4 / 6)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--head_steps", "-1"], "--head_steps must be >= 1, got -1"),
    (["--skip_step", "--skip_head", "--retrieval_gallery", "100", "0"], "--retrieval_gallery sizes must be >= 1, got 0"),
    (["--device", "gpu"], "--device gpu: "),
    (["--clip_model_name", "ViT-No-Such-Model", "--skip_head"], "--clip_model_name ViT-No-Such-Model: not an open_clip ViT"),
])
def test_bad_flags_end_in_one_line(argv, message, capsys):
    """As ``python benchmark.py ...`` ends (utils.run_cli): exit status 1, one line naming the flag, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(benchmark.main, argv, prog="benchmark.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("benchmark.py: error: ") and err.count("\n") == 1, err
    assert message in err


def test_interleaved_medians_needs_a_repetition():
    with pytest.raises(utils.UsageError, match="repeats must be >= 1, got 0"):
        interleaved_medians({"a": lambda: None}, 0, torch.device("cpu"))
