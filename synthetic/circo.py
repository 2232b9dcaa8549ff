"""A synthetic CIRCO in the real layout: one shared gallery, several ground truths per query."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synthetic.captions import CAPTIONS_DIR, caption_stream, scene_captions, write_caption_file
from synthetic.files import write_json
from synthetic.scenes import (
    Cell, Edit, Scene, edit_caption, hard_negatives, pick_variants, render_scene, sample_query, sample_scene,
)

__all__ = ["CIRCO_ASPECTS", "make_synthetic_circo"]

CIRCO_ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change",
                 "comparative_statement", "statement_with_conjunction",
                 "spatial_relations_background", "viewpoint")
_CIRCO_BACKGROUND = (250, 250, 250)


def _aspects(edits: Sequence[Edit]) -> list[str]:
    """CIRCO's semantic aspects a query with these edits exercises, in CIRCO's order."""
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
        reference = sample_scene(rng)
        edits, target = sample_query(rng, reference)
        layouts = [target] + [s for s in _arrangements(rng, _objects(target), 4) if s != target]
        layouts = layouts[:1 + int(rng.integers(1, 4))]
        negatives = pick_variants(hard_negatives(rng, reference, edits, target), 3,
                                  {reference, *layouts})
        kept = [c for c in reference if c is not None and c in _objects(target)]
        concept = f"a {kept[0][1]} {kept[0][0]}" if kept else "coloured shapes"
        queries.append({"reference": add(reference), "target": add(target),
                        "objects": _objects(target), "caption": edit_caption(edits),
                        "concept": concept, "aspects": _aspects(edits)})
        for scene in layouts[1:] + negatives:
            add(scene)
    while len(scenes) < gallery_size:
        add(sample_scene(rng))

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
        render_scene(scenes[position], image_size, _CIRCO_BACKGROUND).save(path, quality=95)
    write_json(out / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
               {"info": {"description": "synthetic COCO 2017 unlabeled"}, "images": images})
    caption_rng = caption_stream(seed)
    write_caption_file(out / CAPTIONS_DIR / "unlabeled2017.json",
                       {str(ids[position]): scene_captions(caption_rng, scenes[position])
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
    write_json(out / "annotations" / "val.json", val)
    write_json(out / "annotations" / "test.json", test)
    return out
