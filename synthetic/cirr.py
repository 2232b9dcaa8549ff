"""A synthetic CIRR in the real layout: sets of six similar scenes, edit-instruction captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from synthetic.captions import CAPTIONS_DIR, caption_stream, scene_captions, write_caption_file
from synthetic.files import save_png, write_json
from synthetic.scenes import (
    MAX_FAILED_DRAWS, Scene, edit_caption, edit_text, hard_negatives, pick_variants, render_scene, sample_query,
    sample_scene, single_edit_links,
)

__all__ = ["make_synthetic_cirr"]

_CIRR_BACKGROUND = (235, 235, 235)
_CIRR_PREFIX = {"train": "train", "val": "dev", "test1": "test1"}


def _write_cirr_split(rng: np.random.Generator, split: str, num_triplets: int, extra_per_set: int,
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
        if failures > MAX_FAILED_DRAWS:
            raise ValueError(f"CIRR {split}: cannot draw {num_triplets} triplets with distinct "
                             f"images; ask for fewer")
        reference = sample_scene(rng)
        edits, target = sample_query(rng, reference)
        if unique and (reference in used or target in used):
            failures += 1
            continue
        variants = pick_variants(hard_negatives(rng, reference, edits, target), 4,
                                 {reference, target} | (used if unique else set()))
        if len(variants) < 4:
            failures += 1
            continue
        failures = 0
        members = [reference, target, *variants]
        order = rng.permutation(6)
        members = [members[i] for i in order]
        names = [f"{prefix}-{set_id}-{m // 2}-img{m % 2}" for m in range(6)]
        queries = [(members.index(reference), members.index(target), edit_caption(edits))]
        links = [(a, b, edit_text(e)) for a, b, e in single_edit_links(members)
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
            save_png(render_scene(scene, image_size, _CIRR_BACKGROUND), root / split_map[name])
        used.update(members)
        set_id += 1
    write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", triplets)
    write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", split_map)
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
    caption_rng = caption_stream(seed)
    for split, count, extra in splits:
        split_rng = np.random.default_rng(rng.integers(2**63))
        scenes = _write_cirr_split(split_rng, split, count, extra, out, image_size)
        if split != "train":  # zero-shot methods caption the evaluation galleries only
            write_caption_file(out / CAPTIONS_DIR / f"{split}.json",
                               {name: scene_captions(caption_rng, scene)
                                for name, scene in scenes.items()})
    return out
