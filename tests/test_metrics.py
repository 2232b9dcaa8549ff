"""Tests for retrieval, metrics and benchmark submissions in utils.py (hand-computed expectations)."""

import json
import math

import pytest
import torch

import utils
from utils import (
    SubmissionError,
    best_metric,
    check_cirr_submission,
    circo_metrics,
    circo_submission,
    cirr_metrics,
    cirr_submission,
    fiq_metrics,
    metrics_table,
    recall_at_k,
    summarize_fiq,
    topk_retrieval,
    write_cirr_submission,
)


# ---------------------------------------------------------------------------------------------
# topk_retrieval
# ---------------------------------------------------------------------------------------------


def dense_topk(query, gallery, k, exclude=None):
    """Reference: full score matrix, stable descending sort (ties -> lower gallery index)."""
    scores = query @ gallery.T  # [Q, G]
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


@pytest.mark.parametrize("kind", ["gaussian", "ties"])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
@pytest.mark.parametrize("k", [1, 4, 17, 30])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_topk_matches_dense(kind, chunk_size, k, use_exclude):
    query, gallery, exclude = random_case(kind)
    exclude = exclude if use_exclude else None
    scores, indices = topk_retrieval(query, gallery, k, exclude, chunk_size=chunk_size)
    ref_scores, ref_indices = dense_topk(query, gallery, k, exclude)
    assert indices.shape == ref_indices.shape == (11, min(k, 17 - (1 if use_exclude else 0)))
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)
    if use_exclude:
        for row, excluded in zip(indices.tolist(), exclude.tolist()):
            assert excluded not in row


def test_topk_ties_prefer_lower_index():
    gallery = torch.tensor([[0.0], [1.0], [1.0], [0.5], [1.0]])
    query = torch.tensor([[1.0], [1.0]])
    # query 1 excludes gallery 1, so its tied best are 2 then 4.
    _, idx = topk_retrieval(query, gallery, 4, torch.tensor([-1, 1]), chunk_size=2)
    assert idx.tolist() == [[1, 2, 4, 3], [2, 4, 3, 0]]


def test_topk_rejects_bad_input():
    q, g = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError):
        topk_retrieval(q, torch.randn(4, 2), 1)
    with pytest.raises(ValueError):
        topk_retrieval(q, g, 0)
    with pytest.raises(ValueError):
        topk_retrieval(q, g, 1, torch.tensor([0, 4]))
    g[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_retrieval(q, g, 1)


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
    assert best_metric(metrics, "cirr") == pytest.approx(200 / 3)

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
    assert best_metric(summary, "fashioniq") == pytest.approx(45.0)


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
    assert best_metric(m, "circo") == m["mAP@10"]


def test_circo_ap_normalised_by_min_k_gt():
    gt = [f"g{i}" for i in range(7)]
    # Seven ground truths all ranked first: AP@5 = 5 * 1 / min(5, 7) = 1.
    m = circo_metrics([gt + ["x"]], [gt], ["g0"], ks=(5, 10))
    assert m["mAP@5"] == pytest.approx(100.0)
    assert m["mAP@10"] == pytest.approx(100.0)  # 7 / min(10, 7)


def test_circo_rejects_duplicates():
    with pytest.raises(ValueError, match="distinct"):
        circo_metrics([["a", "b", "a"]], [["a"]], ["a"])


def test_circo_submission():
    ranked = [[str(i).zfill(12) for i in range(100, 160)], list(range(50))]
    sub = circo_submission(ranked, [7, 3])
    assert list(sub) == ["7", "3"]
    assert sub["7"] == list(range(100, 150)) and sub["3"] == list(range(50))
    with pytest.raises(ValueError, match="distinct"):
        circo_submission([[1, 2, 1]], [0])
    with pytest.raises(ValueError, match="integer"):
        circo_submission([["a"]], [0])


def test_best_metric_and_table():
    with pytest.raises(ValueError):
        best_metric({"mean": 1.0}, "imagenet")
    with pytest.raises(KeyError):
        best_metric({"R@1": 1.0}, "circo")
    flat = metrics_table({"R@1": 12.345, "R@5": 50.0})
    assert "R@1" in flat and "12.35" in flat and "50.00" in flat
    nested = metrics_table({"dress": {"R@10": 1.0, "R@50": 2.0}, "shirt": {"R@10": 3.0, "R@50": 4.0}})
    assert "dress" in nested and "shirt" in nested and "4.00" in nested


# ---------------------------------------------------------------------------------------------
# CIRR submission
# ---------------------------------------------------------------------------------------------


def submission_case(num_q=4, num_g=60):
    gen = torch.Generator().manual_seed(0)
    names = [f"test1-{i}-0-img0" for i in range(num_g)]
    gallery = torch.nn.functional.normalize(torch.randn(num_g, 8, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(num_q, 8, generator=gen), dim=-1)
    triplets = []
    for q in range(num_q):
        group = names[6 * q : 6 * q + 6]
        img_set = {"id": q, "members": group}
        triplets.append({"pairid": 100 + q, "reference": group[0], "caption": "x", "img_set": img_set})
    # Make each query's reference its nearest neighbour, so exclusion is exercised.
    gallery[[6 * q for q in range(num_q)]] = queries
    return queries, gallery, names, triplets


def make_submission():
    queries, gallery, names, triplets = submission_case()
    recall, subset = cirr_submission(
        queries,
        gallery,
        names,
        [t["reference"] for t in triplets],
        [t["img_set"]["members"] for t in triplets],
        [t["pairid"] for t in triplets],
    )
    return recall, subset, triplets


def test_cirr_submission_is_valid():
    recall, subset, triplets = make_submission()
    assert recall["version"] == subset["version"] == "rc2"
    assert recall["metric"] == "recall" and subset["metric"] == "recall_subset"
    for t in triplets:
        top, top3 = recall[str(t["pairid"])], subset[str(t["pairid"])]
        assert len(top) == 50 and len(top3) == 3
        assert t["reference"] not in top and t["reference"] not in top3
        assert set(top3) <= set(t["img_set"]["members"])
    check_cirr_submission(recall, subset, triplets)
    # Also valid after a JSON round trip (what the server sees).
    check_cirr_submission(json.loads(json.dumps(recall)), json.loads(json.dumps(subset)), triplets)


def _drop_first(recall, subset, t):
    del recall[str(t[0]["pairid"])]


def _truncate(recall, subset, t):
    key = str(t[1]["pairid"])
    recall[key] = recall[key][:49]


def _with_reference(recall, subset, t):
    key = str(t[2]["pairid"])
    recall[key] = [t[2]["reference"]] + recall[key][:49]


def _outside_members(recall, subset, t):
    key = str(t[3]["pairid"])
    subset[key] = subset[key][:2] + ["test1-59-0-img0"]


def _wrong_version(recall, subset, t):
    subset["version"] = "rc1"


def _extra_key(recall, subset, t):
    recall["999"] = [f"test1-{i}-0-img0" for i in range(50)]


def _duplicate_names(recall, subset, t):
    key = str(t[0]["pairid"])
    subset[key] = [subset[key][0]] * 3


VIOLATIONS = [
    (_drop_first, "missing"),
    (_truncate, "49 names"),
    (_with_reference, "reference"),
    (_outside_members, "outside img_set.members"),
    (_wrong_version, "'version'"),
    (_extra_key, "unexpected"),
    (_duplicate_names, "not distinct"),
]


@pytest.mark.parametrize("mutate,message", VIOLATIONS, ids=[m.__name__ for m, _ in VIOLATIONS])
def test_check_cirr_submission_each_violation(mutate, message):
    recall, subset, triplets = make_submission()
    mutate(recall, subset, triplets)
    with pytest.raises(SubmissionError, match=message):
        check_cirr_submission(recall, subset, triplets)


def test_check_cirr_submission_reports_all_problems():
    recall, subset, triplets = make_submission()
    for mutate, _ in VIOLATIONS:
        mutate(recall, subset, triplets)
    with pytest.raises(SubmissionError) as info:
        check_cirr_submission(recall, subset, triplets)
    assert len(info.value.problems) >= len(VIOLATIONS)
    for _, message in VIOLATIONS:
        assert message in str(info.value)


def test_check_cirr_submission_size_limit(monkeypatch):
    recall, subset, triplets = make_submission()
    monkeypatch.setattr(utils, "CIRR_MAX_SUBMISSION_BYTES", 1000)
    with pytest.raises(SubmissionError, match="server limit") as info:
        check_cirr_submission(recall, subset, triplets)
    assert len(info.value.problems) == 1  # only the recall file exceeds 1000 bytes


def test_write_cirr_submission(tmp_path):
    recall, subset, triplets = make_submission()
    recall_path, subset_path = write_cirr_submission(tmp_path / "sub", "ssn", recall, subset, triplets)
    assert recall_path.name == "recall_submission_ssn.json"
    assert subset_path.name == "recall_subset_submission_ssn.json"
    assert json.loads(recall_path.read_text()) == recall
    assert json.loads(subset_path.read_text()) == subset

    _truncate(recall, subset, triplets)
    with pytest.raises(SubmissionError):
        write_cirr_submission(tmp_path / "bad", "ssn", recall, subset, triplets)
    assert not (tmp_path / "bad").exists()  # nothing written when the check fails
