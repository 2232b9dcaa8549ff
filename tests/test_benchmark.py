"""Smoke tests of benchmark.py on the tiny config (no timing assertions)."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import benchmark
from benchmarks.official_head import official_ssn_loss
from benchmarks.retrieval import recall_vs_exact
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
