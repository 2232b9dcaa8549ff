"""Benchmark submissions: the CIRR and CIRCO test-server files (built, checked, written) and FashionIQ test rankings.

Files are checked against the server's rules before they are written, and written atomically
(:func:`utils.atomic_write_bytes`), so an upload never starts from a malformed or truncated file.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from retrieval import check_lengths, cirr_rankings
from utils import UserError, atomic_write_bytes, atomic_write_json

__all__ = [
    "SubmissionError",
    "cirr_submission",
    "check_cirr_submission",
    "write_cirr_submission",
    "circo_submission",
    "write_circo_submission",
    "write_fiq_rankings",
]

_logger = logging.getLogger("cir.submission")

CIRR_SUBMISSION_VERSION = "rc2"
CIRR_RECALL_LENGTH = 50
CIRR_SUBSET_LENGTH = 3
# The CIRR server rejects files over 5 MB; 5 * 10**6 bytes is under both readings of "MB".
CIRR_MAX_SUBMISSION_BYTES = 5 * 10**6
CIRCO_SUBMISSION_LENGTH = 50
# Length of the FashionIQ test rankings (no server: the rankings are the output).
FIQ_RANKING_LENGTH = 50


class SubmissionError(UserError, ValueError):
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
    check_lengths(query_feats.shape[0], pair_ids=pair_ids)
    keys = [str(pid) for pid in pair_ids]
    if len(set(keys)) != len(keys):
        raise ValueError("pair_ids must be unique")
    full, subset = cirr_rankings(
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


def _check_name(name: str) -> None:
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"submission name must be a plain file-name part, got {name!r}")


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
    _check_name(name)
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
    check_lengths(len(query_ids), ranked_names=ranked_names)
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


def write_circo_submission(
    out_dir: str | os.PathLike, name: str, ranked_names: Sequence[Sequence[str]], query_ids: Sequence[int],
    gallery_size: int,
) -> Path:
    """Check, then atomically write ``circo_test_submission_{name}.json`` (compact JSON); returns its path.

    Every query must have ``min(50, gallery_size)`` predictions (the server expects 50).

    Raises:
        SubmissionError: listing every query with another number of predictions.
    """
    _check_name(name)
    expected = min(CIRCO_SUBMISSION_LENGTH, gallery_size)
    check_lengths(len(query_ids), ranked_names=ranked_names)
    problems = [f"query {qid}: {len(ids)} predictions, expected {expected}"
                for qid, ids in zip(query_ids, ranked_names) if len(ids) != expected]
    if problems:
        raise SubmissionError(problems)
    path = Path(out_dir) / f"circo_test_submission_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, circo_submission(ranked_names, query_ids), indent=None)
    return path


def write_fiq_rankings(
    out_dir: str | os.PathLike, category: str, name: str, query_ids: Sequence[str],
    ranked_names: Sequence[Sequence[str]],
) -> Path:
    """Atomically write ``fashioniq_{category}_test_rankings_{name}.json``: {query id: names best first}."""
    _check_name(name)
    check_lengths(len(query_ids), ranked_names=ranked_names)
    path = Path(out_dir) / f"fashioniq_{category}_test_rankings_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {qid: list(ranked) for qid, ranked in zip(query_ids, ranked_names)})
    return path
