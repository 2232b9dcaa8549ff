"""Precomputed captions and LLM answers in the JSON style of the CVSI release.

Captions (the release pickles these dicts; store them as JSON):

* gallery side ``{"index_names": [name, ...], "target_captions": [[caption, ...], ...]}``
* query side ``{"reference_names": [name, ...], "all_captions": [[caption, ...], ...], ...}``

LLM answers, one entry per query in the dataset's query order (the release's ``*_mods_*.json``):
``{"instruction": [T, ...], "modified_captions": [[C^M, ...] or C^M, ...], "added_content": [objects, ...]}``
plus, in files this project writes, ``"query_ids"``. Without ids, a file is matched to the query list
whose modification texts equal its ``instruction`` list, so a misaligned file is an error rather than
silently wrong answers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from data_utils import DataError, read_json
from utils import atomic_write_json

__all__ = ["QueryAnswers", "read_caption_files", "read_answer_files", "match_answers", "write_answer_file"]


@dataclass
class QueryAnswers:
    """The LLM's output for one query: modified captions ``C^M`` and the objects most likely added."""

    modified_captions: list[str]
    added_objects: str | None


def _caption_lists(path: Path, names: Any, lists: Any, keys: tuple[str, str]) -> dict[str, list[str]]:
    if not isinstance(names, list) or not isinstance(lists, list) or len(names) != len(lists):
        raise DataError(f"{path}: '{keys[0]}' and '{keys[1]}' must be lists of the same length")
    out = {}
    for index, (name, captions) in enumerate(zip(names, lists)):
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{path}: {keys[1]}[{index}] must be a non-empty list of strings")
        out[str(name)] = captions
    return out


def read_caption_files(paths: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
    """Image name -> captions, merged over files in either layout.

    Raises:
        DataError: unreadable file, unknown layout, misaligned lists, or two files disagreeing on an image.
    """
    captions: dict[str, list[str]] = {}
    for path in map(Path, paths):
        data = read_json(path)
        found = False
        for keys in (("index_names", "target_captions"), ("reference_names", "all_captions")):
            if isinstance(data, dict) and keys[0] in data:
                found = True
                for name, lists in _caption_lists(path, data[keys[0]], data.get(keys[1]), keys).items():
                    if captions.setdefault(name, lists) != lists:
                        raise DataError(f"{path}: image {name} has other captions than in an earlier file")
        if not found:
            raise DataError(f"{path}: expected 'index_names' + 'target_captions' or 'reference_names' + 'all_captions'")
    return captions


@dataclass
class AnswerFile:
    path: Path
    instructions: list[str]
    answers: list[QueryAnswers]
    query_ids: list[str] | None


def read_answer_files(paths: Sequence[str | os.PathLike]) -> list[AnswerFile]:
    """Parse answer files (see the module docstring)."""
    files = []
    for path in map(Path, paths):
        data = read_json(path)
        if not isinstance(data, dict) or "modified_captions" not in data or "instruction" not in data:
            raise DataError(f"{path}: expected an object with 'instruction', 'modified_captions' and 'added_content'")
        instructions, modified = data["instruction"], data["modified_captions"]
        added = data.get("added_content", [None] * len(modified))
        ids = data.get("query_ids")
        lengths = {len(x) for x in (instructions, modified, added) if isinstance(x, list)}
        if len(lengths) != 1 or not all(isinstance(x, list) for x in (instructions, modified, added)):
            raise DataError(f"{path}: 'instruction', 'modified_captions' and 'added_content' must be lists of one length")
        if ids is not None and (not isinstance(ids, list) or len(ids) != len(instructions)):
            raise DataError(f"{path}: 'query_ids' must be a list as long as 'instruction'")
        answers = []
        for index, (captions, objects) in enumerate(zip(modified, added)):
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
                raise DataError(f"{path}: modified_captions[{index}] must be a non-empty string or list of them")
            if objects is not None and not isinstance(objects, str):
                raise DataError(f"{path}: added_content[{index}] must be a string")
            answers.append(QueryAnswers(list(captions), objects or None))
        files.append(AnswerFile(path, list(instructions), answers, None if ids is None else [str(i) for i in ids]))
    return files


def match_answers(
    files: Sequence[AnswerFile], query_lists: dict[str, tuple[list[str], list[str]]]
) -> dict[str, QueryAnswers]:
    """Query id -> answers.

    Args:
        files: from :func:`read_answer_files`.
        query_lists: per query list (e.g. a FashionIQ category): (query ids, modification texts).

    Raises:
        DataError: a file without ids matches no query list, or its instructions disagree with the queries.
    """
    known = {qid: text for ids, texts in query_lists.values() for qid, text in zip(ids, texts)}
    answers: dict[str, QueryAnswers] = {}
    for file in files:
        if file.query_ids is None:
            match = [ids for ids, texts in query_lists.values() if texts == file.instructions]
            if not match:
                raise DataError(
                    f"{file.path}: its {len(file.instructions)} instructions match no query list of this split "
                    "(files without 'query_ids' must list the queries in dataset order)"
                )
            ids = match[0]
        else:
            ids = file.query_ids
            wrong = [qid for qid, text in zip(ids, file.instructions) if qid in known and known[qid] != text]
            if wrong:
                raise DataError(f"{file.path}: instructions differ from the dataset for query ids {wrong[:5]}")
        answers.update(zip(ids, file.answers))
    return answers


def write_answer_file(path: str | os.PathLike, query_ids: Sequence[str], instructions: Sequence[str],
                      answers: Sequence[QueryAnswers]) -> None:
    """Atomically write answers in the release layout, with ``query_ids``."""
    atomic_write_json(path, {
        "query_ids": list(query_ids),
        "instruction": list(instructions),
        "modified_captions": [a.modified_captions for a in answers],
        "added_content": [a.added_objects or "" for a in answers],
    })
