"""Smoke tests of benchmark.py on the tiny config (no timing assertions) and of the gallery feature cache."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import benchmark
from benchmarks.official_head import official_ssn_loss
from benchmarks.retrieval import recall_vs_exact
from feature_cache import cache_key, cached_gallery_features, checkpoint_identity
from model import ssn_loss


def test_benchmark_main_runs_every_part_on_the_tiny_config(capsys):
    argv = [
        "--clip_model_name", "ViT-Tiny-P8-32", "--batch_size", "4", "--steps", "2", "--head_batch_size", "2",
        "--rank_gallery_size", "100", "--retrieval_gallery", "3000", "--retrieval_queries", "7",
        "--retrieval_chunk_size", "1024",
    ]
    if importlib.util.find_spec("faiss") is not None:
        argv += ["--faiss", "flat"]
    results = benchmark.main(argv)
    out = capsys.readouterr().out
    for heading in ("training step", "SSN head vs official head", "exact retrieval"):
        assert heading in out
    step, head, retrieval = results["step"], results["head"], results["retrieval"]
    assert step.ssn_step_s > 0 and step.backbone_step_s > 0 and step.official_step_s > 0 and step.peak_bytes > 0
    # The printed throughputs are the batch over the measured step times (4 triplets per step here).
    assert step.batch_size == 4 and step.rank_gallery_size == 100
    for label, seconds in (("SSN step", step.ssn_step_s), ("backbone-only step", step.backbone_step_s),
                           ("official step", step.official_step_s)):
        line = next(line for line in out.splitlines() if line.startswith(label + " "))
        printed_s, printed_rate = (float(x) for x in re.fullmatch(rf"{label}\s+(\S+) s\s+(\S+) triplets/s", line).groups())
        assert printed_s == pytest.approx(seconds, abs=6e-4)  # printed with 3 decimals
        assert printed_rate == pytest.approx(4 / seconds, abs=6e-3)  # 2 decimals
    assert head.max_abs_diff < 1e-4 and head.ours_s > 0
    assert retrieval.gallery_size == 3000 and retrieval.seconds > 0
    if retrieval.faiss_index == "flat":
        assert retrieval.faiss_recall > 0.99  # an exact index agrees up to float ties


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


def test_feature_cache_encodes_once_per_key(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    identity = checkpoint_identity(checkpoint)
    names = ["a", "b", "c"]
    calls = []

    def compute():
        calls.append(1)
        return names, torch.arange(6.0).view(3, 2)

    cache = tmp_path / "cache"
    first = cached_gallery_features(cache, identity, "cirr/val", names, "ssn", compute)
    second = cached_gallery_features(cache, identity, "cirr/val", names, "ssn", compute)
    assert len(calls) == 1
    assert second[0] == names and torch.equal(first[1], second[1])
    cached_gallery_features(cache, identity, "cirr/val", names, "image", compute)  # another method
    checkpoint.write_bytes(b"retrained weights")
    cached_gallery_features(cache, checkpoint_identity(checkpoint), "cirr/val", names, "ssn", compute)
    assert len(calls) == 3
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_feature_cache_key_depends_on_name_order_and_extra_settings():
    base = cache_key("ckpt", "cirr/val", ["a", "b"], "ssn")
    assert cache_key("ckpt", "cirr/val", ["b", "a"], "ssn") != base
    assert cache_key("ckpt", "cirr/val", ["a", "b"], "ssn", {"precision": "amp"}) != base
    assert cache_key("ckpt", "cirr/val", ["a", "b"], "ssn") == base


def test_feature_cache_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match="names"):
        cached_gallery_features(tmp_path, "ckpt", "cirr/val", ["a"], "ssn", lambda: (["b"], torch.zeros(1, 2)))
