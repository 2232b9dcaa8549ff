"""Tests for metrics.py (hand-computed expectations): recalls, CIRR / FashionIQ / CIRCO metrics, tables, legend."""

import math

import pytest
import torch

from metrics import (
    circo_metrics,
    cirr_metrics,
    fiq_metrics,
    metric_legend,
    metric_meanings,
    metrics_table_with_legend,
    metrics_table,
    recall_at_k,
    selection_value,
    summarize_fiq,
)


# ---------------------------------------------------------------------------------------------
# CIRR
# ---------------------------------------------------------------------------------------------

NAMES = list("abcdefgh")  # gallery image i has one-hot feature e_i, so score(q, i) = q[i]


def onehot_query(**weights):
    feat = torch.zeros(len(NAMES))
    for name, value in weights.items():
        feat[NAMES.index(name)] = value
    return feat


def test_recall_at_k_basic():
    ranked = [["a", "b", "c"], ["c", "a", "b"]]
    assert recall_at_k(ranked, ["b", "b"], [1, 2, 3]) == {"R@1": 0.0, "R@2": 50.0, "R@3": 100.0}


def test_cirr_metrics_by_hand():
    queries = torch.stack(
        [
            # q0: ref a, target b. Its own reference scores highest (0.9) and must be removed:
            # full ranking b, c, d.. -> rank 1. Subset (members minus a) b, c, .. -> rank 1.
            onehot_query(a=0.9, b=0.5, c=0.3),
            # q1: ref c, target f. Full ranking (c removed): a .9, b .85, d .8, f .6 -> rank 4.
            # Subset {d, e, f, g, h}: d .8, f .6, e .5 -> rank 2.
            onehot_query(c=1.0, a=0.9, b=0.85, d=0.8, f=0.6, e=0.5),
            # q2: ref g, target h. Full: a, b, c, d, e, f, h -> rank 7. Subset {h, a, b, c, d}: rank 5.
            onehot_query(g=1.0, a=0.5, b=0.4, c=0.3, d=0.2, e=0.15, f=0.12, h=0.1),
        ]
    )
    gallery = torch.eye(len(NAMES))
    members = [list("abcdef"), list("cdefgh"), list("ghabcd")]
    metrics = cirr_metrics(queries, gallery, NAMES, ["a", "c", "g"], ["b", "f", "h"], members)

    third = 100 / 3
    # Hits per query (q0, q1, q2): R@1 (1,0,0) R@5 (1,1,0) R@10 (1,1,1) R@50 (1,1,1)
    # Rs@1 (1,0,0) Rs@2 (1,1,0) Rs@3 (1,1,0)
    expected = {
        "R@1": third, "R@5": 2 * third, "R@10": 100.0, "R@50": 100.0,
        "Rs@1": third, "Rs@2": 2 * third, "Rs@3": 2 * third,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    recalls = list(expected.values())
    assert metrics["Avg"] == pytest.approx((2 * third + third) / 2)  # (R@5 + Rs@1) / 2 = 50
    assert metrics["mean"] == pytest.approx(200 / 3)  # 14 thirds / 7
    assert metrics["harmonic_mean"] == pytest.approx(7 / sum(1 / r for r in recalls))
    assert metrics["geometric_mean"] == pytest.approx(math.prod(recalls) ** (1 / 7))

    # Chunking must not change anything.
    assert cirr_metrics(queries, gallery, NAMES, ["a", "c", "g"], ["b", "f", "h"], members, chunk_size=2) == metrics


def test_cirr_metrics_zero_recall_means():
    metrics = cirr_metrics(onehot_query(a=1.0, b=0.5)[None], torch.eye(8), NAMES, ["a"], ["h"], [list("abcdeh")])
    assert metrics["R@1"] == 0.0 and metrics["harmonic_mean"] == 0.0 and metrics["geometric_mean"] == 0.0


def test_cirr_metrics_rejects_bad_names():
    with pytest.raises(ValueError, match="duplicate"):
        cirr_metrics(torch.eye(2), torch.eye(2), ["a", "a"], ["a", "a"], ["a", "a"], [["a"], ["a"]])
    with pytest.raises(ValueError, match="not in the gallery"):
        cirr_metrics(torch.eye(2), torch.eye(2), ["a", "b"], ["a", "b"], ["b", "a"], [["a", "z"], ["a", "b"]])


# ---------------------------------------------------------------------------------------------
# FashionIQ
# ---------------------------------------------------------------------------------------------


def test_fiq_metrics_by_hand():
    num_g = 60
    names = [f"img{i}" for i in range(num_g)]
    gallery = torch.eye(num_g)
    # Score of gallery j is 60 - j for every query, so the ranking is gallery order.
    queries = torch.arange(num_g, 0, -1, dtype=torch.float32).expand(5, num_g)
    # Targets at ranks 1, 10, 11, 50, 51 -> R@10 = 2/5, R@50 = 4/5.
    targets = [names[r - 1] for r in (1, 10, 11, 50, 51)]
    assert fiq_metrics(queries, gallery, names, targets) == pytest.approx({"R@10": 40.0, "R@50": 80.0})


def test_summarize_fiq():
    summary = summarize_fiq({
        "dress": {"R@10": 30.0, "R@50": 60.0},
        "shirt": {"R@10": 20.0, "R@50": 50.0},
        "toptee": {"R@10": 40.0, "R@50": 70.0},
    })
    assert summary["dress_R@10"] == 30.0 and summary["toptee_R@50"] == 70.0
    assert summary["avg_R@10"] == pytest.approx(30.0)
    assert summary["avg_R@50"] == pytest.approx(60.0)
    assert summary["mean"] == pytest.approx(45.0)


# ---------------------------------------------------------------------------------------------
# CIRCO
# ---------------------------------------------------------------------------------------------


def test_circo_metrics_by_hand():
    ranked = [list("abcdefgh"), ["y", "x", "z"]]
    gt = [["a", "c", "f"], ["x"]]
    targets = ["f", "x"]
    aspects = [["cardinality", "addition"], ["addition"]]
    m = circo_metrics(ranked, gt, targets, aspects)
    # q0, GT {a, c, f}, hits at ranks 1, 3, 6:
    #   AP@5  = (1/1 + 2/3) / min(5, 3) = 5/9
    #   AP@10 = (1/1 + 2/3 + 3/6) / 3 = 13/18 (same for 25, 50: the ranking has no more hits)
    # q1, GT {x}, hit at rank 2: AP@k = (1/2) / 1 = 1/2 for every k
    assert m["mAP@5"] == pytest.approx(100 * (5 / 9 + 1 / 2) / 2)
    for k in (10, 25, 50):
        assert m[f"mAP@{k}"] == pytest.approx(100 * (13 / 18 + 1 / 2) / 2)
    # Targets at ranks 6 and 2.
    assert m["R@5"] == 50.0 and m["R@10"] == 100.0
    assert m["mAP@10_cardinality"] == pytest.approx(100 * 13 / 18)
    assert m["mAP@10_addition"] == pytest.approx(100 * (13 / 18 + 1 / 2) / 2)


def test_circo_ap_normalised_by_min_k_gt():
    gt = [f"g{i}" for i in range(7)]
    # Seven ground truths all ranked first: AP@5 = 5 * 1 / min(5, 7) = 1.
    m = circo_metrics([gt + ["x"]], [gt], ["g0"], ks=(5, 10))
    assert m["mAP@5"] == pytest.approx(100.0)
    assert m["mAP@10"] == pytest.approx(100.0)  # 7 / min(10, 7)


def test_circo_rejects_duplicates():
    with pytest.raises(ValueError, match="distinct"):
        circo_metrics([["a", "b", "a"]], [["a"]], ["a"])


def test_selection_value():
    assert selection_value({"mean": 3.0, "harmonic_mean": 2.0}, ("mean", "harmonic_mean")) == 3.0
    assert selection_value({"mean": 3.0, "harmonic_mean": 2.0}, ("mean", "harmonic_mean"), "harmonic_mean") == 2.0
    with pytest.raises(ValueError, match="selected by one of"):
        selection_value({"R@1": 1.0}, ("mean",), "R@1")
    with pytest.raises(KeyError, match="needs metric 'mAP@10'"):
        selection_value({"R@1": 1.0}, ("mAP@10",))


def test_metrics_table():
    flat = metrics_table({"R@1": 12.345, "R@5": 50.0})
    assert "R@1" in flat and "12.35" in flat and "50.00" in flat
    nested = metrics_table({"dress": {"R@10": 1.0, "R@50": 2.0}, "shirt": {"R@10": 3.0, "R@50": 4.0}})
    assert "dress" in nested and "shirt" in nested and "4.00" in nested


def test_metric_legend_explains_every_key_once_by_kind():
    cirr_keys = ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg", "mean", "harmonic_mean", "geometric_mean"]
    legend = metric_legend(cirr_keys).splitlines()
    assert legend[0].startswith("R@1, R@5, R@10, R@50: recall@k")
    assert legend[1].startswith("Rs@1, Rs@2, Rs@3: recall_subset@k")
    assert "Avg: (R@5 + Rs@1) / 2" in legend[2] and "leaderboard" in legend[2]
    assert "mean: mean of the 7 CIRR recalls" in legend[3] and "best checkpoint" in legend[3]
    assert len(legend) == 6  # one line per kind: recalls, subset recalls, Avg, mean, harmonic, geometric

    fiq = metric_legend(["dress_R@10", "dress_R@50", "avg_R@10", "avg_R@50", "mean"]).splitlines()
    assert fiq[0].startswith("dress_R@10, dress_R@50: recall@k of one FashionIQ category")
    assert fiq[1].startswith("avg_R@10, avg_R@50: FashionIQ recall@k averaged")
    assert fiq[2].startswith("mean: (avg_R@10 + avg_R@50) / 2")

    circo = metric_legend(["mAP@5", "mAP@10", "R@5", "mAP@10_addition", "bogus"]).splitlines()
    assert circo[0].startswith("mAP@5, mAP@10: CIRCO mean average precision")
    assert circo[2].startswith("mAP@10_addition: CIRCO mAP@10 over the queries with one semantic aspect")
    assert circo[-1] == "bogus: (no description)"


def test_every_printed_table_carries_its_legend():
    nested = {"ssn": {"R@1": 10.0, "Rs@1": 20.0, "mean": 15.0}, "image": {"R@1": 5.0, "Rs@1": 7.0, "mean": 6.0}}
    text = metrics_table_with_legend(nested).splitlines()
    assert text[-3:] == metric_legend(["R@1", "Rs@1", "mean"]).splitlines()
    assert text[-1].startswith("mean: mean of the 7 CIRR recalls")
    flat = metrics_table_with_legend({"avg_R@10": 1.0, "mean": 2.0}).splitlines()
    assert flat[-1].startswith("mean: (avg_R@10 + avg_R@50) / 2")


def test_metric_meanings_name_each_key():
    meanings = metric_meanings(["R@1", "Rs@1", "mean", "bogus"])
    assert list(meanings) == ["R@1", "Rs@1", "mean", "bogus"]
    assert meanings["mean"].startswith("mean of the 7 CIRR recalls") and meanings["bogus"] == "(no description)"
    assert metric_meanings(["avg_R@10", "mean"])["mean"].startswith("(avg_R@10 + avg_R@50) / 2")
    # A dataset with neither CIRR's nor FashionIQ's keys is not described as either.
    other = metric_meanings(["mAP@10", "mean"])["mean"]
    assert "CIRR" not in other and "FashionIQ" not in other and other.startswith("the dataset's mean")
