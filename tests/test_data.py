"""Tests for data_utils: dataset classes, preprocessing and input checks, on data the synthetic generators write.

The generators' own determinism and command line are tested in test_synthetic.py.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_utils import (
    CIRCODataset,
    CIRRDataset,
    DataError,
    FashionIQDataset,
    TargetPad,
    build_transform,
    collate_batch,
    load_image,
    read_json,
)
from synthetic import CIRCO_ASPECTS, make_synthetic_circo, make_synthetic_cirr, make_synthetic_fashioniq

SIZE = 32
CATEGORIES = ["dress", "shirt", "toptee"]
SMALL_CIRR = dict(num_train=40, num_val=30, num_test=12, image_size=48)
SMALL_FIQ = dict(num_train_per_category=20, num_val_per_category=15, num_test_per_category=6,
                 image_size=48)
SMALL_CIRCO = dict(num_val=15, num_test=6, gallery_size=120, image_size=48)


@pytest.fixture(scope="session")
def transform():
    return build_transform("clip", SIZE)


@pytest.fixture(scope="session")
def cirr_root(tmp_path_factory) -> Path:
    return make_synthetic_cirr(tmp_path_factory.mktemp("cirr"), seed=0, **SMALL_CIRR)


@pytest.fixture(scope="session")
def fiq_root(tmp_path_factory) -> Path:
    return make_synthetic_fashioniq(tmp_path_factory.mktemp("fiq"), seed=0, **SMALL_FIQ)


@pytest.fixture(scope="session")
def circo_root(tmp_path_factory) -> Path:
    return make_synthetic_circo(tmp_path_factory.mktemp("circo"), seed=0, **SMALL_CIRCO)


@pytest.fixture
def cirr_copy(cirr_root, tmp_path) -> Path:
    """A private copy of the small CIRR dataset that a test may damage."""
    return Path(shutil.copytree(cirr_root, tmp_path / "cirr_dataset"))


def _pixels(path: Path) -> bytes:
    return np.asarray(load_image(path)).tobytes()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------
# Generators: layout and keys
# ------------------------------------------------------------------------------------------


def test_cirr_layout_and_keys(cirr_root):
    assert cirr_root.name == "cirr_dataset"
    prefixes = {"train": "train", "val": "dev", "test1": "test1"}
    for split, prefix in prefixes.items():
        split_map = read_json(cirr_root / f"cirr/image_splits/split.rc2.{split}.json")
        triplets = read_json(cirr_root / f"cirr/captions/cap.rc2.{split}.json")
        assert isinstance(split_map, dict) and isinstance(triplets, list) and triplets
        folder = r"\./train/\d+/" if split == "train" else rf"\./{prefix}/"
        for name, rel in split_map.items():
            assert re.fullmatch(rf"{prefix}-\d+-\d+-img\d", name)
            assert re.fullmatch(rf"{folder}{name}\.png", rel)
            assert (cirr_root / rel).is_file()
        pairids = [t["pairid"] for t in triplets]
        assert all(_is_int(p) for p in pairids) and len(set(pairids)) == len(pairids)
        for t in triplets:
            assert isinstance(t["reference"], str) and isinstance(t["caption"], str)
            members = t["img_set"]["members"]
            assert _is_int(t["img_set"]["id"]) and len(members) == len(set(members)) == 6
            assert set(members) <= set(split_map)
            assert members[t["img_set"]["reference_rank"]] == t["reference"]
            if split == "test1":
                assert not {"target_hard", "target_soft"} & set(t)
                assert "target_rank" not in t["img_set"]
            else:
                assert t["target_soft"] == {t["target_hard"]: 1.0}
                assert members[t["img_set"]["target_rank"]] == t["target_hard"]
        assert len(triplets) == {"train": 40, "val": 30, "test1": 12}[split]


def test_fashioniq_layout_and_keys(fiq_root):
    assert fiq_root.name == "fashion-iq"
    for category in CATEGORIES:
        for split in ("train", "val", "test"):
            ids = json.loads((fiq_root / f"image_splits/split.{category}.{split}.json").read_text())
            triplets = json.loads((fiq_root / f"captions/cap.{category}.{split}.json").read_text())
            assert ids and all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
            assert all((fiq_root / "images" / f"{i}.png").is_file() for i in ids)
            for t in triplets:
                assert isinstance(t["candidate"], str)
                assert len(t["captions"]) == 2 and all(c.strip() for c in t["captions"])
                assert ("target" in t) == (split != "test")
                if split != "test":
                    assert t["candidate"] in ids and t["target"] in ids
    # Image ids never collide across categories or splits.
    all_ids = [i for p in (fiq_root / "image_splits").glob("*.json")
               for i in json.loads(p.read_text())]
    assert len(all_ids) == len(set(all_ids))


def test_circo_layout_and_keys(circo_root):
    assert circo_root.name == "CIRCO"
    info = json.loads((circo_root / "COCO2017_unlabeled/annotations/"
                       "image_info_unlabeled2017.json").read_text())
    ids = [record["id"] for record in info["images"]]
    assert len(ids) >= SMALL_CIRCO["gallery_size"] and len(set(ids)) == len(ids)
    for record in info["images"]:
        assert record["file_name"] == f"{record['id']:012d}.jpg"
        path = circo_root / "COCO2017_unlabeled/unlabeled2017" / record["file_name"]
        assert path.read_bytes()[:2] == b"\xff\xd8"  # JPEG
    val = json.loads((circo_root / "annotations/val.json").read_text())
    test = json.loads((circo_root / "annotations/test.json").read_text())
    assert len(val) == SMALL_CIRCO["num_val"] and len(test) == SMALL_CIRCO["num_test"]
    for q in val:
        assert _is_int(q["id"]) and _is_int(q["reference_img_id"])
        assert q["gt_img_ids"][0] == q["target_img_id"] and len(q["gt_img_ids"]) >= 2
        assert set(q["gt_img_ids"]) <= set(ids) and q["reference_img_id"] in ids
        assert q["reference_img_id"] not in q["gt_img_ids"]
        assert q["semantic_aspects"] and set(q["semantic_aspects"]) <= set(CIRCO_ASPECTS)
        assert q["relative_caption"] and q["shared_concept"]
    for q in test:
        assert set(q) == {"id", "reference_img_id", "relative_caption", "shared_concept"}


# ------------------------------------------------------------------------------------------
# Synthetic task sanity
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test1"])
def test_cirr_synthetic_task_sanity(cirr_root, split):
    data = CIRRDataset(cirr_root, split, "relative", lambda x: x)
    gallery_pixels = [_pixels(data.image_path(n)) for n in data.image_names]
    # Each scene appears once, so every query has exactly one correct gallery image.
    assert len(set(gallery_pixels)) == len(gallery_pixels)
    for t in data.triplets:
        assert t["caption"].strip()
        members = t["img_set"]["members"]
        assert t["reference"] in members
        if split == "val":
            assert t["target_hard"] in members and t["target_hard"] != t["reference"]
            assert (_pixels(data.image_path(t["target_hard"]))
                    != _pixels(data.image_path(t["reference"])))
    # Images are shared between triplets: some targets are other triplets' references.
    references = {t["reference"] for t in data.triplets}
    if split == "val":
        assert any(t["target_hard"] in references for t in data.triplets)


def test_cirr_captions_are_edit_instructions(cirr_root):
    shape = "(circle|square|triangle)"
    edit = rf"(make the {shape} \w+|remove the {shape}|add an? \w+ {shape})"
    captions = [t["caption"] for t in read_json(cirr_root / "cirr/captions/cap.rc2.train.json")]
    assert all(re.fullmatch(rf"{edit}( and {edit})?", c) for c in captions)


def test_cirr_image_only_retrieval_is_weak(tmp_path):
    """Nearest neighbour of the reference in pixel space rarely is the target (hard negatives)."""
    root = make_synthetic_cirr(tmp_path, seed=0, num_train=0, num_val=120, num_test=0,
                               image_size=32)
    data = CIRRDataset(root, "val", "relative", lambda x: x)
    pixels = np.stack([np.frombuffer(_pixels(data.image_path(n)), np.uint8).astype(np.float32)
                       for n in data.image_names])
    position = {n: i for i, n in enumerate(data.image_names)}
    hits = 0
    for t in data.triplets:
        distance = ((pixels - pixels[position[t["reference"]]]) ** 2).sum(1)
        distance[position[t["reference"]]] = np.inf
        hits += data.image_names[int(distance.argmin())] == t["target_hard"]
    assert hits / len(data.triplets) < 0.35


def test_circo_ground_truths_share_objects(circo_root):
    data = CIRCODataset(circo_root, "val", "relative", lambda x: x)
    for q in data.triplets:
        target = _pixels(data.image_path(str(q["target_img_id"])))
        assert target != _pixels(data.image_path(str(q["reference_img_id"])))
        gts = [_pixels(data.image_path(str(i))) for i in q["gt_img_ids"]]
        assert len(set(gts)) == len(gts) and target in gts
        # Same objects in different layouts: different pixels, (nearly) the same mean colour.
        means = np.stack([np.frombuffer(g, np.uint8).reshape(-1, 3).mean(0) for g in gts])
        assert np.abs(means - means[0]).max() < 3


# ------------------------------------------------------------------------------------------
# Dataset classes
# ------------------------------------------------------------------------------------------


def _check_image(tensor):
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, SIZE, SIZE)
    assert tensor.dtype == torch.float32


def _check_relative_item(item: dict, train: bool, eval_keys: set[str]) -> None:
    """A training item is (reference, target, caption); an evaluation item adds names and ``eval_keys``."""
    _check_image(item["reference_image"])
    if train:
        assert set(item) == {"reference_image", "target_image", "caption"}
        _check_image(item["target_image"])
    else:
        assert set(item) == {"reference_image", "reference_name", "target_name", "caption", *eval_keys}


@pytest.mark.parametrize("split", ["train", "val", "test1"])
def test_cirr_dataset_items(cirr_root, transform, split):
    relative = CIRRDataset(cirr_root, split, "relative", transform)
    classic = CIRRDataset(cirr_root, split, "classic", transform)
    assert relative.split == split and relative.mode == "relative"
    assert len(relative) == len(relative.triplets) and len(classic) == len(classic.image_names)
    item = relative[0]
    _check_relative_item(item, split == "train", {"members", "pair_id"})
    if split != "train":
        expected = "" if split == "test1" else relative.triplets[0]["target_hard"]
        assert item["target_name"] == expected
        assert _is_int(item["pair_id"]) and len(item["members"]) == 6
        gallery = set(classic.image_names)
        for t in relative.triplets:
            assert set(t["img_set"]["members"]) <= gallery
            assert t.get("target_hard", t["reference"]) in gallery
    image_item = classic[len(classic) - 1]
    assert set(image_item) == {"name", "image"} and image_item["name"] == classic.image_names[-1]
    _check_image(image_item["image"])
    split_map = read_json(cirr_root / f"cirr/image_splits/split.rc2.{split}.json")
    assert classic.image_names == list(split_map)


@pytest.mark.parametrize("split", ["val", "test1"])
def test_cirr_collate_keeps_members_per_sample(cirr_root, transform, split):
    data = CIRRDataset(cirr_root, split, "relative", transform)
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=collate_batch)))
    assert batch["reference_image"].shape == (4, 3, SIZE, SIZE)
    assert batch["members"] == [t["img_set"]["members"] for t in data.triplets[:4]]
    assert batch["pair_id"] == [t["pairid"] for t in data.triplets[:4]]
    assert isinstance(batch["caption"], list) and isinstance(batch["caption"][0], str)


def test_dataloader_with_workers(cirr_root, transform):
    data = CIRRDataset(cirr_root, "train", "relative", transform)
    loader = DataLoader(data, batch_size=8, num_workers=2, collate_fn=collate_batch)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == len(data)
    assert batches[0]["target_image"].shape == (8, 3, SIZE, SIZE)


def test_collate_batch_rules():
    batch = collate_batch([{"x": torch.zeros(2), "n": 1, "s": "a", "l": ["p", "q", "r"]},
                           {"x": torch.ones(2), "n": 2, "s": "b", "l": ["u"]}])
    assert batch["x"].shape == (2, 2) and batch["n"] == [1, 2] and batch["s"] == ["a", "b"]
    assert batch["l"] == [["p", "q", "r"], ["u"]]
    with pytest.raises(ValueError):
        collate_batch([{"x": 1}, {"y": 2}])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_fashioniq_dataset_items(fiq_root, transform, split):
    relative = FashionIQDataset(fiq_root, split, CATEGORIES, "relative", transform)
    classic = FashionIQDataset(fiq_root, split, CATEGORIES, "classic", transform)
    assert len(relative) == 3 * SMALL_FIQ[f"num_{split}_per_category"]
    item = relative[0]
    _check_relative_item(item, split == "train", {"category"})
    if split != "train":
        assert item["category"] == "dress"
        assert item["target_name"] == ("" if split == "test" else relative.triplets[0]["target"])
    gallery = dict(zip(classic.image_names, classic.image_categories))
    expected = [i for c in CATEGORIES
                for i in read_json(fiq_root / f"image_splits/split.{c}.{split}.json")]
    assert classic.image_names == expected
    for t in relative.triplets:
        assert gallery[t["candidate"]] == t["category"]
        if "target" in t:
            assert gallery[t["target"]] == t["category"]
    image_item = classic[len(classic) - 1]
    assert set(image_item) == {"name", "image", "category"} and image_item["category"] == "toptee"
    _check_image(image_item["image"])
    batch = collate_batch([relative[i] for i in range(3)])
    assert batch["reference_image"].shape == (3, 3, SIZE, SIZE)


def test_fashioniq_single_category_and_jpg(fiq_root, tmp_path, transform):
    root = Path(shutil.copytree(fiq_root, tmp_path / "fashion-iq"))
    image_id = read_json(root / "image_splits/split.shirt.val.json")[0]
    png = root / "images" / f"{image_id}.png"
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    png.unlink()
    data = FashionIQDataset(root, "val", ["shirt"], "classic", transform)
    assert set(data.image_categories) == {"shirt"}
    assert data[0]["name"] == image_id
    _check_image(data[0]["image"])


def test_fashioniq_caption_modes(fiq_root):
    join = FashionIQDataset(fiq_root, "val", ["dress"], "relative", lambda x: x)
    first, second = join.triplets[0]["captions"]
    assert join[0]["caption"] == f"{first} and {second}"
    assert join._caption(["is red. ", " has stripes."]) == "is red and has stripes"

    rand = FashionIQDataset(fiq_root, "train", ["dress"], "relative", lambda x: x)
    assert rand.caption_mode == "random"
    random.seed(0)
    seen = {rand._caption(["is red.", "has stripes"]) for _ in range(200)}
    assert seen == {"is red and has stripes", "has stripes and is red", "is red", "has stripes"}
    forced = FashionIQDataset(fiq_root, "train", ["dress"], "relative", lambda x: x,
                              caption_mode="join")
    assert forced._caption(["a", "b"]) == "a and b"


@pytest.mark.parametrize("split", ["val", "test"])
def test_circo_dataset_items(circo_root, transform, split):
    relative = CIRCODataset(circo_root, split, "relative", transform)
    classic = CIRCODataset(circo_root, split, "classic", transform)
    item = relative[0]
    assert set(item) == {"reference_image", "reference_name", "query_id", "caption",
                         "shared_concept", "target_name", "gt_names", "semantic_aspects"}
    _check_image(item["reference_image"])
    assert _is_int(item["query_id"]) and isinstance(item["reference_name"], str)
    if split == "val":
        assert item["target_name"] == item["gt_names"][0] and item["semantic_aspects"]
    else:
        assert item["target_name"] == "" and item["gt_names"] == []
    gallery = set(classic.image_names)
    for q in relative.triplets:
        assert {str(i) for i in q.get("gt_img_ids", [])} | {str(q["reference_img_id"])} <= gallery
    info = read_json(circo_root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json")
    assert classic.image_names == [str(r["id"]) for r in info["images"]]
    assert set(classic[0]) == {"name", "image"}
    _check_image(classic[0]["image"])
    batch = next(iter(DataLoader(relative, batch_size=3, collate_fn=collate_batch)))
    assert batch["gt_names"] == [[str(i) for i in q.get("gt_img_ids", [])]
                                 for q in relative.triplets[:3]]
    assert batch["semantic_aspects"] == [q.get("semantic_aspects", [])
                                         for q in relative.triplets[:3]]


def test_ssn_layout_resolves_train_images(cirr_copy, transform):
    (cirr_copy / "images").mkdir()
    shutil.move(cirr_copy / "train", cirr_copy / "images" / "train")
    data = CIRRDataset(cirr_copy, "train", "relative", transform)
    assert all("images" in data.image_path(n).parts for n in data.image_names)
    _check_image(data[0]["target_image"])


def test_invalid_arguments(cirr_root, fiq_root, circo_root, transform):
    with pytest.raises(ValueError, match="split"):
        CIRRDataset(cirr_root, "test", "relative", transform)
    with pytest.raises(ValueError, match="mode"):
        CIRRDataset(cirr_root, "val", "gallery", transform)
    with pytest.raises(ValueError, match="caption_mode"):
        FashionIQDataset(fiq_root, "val", ["dress"], "relative", transform, caption_mode="x")
    with pytest.raises(ValueError, match="dress_types"):
        FashionIQDataset(fiq_root, "val", "dress", "relative", transform)
    with pytest.raises(ValueError, match="split"):
        CIRCODataset(circo_root, "train", "relative", transform)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_image_file(cirr_copy, transform):
    split_map = read_json(cirr_copy / "cirr/image_splits/split.rc2.val.json")
    name, rel = next(iter(split_map.items()))
    (cirr_copy / rel).unlink()
    with pytest.raises(DataError, match=re.escape(f"{name}.png")) as info:
        CIRRDataset(cirr_copy, "val", "relative", transform)
    assert "split.rc2.val.json" in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_crc"])
def test_unreadable_image_raises_on_access(cirr_copy, transform, damage):
    split_map = read_json(cirr_copy / "cirr/image_splits/split.rc2.val.json")
    name = next(iter(split_map))
    path = cirr_copy / split_map[name]
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not an image at all\n" * 10)
    else:  # flip a byte inside the image data so the chunk CRC no longer matches
        start = data.index(b"IDAT") + 8
        path.write_bytes(data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1:])
    dataset = CIRRDataset(cirr_copy, "val", "classic", transform)  # no decoding up front
    with pytest.raises(DataError, match=re.escape(str(path))):
        dataset[dataset.image_names.index(name)]
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_image(path)


def test_load_image_missing_and_ok(tmp_path):
    with pytest.raises(DataError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")
    Image.new("L", (5, 7)).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 7)


def test_read_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"a": 1,}\n]')
    with pytest.raises(DataError, match=r"bad\.json.*line 2, column"):
        read_json(bad)
    with pytest.raises(DataError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_malformed_json_names_file(cirr_copy, transform):
    caption_file = cirr_copy / "cirr/captions/cap.rc2.val.json"
    caption_file.write_text(caption_file.read_text()[:-20])
    with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: malformed JSON at line \d+"):
        CIRRDataset(cirr_copy, "val", "relative", transform)


def test_wrong_top_level_type(cirr_copy, transform):
    (cirr_copy / "cirr/image_splits/split.rc2.val.json").write_text("[]")
    with pytest.raises(DataError, match=r"split\.rc2\.val\.json: expected a JSON dict"):
        CIRRDataset(cirr_copy, "val", "classic", transform)


def test_missing_key_and_wrong_type(cirr_copy, transform):
    def damage(triplets):
        del triplets[1]["caption"]
        triplets[2]["pairid"] = "7"
        del triplets[3]["img_set"]["members"]
    _edit_json(cirr_copy / "cirr/captions/cap.rc2.val.json", damage)
    with pytest.raises(DataError) as info:
        CIRRDataset(cirr_copy, "val", "relative", transform)
    message = str(info.value)
    assert "cap.rc2.val.json: entry 1: missing key 'caption'" in message
    assert "entry 2: key 'pairid' should be int, got string" in message
    assert "entry 3: missing key 'img_set.members'" in message
    assert "3 data problem(s)" in message


def test_unknown_image_name(cirr_copy, transform):
    _edit_json(cirr_copy / "cirr/captions/cap.rc2.val.json",
               lambda t: t[0].update(target_hard="dev-999-0-img0"))
    with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: entry 0: target_hard image "
                                        r"'dev-999-0-img0' is not listed in split\.rc2\.val\.json"):
        CIRRDataset(cirr_copy, "val", "relative", transform)


def test_all_problems_in_one_error(cirr_copy, transform):
    split_map = read_json(cirr_copy / "cirr/image_splits/split.rc2.val.json")
    removed = list(split_map.items())[:25]
    for _, rel in removed:
        (cirr_copy / rel).unlink()
    _edit_json(cirr_copy / "cirr/captions/cap.rc2.val.json",
               lambda t: t[0].update(reference="ghost"))
    with pytest.raises(DataError) as info:
        CIRRDataset(cirr_copy, "val", "relative", transform)
    message = str(info.value)
    assert "26 data problem(s)" in message
    assert message.count("\n  - ") == 20 and message.endswith("... and 6 more")
    assert removed[0][0] in message and "split.rc2.val.json" in message


def test_fashioniq_bad_input(fiq_root, tmp_path, transform):
    root = Path(shutil.copytree(fiq_root, tmp_path / "fashion-iq"))
    _edit_json(root / "captions/cap.shirt.val.json", lambda t: t[0].pop("candidate"))
    image_id = read_json(root / "image_splits/split.toptee.val.json")[0]
    (root / "images" / f"{image_id}.png").unlink()
    (root / "captions/cap.dress.val.json").write_text("{oops")
    with pytest.raises(DataError) as info:
        FashionIQDataset(root, "val", CATEGORIES, "relative", transform)
    message = str(info.value)
    assert "cap.shirt.val.json: entry 0: missing key 'candidate'" in message
    assert f"image '{image_id}': file not found" in message
    assert "cap.dress.val.json: malformed JSON" in message


def test_circo_bad_input(circo_root, tmp_path, transform):
    root = Path(shutil.copytree(circo_root, tmp_path / "CIRCO"))

    def damage(queries):
        queries[0]["gt_img_ids"] = [123]  # not a gallery id
        del queries[1]["relative_caption"]
    _edit_json(root / "annotations/val.json", damage)
    first = read_json(root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json")
    missing = root / "COCO2017_unlabeled/unlabeled2017" / first["images"][0]["file_name"]
    missing.unlink()
    with pytest.raises(DataError) as info:
        CIRCODataset(root, "val", "relative", transform)
    message = str(info.value)
    assert "val.json: entry 0: gt_img_ids 123 is not listed" in message
    assert "val.json: entry 1: missing key 'relative_caption'" in message
    assert str(missing) in message
    # Test annotations legitimately lack targets; only the missing file is reported there.
    with pytest.raises(DataError, match="1 data problem"):
        CIRCODataset(root, "test", "classic", transform)


# ------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "targetpad"])
@pytest.mark.parametrize("size", [(300, 100), (100, 300), (64, 64)])
def test_build_transform_shapes(kind, size):
    out = build_transform(kind, 40)(Image.new("RGB", size, (200, 10, 10)))
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32


def test_build_transform_unknown_kind():
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("squash", 32)


@pytest.mark.parametrize("ratio", [1.0, 1.25, 1.5])
def test_target_pad_ratio(ratio):
    for size in [(300, 100), (100, 300), (301, 97)]:
        padded = TargetPad(ratio)(Image.new("RGB", size, (255, 255, 255)))
        assert max(padded.size) / min(padded.size) <= ratio
        assert max(padded.size) == max(size)
        # Centred, black padding: the corners are black, the centre keeps the image.
        pixels = np.asarray(padded)
        if padded.size != size:
            assert pixels[0, 0].tolist() == [0, 0, 0]
        assert pixels[padded.size[1] // 2, padded.size[0] // 2].tolist() == [255, 255, 255]
    square = Image.new("RGB", (50, 45))
    assert TargetPad(1.25)(square) is square
