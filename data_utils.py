"""Datasets, preprocessing and synthetic data for Composed Image Retrieval (CIR).

Three benchmarks are supported in their real on-disk layouts:

* CIRR       ``cirr_dataset/cirr/{captions,image_splits}/...``
* FashionIQ  ``fashion-iq/{captions,image_splits,images}/...``
* CIRCO      ``CIRCO/annotations/...`` + ``CIRCO/COCO2017_unlabeled/...``

Every dataset checks its annotation files and image paths up front (cheaply, without decoding
images) and reports *all* problems in one :class:`DataError`, so a broken download fails at start-up
instead of hours into training. Images that turn out to be unreadable later also raise
:class:`DataError`; no sample is ever silently dropped.

The ``make_synthetic_*`` functions write small datasets in exactly the real layouts. Their images
are 2x2 grids of coloured shapes and their captions describe edits ("make the circle blue and
remove the square"), so a model has to compose image and text to find the target; the galleries
hold hard negatives (partial edits, wrong colours, the reference itself). The evaluation splits
also get ``image_captions/*.json``: several noisy descriptions per gallery image, in the style of
the BLIP-2 caption files that zero-shot methods such as CVSI precompute (see
:func:`write_caption_file`).

Command line: ``python data_utils.py synth --dataset all --out DIR --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as tv_transforms
from torchvision.transforms import InterpolationMode

__all__ = [
    "DataError",
    "load_image",
    "read_json",
    "TargetPad",
    "build_transform",
    "ImageFiles",
    "CIRRDataset",
    "FashionIQDataset",
    "join_fiq_captions",
    "CIRCODataset",
    "SkippedSample",
    "SkipBadSamples",
    "collate_batch",
    "make_synthetic_cirr",
    "make_synthetic_fashioniq",
    "make_synthetic_circo",
    "SYNTHETIC_CAPTIONS_PER_IMAGE",
    "CAPTIONS_DIR",
    "write_caption_file",
    "main",
]

Transform = Callable[[Image.Image], torch.Tensor]

# How many problems one DataError lists before summarising the rest.
MAX_LISTED_PROBLEMS = 20


# --------------------------------------------------------------------------------------------
# Errors and file reading
# --------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad input data. The message names the offending file(s) and what is wrong."""


# Exceptions PIL raises for missing, truncated, corrupt or non-image files. UnidentifiedImageError
# is an OSError; SyntaxError/struct.error come from plugin parsers (e.g. broken PNG chunks).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and return it as RGB.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise unreadable.
    """
    path = Path(path)
    try:
        # verify() checks the file structure (e.g. PNG CRCs) but leaves the object unusable,
        # so the image is opened a second time for decoding; load() catches truncated data.
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (PIL cannot identify it)") from None
    except _IMAGE_ERRORS as error:
        raise DataError(f"{path}: unreadable image ({type(error).__name__}: {error})") from error


def read_json(path: str | Path) -> Any:
    """Parse a UTF-8 JSON file.

    Raises:
        DataError: the file is missing, unreadable or not valid JSON (with line and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read file ({error})") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except (ValueError, RecursionError) as error:  # e.g. a 5000-digit number, "[[[[..." nested too deeply
        raise DataError(f"{path}: JSON cannot be parsed ({type(error).__name__}: {error})") from None


class _Problems:
    """Collects data problems so that one DataError can report all of them at once."""

    def __init__(self, context: str) -> None:
        self.context = context
        self.messages: list[str] = []

    def add(self, file: str | Path, message: str) -> None:
        self.messages.append(f"{file}: {message}")

    def read_json(self, path: Path, expected: type) -> Any:
        """Read a JSON file whose top level must be ``expected``; None (and a problem) if not."""
        try:
            data = read_json(path)
        except DataError as error:
            self.messages.append(str(error))
            return None
        if not isinstance(data, expected):
            self.add(path, f"expected a JSON {expected.__name__} at top level, got {_kind(data)}")
            return None
        return data

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_LISTED_PROBLEMS]
        lines = [f"{self.context}: {len(self.messages)} data problem(s):"]
        lines += [f"  - {message}" for message in shown]
        if len(self.messages) > len(shown):
            lines.append(f"  ... and {len(self.messages) - len(shown)} more")
        raise DataError("\n".join(lines))


def _kind(value: Any) -> str:
    """JSON-ish type name used in error messages."""
    return {dict: "object", list: "list", str: "string", bool: "bool", int: "int",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "int_list":
        return isinstance(value, list) and all(_type_ok(v, "int") for v in value)
    raise ValueError(f"unknown kind {kind!r}")


_MISSING = object()  # sentinel: distinguishes an absent key from a JSON null


def _check_fields(
    entry: Any, index: int, fields: Iterable[tuple[str, str, bool]], file: Path, problems: _Problems
) -> bool:
    """Check one annotation entry against ``(dotted_key, kind, required)`` specs.

    Returns True when every present field has the right type and every required one is present.
    """
    if not isinstance(entry, dict):
        problems.add(file, f"entry {index}: expected an object, got {_kind(entry)}")
        return False
    ok = True
    for dotted, kind, required in fields:
        value: Any = entry
        for part in dotted.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
            if value is _MISSING:
                break
        if value is _MISSING:
            if required:
                problems.add(file, f"entry {index}: missing key '{dotted}'")
                ok = False
        elif not _type_ok(value, kind):
            problems.add(file, f"entry {index}: key '{dotted}' should be {kind}, "
                         f"got {_kind(value)}")
            ok = False
    return ok


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


class TargetPad:
    """CLIP4Cir's "target pad": pad an image (centred, black) so that its aspect ratio is at most
    ``target_ratio``; the resize that follows then keeps the whole image instead of cropping it.
    """

    def __init__(self, target_ratio: float = 1.25) -> None:
        if target_ratio < 1.0:
            raise ValueError(f"target_ratio must be >= 1, got {target_ratio}")
        self.target_ratio = target_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        long_side, short_side = max(w, h), min(w, h)
        if long_side <= self.target_ratio * short_side:
            return image
        # Round up so the padded ratio never exceeds target_ratio.
        new_short = math.ceil(long_side / self.target_ratio)
        new_size = (w, new_short) if w >= h else (new_short, h)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # so that zero fill means black
        padded = Image.new(image.mode, new_size)
        padded.paste(image, ((new_size[0] - w) // 2, (new_size[1] - h) // 2))
        return padded

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_ratio={self.target_ratio})"


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def build_transform(
    kind: str,
    image_size: int,
    target_ratio: float = 1.25,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> Transform:
    """Image preprocessing producing a ``[3, image_size, image_size]`` float tensor.

    Args:
        kind: ``'clip'`` (CLIP's resize + centre crop) or ``'targetpad'`` (pad to
            ``target_ratio`` first, CLIP4Cir style).
        image_size: output side length in pixels.
        target_ratio: maximum aspect ratio kept by ``'targetpad'``.
        mean, std: normalisation statistics (CLIP's by default).
    """
    clip_steps = [
        tv_transforms.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
        tv_transforms.CenterCrop(image_size),
        _to_rgb,
        tv_transforms.ToTensor(),
        tv_transforms.Normalize(mean=mean, std=std),
    ]
    if kind == "clip":
        return tv_transforms.Compose(clip_steps)
    if kind == "targetpad":
        return tv_transforms.Compose([TargetPad(target_ratio), *clip_steps])
    raise ValueError(f"unknown transform kind {kind!r}; expected 'clip' or 'targetpad'")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class _CIRDataset(Dataset):
    """Shared behaviour: ``image_names`` gallery, ``mode`` switch and image loading."""

    split: str
    mode: str
    transform: Transform
    image_names: list[str]
    triplets: list[dict]
    _image_paths: dict[str, Path]

    def __len__(self) -> int:
        return len(self.triplets) if self.mode == "relative" else len(self.image_names)

    def image_path(self, name: str) -> Path:
        """File of gallery/query image ``name`` (resolved once, at construction)."""
        return self._image_paths[name]

    def _image(self, name: str) -> torch.Tensor:
        return self.transform(load_image(self._image_paths[name]))


class ImageFiles(Dataset):
    """Items ``{"name", "image"}`` over named image files (a folder gallery, images missing from a cache)."""

    def __init__(self, names: Sequence[str], paths: Sequence[Path], transform: Callable[[Image.Image], Any]) -> None:
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} image files")
        self.names, self.paths, self.transform = list(names), list(paths), transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"name": self.names[index], "image": self.transform(load_image(self.paths[index]))}


class CIRRDataset(_CIRDataset):
    """CIRR (Liu et al., ICCV 2021).

    Args:
        root: the ``cirr_dataset`` directory.
        split: ``'train'``, ``'val'`` or ``'test1'``.
        mode: ``'relative'`` (one item per triplet) or ``'classic'`` (one item per gallery image).
        transform: image preprocessing, e.g. from :func:`build_transform`.

    Items:
        relative/train: ``reference_image, target_image, caption``.
        relative/val, test1: ``reference_image, reference_name, target_name`` ('' on test1),
        ``caption, members, pair_id``.
        classic: ``name, image``; the gallery is every image of the split file, in file order.
    """

    SPLITS = ("train", "val", "test1")

    def __init__(self, root: str | Path, split: str, mode: str, transform: Transform) -> None:
        _check_choice("split", split, self.SPLITS)
        _check_choice("mode", mode, ("relative", "classic"))
        self.root, self.split, self.mode, self.transform = Path(root), split, mode, transform
        problems = _Problems(f"CIRR {split} under {self.root}")

        split_file = self.root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
        caption_file = self.root / "cirr" / "captions" / f"cap.rc2.{split}.json"
        split_map = problems.read_json(split_file, dict) or {}
        raw_triplets = problems.read_json(caption_file, list) or []

        self._image_paths = {}
        for name, rel in split_map.items():
            if not isinstance(rel, str):
                problems.add(split_file, f"image '{name}': path should be string, got {_kind(rel)}")
                continue
            path = self._resolve(rel)
            if path is None:
                problems.add(split_file, f"image '{name}': file not found at {self.root / rel} "
                             f"or {self.root / 'images' / rel}")
            else:
                self._image_paths[name] = path
        self.image_names = list(split_map)

        has_target = split != "test1"
        fields = [("pairid", "int", True), ("reference", "str", True), ("caption", "str", True),
                  ("img_set", "dict", True), ("img_set.members", "str_list", True),
                  ("target_hard", "str", has_target)]
        seen_pairids: set[int] = set()
        for index, entry in enumerate(raw_triplets):
            if not _check_fields(entry, index, fields, caption_file, problems):
                continue
            if entry["pairid"] in seen_pairids:
                problems.add(caption_file, f"entry {index}: duplicate pairid {entry['pairid']}")
            seen_pairids.add(entry["pairid"])
            names = [("reference", entry["reference"])]
            if "target_hard" in entry:
                names.append(("target_hard", entry["target_hard"]))
            names += [("img_set.members", m) for m in entry["img_set"]["members"]]
            for role, name in names:
                if name not in split_map:
                    problems.add(caption_file, f"entry {index}: {role} image '{name}' is not "
                                 f"listed in {split_file.name}")
        problems.raise_if_any()
        self.triplets = raw_triplets

    def _resolve(self, rel: str) -> Path | None:
        # The official layout keeps images next to `cirr/`; SSN's moves train under images/.
        for candidate in (self.root / rel, self.root / "images" / rel):
            if candidate.is_file():
                return candidate
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mode == "classic":
            name = self.image_names[index]
            return {"name": name, "image": self._image(name)}
        triplet = self.triplets[index]
        reference = triplet["reference"]
        if self.split == "train":
            return {"reference_image": self._image(reference),
                    "target_image": self._image(triplet["target_hard"]),
                    "caption": triplet["caption"]}
        return {"reference_image": self._image(reference),
                "reference_name": reference,
                "target_name": triplet.get("target_hard", ""),
                "caption": triplet["caption"],
                "members": list(triplet["img_set"]["members"]),
                "pair_id": triplet["pairid"]}


def _strip_caption(caption: str) -> str:
    return caption.strip().strip(".?, ").strip()


def join_fiq_captions(captions: Sequence[str]) -> str:
    """FashionIQ's evaluation caption: the two relative captions as "c1 and c2"."""
    first, second = (_strip_caption(c) for c in captions)
    return f"{first} and {second}"


class FashionIQDataset(_CIRDataset):
    """FashionIQ (Wu et al., CVPR 2021).

    Args:
        root: the ``fashion-iq`` directory.
        split: ``'train'``, ``'val'`` or ``'test'``.
        dress_types: categories to use, e.g. ``['dress', 'shirt', 'toptee']``.
        mode: ``'relative'`` or ``'classic'``.
        transform: image preprocessing.
        caption_mode: ``'random'`` (CLIP4Cir's training augmentation: "c1 and c2", "c2 and c1",
            "c1" or "c2" with equal probability, drawn from Python's ``random`` module, which
            PyTorch seeds per DataLoader worker) or ``'join'`` ("c1 and c2"). Defaults to
            ``'random'`` on train and ``'join'`` otherwise.

    Items:
        relative/train: ``reference_image, target_image, caption``.
        relative/val, test: ``reference_image, reference_name, target_name`` ('' when the file
        has no target), ``caption, category``.
        classic: ``name, image, category``; the gallery is the union of the categories' split
        files (first category wins for an id listed twice).
    """

    SPLITS = ("train", "val", "test")

    def __init__(
        self,
        root: str | Path,
        split: str,
        dress_types: Sequence[str],
        mode: str,
        transform: Transform,
        caption_mode: str | None = None,
    ) -> None:
        _check_choice("split", split, self.SPLITS)
        _check_choice("mode", mode, ("relative", "classic"))
        if isinstance(dress_types, str) or not dress_types:
            raise ValueError(
                f"dress_types must be a non-empty sequence of names, got {dress_types!r}")
        caption_mode = caption_mode or ("random" if split == "train" else "join")
        _check_choice("caption_mode", caption_mode, ("random", "join"))
        self.root, self.split, self.mode, self.transform = Path(root), split, mode, transform
        self.dress_types, self.caption_mode = list(dress_types), caption_mode
        problems = _Problems(f"FashionIQ {split} {self.dress_types} under {self.root}")

        self.image_names, self.image_categories, self.triplets = [], [], []
        self._image_paths = {}
        listed: set[str] = set()
        # Test caption files carry no targets in the real release.
        fields = [("candidate", "str", True), ("target", "str", split != "test"),
                  ("captions", "str_list", True)]
        for category in self.dress_types:
            split_file = self.root / "image_splits" / f"split.{category}.{split}.json"
            caption_file = self.root / "captions" / f"cap.{category}.{split}.json"
            ids = problems.read_json(split_file, list) or []
            gallery = set()
            for index, image_id in enumerate(ids):
                if not isinstance(image_id, str):
                    problems.add(split_file, f"entry {index}: expected an image id string, "
                                 f"got {_kind(image_id)}")
                    continue
                gallery.add(image_id)
                if image_id not in listed:
                    listed.add(image_id)
                    self.image_names.append(image_id)
                    self.image_categories.append(category)
                self._register(image_id, split_file, problems)
            for index, entry in enumerate(problems.read_json(caption_file, list) or []):
                if not _check_fields(entry, index, fields, caption_file, problems):
                    continue
                if len(entry["captions"]) != 2:
                    problems.add(caption_file, f"entry {index}: expected 2 captions, got "
                                 f"{len(entry['captions'])}")
                    continue
                self._register(entry["candidate"], caption_file, problems)
                if "target" in entry:
                    self._register(entry["target"], caption_file, problems)
                    # Evaluation ranks the category's gallery; a missing target would score 0.
                    if split != "train" and entry["target"] not in gallery:
                        problems.add(caption_file, f"entry {index}: target '{entry['target']}' "
                                     f"is not listed in {split_file.name}")
                self.triplets.append({**entry, "category": category})
        problems.raise_if_any()

    def _register(self, image_id: str, source: Path, problems: _Problems) -> None:
        """Resolve ``images/<id>.png`` (or ``.jpg``) once; record a problem if neither exists."""
        if image_id in self._image_paths:
            return
        png = self.root / "images" / f"{image_id}.png"
        jpg = png.with_suffix(".jpg")
        if png.is_file():
            self._image_paths[image_id] = png
        elif jpg.is_file():
            self._image_paths[image_id] = jpg
        else:
            problems.add(source, f"image '{image_id}': file not found at {png} or {jpg}")
            # Remember the failure so the same id is reported once.
            self._image_paths[image_id] = png

    def _caption(self, captions: Sequence[str]) -> str:
        if self.caption_mode == "join":
            return join_fiq_captions(captions)
        first, second = (_strip_caption(c) for c in captions)
        return random.choice([f"{first} and {second}", f"{second} and {first}", first, second])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mode == "classic":
            name = self.image_names[index]
            return {"name": name, "image": self._image(name),
                    "category": self.image_categories[index]}
        triplet = self.triplets[index]
        caption = self._caption(triplet["captions"])
        if self.split == "train":
            return {"reference_image": self._image(triplet["candidate"]),
                    "target_image": self._image(triplet["target"]),
                    "caption": caption}
        return {"reference_image": self._image(triplet["candidate"]),
                "reference_name": triplet["candidate"],
                "target_name": triplet.get("target", ""),
                "caption": caption,
                "category": triplet["category"]}


class CIRCODataset(_CIRDataset):
    """CIRCO (Baldrati et al., ICCV 2023): queries over the COCO 2017 unlabeled images.

    Args:
        root: the ``CIRCO`` directory.
        split: ``'val'`` or ``'test'`` (test has no targets).
        mode: ``'relative'`` or ``'classic'``.
        transform: image preprocessing.

    Items:
        relative: ``reference_image, reference_name`` (str id), ``query_id`` (int),
        ``caption, shared_concept, target_name`` ('' on test), ``gt_names`` (list[str]),
        ``semantic_aspects`` (list[str]).
        classic: ``name`` (str id), ``image``; gallery order is that of
        ``image_info_unlabeled2017.json``.
    """

    SPLITS = ("val", "test")

    def __init__(self, root: str | Path, split: str, mode: str, transform: Transform) -> None:
        _check_choice("split", split, self.SPLITS)
        _check_choice("mode", mode, ("relative", "classic"))
        self.root, self.split, self.mode, self.transform = Path(root), split, mode, transform
        problems = _Problems(f"CIRCO {split} under {self.root}")

        coco = self.root / "COCO2017_unlabeled"
        info_file = coco / "annotations" / "image_info_unlabeled2017.json"
        annotation_file = self.root / "annotations" / f"{split}.json"
        info = problems.read_json(info_file, dict)
        images: list = []
        if info is not None:
            images = info.get("images", [])
            if "images" not in info:
                problems.add(info_file, "missing key 'images'")
            elif not isinstance(images, list):
                problems.add(info_file, f"key 'images' should be list, got {_kind(images)}")
                images = []

        self.image_names, self._image_paths = [], {}
        for index, record in enumerate(images):
            if not _check_fields(record, index, [("id", "int", True), ("file_name", "str", False)],
                                 info_file, problems):
                continue
            name = str(record["id"])
            path = coco / "unlabeled2017" / record.get("file_name", f"{record['id']:012d}.jpg")
            if name in self._image_paths:
                problems.add(info_file, f"entry {index}: duplicate image id {name}")
                continue
            if not path.is_file():
                problems.add(info_file, f"image {name}: file not found at {path}")
            self.image_names.append(name)
            self._image_paths[name] = path

        is_val = split == "val"
        fields = [("id", "int", True), ("reference_img_id", "int", True),
                  ("relative_caption", "str", True), ("shared_concept", "str", True),
                  ("target_img_id", "int", is_val), ("gt_img_ids", "int_list", is_val),
                  ("semantic_aspects", "str_list", is_val)]
        raw_queries = problems.read_json(annotation_file, list) or []
        for index, entry in enumerate(raw_queries):
            if not _check_fields(entry, index, fields, annotation_file, problems):
                continue
            referenced = [("reference_img_id", entry["reference_img_id"])]
            if "target_img_id" in entry:
                referenced.append(("target_img_id", entry["target_img_id"]))
            referenced += [("gt_img_ids", i) for i in entry.get("gt_img_ids", [])]
            for role, image_id in referenced:
                if str(image_id) not in self._image_paths:
                    problems.add(annotation_file, f"entry {index}: {role} {image_id} is not listed "
                                 f"in {info_file.name}")
            if is_val and not entry["gt_img_ids"]:
                problems.add(annotation_file, f"entry {index}: 'gt_img_ids' is empty")
        problems.raise_if_any()
        self.triplets = raw_queries

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mode == "classic":
            name = self.image_names[index]
            return {"name": name, "image": self._image(name)}
        query = self.triplets[index]
        reference = str(query["reference_img_id"])
        target = query.get("target_img_id")
        return {"reference_image": self._image(reference),
                "reference_name": reference,
                "query_id": query["id"],
                "caption": query["relative_caption"],
                "shared_concept": query["shared_concept"],
                "target_name": "" if target is None else str(target),
                "gt_names": [str(i) for i in query.get("gt_img_ids", [])],
                "semantic_aspects": list(query.get("semantic_aspects", []))}


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a dataset item that could not be read (see :class:`SkipBadSamples`)."""

    index: int
    error: str


class SkipBadSamples(Dataset):
    """Wrap a dataset so that an item raising :class:`DataError` becomes a :class:`SkippedSample`.

    :func:`collate_batch` moves the markers out of the batch into ``batch["skipped_samples"]``, so
    the training loop can count, log and report every skipped sample; nothing is dropped silently.
    Only :class:`DataError` (an unreadable image, named in the message) is caught.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        try:
            return self.dataset[index]
        except DataError as error:
            return SkippedSample(int(index), str(error))


def collate_batch(batch: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Collate dataset items: tensors are stacked, everything else becomes a per-sample list.

    Unlike ``default_collate``, list-valued fields (``members``, ``gt_names``, ...) stay one list
    per sample instead of being transposed, and ints stay Python ints.  :class:`SkippedSample`
    markers are left out of the fields and listed under ``"skipped_samples"`` (a batch of markers
    only collates to that key alone).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    skipped = [item for item in batch if isinstance(item, SkippedSample)]
    if skipped:
        items = [item for item in batch if not isinstance(item, SkippedSample)]
        return {**(collate_batch(items) if items else {}), "skipped_samples": skipped}
    keys = list(batch[0])
    for item in batch[1:]:
        if list(item) != keys:
            raise ValueError(f"items have different keys: {keys} vs {list(item)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# --------------------------------------------------------------------------------------------
# Synthetic data: scenes of coloured shapes on a 2x2 grid
# --------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 70, 230),
    "yellow": (240, 210, 0), "purple": (140, 40, 190), "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
CIRCO_ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change",
                 "comparative_statement", "statement_with_conjunction",
                 "spatial_relations_background", "viewpoint")

# A scene is a tuple of 4 cells in reading order, each None or (shape, colour); every shape type
# appears at most once so that "the circle" is unambiguous.
Cell = tuple[str, str] | None
Scene = tuple[Cell, ...]
# An edit is (op, shape, colour) with op in {"recolour", "remove", "add"}; colour is "" for remove.
Edit = tuple[str, str, str]


def _shape_cell(scene: Scene, shape: str) -> int | None:
    for index, cell in enumerate(scene):
        if cell is not None and cell[0] == shape:
            return index
    return None


def _apply(scene: Scene, edit: Edit) -> Scene | None:
    """Apply one edit; None if it does not apply (absent shape, no room, no-op, empty result)."""
    op, shape, colour = edit
    cells = list(scene)
    where = _shape_cell(scene, shape)
    if op == "add":
        if where is not None or None not in cells:
            return None
        cells[cells.index(None)] = (shape, colour)  # first empty cell in reading order
    elif where is None:
        return None
    elif op == "remove":
        cells[where] = None
        if all(c is None for c in cells):
            return None
    elif op == "recolour":
        if scene[where][1] == colour:
            return None
        cells[where] = (shape, colour)
    return tuple(cells)


def _apply_all(scene: Scene | None, edits: Sequence[Edit]) -> Scene | None:
    for edit in edits:
        if scene is None:
            return None
        scene = _apply(scene, edit)
    return scene


def _edits_by_op(scene: Scene) -> dict[str, list[Edit]]:
    """Every applicable single edit of ``scene``, grouped by operation."""
    present = [c[0] for c in scene if c is not None]
    groups: dict[str, list[Edit]] = {"recolour": [], "remove": [], "add": []}
    for cell in scene:
        if cell is None:
            continue
        groups["recolour"] += [("recolour", cell[0], c) for c in COLOURS if c != cell[1]]
        if len(present) > 1:
            groups["remove"].append(("remove", cell[0], ""))
    if None in scene:
        groups["add"] += [("add", s, c) for s in SHAPES if s not in present for c in COLOURS]
    return {op: edits for op, edits in groups.items() if edits}


def _sample_edit(rng: np.random.Generator, scene: Scene, avoid_shape: str = "") -> Edit | None:
    # Pick the operation first so recolours (the most numerous edits) do not dominate.
    groups = {op: [e for e in edits if e[1] != avoid_shape]
              for op, edits in _edits_by_op(scene).items()}
    groups = {op: edits for op, edits in groups.items() if edits}
    if not groups:
        return None
    ops = sorted(groups)
    edits = groups[ops[rng.integers(len(ops))]]
    return edits[rng.integers(len(edits))]


def _sample_scene(rng: np.random.Generator, min_shapes: int = 1, max_shapes: int = 3) -> Scene:
    count = int(rng.integers(min_shapes, max_shapes + 1))
    shapes = rng.permutation(len(SHAPES))[:count]
    cells = rng.permutation(4)[:count]
    colours = list(COLOURS)
    scene: list[Cell] = [None] * 4
    for shape, cell in zip(shapes, cells):
        scene[cell] = (SHAPES[shape], colours[rng.integers(len(colours))])
    return tuple(scene)


def _sample_query(rng: np.random.Generator, scene: Scene) -> tuple[list[Edit], Scene]:
    """One or two edits (on different shapes) and the resulting target scene."""
    while True:
        first = _sample_edit(rng, scene)
        middle = _apply(scene, first)
        if rng.random() < 0.5:
            return [first], middle
        second = _sample_edit(rng, middle, avoid_shape=first[1])
        if second is not None:
            return [first, second], _apply(middle, second)


def _edit_text(edit: Edit) -> str:
    op, shape, colour = edit
    if op == "recolour":
        return f"make the {shape} {colour}"
    if op == "remove":
        return f"remove the {shape}"
    return f"add a {colour} {shape}"


def _caption(edits: Sequence[Edit]) -> str:
    return " and ".join(_edit_text(e) for e in edits)


def _hard_negatives(rng: np.random.Generator, reference: Scene, edits: Sequence[Edit],
                    target: Scene) -> list[list[Scene]]:
    """Near-variants of the target, grouped by kind, each group shuffled.

    Kinds: only some of the edits applied; the right edits with a wrong colour/shape/object;
    the target with an untouched shape recoloured; a random single edit of reference or target.
    """
    partial = [_apply_all(reference, [e]) for e in edits] if len(edits) > 1 else []
    wrong: list[Scene | None] = []
    for index, (op, shape, colour) in enumerate(edits):
        others = [e for j, e in enumerate(edits) if j != index]
        if op in ("recolour", "add"):
            wrong += [_apply_all(reference, [(op, shape, c)] + others)
                      for c in COLOURS if c != colour]
        if op == "add":
            wrong += [_apply_all(reference, [(op, s, colour)] + others)
                      for s in SHAPES if s != shape]
        if op == "remove":
            wrong += [_apply_all(reference, [(op, s, "")] + others) for s in SHAPES if s != shape]
    touched = {e[1] for e in edits}
    untouched = [_apply(target, e) for e in _edits_by_op(target).get("recolour", [])
                 if e[1] not in touched]
    random_edit = [_apply(s, e) for s in (reference, target)
                   for edits_ in _edits_by_op(s).values() for e in edits_]
    groups = []
    for group in (partial, wrong, untouched, random_edit):
        group = [s for s in group if s is not None]
        groups.append([group[i] for i in rng.permutation(len(group))])
    return groups


def _pick_variants(groups: list[list[Scene]], count: int, exclude: set[Scene]) -> list[Scene]:
    """Round-robin over the groups so that every kind of hard negative is represented."""
    chosen: list[Scene] = []
    iterators = [iter(g) for g in groups]
    while len(chosen) < count and iterators:
        for it in list(iterators):
            for scene in it:
                if scene not in exclude and scene not in chosen:
                    chosen.append(scene)
                    break
            else:
                iterators.remove(it)
            if len(chosen) == count:
                break
    return chosen


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _render_scene(scene: Scene, size: int, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / 2
    margin = cell * 0.1  # shapes fill ~80% of the cell so they survive downscaling to 32 px
    for index, content in enumerate(scene):
        if content is None:
            continue
        x0, y0 = (index % 2) * cell, (index // 2) * cell
        box = (x0 + margin, y0 + margin, x0 + cell - margin - 1, y0 + cell - margin - 1)
        _draw_shape(draw, content[0], box, COLOURS[content[1]])
    return image


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)  # level 1: fast, still deterministic


def _single_edit_links(members: Sequence[Scene]) -> list[tuple[int, int, Edit]]:
    """All (a, b, edit) with members[b] == edit applied to members[a]."""
    index = {scene: i for i, scene in enumerate(members)}
    links = []
    for a, scene in enumerate(members):
        for edits in _edits_by_op(scene).values():
            for edit in edits:
                b = index.get(_apply(scene, edit))
                if b is not None:
                    links.append((a, b, edit))
    return links

# Image captions: what a captioner such as BLIP-2 would say about each image, N per image, with
# a captioner's typical noise (an object missed, a colour got wrong, varied wording).
SYNTHETIC_CAPTIONS_PER_IMAGE = 15
CAPTIONS_DIR = "image_captions"
_CAPTION_MISS_RATE = 0.15  # per caption: one object left out (scenes with 2+ objects)
_CAPTION_COLOUR_ERROR_RATE = 0.1  # per caption: one object described with a wrong colour
_SCENE_TEMPLATES = ("{}", "a picture of {}", "{} on a white background", "an image showing {}",
                    "a drawing of {}")


def _caption_rng(seed: int) -> np.random.Generator:
    """A stream of its own, so that captions leave the images and annotations unchanged."""
    return np.random.default_rng([seed, 0xCA])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_phrases(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _scene_captions(rng: np.random.Generator, scene: Scene,
                    count: int = SYNTHETIC_CAPTIONS_PER_IMAGE) -> list[str]:
    """``count`` noisy descriptions of a scene, e.g. "a picture of a red circle and a blue square"."""
    objects = [cell for cell in scene if cell is not None]
    colours = list(COLOURS)
    captions = []
    for _ in range(count):
        described = [objects[i] for i in rng.permutation(len(objects))]
        if len(described) > 1 and rng.random() < _CAPTION_MISS_RATE:
            described.pop(int(rng.integers(len(described))))
        if rng.random() < _CAPTION_COLOUR_ERROR_RATE:
            wrong = int(rng.integers(len(described)))
            described[wrong] = (described[wrong][0], colours[rng.integers(len(colours))])
        phrases = [f"{_article(colour)} {colour} {shape}" for shape, colour in described]
        template = _SCENE_TEMPLATES[rng.integers(len(_SCENE_TEMPLATES))]
        captions.append(template.format(_join_phrases(phrases)))
    return captions


def _garment_captions(rng: np.random.Generator, category: str, garment: Garment,
                      count: int = SYNTHETIC_CAPTIONS_PER_IMAGE) -> list[str]:
    """``count`` noisy descriptions of a garment, e.g. "a long blue dress with white stripes"."""
    colour, pattern, pattern_colour, length = garment
    noun = {"dress": "dress", "shirt": "shirt", "toptee": "top"}[category]
    colours = list(COLOURS)
    captions = []
    for _ in range(count):
        said_colour = colour
        if rng.random() < _CAPTION_COLOUR_ERROR_RATE:
            said_colour = colours[rng.integers(len(colours))]
        words = [length] if rng.random() < 0.5 else []
        words = [*words, said_colour, noun]
        text = " ".join([_article(words[0]), *words])
        if pattern != "plain" and rng.random() >= _CAPTION_MISS_RATE:
            text += f" with {pattern_colour} {pattern}s" if pattern != "stripe" else \
                f" with {pattern_colour} stripes"
        template = ("{}", "a woman wearing {}", "{} on a plain background")[rng.integers(3)]
        captions.append(template.format(text))
    return captions


def write_caption_file(path: str | Path, captions: dict[str, list[str]]) -> None:
    """Write image captions as the CVSI release stores its precomputed BLIP-2 captions (there as a
    pickle): ``{"index_names": [name, ...], "target_captions": [[caption, ...], ...]}``, the two
    lists aligned."""
    _write_json(Path(path), {"index_names": list(captions),
                             "target_captions": [list(c) for c in captions.values()]})


_CIRR_BACKGROUND = (235, 235, 235)
# Consecutive rejected draws after which a generator gives up instead of looping forever.
_MAX_FAILED_DRAWS = 10_000
_CIRR_PREFIX = {"train": "train", "val": "dev", "test1": "test1"}


def _cirr_split(rng: np.random.Generator, split: str, num_triplets: int, extra_per_set: int,
                root: Path, image_size: int) -> dict[str, Scene]:
    """Write one CIRR split: sets of 6 similar images, each giving 1 + extra triplets.

    Returns the scene of every image written, by image name.
    """
    prefix = _CIRR_PREFIX[split]
    # Gallery splits need unique scenes so that each query has exactly one correct image.
    used: set[Scene] = set()
    unique = split != "train"
    split_map: dict[str, str] = {}
    scenes: dict[str, Scene] = {}
    triplets: list[dict] = []
    set_id = failures = 0
    while len(triplets) < num_triplets:
        # Unique galleries can run out of unused scenes (about 6500 exist); fail, don't hang.
        if failures > _MAX_FAILED_DRAWS:
            raise ValueError(f"CIRR {split}: cannot draw {num_triplets} triplets with distinct "
                             f"images; ask for fewer")
        reference = _sample_scene(rng)
        edits, target = _sample_query(rng, reference)
        if unique and (reference in used or target in used):
            failures += 1
            continue
        variants = _pick_variants(_hard_negatives(rng, reference, edits, target), 4,
                                  {reference, target} | (used if unique else set()))
        if len(variants) < 4:
            failures += 1
            continue
        failures = 0
        members = [reference, target, *variants]
        order = rng.permutation(6)
        members = [members[i] for i in order]
        names = [f"{prefix}-{set_id}-{m // 2}-img{m % 2}" for m in range(6)]
        queries = [(members.index(reference), members.index(target), _caption(edits))]
        links = [(a, b, _edit_text(e)) for a, b, e in _single_edit_links(members)
                 if (a, b) != queries[0][:2]]
        for i in rng.permutation(len(links))[:extra_per_set]:
            queries.append(links[i])
        for ref_rank, target_rank, caption in queries[:num_triplets - len(triplets)]:
            entry: dict[str, Any] = {"pairid": len(triplets), "reference": names[ref_rank]}
            if split != "test1":
                entry["target_hard"] = names[target_rank]
                entry["target_soft"] = {names[target_rank]: 1.0}
            entry["caption"] = caption
            img_set: dict[str, Any] = {"id": set_id, "members": names, "reference_rank": ref_rank}
            if split != "test1":
                img_set["target_rank"] = target_rank
            entry["img_set"] = img_set
            triplets.append(entry)
        for name, scene in zip(names, members):
            folder = f"./train/{set_id // 10}" if split == "train" else f"./{prefix}"
            split_map[name] = f"{folder}/{name}.png"
            scenes[name] = scene
            _save_png(_render_scene(scene, image_size, _CIRR_BACKGROUND), root / split_map[name])
        used.update(members)
        set_id += 1
    _write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", triplets)
    _write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", split_map)
    return scenes


def make_synthetic_cirr(root: str | Path, seed: int = 0, num_train: int = 2400, num_val: int = 300,
                        num_test: int = 120, image_size: int = 64) -> Path:
    """Write a synthetic CIRR copy to ``<root>/cirr_dataset`` in the real layout; return that path.

    Each image set holds a reference, its edited target and 4 hard negatives (partial edits,
    wrong colours, other shapes changed); every set yields 1-3 triplets whose captions are edit
    instructions. Val and test1 galleries contain each scene once. Deterministic in ``seed``.
    Image captions are written for val and test1: ``image_captions/{val,test1}.json``.
    """
    out = Path(root) / "cirr_dataset"
    rng = np.random.default_rng(seed)
    # Train sets yield up to 3 triplets (more reuse), gallery splits 2 (more distinct sets).
    splits = (("train", num_train, 2), ("val", num_val, 1), ("test1", num_test, 1))
    caption_rng = _caption_rng(seed)
    for split, count, extra in splits:
        split_rng = np.random.default_rng(rng.integers(2**63))
        scenes = _cirr_split(split_rng, split, count, extra, out, image_size)
        if split != "train":  # zero-shot methods caption the evaluation galleries only
            write_caption_file(out / CAPTIONS_DIR / f"{split}.json",
                               {name: _scene_captions(caption_rng, scene)
                                for name, scene in scenes.items()})
    return out


# FashionIQ: a garment per image; attributes colour, pattern and length; each category has its
# own silhouette and background tone so the three categories look distinct.
_FIQ_CATEGORIES = {"dress": (250, 232, 236), "shirt": (228, 238, 250), "toptee": (244, 240, 222)}
_FIQ_PATTERNS = ("plain", "circle", "square", "triangle", "stripe")
_FIQ_PATTERN_COLOURS = {"white": (255, 255, 255), "black": (20, 20, 20)}
_FIQ_LENGTHS = {"short": 0.55, "mid-length": 0.72, "long": 0.9}
Garment = tuple[str, str, str, str]  # colour, pattern, pattern colour ("" when plain), length


def _garment_outline(category: str, size: int, length: float) -> list[tuple[float, float]]:
    s, top, bottom = size, size * 0.06, size * (0.06 + length * 0.9)
    if category == "dress":  # narrow bodice, flared skirt
        return [(0.38 * s, top), (0.62 * s, top), (0.6 * s, 0.35 * s), (0.9 * s, bottom),
                (0.1 * s, bottom), (0.4 * s, 0.35 * s)]
    if category == "shirt":  # long sleeves
        return [(0.3 * s, top), (0.7 * s, top), (0.98 * s, 0.6 * s), (0.84 * s, 0.66 * s),
                (0.72 * s, 0.35 * s), (0.72 * s, bottom), (0.28 * s, bottom), (0.28 * s, 0.35 * s),
                (0.16 * s, 0.66 * s), (0.02 * s, 0.6 * s)]
    return [(0.3 * s, top), (0.38 * s, top), (0.45 * s, 0.2 * s), (0.55 * s, 0.2 * s),  # tank top
            (0.62 * s, top), (0.7 * s, top), (0.78 * s, bottom), (0.22 * s, bottom)]


def _render_garment(category: str, garment: Garment, size: int) -> Image.Image:
    colour, pattern, pattern_colour, length = garment
    image = Image.new("RGB", (size, size), _FIQ_CATEGORIES[category])
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(_garment_outline(category, size, _FIQ_LENGTHS[length]), fill=255)
    cloth = Image.new("RGB", (size, size), COLOURS[colour])
    if pattern != "plain":
        draw, fill = ImageDraw.Draw(cloth), _FIQ_PATTERN_COLOURS[pattern_colour]
        step = size / 4
        if pattern == "stripe":
            for y in range(4):
                draw.rectangle((0, y * step + step * 0.3, size, y * step + step * 0.7), fill=fill)
        else:
            for y in range(4):
                for x in range(4):
                    x0, y0 = x * step + step * 0.2, y * step + step * 0.2
                    _draw_shape(draw, pattern, (x0, y0, x0 + step * 0.6, y0 + step * 0.6), fill)
    image.paste(cloth, (0, 0), mask)
    return image


def _sample_garment(rng: np.random.Generator) -> Garment:
    pattern = _FIQ_PATTERNS[rng.integers(len(_FIQ_PATTERNS))]
    pattern_colour = "" if pattern == "plain" else list(_FIQ_PATTERN_COLOURS)[rng.integers(2)]
    colours, lengths = list(COLOURS), list(_FIQ_LENGTHS)
    return (colours[rng.integers(len(colours))], pattern, pattern_colour,
            lengths[rng.integers(len(lengths))])


def _change_garment(rng: np.random.Generator, garment: Garment, attribute: str) -> Garment:
    while True:
        new = _sample_garment(rng)
        if attribute == "colour" and new[0] != garment[0]:
            return (new[0], *garment[1:])
        if attribute == "pattern" and new[1:3] != garment[1:3]:
            return (garment[0], *new[1:3], garment[3])
        if attribute == "length" and new[3] != garment[3]:
            return (*garment[:3], new[3])


def _describe(garment: Garment, attribute: str, paraphrase: bool) -> str:
    colour, pattern, pattern_colour, length = garment
    if attribute == "colour":
        return f"is {colour} in colour" if paraphrase else f"is {colour}"
    if attribute == "length":
        return f"has a {length} cut" if paraphrase else f"is {length}"
    if pattern == "plain":
        return "has no print" if paraphrase else "is plain"
    if pattern == "stripe":
        return f"has {pattern_colour} stripes" if paraphrase else f"is {pattern_colour} striped"
    if paraphrase:
        return f"has {pattern_colour} {pattern}s on it"
    return f"has a {pattern_colour} {pattern} print"


def _fiq_split(rng: np.random.Generator, category: str, split: str, code: str, num_triplets: int,
               root: Path, image_size: int, with_target: bool) -> dict[Garment, str]:
    """Write one category/split. Each distinct garment gets one id, so galleries never hold
    duplicates and images are shared between triplets. Returns the image id of every garment."""
    ids: dict[Garment, str] = {}

    def image_id(garment: Garment) -> str:
        if garment not in ids:
            ids[garment] = f"B0{code}{len(ids):06d}"
            _save_png(_render_garment(category, garment, image_size),
                      root / "images" / f"{ids[garment]}.png")
        return ids[garment]

    attributes = ("colour", "pattern", "length")
    triplets, pairs = [], set()
    failures = 0
    while len(triplets) < num_triplets:
        if failures > _MAX_FAILED_DRAWS:
            raise ValueError(f"FashionIQ {category} {split}: cannot draw {num_triplets} distinct "
                             f"triplets; ask for fewer")
        reference = _sample_garment(rng)
        changed = [attributes[i] for i in rng.permutation(3)[:1 + int(rng.random() < 0.5)]]
        target = reference
        for attribute in changed:
            target = _change_garment(rng, target, attribute)
        if (reference, target) in pairs:
            failures += 1
            continue
        failures = 0
        pairs.add((reference, target))
        if len(changed) == 2:  # two annotators describe different changes
            captions = [_describe(target, changed[0], False), _describe(target, changed[1], False)]
        else:  # both describe the same change in different words
            captions = [_describe(target, changed[0], False), _describe(target, changed[0], True)]
        entry: dict[str, Any] = {"candidate": image_id(reference)}
        target_id = image_id(target)
        if with_target:
            entry["target"] = target_id
        entry["captions"] = captions
        triplets.append(entry)
    _write_json(root / "captions" / f"cap.{category}.{split}.json", triplets)
    _write_json(root / "image_splits" / f"split.{category}.{split}.json", list(ids.values()))
    return ids


def make_synthetic_fashioniq(root: str | Path, seed: int = 0, num_train_per_category: int = 600,
                             num_val_per_category: int = 150, num_test_per_category: int = 60,
                             image_size: int = 64) -> Path:
    """Write a synthetic FashionIQ copy to ``<root>/fashion-iq`` in the real layout; return it.

    Categories dress, shirt and toptee differ in silhouette and background. Garments vary in
    colour, print (plain, circles, squares, triangles, stripes; white or black) and length; a
    triplet changes 1 or 2 attributes and has two captions describing the target ("is blue",
    "has a white circle print"). Test caption files have no targets, as in the real release.
    Image captions are written for val and test: ``image_captions/{category}.{split}.json``.
    """
    out = Path(root) / "fashion-iq"
    rng = np.random.default_rng(seed)
    splits = (("train", "R", num_train_per_category), ("val", "V", num_val_per_category),
              ("test", "E", num_test_per_category))
    caption_rng = _caption_rng(seed)
    for category in _FIQ_CATEGORIES:
        for split, split_code, count in splits:
            code = f"{category[0].upper()}{split_code}"
            ids = _fiq_split(np.random.default_rng(rng.integers(2**63)), category, split, code,
                             count, out, image_size, with_target=split != "test")
            if split != "train":
                write_caption_file(out / CAPTIONS_DIR / f"{category}.{split}.json",
                                   {image_id: _garment_captions(caption_rng, category, garment)
                                    for garment, image_id in ids.items()})
    return out


_CIRCO_BACKGROUND = (250, 250, 250)


def _aspects(edits: Sequence[Edit]) -> list[str]:
    found = set()
    for op, _, _ in edits:
        found |= {"recolour": {"direct_addressing", "compare_change"},
                  "add": {"addition", "cardinality"}, "remove": {"negation", "cardinality"}}[op]
    if len(edits) > 1:
        found.add("statement_with_conjunction")
    return [a for a in CIRCO_ASPECTS if a in found]


def _objects(scene: Scene) -> frozenset[tuple[str, str]]:
    return frozenset(c for c in scene if c is not None)


def _arrangements(rng: np.random.Generator, objects: Iterable[tuple[str, str]],
                  count: int) -> list[Scene]:
    """Up to ``count`` distinct layouts of the same objects."""
    objects = sorted(objects)
    layouts: list[Scene] = []
    for _ in range(4 * count):
        cells: list[Cell] = [None] * 4
        for obj, cell in zip(objects, rng.permutation(4)):
            cells[cell] = obj
        if tuple(cells) not in layouts:
            layouts.append(tuple(cells))
        if len(layouts) == count:
            break
    return layouts


def make_synthetic_circo(root: str | Path, seed: int = 0, num_val: int = 120, num_test: int = 60,
                         gallery_size: int = 1500, image_size: int = 64) -> Path:
    """Write a synthetic CIRCO copy to ``<root>/CIRCO`` in the real layout; return that path.

    A query's ground truths are all gallery images with the edited set of objects, in any layout
    (so each query has several); ``target_img_id`` is the first of them. The gallery (JPEG files
    named like COCO unlabeled2017) also holds each reference and hard negatives, and is topped
    up with random scenes to ``gallery_size`` images. Val and test share the gallery; test
    annotations have no targets, as in the real release. Image captions of the whole gallery
    are written to ``image_captions/unlabeled2017.json`` (image ids as names).
    """
    out = Path(root) / "CIRCO"
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    index: dict[Scene, int] = {}

    def add(scene: Scene) -> int:
        if scene not in index:
            index[scene] = len(scenes)
            scenes.append(scene)
        return index[scene]

    queries = []
    for _ in range(num_val + num_test):
        reference = _sample_scene(rng)
        edits, target = _sample_query(rng, reference)
        layouts = [target] + [s for s in _arrangements(rng, _objects(target), 4) if s != target]
        layouts = layouts[:1 + int(rng.integers(1, 4))]
        negatives = _pick_variants(_hard_negatives(rng, reference, edits, target), 3,
                                   {reference, *layouts})
        kept = [c for c in reference if c is not None and c in _objects(target)]
        concept = f"a {kept[0][1]} {kept[0][0]}" if kept else "coloured shapes"
        queries.append({"reference": add(reference), "target": add(target),
                        "objects": _objects(target), "caption": _caption(edits),
                        "concept": concept, "aspects": _aspects(edits)})
        for scene in layouts[1:] + negatives:
            add(scene)
    while len(scenes) < gallery_size:
        add(_sample_scene(rng))

    # COCO-like ids, unrelated to the generation order; the gallery is listed by increasing id.
    ids = rng.choice(np.arange(1, 1_000_000), size=len(scenes), replace=False).tolist()
    images = []
    order = np.argsort(ids)
    for position in order:
        image_id = ids[position]
        file_name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": image_size,
                       "height": image_size})
        path = out / "COCO2017_unlabeled" / "unlabeled2017" / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        _render_scene(scenes[position], image_size, _CIRCO_BACKGROUND).save(path, quality=95)
    _write_json(out / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
                {"info": {"description": "synthetic COCO 2017 unlabeled"}, "images": images})
    caption_rng = _caption_rng(seed)
    write_caption_file(out / CAPTIONS_DIR / "unlabeled2017.json",
                       {str(ids[position]): _scene_captions(caption_rng, scenes[position])
                        for position in order})

    by_objects: dict[frozenset, list[int]] = {}
    for position in order:  # gallery order, so ground truths are listed consistently
        by_objects.setdefault(_objects(scenes[position]), []).append(ids[position])
    val, test = [], []
    for number, query in enumerate(queries):
        is_val = number < num_val
        entry: dict[str, Any] = {"id": number if is_val else number - num_val,
                                 "reference_img_id": ids[query["reference"]]}
        if is_val:
            target_id = ids[query["target"]]
            entry["target_img_id"] = target_id
            entry["gt_img_ids"] = [target_id] + [i for i in by_objects[query["objects"]]
                                                 if i != target_id]
        entry["relative_caption"] = query["caption"]
        entry["shared_concept"] = query["concept"]
        if is_val:
            entry["semantic_aspects"] = query["aspects"]
        (val if is_val else test).append(entry)
    _write_json(out / "annotations" / "val.json", val)
    _write_json(out / "annotations" / "test.json", test)
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python data_utils.py synth --dataset {cirr,fashioniq,circo,all} --out DIR --seed N``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write synthetic datasets in the real layouts")
    synth.add_argument("--dataset", choices=("cirr", "fashioniq", "circo", "all"), default="all")
    synth.add_argument("--out", type=Path, required=True, help="directory to write into")
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    makers = {"cirr": make_synthetic_cirr, "fashioniq": make_synthetic_fashioniq,
              "circo": make_synthetic_circo}
    chosen = list(makers) if args.dataset == "all" else [args.dataset]
    for name in chosen:
        print(f"{name}: {makers[name](args.out, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
