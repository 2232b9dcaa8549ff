"""Precomputed captions and LLM answers in the layouts of the CVSI release.

Captions — pickles as the release writes them (read with an unpickler that accepts only plain lists,
dicts and strings), or the same dicts as JSON:

* gallery role ``{"index_names": [...], "target_captions": [[caption, ...], ...]}``: one caption list per
  gallery image. The release extends ``index_names`` inside its per-image loop, so for each batch of
  ``b`` images it holds the batch's ``b`` names ``b`` times (Σ b² names in all) while
  ``target_captions`` is in the dataset's gallery order. The names are recovered from that pattern;
  if they cannot be, the caption lists are taken in the gallery order of the split's one gallery with
  as many images (the release's own reading).
* reference role ``{"reference_names": [...], "all_captions": [[caption, ...], ...], ...}``: one caption
  list per *query*, in the dataset's query order (a reference image shared by two queries is captioned
  twice). A file whose ``reference_names`` equal a query list's references in order gives each query
  its own captions; otherwise it is read by image name.

The two roles are separate caption sets: an image captioned once as a reference and once as a gallery
image (as the release does) keeps both. A query's reference captions come from the reference role,
else from the gallery role's captions of that image (this project's own files caption each image once).

LLM answers, one entry per query in the dataset's query order (the release's ``*_mods_*.json``):
``{"instruction": [T, ...], "modified_captions": [[C^M, ...] or C^M, ...], "added_content": [objects, ...]}``
plus, in files this project writes, ``"query_ids"``. Without ids, a file is matched to the query list
whose modification texts equal its ``instruction`` list, so a misaligned file is an error rather than
silently wrong answers.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from data_utils import DataError, read_json
from utils import atomic_write_json

__all__ = ["QueryAnswers", "CaptionSets", "read_caption_sets", "read_answer_files", "match_answers",
           "write_answer_file"]

_logger = logging.getLogger("cir.cvsi.imports")
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".p"}
_GALLERY_KEYS = ("index_names", "target_captions")
_REFERENCE_KEYS = ("reference_names", "all_captions")


@dataclass
class QueryAnswers:
    """The LLM's output for one query: modified captions ``C^M`` and the objects most likely added."""

    modified_captions: list[str]
    added_objects: str | None


@dataclass
class CaptionSets:
    """Imported captions by role: ``gallery`` and ``references`` by image name, ``per_query`` by query id."""

    gallery: dict[str, list[str]] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    per_query: dict[str, list[str]] = field(default_factory=dict)

    def reference(self, query_id: str, name: str) -> list[str] | None:
        """The captions of a query's reference image: per-query files, then reference files by name, then
        the gallery role's captions of the image; None if no file has them."""
        for found in (self.per_query.get(query_id), self.references.get(name), self.gallery.get(name)):
            if found is not None:
                return found
        return None


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: nothing that needs a class (or runs code)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it needs {module}.{name}; only plain lists, dicts and strings are read")


def _read_caption_file(path: Path) -> Any:
    if path.suffix.lower() not in _PICKLE_SUFFIXES:
        return read_json(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable caption pickle ({exc})") from exc


def _caption_lists(path: Path, lists: Any, key: str) -> list[list[str]]:
    if not isinstance(lists, list):
        raise DataError(f"{path}: '{key}' must be a list of caption lists")
    out = []
    for index, captions in enumerate(lists):
        if isinstance(captions, str):
            captions = [captions]
        if isinstance(captions, tuple):
            captions = list(captions)
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{path}: {key}[{index}] must be a non-empty list of strings")
        out.append(captions)
    return out


def _names(values: Any) -> list[str] | None:
    return [str(v) for v in values] if isinstance(values, list) and all(isinstance(v, (str, int)) for v in values) \
        else None


def _undo_batch_repeats(names: Sequence[str], count: int) -> list[str] | None:
    """The ``count`` image names behind the release's ``index_names``, or None if it has another form.

    For each batch of b images the release appended the batch's b names b times, so a block starts with
    the batch and repeats it; the batch size is where the block's first name comes back (1 if never).
    """
    recovered: list[str] = []
    position = 0
    while position < len(names):
        first = names[position]
        try:
            size = names.index(first, position + 1) - position
        except ValueError:
            size = 1
        batch = list(names[position:position + size])
        if list(names[position:position + size * size]) != batch * size:
            return None
        recovered += batch
        position += size * size
    return recovered if len(recovered) == count and len(set(recovered)) == count else None


def _merge(target: dict[str, list[str]], path: Path, name: str, captions: list[str], role: str) -> None:
    if target.setdefault(name, captions) != captions:
        raise DataError(f"{path}: image {name} has other {role} captions than an earlier entry (this or an earlier file)")


def read_caption_sets(
    paths: Sequence[str | os.PathLike],
    galleries: Mapping[str, Sequence[str]],
    query_lists: Mapping[str, tuple[Sequence[str], Sequence[str]]],
) -> CaptionSets:
    """Read caption files of either role (see the module docstring).

    Args:
        paths: JSON files or release pickles.
        galleries: per task (e.g. a FashionIQ category), its gallery image names in dataset order.
        query_lists: per task, (query ids, reference image names) in dataset order.

    Raises:
        DataError: unreadable file, unknown layout, misaligned lists, unusable names with no gallery of
            the same size, or two files of one role disagreeing on an image.
    """
    sets = CaptionSets()
    for path in map(Path, paths):
        data = _read_caption_file(path)
        if isinstance(data, dict) and _GALLERY_KEYS[0] in data:
            _read_gallery_role(path, data, galleries, sets)
        elif isinstance(data, dict) and _REFERENCE_KEYS[0] in data:
            _read_reference_role(path, data, query_lists, sets)
        else:
            raise DataError(f"{path}: expected '{_GALLERY_KEYS[0]}' + '{_GALLERY_KEYS[1]}' (gallery captions) or "
                            f"'{_REFERENCE_KEYS[0]}' + '{_REFERENCE_KEYS[1]}' (reference captions)")
    return sets


def _read_gallery_role(path: Path, data: dict, galleries: Mapping[str, Sequence[str]], sets: CaptionSets) -> None:
    lists = _caption_lists(path, data.get(_GALLERY_KEYS[1]), _GALLERY_KEYS[1])
    names = _names(data[_GALLERY_KEYS[0]])
    if names is not None and len(names) != len(lists):
        names = _undo_batch_repeats(names, len(lists))
    if names is None:
        matching = [task for task, gallery in galleries.items() if len(gallery) == len(lists)]
        if len(matching) != 1:
            sizes = ", ".join(f"{task} {len(gallery)}" for task, gallery in galleries.items())
            raise DataError(f"{path}: '{_GALLERY_KEYS[0]}' does not name its {len(lists)} caption lists, and "
                            f"{'no' if not matching else 'more than one'} gallery of this split has that many images "
                            f"({sizes})")
        names = [str(name) for name in galleries[matching[0]]]
        _logger.info("%s: image names unusable; caption lists taken in the gallery order of %s", path, matching[0])
    for name, captions in zip(names, lists):
        _merge(sets.gallery, path, name, captions, "gallery")


def _read_reference_role(path: Path, data: dict, query_lists: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                         sets: CaptionSets) -> None:
    lists = _caption_lists(path, data.get(_REFERENCE_KEYS[1]), _REFERENCE_KEYS[1])
    names = _names(data[_REFERENCE_KEYS[0]])
    if names is None or len(names) != len(lists):
        raise DataError(f"{path}: '{_REFERENCE_KEYS[0]}' and '{_REFERENCE_KEYS[1]}' must be lists of the same length")
    for ids, references in query_lists.values():
        if [str(r) for r in references] == names:
            for query_id, captions in zip(ids, lists):
                _merge(sets.per_query, path, str(query_id), captions, "reference")
            return
    by_name: dict[str, list[str]] = {}
    for name, captions in zip(names, lists):
        if by_name.setdefault(name, captions) != captions:
            raise DataError(f"{path}: image {name} is listed twice with other captions, and the file does not "
                            "follow the query order of this split (a per-query file must list every query in order)")
    for name, captions in by_name.items():
        _merge(sets.references, path, name, captions, "reference")


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
