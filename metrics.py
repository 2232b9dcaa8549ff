"""Composed-image-retrieval metrics: recalls, CIRR / FashionIQ / CIRCO figures, tables and their legend.

Metric definitions follow the official CIRR, FashionIQ and CIRCO evaluations (see docs/benchmarks.md).
Every recall / mAP returned here is a percentage in [0, 100].  Rankings come from :mod:`retrieval`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence

import pandas as pd
from torch import Tensor

from retrieval import check_lengths, cirr_rankings, name_to_index, ranked_names

__all__ = [
    "CIRR_RECALL_KS",
    "CIRR_SUBSET_KS",
    "FIQ_KS",
    "CIRCO_KS",
    "recall_at_k",
    "cirr_metrics",
    "fiq_metrics",
    "summarize_fiq",
    "circo_metrics",
    "selection_value",
    "metrics_table",
    "metric_legend",
    "metric_meanings",
    "table_keys",
    "metrics_table_with_legend",
]

CIRR_RECALL_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)


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
    check_lengths(len(target_names), ranked_names=ranked_names)
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
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    target_names: Sequence[str],
    members: Sequence[Sequence[str]],
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
    check_lengths(query_feats.shape[0], target_names=target_names)
    full, subset = cirr_rankings(
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
    gallery_names: Sequence[str],
    target_names: Sequence[str],
    chunk_size: int = 4096,
) -> dict[str, float]:
    """FashionIQ validation metrics for one category: 'R@10', 'R@50' in percent.

    The gallery is the category's val images; as in the official evaluation the reference image is
    not removed from the ranking.
    """
    check_lengths(query_feats.shape[0], target_names=target_names)
    name_to_index(gallery_names)  # uniqueness check
    ranked = ranked_names(query_feats, gallery_feats, gallery_names, max(FIQ_KS), chunk_size=chunk_size)
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
    ranked_names: Sequence[Sequence[str]],
    gt_names: Sequence[Sequence[str]],
    target_names: Sequence[str],
    semantic_aspects: Sequence[Sequence[str]] | None = None,
    ks: Sequence[int] = CIRCO_KS,
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
    check_lengths(num_q, gt_names=gt_names, target_names=target_names)
    if semantic_aspects is not None:
        check_lengths(num_q, semantic_aspects=semantic_aspects)
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


def selection_value(
    metrics: Mapping[str, float], criteria: Sequence[str], criterion: str | None = None, what: str = "checkpoint"
) -> float:
    """The single number used to pick the best checkpoint: ``metrics[criterion]``.

    ``criterion`` must be one of ``criteria`` (default: the first), e.g. a dataset's
    ``DatasetSpec.selection_criteria``; ``what`` names the selection in error messages.
    """
    key = criterion or criteria[0]
    if key not in criteria:
        raise ValueError(f"{what}s are selected by one of {tuple(criteria)}, not {key!r}")
    if key not in metrics:
        raise KeyError(f"{what} selection needs metric {key!r}, got {sorted(metrics)}")
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
# Legend: what each metric key means (one line per kind of key)
# --------------------------------------------------------------------------------------------------

# (pattern, meaning): the first pattern that matches a whole key explains it.
_LEGEND: tuple[tuple[str, str], ...] = (
    (r"R@\d+", "recall@k: % of queries whose target is among the first k results of the whole gallery "
               "(CIRR: the reference image removed)"),
    (r"Rs@\d+", "recall_subset@k (CIRR): the same within the query's image set minus the reference"),
    (r"Avg", "(R@5 + Rs@1) / 2, the CIRR leaderboard figure"),
    (r"harmonic_mean", "harmonic mean of the 7 CIRR recalls (0 if any is 0); selects best_harmonic.pt"),
    (r"geometric_mean", "geometric mean of the 7 CIRR recalls (0 if any is 0); selects best_geometric.pt"),
    (r"avg_R@\d+", "FashionIQ recall@k averaged over the categories"),
    (r"\w+_R@\d+", "recall@k of one FashionIQ category (its own gallery, reference kept)"),
    (r"mAP@\d+", "CIRCO mean average precision at k over all ground truths: "
                 "AP@k = sum_{i<=k} P@i * rel_i / min(k, |GT|)"),
    (r"mAP@10_.+", "CIRCO mAP@10 over the queries with one semantic aspect"),
)
# 'mean' is each dataset's selection figure: (a key only that dataset reports, what its 'mean' is).  A
# dataset whose 'mean' is something else adds its line here; without one, 'mean' gets the generic meaning.
_MEAN_MEANINGS: tuple[tuple[str, str], ...] = (
    (r"Rs@\d+", "mean of the 7 CIRR recalls (R@1, 5, 10, 50, Rs@1, 2, 3); picks the best checkpoint"),
    (r"avg_R@\d+", "(avg_R@10 + avg_R@50) / 2, the FashionIQ average; picks the best checkpoint"),
)
_GENERIC_MEAN = "the dataset's mean of its reported figures"


def _key_kind(key: str) -> str | None:
    """The legend pattern (or 'mean') that explains ``key``; None for an unknown key."""
    if key == "mean":
        return "mean"
    for pattern, _ in _LEGEND:
        if re.fullmatch(pattern, key):
            return pattern
    return None


def metric_meanings(keys: Sequence[str]) -> dict[str, str]:
    """``{key: what it means}`` for each of ``keys`` (as ``summary.json``'s "legend"); unknown keys get
    '(no description)'.

    'mean' is explained by its context: the mean of the 7 recalls when CIRR's 'Rs@k' are among ``keys``,
    FashionIQ's average of avg_R@10 and avg_R@50 when its 'avg_R@k' are, a generic line otherwise.
    """
    meanings = dict(_LEGEND)
    mean_meaning = next((meaning for pattern, meaning in _MEAN_MEANINGS
                         if any(re.fullmatch(pattern, key) for key in keys)), _GENERIC_MEAN)
    explained = {}
    for key in dict.fromkeys(keys):  # unique, in order
        kind = _key_kind(key)
        if kind == "mean":
            explained[key] = mean_meaning
        else:
            explained[key] = meanings[kind] if kind is not None else _UNKNOWN
    return explained


_UNKNOWN = "(no description)"


def metric_legend(keys: Sequence[str]) -> str:
    """One line per kind of metric among ``keys``: ``"R@1, R@5: recall@k: ..."``, in order of first appearance
    (:func:`metric_meanings`); unknown keys last."""
    groups: dict[str, list[str]] = {}
    for key, meaning in metric_meanings(keys).items():
        groups.setdefault(meaning, []).append(key)
    unknown = groups.pop(_UNKNOWN, [])
    lines = [f"{', '.join(members)}: {meaning}" for meaning, members in groups.items()]
    if unknown:
        lines.append(f"{', '.join(unknown)}: {_UNKNOWN}")
    return "\n".join(lines)


def table_keys(metrics: Mapping[str, float] | Mapping[str, Mapping[str, float]]) -> list[str]:
    """The metric names of a :func:`metrics_table` (the columns; a nested table's inner keys)."""
    rows = [row for row in metrics.values() if isinstance(row, Mapping)] or [metrics]
    return list(dict.fromkeys(key for row in rows for key in row))


def metrics_table_with_legend(
    metrics: Mapping[str, float] | Mapping[str, Mapping[str, float]], decimals: int = 2
) -> str:
    """:func:`metrics_table`, then its :func:`metric_legend`: every printed table says what its columns are."""
    return f"{metrics_table(metrics, decimals)}\n{metric_legend(table_keys(metrics))}"
