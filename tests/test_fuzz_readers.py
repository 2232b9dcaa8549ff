"""Property-based tests: malformed input to every reader ends in a clean DataError / CheckpointError.

Malformed JSON, wrong types, missing keys, empty and huge captions, non-image bytes and truncated or
damaged PNGs are thrown at ``read_json``, ``load_image``, ``load_checkpoint`` and the CIRR, FashionIQ and
CIRCO datasets (construction and item loading).  Each reader must either succeed or raise its own error
type; anything else (KeyError, TypeError, a crash inside PIL or torch) fails the test.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import checkpoint
from data_utils import CIRCODataset, CIRRDataset, DataError, FashionIQDataset, build_transform, load_image, read_json
from model import create_backbone

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE_SIZE = 16

# Arbitrary JSON values (what a wrong type in an annotation file can be).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
captions = st.one_of(st.text(max_size=40), st.just(""), st.just("   "), st.just("make it blue " * 5000))


def maybe_wrong(valid: st.SearchStrategy, valid_weight: int = 6) -> st.SearchStrategy:
    """Mostly a valid value, sometimes any JSON value (a wrong type), so that both paths are explored."""
    return st.one_of(*[valid] * valid_weight, json_values)


def json_file(content: st.SearchStrategy) -> st.SearchStrategy:
    """Bytes of a file: mostly the JSON of ``content``, else raw bytes (malformed JSON, bad UTF-8) or a truncation."""
    encoded = content.map(lambda value: json.dumps(value).encode())
    return st.one_of(*[encoded] * 6, st.binary(max_size=64),
                     encoded.flatmap(lambda data: st.integers(0, len(data)).map(lambda cut: data[:cut])))


def png_bytes(size: int = IMAGE_SIZE, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def damaged_copies(good: bytes, first_flip: int = 0) -> st.SearchStrategy[bytes]:
    """``good`` cut short anywhere, or with one byte (at ``first_flip`` or later) flipped."""
    return st.one_of(
        st.integers(0, len(good) - 1).map(lambda cut: good[:cut]),
        st.tuples(st.integers(first_flip, len(good) - 1), st.integers(1, 255)).map(
            lambda flip: good[: flip[0]] + bytes([good[flip[0]] ^ flip[1]]) + good[flip[0] + 1:]
        ),
    )


GOOD_PNG = png_bytes()
# Damaged image file contents: non-image bytes, a truncated PNG, a PNG with one byte flipped (after the
# signature), a PNG signature followed by garbage.
bad_image_files = st.one_of(
    st.binary(max_size=64),
    damaged_copies(GOOD_PNG, first_flip=8),
    st.binary(max_size=64).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
)
image_files = st.one_of(st.just(GOOD_PNG), bad_image_files)
mostly_good_images = st.one_of(*[st.just(GOOD_PNG)] * 4, bad_image_files)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Scratch space shared by the examples of a test (hypothesis reruns a test body many times)."""
    path = Path(tempfile.mkdtemp(prefix="fuzz_readers_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fresh(workdir: Path, name: str) -> Path:
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def load_every_item(build: Callable[[], Any]) -> None:
    """Construct a dataset and read each item: success or DataError, nothing else."""
    try:
        dataset = build()
    except DataError:
        event("dataset rejected")
        return
    event(f"dataset accepted with {min(len(dataset), 2)}+ items")
    for index in range(len(dataset)):
        try:
            item = dataset[index]
        except DataError:
            event("item raised DataError")
            continue
        event("item loaded")
        for value in item.values():
            if isinstance(value, torch.Tensor):
                assert value.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(value).all()


TRANSFORM = build_transform("clip", IMAGE_SIZE)
NAMES = ["img-a", "img-b", "img-c", "img-d"]


# ---------------------------------------------------------------------------------------------- files
@FUZZ
@given(data=st.one_of(st.binary(max_size=200), json_values.map(lambda value: json.dumps(value).encode())))
@example(data=b"[" * 100_000)  # deeper than the parser's recursion limit
@example(data=b"1" * 5000)  # more digits than Python converts to an int
@example(data=b"\xff\xfe{}")  # not UTF-8
def test_read_json_parses_or_raises_data_error(workdir, data):
    path = workdir / "file.json"
    path.write_bytes(data)
    try:
        read_json(path)
    except DataError as error:
        assert str(path) in str(error)


@FUZZ
@given(data=image_files)
def test_load_image_decodes_or_raises_data_error(workdir, data):
    path = workdir / "image.png"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert image.mode == "RGB"


def _torch_file(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD_STATE = {"format_version": checkpoint.CHECKPOINT_FORMAT_VERSION, "model": torch.nn.Linear(3, 2).state_dict(), "epoch": 1}
GOOD_CHECKPOINT = bytes(checkpoint.sealed_bytes(GOOD_STATE))
# A checkpoint of format 2, written before checkpoints were sealed (loads with a warning).
LEGACY_CHECKPOINT = _torch_file({**GOOD_STATE, "format_version": 2})
checkpoint_files = st.one_of(
    st.binary(max_size=256),
    damaged_copies(GOOD_CHECKPOINT),
    damaged_copies(LEGACY_CHECKPOINT),
    # well-formed torch files holding the wrong things (no version, a wrong version type, not a dict)
    json_values.map(_torch_file),
    json_values.map(lambda value: _torch_file({"format_version": value, "model": {}})),
)


@FUZZ
@given(data=checkpoint_files)
def test_load_checkpoint_loads_or_raises_checkpoint_error(workdir, data):
    path = workdir / "checkpoint.pt"
    path.write_bytes(data)
    try:
        state = checkpoint.load_checkpoint(path)
    except checkpoint.CheckpointError as error:
        assert str(path) in str(error)
    else:
        assert isinstance(state, dict) and 1 <= state["format_version"] <= checkpoint.CHECKPOINT_FORMAT_VERSION


@FUZZ
@given(data=damaged_copies(GOOD_CHECKPOINT))
@example(data=GOOD_CHECKPOINT[:-1])  # the seal cut short
@example(data=GOOD_CHECKPOINT[:-checkpoint._SEAL_LENGTH])  # the seal cut off
def test_a_damaged_sealed_checkpoint_never_loads(workdir, data):
    """Any byte of a sealed checkpoint changed, or the file cut short anywhere: a CheckpointError naming the file."""
    path = workdir / "checkpoint.pt"
    path.write_bytes(data)
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load_checkpoint(path)


# ---------------------------------------------------------------------------------------------- datasets
def entries(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Annotation entries: mostly with every key (each maybe of a wrong type), sometimes with keys missing."""
    return st.one_of(st.fixed_dictionaries(fields), st.fixed_dictionaries(fields), st.fixed_dictionaries({}, optional=fields))


cirr_entries = entries({
    "pairid": maybe_wrong(st.integers(0, 5)),
    "reference": maybe_wrong(st.sampled_from(NAMES)),
    "target_hard": maybe_wrong(st.sampled_from(NAMES)),
    "caption": maybe_wrong(captions),
    "img_set": maybe_wrong(st.fixed_dictionaries({"members": maybe_wrong(st.lists(st.sampled_from(NAMES), max_size=4))})),
})


@FUZZ
@given(
    split_map=json_file(maybe_wrong(st.one_of(
        st.just({name: f"train/{name}.png" for name in NAMES}),  # complete and right
        st.dictionaries(st.sampled_from(NAMES), maybe_wrong(st.sampled_from([f"train/{n}.png" for n in NAMES])), max_size=4),
    ))),
    triplets=json_file(maybe_wrong(st.lists(maybe_wrong(cirr_entries), max_size=4))),
    images=st.lists(mostly_good_images, min_size=len(NAMES), max_size=len(NAMES)),
)
def test_cirr_dataset_reads_or_raises_data_error(workdir, split_map, triplets, images):
    root = fresh(workdir, "cirr_dataset")
    write(root / "cirr" / "image_splits" / "split.rc2.train.json", split_map)
    write(root / "cirr" / "captions" / "cap.rc2.train.json", triplets)
    for name, data in zip(NAMES, images):
        write(root / "train" / f"{name}.png", data)
    load_every_item(lambda: CIRRDataset(root, "train", "relative", TRANSFORM))
    load_every_item(lambda: CIRRDataset(root, "train", "classic", TRANSFORM))


fiq_entries = entries({
    "candidate": maybe_wrong(st.sampled_from(NAMES)),
    "target": maybe_wrong(st.sampled_from(NAMES)),
    "captions": maybe_wrong(st.lists(captions, min_size=2, max_size=2)),
})


@FUZZ
@given(
    image_ids=json_file(maybe_wrong(st.one_of(st.just(NAMES), st.lists(maybe_wrong(st.sampled_from(NAMES)), max_size=4)))),
    triplets=json_file(maybe_wrong(st.lists(maybe_wrong(fiq_entries), max_size=4))),
    images=st.lists(mostly_good_images, min_size=len(NAMES), max_size=len(NAMES)),
    split=st.sampled_from(["train", "val"]),
)
def test_fashioniq_dataset_reads_or_raises_data_error(workdir, image_ids, triplets, images, split):
    root = fresh(workdir, "fashion-iq")
    write(root / "image_splits" / f"split.dress.{split}.json", image_ids)
    write(root / "captions" / f"cap.dress.{split}.json", triplets)
    for name, data in zip(NAMES, images):
        write(root / "images" / f"{name}.png", data)
    load_every_item(lambda: FashionIQDataset(root, split, ["dress"], "relative", TRANSFORM))
    load_every_item(lambda: FashionIQDataset(root, split, ["dress"], "classic", TRANSFORM))


IDS = [1, 2, 3, 4]
circo_records = st.fixed_dictionaries({"id": maybe_wrong(st.sampled_from(IDS))},
                                      optional={"file_name": maybe_wrong(st.sampled_from([f"{i:012d}.jpg" for i in IDS]))})
circo_queries = entries({
    "id": maybe_wrong(st.integers(0, 3)),
    "reference_img_id": maybe_wrong(st.sampled_from(IDS)),
    "target_img_id": maybe_wrong(st.sampled_from(IDS)),
    "gt_img_ids": maybe_wrong(st.lists(st.sampled_from(IDS), max_size=3)),
    "relative_caption": maybe_wrong(captions),
    "shared_concept": maybe_wrong(captions),
    "semantic_aspects": maybe_wrong(st.lists(st.text(max_size=5), max_size=2)),
})


@FUZZ
@given(
    info=json_file(maybe_wrong(st.fixed_dictionaries({"images": maybe_wrong(st.one_of(
        st.just([{"id": i, "file_name": f"{i:012d}.jpg"} for i in IDS]),
        st.lists(maybe_wrong(circo_records), max_size=4),
    ))}))),
    queries=json_file(maybe_wrong(st.lists(maybe_wrong(circo_queries), max_size=4))),
    images=st.lists(mostly_good_images, min_size=len(IDS), max_size=len(IDS)),
)
def test_circo_dataset_reads_or_raises_data_error(workdir, info, queries, images):
    root = fresh(workdir, "CIRCO")
    write(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", info)
    write(root / "annotations" / "val.json", queries)
    for image_id, data in zip(IDS, images):
        write(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg", data)
    load_every_item(lambda: CIRCODataset(root, "val", "relative", TRANSFORM))
    load_every_item(lambda: CIRCODataset(root, "val", "classic", TRANSFORM))


# ---------------------------------------------------------------------------------------------- captions
@pytest.fixture(scope="module")
def backbone():
    return create_backbone("ViT-Tiny-P8-32")


@settings(max_examples=20, deadline=None, database=None)
@given(batch=st.lists(captions, min_size=1, max_size=3))
def test_empty_and_huge_captions_tokenize_within_the_context(backbone, batch):
    tokens = backbone.tokenize(batch)
    assert tokens.shape[0] == len(batch) and 2 <= tokens.shape[1] <= backbone.clip.context_length
