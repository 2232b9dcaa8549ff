"""Shared utilities: exact chunked retrieval, CIR metrics, benchmark submissions, safe I/O, logging.

Metric definitions follow the official CIRR, FashionIQ and CIRCO evaluations (see docs/benchmarks.md).
Every recall / mAP returned here is a percentage in [0, 100].
"""

import ctypes
import errno
import io
import json
import logging
import math
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = [
    "topk_retrieval",
    "recall_at_k",
    "cirr_metrics",
    "fiq_metrics",
    "summarize_fiq",
    "circo_metrics",
    "SELECTION_CRITERIA",
    "best_metric",
    "metrics_table",
    "SubmissionError",
    "cirr_submission",
    "check_cirr_submission",
    "write_cirr_submission",
    "circo_submission",
    "atomic_write_bytes",
    "atomic_write_json",
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "atomic_link_or_copy",
    "load_checkpoint",
    "set_seed",
    "seed_worker",
    "setup_logging",
    "MetricsLogger",
    "read_metrics_log",
]

_logger = logging.getLogger("cir.utils")

CIRR_RECALL_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FIQ_KS = (10, 50)
CIRR_SUBMISSION_VERSION = "rc2"
CIRR_RECALL_LENGTH = 50
CIRR_SUBSET_LENGTH = 3
# The CIRR server rejects files over 5 MB; 5 * 10**6 bytes is under both readings of "MB".
CIRR_MAX_SUBMISSION_BYTES = 5 * 10**6
CIRCO_SUBMISSION_LENGTH = 50
CHECKPOINT_FORMAT_VERSION = 2  # 2: step-level resume (step_in_epoch, sampler, full RNG states)
_CHECKPOINT_VERSION_KEY = "format_version"
# Checkpoint-selection criteria per dataset, the default first (CIRR: the official trio of means).
SELECTION_CRITERIA = {"cirr": ("mean", "harmonic_mean", "geometric_mean"), "fashioniq": ("mean",), "circo": ("mAP@10",)}


# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------


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


def _name_to_index(names: Sequence[Hashable]) -> dict[Hashable, int]:
    """Map gallery name -> position; gallery names must be unique."""
    index: dict[Hashable, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise ValueError(f"duplicate gallery name {name!r} at positions {index[name]} and {i}")
        index[name] = i
    return index


def _check_lengths(num_queries: int, **lists: Sequence) -> None:
    for arg, values in lists.items():
        if len(values) != num_queries:
            raise ValueError(f"{arg} has {len(values)} entries but there are {num_queries} queries")


def _cirr_rankings(
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
    _check_lengths(num_q, reference_names=reference_names, members=members)
    if gallery_feats.shape[0] != len(gallery_names):
        raise ValueError(f"{gallery_feats.shape[0]} gallery features but {len(gallery_names)} gallery names")
    name_index = _name_to_index(gallery_names)
    # A reference outside the gallery has nothing to remove (-1).
    exclude = torch.tensor([name_index.get(ref, -1) for ref in reference_names], dtype=torch.long)
    _, top = topk_retrieval(query_feats, gallery_feats, k_full, exclude, chunk_size)
    full = [[gallery_names[i] for i in row] for row in top.tolist()]

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


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def recall_at_k(
    ranked_names: Sequence[Sequence[Hashable]], target_names: Sequence[Hashable], ks: Sequence[int]
) -> dict[str, float]:
    """Recall@k in percent: R@k = 100 * mean_q [target_q in ranked_q[:k]].

    Args:
        ranked_names: per query, gallery names best first (at least max(ks) long unless the gallery
            is smaller).
        target_names: per query, the single correct name.
        ks: cut-offs.

    Returns:
        {'R@k': value} for each k.
    """
    if not target_names:
        raise ValueError("recall_at_k needs at least one query")
    _check_lengths(len(target_names), ranked_names=ranked_names)
    if any(k < 1 for k in ks):
        raise ValueError(f"cut-offs must be >= 1, got {list(ks)}")
    result = {}
    for k in ks:
        hits = sum(target in ranked[:k] for ranked, target in zip(ranked_names, target_names))
        result[f"R@{k}"] = 100.0 * hits / len(target_names)
    return result


def _means(values: Sequence[float]) -> dict[str, float]:
    """Arithmetic, harmonic and geometric mean (the latter two are 0 if any value is 0)."""
    if any(v == 0 for v in values):
        harmonic = geometric = 0.0
    else:
        harmonic = len(values) / sum(1.0 / v for v in values)
        geometric = math.exp(sum(math.log(v) for v in values) / len(values))
    return {"mean": sum(values) / len(values), "harmonic_mean": harmonic, "geometric_mean": geometric}


def cirr_metrics(
    query_feats: Tensor,
    gallery_feats: Tensor,
    gallery_names: list[str],
    reference_names: list[str],
    target_names: list[str],
    members: list[list[str]],
    chunk_size: int = 4096,
) -> dict[str, float]:
    """CIRR validation metrics, in percent.

    Args:
        query_feats: [Q, D] L2-normalised composed query features.
        gallery_feats: [G, D] L2-normalised gallery features, row i is ``gallery_names[i]``.
        reference_names, target_names: per query.
        members: per query, ``img_set.members`` (the reference among them is ignored).

    Returns:
        'R@1', 'R@5', 'R@10', 'R@50': the target's rank in the whole gallery with the reference removed;
        'Rs@1', 'Rs@2', 'Rs@3': the same within the query's members minus the reference;
        'Avg' = (R@5 + Rs@1) / 2 (leaderboard); 'mean', 'harmonic_mean', 'geometric_mean' over the
        7 recalls (checkpoint selection uses 'mean').
    """
    _check_lengths(query_feats.shape[0], target_names=target_names)
    full, subset = _cirr_rankings(
        query_feats, gallery_feats, gallery_names, reference_names, members,
        max(CIRR_RECALL_KS), max(CIRR_SUBSET_KS), chunk_size,
    )
    metrics = recall_at_k(full, target_names, CIRR_RECALL_KS)
    subset_recalls = recall_at_k(subset, target_names, CIRR_SUBSET_KS)
    metrics.update({key.replace("R@", "Rs@"): value for key, value in subset_recalls.items()})
    recalls = list(metrics.values())
    metrics["Avg"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    metrics.update(_means(recalls))
    return metrics


def fiq_metrics(
    query_feats: Tensor,
    gallery_feats: Tensor,
    gallery_names: list[str],
    target_names: list[str],
    chunk_size: int = 4096,
) -> dict[str, float]:
    """FashionIQ validation metrics for one category: 'R@10', 'R@50' in percent.

    The gallery is the category's val images; as in the official evaluation the reference image is
    not removed from the ranking.
    """
    _check_lengths(query_feats.shape[0], target_names=target_names)
    if gallery_feats.shape[0] != len(gallery_names):
        raise ValueError(f"{gallery_feats.shape[0]} gallery features but {len(gallery_names)} gallery names")
    _name_to_index(gallery_names)  # uniqueness check
    _, top = topk_retrieval(query_feats, gallery_feats, max(FIQ_KS), chunk_size=chunk_size)
    ranked = [[gallery_names[i] for i in row] for row in top.tolist()]
    return recall_at_k(ranked, target_names, FIQ_KS)


def summarize_fiq(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten per-category FashionIQ recalls and average them.

    Returns '{cat}_R@10', '{cat}_R@50' per category, 'avg_R@10' and 'avg_R@50' (mean over
    categories) and 'mean' = (avg_R@10 + avg_R@50) / 2, the usual FashionIQ summary.
    """
    if not per_category:
        raise ValueError("summarize_fiq needs at least one category")
    summary: dict[str, float] = {}
    for category, metrics in per_category.items():
        for k in FIQ_KS:
            summary[f"{category}_R@{k}"] = float(metrics[f"R@{k}"])
    for k in FIQ_KS:
        summary[f"avg_R@{k}"] = sum(float(m[f"R@{k}"]) for m in per_category.values()) / len(per_category)
    summary["mean"] = sum(summary[f"avg_R@{k}"] for k in FIQ_KS) / len(FIQ_KS)
    return summary


def _average_precision(ranked: Sequence[Hashable], gt: set, k: int) -> float:
    """AP@k = sum_{i<=k} P@i * rel_i / min(k, |GT|), with P@i the precision of the first i results."""
    hits = 0
    total = 0.0
    for i, name in enumerate(ranked[:k], start=1):
        if name in gt:
            hits += 1
            total += hits / i
    return total / min(k, len(gt))


def circo_metrics(
    ranked_names: list[list[str]],
    gt_names: list[list[str]],
    target_names: list[str],
    semantic_aspects: list[list[str]] | None = None,
    ks: Sequence[int] = (5, 10, 25, 50),
) -> dict[str, float]:
    """CIRCO metrics in percent, as the official evaluation reports them.

    Args:
        ranked_names: per query, distinct gallery names (or ids) best first.
        gt_names: per query, all ground truths (``gt_img_ids``).
        target_names: per query, the single ``target_img_id``.
        semantic_aspects: optional per-query aspect lists.
        ks: cut-offs.

    Returns:
        'mAP@k' = 100 * mean_q AP@k, AP@k = sum_{i<=k} P@i * rel_i / min(k, |GT_q|);
        'R@k' on the single target; 'mAP@10_<aspect>' over the queries having each aspect.

    Raises:
        ValueError: a ranking repeats a name, or a query has no ground truth.
    """
    num_q = len(ranked_names)
    if num_q == 0:
        raise ValueError("circo_metrics needs at least one query")
    _check_lengths(num_q, gt_names=gt_names, target_names=target_names)
    if semantic_aspects is not None:
        _check_lengths(num_q, semantic_aspects=semantic_aspects)
    gt_sets = []
    for q, (ranked, gt) in enumerate(zip(ranked_names, gt_names)):
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"query {q}: predictions must be distinct, ranking repeats names")
        if not gt:
            raise ValueError(f"query {q}: empty ground-truth list")
        gt_sets.append(set(gt))

    metrics: dict[str, float] = {}
    for k in ks:
        aps = [_average_precision(ranked, gt, k) for ranked, gt in zip(ranked_names, gt_sets)]
        metrics[f"mAP@{k}"] = 100.0 * sum(aps) / num_q
    metrics.update(recall_at_k(ranked_names, target_names, ks))
    if semantic_aspects is not None:
        per_aspect: dict[str, list[float]] = {}
        for ranked, gt, aspects in zip(ranked_names, gt_sets, semantic_aspects):
            ap10 = _average_precision(ranked, gt, 10)
            for aspect in set(aspects):
                per_aspect.setdefault(aspect, []).append(ap10)
        for aspect in sorted(per_aspect):
            metrics[f"mAP@10_{aspect}"] = 100.0 * sum(per_aspect[aspect]) / len(per_aspect[aspect])
    return metrics


def best_metric(metrics: Mapping[str, float], dataset: str, criterion: str | None = None) -> float:
    """The single number used to pick the best checkpoint.

    ``criterion`` is one of ``SELECTION_CRITERIA[dataset]`` (default: the first).  'cirr': 'mean',
    'harmonic_mean' or 'geometric_mean' of the 7 recalls; 'fashioniq': 'mean' of avg R@10 and
    avg R@50; 'circo': 'mAP@10'.
    """
    if dataset not in SELECTION_CRITERIA:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(SELECTION_CRITERIA)}")
    key = criterion or SELECTION_CRITERIA[dataset][0]
    if key not in SELECTION_CRITERIA[dataset]:
        raise ValueError(f"{dataset} checkpoints are selected by one of {SELECTION_CRITERIA[dataset]}, not {key!r}")
    if key not in metrics:
        raise KeyError(f"{dataset} checkpoint selection needs metric {key!r}, got {sorted(metrics)}")
    return float(metrics[key])


def metrics_table(metrics: Mapping[str, float] | Mapping[str, Mapping[str, float]], decimals: int = 2) -> str:
    """Render metrics as a text table: a flat dict gives one row, a nested dict one row per outer key."""
    if not metrics:
        return "(no metrics)"
    if all(isinstance(v, Mapping) for v in metrics.values()):
        frame = pd.DataFrame.from_dict({k: dict(v) for k, v in metrics.items()}, orient="index")
    else:
        frame = pd.DataFrame([dict(metrics)], index=[""])
    return frame.to_string(float_format=lambda x: f"{x:.{decimals}f}", na_rep="-")


# --------------------------------------------------------------------------------------------------
# Submissions
# --------------------------------------------------------------------------------------------------


class SubmissionError(ValueError):
    """A benchmark submission breaks the server's rules; ``problems`` lists every violation."""

    max_shown = 20

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in the submission:"]
        lines += [f"  - {p}" for p in self.problems[: self.max_shown]]
        if len(self.problems) > self.max_shown:
            lines.append(f"  ... and {len(self.problems) - self.max_shown} more")
        super().__init__("\n".join(lines))


def _submission_bytes(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON, the exact bytes written (and size-checked) for a submission."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def cirr_submission(
    query_feats: Tensor,
    gallery_feats: Tensor,
    gallery_names: list[str],
    reference_names: list[str],
    members: list[list[str]],
    pair_ids: Sequence[int | str],
    chunk_size: int = 4096,
) -> tuple[dict, dict]:
    """Build the two CIRR test-server files' contents.

    Returns:
        recall: {"version": "rc2", "metric": "recall", "<pairid>": [top-50 names, reference excluded]}
        subset: {"version": "rc2", "metric": "recall_subset", "<pairid>": [top-3 of members minus reference]}
    """
    _check_lengths(query_feats.shape[0], pair_ids=pair_ids)
    keys = [str(pid) for pid in pair_ids]
    if len(set(keys)) != len(keys):
        raise ValueError("pair_ids must be unique")
    full, subset = _cirr_rankings(
        query_feats, gallery_feats, gallery_names, reference_names, members,
        CIRR_RECALL_LENGTH, CIRR_SUBSET_LENGTH, chunk_size,
    )
    recall_sub: dict[str, Any] = {"version": CIRR_SUBMISSION_VERSION, "metric": "recall"}
    subset_sub: dict[str, Any] = {"version": CIRR_SUBMISSION_VERSION, "metric": "recall_subset"}
    recall_sub.update(zip(keys, full))
    subset_sub.update(zip(keys, subset))
    return recall_sub, subset_sub


def _check_ranking(label: str, names: Any, length: int, reference: str, allowed: set | None) -> list[str]:
    """Problems with one submitted list: type, length, distinctness, reference, allowed names."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return [f"{label}: expected a list of name strings, got {type(names).__name__}"]
    problems = []
    if len(names) != length:
        problems.append(f"{label}: {len(names)} names, expected {length}")
    if len(set(names)) != len(names):
        problems.append(f"{label}: names are not distinct")
    if reference in names:
        problems.append(f"{label}: contains the reference image {reference!r}")
    if allowed is not None:
        outside = [n for n in names if n not in allowed]
        if outside:
            problems.append(f"{label}: names outside img_set.members: {outside}")
    return problems


def check_cirr_submission(
    recall: Mapping[str, Any], subset: Mapping[str, Any], triplets: Sequence[Mapping[str, Any]]
) -> None:
    """Validate a CIRR test submission against the test1 triplets before upload.

    Checks the version / metric fields; that every test1 pairid is present and nothing else; exactly
    50 (recall) and 3 (subset) distinct names per pairid; the reference in neither; subset names
    within the query's ``img_set.members``; each serialized file under the 5 MB server limit.

    Raises:
        SubmissionError: listing every problem found.
    """
    problems: list[str] = []
    expected: dict[str, Mapping[str, Any]] = {}
    for t in triplets:
        key = str(t["pairid"])
        if key in expected:
            problems.append(f"triplets: pairid {key} appears more than once")
        expected[key] = t

    files = (
        ("recall", recall, "recall", CIRR_RECALL_LENGTH),
        ("recall_subset", subset, "recall_subset", CIRR_SUBSET_LENGTH),
    )
    for label, sub, metric, length in files:
        if not isinstance(sub, Mapping):
            problems.append(f"{label}: expected a JSON object, got {type(sub).__name__}")
            continue
        if sub.get("version") != CIRR_SUBMISSION_VERSION:
            problems.append(f"{label}: 'version' is {sub.get('version')!r}, expected {CIRR_SUBMISSION_VERSION!r}")
        if sub.get("metric") != metric:
            problems.append(f"{label}: 'metric' is {sub.get('metric')!r}, expected {metric!r}")
        submitted = set(sub) - {"version", "metric"}
        missing = [key for key in expected if key not in submitted]
        extra = sorted(submitted - set(expected))
        if missing:
            problems.append(f"{label}: {len(missing)} test pairid(s) missing, e.g. {missing[:5]}")
        if extra:
            problems.append(f"{label}: {len(extra)} unexpected key(s), e.g. {extra[:5]}")
        for key, t in expected.items():
            if key in sub:
                allowed = set(t["img_set"]["members"]) if metric == "recall_subset" else None
                problems += _check_ranking(f"{label}[{key}]", sub[key], length, t["reference"], allowed)
        size = len(_submission_bytes(sub))
        if size >= CIRR_MAX_SUBMISSION_BYTES:
            problems.append(f"{label}: {size} bytes serialized, the server limit is {CIRR_MAX_SUBMISSION_BYTES}")
    if problems:
        raise SubmissionError(problems)


def write_cirr_submission(
    out_dir: str | os.PathLike,
    name: str,
    recall: Mapping[str, Any],
    subset: Mapping[str, Any],
    triplets: Sequence[Mapping[str, Any]],
) -> tuple[Path, Path]:
    """Check, then atomically write ``recall_submission_{name}.json`` and ``recall_subset_submission_{name}.json``.

    Returns:
        (recall path, subset path).
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"submission name must be a plain file-name part, got {name!r}")
    check_cirr_submission(recall, subset, triplets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recall_path = out / f"recall_submission_{name}.json"
    subset_path = out / f"recall_subset_submission_{name}.json"
    atomic_write_bytes(recall_path, _submission_bytes(recall))
    atomic_write_bytes(subset_path, _submission_bytes(subset))
    return recall_path, subset_path


def circo_submission(ranked_names: Sequence[Sequence[int | str]], query_ids: Sequence[int]) -> dict[str, list[int]]:
    """CIRCO test-server content: {"<query id>": [top-50 distinct image ids as ints]}.

    ``ranked_names`` holds image ids (ints or digit strings such as "000000123456"), best first.
    """
    _check_lengths(len(query_ids), ranked_names=ranked_names)
    submission: dict[str, list[int]] = {}
    short = 0
    for qid, ranked in zip(query_ids, ranked_names):
        key = str(qid)
        if key in submission:
            raise ValueError(f"query id {key} appears more than once")
        try:
            ids = [int(name) for name in ranked[:CIRCO_SUBMISSION_LENGTH]]
        except ValueError as exc:
            raise ValueError(f"query {key}: CIRCO predictions must be integer image ids ({exc})") from exc
        if len(set(ids)) != len(ids):
            raise ValueError(f"query {key}: predictions must be distinct image ids")
        short += len(ids) < CIRCO_SUBMISSION_LENGTH
        submission[key] = ids
    if short:  # one warning, not one per query: a small (e.g. synthetic) gallery makes every ranking short
        _logger.warning("%d CIRCO queries have fewer than the %d predictions the server expects",
                        short, CIRCO_SUBMISSION_LENGTH)
    return submission


# --------------------------------------------------------------------------------------------------
# Atomic I/O and checkpoints
# --------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    The bytes go to a temporary file in the same directory (same filesystem, so ``os.replace`` is
    atomic), are flushed and fsynced, then renamed over ``path``. On failure (e.g. disk full) the
    temporary file is removed, ``path`` is left untouched and an OSError naming ``path`` is raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    created = False
    try:
        # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask apply as usual.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if created:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            # OSError(errno, ...) re-creates the matching subclass (FileNotFoundError, ...).
            raise OSError(exc.errno or errno.EIO, f"could not write {path}: {exc.strerror or exc}") from exc
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as UTF-8 JSON (compact separators when ``indent`` is None)."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(obj, indent=indent, separators=separators)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not one written by :func:`save_checkpoint`."""


_PLAIN_TYPES = (Tensor, str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Reject anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _PLAIN_TYPES) and not isinstance(obj, (np.generic, np.ndarray)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(obj).__name__}; states may hold only tensors, numbers, strings, "
        "None, lists, tuples and dicts (use vars(args) for a Namespace, str() for a Path, float() for numpy)"
    )


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically save ``state`` plus ``format_version`` so that :func:`load_checkpoint` can read it safely.

    ``state`` may already carry ``format_version``, but only with the current value.
    """
    if state.get(_CHECKPOINT_VERSION_KEY, CHECKPOINT_FORMAT_VERSION) != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"state[{_CHECKPOINT_VERSION_KEY!r}] is {state[_CHECKPOINT_VERSION_KEY]!r}; "
            f"save_checkpoint writes format {CHECKPOINT_FORMAT_VERSION}"
        )
    payload = {_CHECKPOINT_VERSION_KEY: CHECKPOINT_FORMAT_VERSION, **state}
    _check_plain(payload, "state")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Make ``destination`` hold ``source``'s bytes, atomically: a hard link, or a copy where links fail.

    The best checkpoints by several criteria are often one and the same state; a hard link stores it
    once.  ``source`` files are only ever replaced (``os.replace``), never written in place, so a
    linked file keeps its contents when either name is later given a new checkpoint.
    """
    source, destination = Path(source), Path(destination)
    tmp = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links (FAT, some network mounts)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, destination)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno or errno.EIO, f"could not write {destination}: {exc.strerror or exc}") from exc


def load_weights_only(
    path: Path, error: type[Exception], what: str, map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` (no code from the file runs), failures as ``error(...)``.

    A missing file and a file the weights-only unpickler cannot read raise ``error`` with a message
    starting with ``"<what> <path>:"``; OSError (other than a missing file) and MemoryError pass through.
    """
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, MemoryError):
        raise  # unreadable file or no memory: not a statement about the file's contents
    except Exception as exc:  # a damaged file can fail anywhere in the unpickler (IndexError, KeyError, ...)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"{what} {path}: corrupt or not a weights-only checkpoint ({first_line})") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Returns:
        The saved state dict, including ``format_version``.

    Raises:
        CheckpointError: the file is missing, unreadable as a weights-only checkpoint, or not ours.
    """
    path = Path(path)
    state = load_weights_only(path, CheckpointError, "checkpoint", map_location)
    if not isinstance(state, dict) or _CHECKPOINT_VERSION_KEY not in state:
        raise CheckpointError(
            f"checkpoint {path}: not a checkpoint written by save_checkpoint (no {_CHECKPOINT_VERSION_KEY!r})"
        )
    version = state[_CHECKPOINT_VERSION_KEY]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {path}: invalid format version {version!r}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version!r} is newer than supported ({CHECKPOINT_FORMAT_VERSION})"
        )
    return state


# --------------------------------------------------------------------------------------------------
# Seeding and logging
# --------------------------------------------------------------------------------------------------


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MALLOC_ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed activation buffers instead of returning them to the kernel every step.

    With glibc's defaults, the large tensors of a CPU training step are mmap-ed and unmapped each step
    and page-faulted back in the next (measured: 7-10 % of a ViT-B/32 step).  A 32 MiB mmap threshold
    and a 2 GiB trim threshold (the largest mallopt accepts) keep them in the heap, as the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would.  Results are unchanged.
    Returns False (and changes nothing) off glibc, or when those variables are already set.
    """
    if any(key in os.environ for key in MALLOC_ENV_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


SECRET_ARGS = frozenset({"api_key"})


def public_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Run arguments without secrets (the Comet API key), as written to args.json, checkpoints and Comet."""
    return {key: value for key, value in args.items() if key not in SECRET_ARGS}


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all CUDA devices too, when present)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only accepts 32-bit seeds
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy from the worker's torch seed.

    torch already gives each worker seed base_seed + worker_id, but not Python's ``random`` or
    NumPy, which would otherwise repeat the same stream in every worker.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def setup_logging(output_dir: Path | None, level: int = logging.INFO) -> logging.Logger:
    """Configure and return the ``cir`` logger: console, plus ``output_dir/log.txt`` when given.

    Calling it again replaces the handlers instead of duplicating them.
    """
    logger = logging.getLogger("cir")
    logger.setLevel(level)
    logger.propagate = False  # our handlers only; avoids double lines via the root logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
        logger.addHandler(handler)
    return logger


def _to_float(value: Any) -> float:
    """Python float from a number, 0-d tensor or NumPy scalar (JSON cannot hold tensors)."""
    return float(value.item()) if isinstance(value, (Tensor, np.generic)) else float(value)


class MetricsLogger:
    """Append metrics to ``output_dir/metrics.jsonl`` and, optionally, to Comet.

    Each :meth:`log` call writes one JSON object ``{"time", ["step"], ["epoch"], <prefix+name>: value}``
    and flushes it, so the file is readable while training runs. Comet is used only when both
    ``comet_api_key`` and ``comet_workspace`` are given; ``comet_ml`` is imported only then.
    """

    def __init__(
        self,
        output_dir: Path,
        comet_api_key: str | None = None,
        comet_workspace: str | None = None,
        comet_project: str | None = None,
        run_args: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self.experiment = None
        if bool(comet_api_key) != bool(comet_workspace):
            _logger.warning("Comet logging needs both an API key and a workspace; logging to %s only", self.path)
        elif comet_api_key:
            try:
                import comet_ml
            except ImportError as exc:
                raise ImportError(
                    "Comet logging was requested but comet_ml is not installed: pip install comet_ml"
                ) from exc
            self.experiment = comet_ml.Experiment(
                api_key=comet_api_key, workspace=comet_workspace, project_name=comet_project
            )
            if run_args:
                self.experiment.log_parameters(run_args)
        self._file = self.path.open("a", encoding="utf-8")

    def log(
        self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None, prefix: str = ""
    ) -> None:
        """Record ``metrics`` (names get ``prefix`` prepended) at the given step / epoch."""
        values = {f"{prefix}{name}": _to_float(value) for name, value in metrics.items()}
        record: dict[str, Any] = {"time": time.time()}
        if step is not None:
            record["step"] = int(step)
        if epoch is not None:
            record["epoch"] = int(epoch)
        record.update(values)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.experiment is not None:
            self.experiment.log_metrics(values, step=step, epoch=epoch)

    def close(self) -> None:
        """Close the file and end the Comet experiment (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self.experiment is not None:
            self.experiment.end()
            self.experiment = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics_log(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``metrics.jsonl`` written by :class:`MetricsLogger` into a DataFrame (one row per call).

    A truncated last line (the process died mid-write) is skipped with a warning; a malformed line
    elsewhere raises ValueError.
    """
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                _logger.warning("%s: skipping truncated last line %d", path, number)
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({exc})") from exc
    return pd.DataFrame.from_records(records)
