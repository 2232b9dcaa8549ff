"""Tests for submission.py: CIRR files (built, checked against every server rule, written), CIRCO, FashionIQ."""

import json

import pytest
import torch

import submission
from submission import (
    SubmissionError,
    check_cirr_submission,
    circo_submission,
    cirr_submission,
    write_circo_submission,
    write_cirr_submission,
    write_fiq_rankings,
)


def test_circo_submission():
    ranked = [[str(i).zfill(12) for i in range(100, 160)], list(range(50))]
    sub = circo_submission(ranked, [7, 3])
    assert list(sub) == ["7", "3"]
    assert sub["7"] == list(range(100, 150)) and sub["3"] == list(range(50))
    with pytest.raises(ValueError, match="distinct"):
        circo_submission([[1, 2, 1]], [0])
    with pytest.raises(ValueError, match="integer"):
        circo_submission([["a"]], [0])


def test_write_circo_submission_checks_lengths_and_writes_compact_json(tmp_path):
    ranked = [[str(i) for i in range(q, q + 50)] for q in range(3)]
    path = write_circo_submission(tmp_path / "out", "run1", ranked, [4, 5, 6], gallery_size=100)
    assert path.name == "circo_test_submission_run1.json"
    assert json.loads(path.read_text()) == {"4": list(range(0, 50)), "5": list(range(1, 51)), "6": list(range(2, 52))}
    assert " " not in path.read_text().strip()  # compact separators, as the server's examples
    # A small gallery: every query must have all of its images.
    assert write_circo_submission(tmp_path, "small", [["1", "2"]], [0], gallery_size=2).is_file()
    with pytest.raises(SubmissionError, match="query 5: 49 predictions, expected 50"):
        write_circo_submission(tmp_path, "bad", [ranked[0], ranked[1][:49]], [4, 5], gallery_size=100)
    assert not (tmp_path / "circo_test_submission_bad.json").exists()
    with pytest.raises(ValueError, match="file-name part"):
        write_circo_submission(tmp_path, "a/b", ranked, [4, 5, 6], gallery_size=100)


def test_write_fiq_rankings(tmp_path):
    path = write_fiq_rankings(tmp_path, "dress", "run1", ["dress:0", "dress:1"], [["b", "a"], ["a", "b"]])
    assert path.name == "fashioniq_dress_test_rankings_run1.json"
    assert json.loads(path.read_text()) == {"dress:0": ["b", "a"], "dress:1": ["a", "b"]}
    with pytest.raises(ValueError, match="ranked_names has 1 entries"):
        write_fiq_rankings(tmp_path, "dress", "run1", ["dress:0", "dress:1"], [["a"]])


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
    monkeypatch.setattr(submission, "CIRR_MAX_SUBMISSION_BYTES", 1000)
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
