"""Datasets and preprocessing for Composed Image Retrieval (CIR).

Three benchmarks are supported in their real on-disk layouts:

* CIRR       ``cirr_dataset/cirr/{captions,image_splits}/...``
* FashionIQ  ``fashion-iq/{captions,image_splits,images}/...``
* CIRCO      ``CIRCO/annotations/...`` + ``CIRCO/COCO2017_unlabeled/...``

Every dataset checks its annotation files and image paths up front (cheaply, without decoding
images) and reports *all* problems in one :class:`DataError`, so a broken download fails at start-up
instead of hours into training; :func:`check_image_headers` adds a check that each file is an image PIL
can identify (its header only), and :class:`DataReport` joins the problems of several splits into one
error. Images that turn out to be unreadable later also raise :class:`DataError`; no sample is ever
silently dropped.

Small synthetic datasets in exactly these layouts are written by the :mod:`synthetic` package
(``python -m synthetic --help``).
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as tv_transforms
from torchvision.transforms import InterpolationMode

from utils import UserError, seed_worker

__all__ = [
    "DataError",
    "DataReport",
    "check_image_headers",
    "load_image",
    "read_json",
    "TargetPad",
    "build_transform",
    "TRANSFORM_REVISION",
    "ImageFiles",
    "IMAGE_EXTENSIONS",
    "list_gallery_images",
    "CIRRDataset",
    "FashionIQDataset",
    "join_fiq_captions",
    "CIRCODataset",
    "SkippedSample",
    "SkipBadSamples",
    "collate_batch",
    "make_loader",
]

Transform = Callable[[Image.Image], torch.Tensor]

# How many problems one DataError lists before summarising the rest.
MAX_LISTED_PROBLEMS = 20


# --------------------------------------------------------------------------------------------
# Errors and file reading
# --------------------------------------------------------------------------------------------


# How a DataLoader re-raises an exception from a worker process: a new exception of the same type whose
# message is "Caught <Type> in DataLoader worker process <n>.\nOriginal Traceback ...", the worker's
# whole traceback, ending in "<module>.<Type>: <message>".
_WORKER_MESSAGE = re.compile(r"\ACaught DataError in DataLoader worker process \d+\.\nOriginal Traceback .*?"
                             r"^(?:[\w.]+\.)?DataError: (?P<message>.*)\Z", re.S | re.M)


class DataError(UserError, ValueError):
    """Bad input data. The message names the offending file(s) and what is wrong.

    ``problems`` holds the individual problems (one line each) of an error that reports several.  Raised
    in a DataLoader worker, the error reaches the main process with its original message (the worker's
    traceback, which the DataLoader puts into the message, is left out).
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        worker = _WORKER_MESSAGE.match(message)
        if worker:
            message = worker["message"].rstrip()
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


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
        raise DataError("\n".join(lines), self.messages)


T = TypeVar("T")


class DataReport:
    """The problems of several parts of a dataset (e.g. its train and val splits), raised as one DataError.

    Each part is read with :meth:`read` (its DataError is recorded instead of raised) or checked by the
    caller (:meth:`add`); :meth:`raise_if_any` then reports every problem of every part at once.
    """

    def __init__(self, context: str) -> None:
        self.context = context
        self.parts: dict[str, list[str]] = {}

    def read(self, part: str, reader: Callable[[], T]) -> T | None:
        """``reader()``, or None with its problems recorded under ``part`` when it raises DataError."""
        try:
            return reader()
        except DataError as error:
            self.add(part, error.problems)
            return None

    def add(self, part: str, problems: Iterable[str]) -> None:
        """Record ``problems`` (one line each) of ``part``."""
        problems = list(problems)
        if problems:
            self.parts.setdefault(part, []).extend(problems)

    def raise_if_any(self, note: str = "") -> None:
        """Raise one DataError listing up to ``MAX_LISTED_PROBLEMS`` problems of each part, if there are any
        (``note``: a last line, e.g. what the user can do)."""
        total = sum(len(problems) for problems in self.parts.values())
        if not total:
            return
        counts = ", ".join(f"{part}: {len(problems)}" for part, problems in self.parts.items())
        lines = [f"{self.context}: {total} data problem(s) ({counts}):"]
        for part, problems in self.parts.items():
            lines += [f"  - [{part}] {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
            if len(problems) > MAX_LISTED_PROBLEMS:
                lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more in {part}")
        if note:
            lines.append(note)
        raise DataError("\n".join(lines), [f"[{part}] {p}" for part, problems in self.parts.items() for p in problems])


def check_image_headers(paths: Iterable[str | Path]) -> list[str]:
    """Problems of files that are not images PIL can identify, one line each naming the file.

    Only the header is parsed (about 0.06 ms per file when cached, against 3.5 ms for decoding a
    500 x 400 JPEG), so the check catches non-image and garbled files, not truncated image data (which
    :func:`load_image` reports when the image is read).  Missing files are left to the readers, which
    report them with the annotation file that names them.
    """
    problems = []
    for path in paths:
        try:
            with Image.open(path):
                pass
        except FileNotFoundError:
            continue
        except UnidentifiedImageError:
            problems.append(f"{path}: not an image file (PIL cannot identify it)")
        except _IMAGE_ERRORS as error:
            problems.append(f"{path}: unreadable image ({type(error).__name__}: {error})")
    return problems


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


# Bumped whenever build_transform's output changes, so that cached features are recomputed
# (2: 'clip' follows CLIPImageProcessor exactly: RGB first, floored centre-crop offset).
TRANSFORM_REVISION = 2


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class CenterCropFloor:
    """Centre crop to ``size`` x ``size`` at the offset ``(W - size) // 2``, ``(H - size) // 2``, as
    transformers' ``CLIPImageProcessor`` crops; torchvision's ``CenterCrop`` rounds the offset to the nearest
    even integer instead, one pixel further for some odd ``W - size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def build_transform(
    kind: str,
    image_size: int,
    target_ratio: float = 1.25,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> Transform:
    """Image preprocessing producing a ``[3, image_size, image_size]`` float tensor.

    Args:
        kind: ``'clip'`` (the official SSN preprocessing: RGB, bicubic resize of the short side, centre
            crop) or ``'targetpad'`` (pad to ``target_ratio`` first, CLIP4Cir style).
        image_size: output side length in pixels.
        target_ratio: maximum aspect ratio kept by ``'targetpad'``.
        mean, std: normalisation statistics (CLIP's by default).
    """
    resize = tv_transforms.Resize(image_size, interpolation=InterpolationMode.BICUBIC)
    to_tensor = [tv_transforms.ToTensor(), tv_transforms.Normalize(mean=mean, std=std)]
    if kind == "clip":
        # transformers' CLIPImageProcessor as the official code ran it (4.26.1): PIL's RGB conversion first
        # (alpha dropped), PIL's bicubic resize, centre crop at the floored offset (tests/test_preprocessing.py).
        return tv_transforms.Compose([_to_rgb, resize, CenterCropFloor(image_size), *to_tensor])
    if kind == "targetpad":
        # CLIP4Cir's order: pad, resize, torchvision's centre crop, then RGB.
        return tv_transforms.Compose([TargetPad(target_ratio), resize, tv_transforms.CenterCrop(image_size), _to_rgb,
                                      *to_tensor])
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

    def image_files(self) -> list[Path]:
        """Every image file the split refers to, once each, sorted."""
        return sorted(set(self._image_paths.values()))

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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def list_gallery_images(directory: str | Path) -> list[Path]:
    """Image files under ``directory`` (recursively), sorted so features line up with names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: gallery directory not found")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


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


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, drop_last: bool = False,
    generator: torch.Generator | None = None, sampler: Sampler[int] | None = None,
    worker_init_fn: Callable[[int], None] = seed_worker,
) -> DataLoader:
    """A DataLoader over triplets or images (:func:`collate_batch`), pinned host memory on CUDA (asynchronous copies).

    Workers are never persistent: the training loader's workers are re-created every epoch so that
    they are seeded from the epoch's ``loader_seed`` (exact resume of FashionIQ's random caption order
    depends on it), and the evaluation loaders are built once per use.  Re-creating 2-4 workers costs
    well under a second per epoch (docs/performance.md).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_batch,
        worker_init_fn=worker_init_fn,
        generator=generator,
    )
