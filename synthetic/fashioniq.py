"""A synthetic FashionIQ in the real layout: garments per category, two captions per triplet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from synthetic.captions import CAPTIONS_DIR, caption_stream, garment_captions, write_caption_file
from synthetic.files import save_png, write_json
from synthetic.garments import (
    CATEGORY_BACKGROUNDS, Garment, change_garment, describe_change, render_garment, sample_garment,
)
from synthetic.scenes import MAX_FAILED_DRAWS

__all__ = ["make_synthetic_fashioniq"]


def _write_fiq_split(rng: np.random.Generator, category: str, split: str, code: str, num_triplets: int,
                     root: Path, image_size: int, with_target: bool) -> dict[Garment, str]:
    """Write one category/split. Each distinct garment gets one id, so galleries never hold
    duplicates and images are shared between triplets. Returns the image id of every garment."""
    ids: dict[Garment, str] = {}

    def image_id(garment: Garment) -> str:
        if garment not in ids:
            ids[garment] = f"B0{code}{len(ids):06d}"
            save_png(render_garment(category, garment, image_size),
                     root / "images" / f"{ids[garment]}.png")
        return ids[garment]

    attributes = ("colour", "pattern", "length")
    triplets, pairs = [], set()
    failures = 0
    while len(triplets) < num_triplets:
        if failures > MAX_FAILED_DRAWS:
            raise ValueError(f"FashionIQ {category} {split}: cannot draw {num_triplets} distinct "
                             f"triplets; ask for fewer")
        reference = sample_garment(rng)
        changed = [attributes[i] for i in rng.permutation(3)[:1 + int(rng.random() < 0.5)]]
        target = reference
        for attribute in changed:
            target = change_garment(rng, target, attribute)
        if (reference, target) in pairs:
            failures += 1
            continue
        failures = 0
        pairs.add((reference, target))
        if len(changed) == 2:  # two annotators describe different changes
            captions = [describe_change(target, changed[0], False), describe_change(target, changed[1], False)]
        else:  # both describe the same change in different words
            captions = [describe_change(target, changed[0], False), describe_change(target, changed[0], True)]
        entry: dict[str, Any] = {"candidate": image_id(reference)}
        target_id = image_id(target)
        if with_target:
            entry["target"] = target_id
        entry["captions"] = captions
        triplets.append(entry)
    write_json(root / "captions" / f"cap.{category}.{split}.json", triplets)
    write_json(root / "image_splits" / f"split.{category}.{split}.json", list(ids.values()))
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
    caption_rng = caption_stream(seed)
    for category in CATEGORY_BACKGROUNDS:
        for split, split_code, count in splits:
            code = f"{category[0].upper()}{split_code}"
            ids = _write_fiq_split(np.random.default_rng(rng.integers(2**63)), category, split, code,
                                   count, out, image_size, with_target=split != "test")
            if split != "train":
                write_caption_file(out / CAPTIONS_DIR / f"{category}.{split}.json",
                                   {image_id: garment_captions(caption_rng, category, garment)
                                    for garment, image_id in ids.items()})
    return out
