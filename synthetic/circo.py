"""A synthetic CIRCO in the real layout: one shared gallery, several ground truths per query.

Two generators write it. :func:`make_synthetic_circo`: a query's ground truths are the gallery images
with the edited set of objects, in any layout. :func:`make_complementary_circo`: the reference's setting
(layout and background) counts too, and the gallery is built so that neither the images nor the captions
find the ground truths alone (the CVSI demo, :mod:`cvsi.demo`); :func:`setting_captioned_photo` gives
image-caption pairs whose captions also describe the setting, to train a CLIP for it on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from synthetic.captions import CAPTIONS_DIR, caption_stream, scene_captions, write_caption_file
from synthetic.files import write_json
from synthetic.scenes import (
    COLOURS, SHAPES, Cell, Edit, Scene, draw_shape, edit_caption, hard_negatives, pick_variants, render_scene, sample_query,
    sample_scene,
)

__all__ = ["CIRCO_ASPECTS", "CELL_NAMES", "BACKGROUNDS", "make_synthetic_circo", "make_complementary_circo",
           "render_photo", "setting_caption", "setting_captioned_photo", "setting_pair_caption"]

CIRCO_ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change",
                 "comparative_statement", "statement_with_conjunction",
                 "spatial_relations_background", "viewpoint")
_CIRCO_BACKGROUND = (250, 250, 250)
CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 grid in reading order
# Backgrounds of make_complementary_circo's photos: light, so every shape colour stands out on each.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "grey": (190, 190, 190), "cream": (250, 238, 190),
    "pale blue": (190, 215, 250), "pale green": (195, 240, 195), "pink": (250, 200, 225),
}
# make_complementary_circo, per query: near-copies of the reference (photos of it without the edit),
# distractors with the target's objects in another setting, and hard negatives of synthetic.scenes' kinds.
_REFERENCE_COPIES = 2
_SETTING_DISTRACTORS = 3
_HARD_NEGATIVES = 2
_GROUND_TRUTHS = (2, 4)  # photos of scenes that satisfy the query, at least and at most
_SHAPE_SCALE = (0.6, 0.85)  # render_photo: a shape's side as a fraction of its cell
_PHOTO_STREAM, _PRETRAINING_STREAM = 0x9407, 0x11A7  # random streams of their own (photos, pretraining pairs)


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


def _concept(reference: Scene, target: Scene) -> str:
    """CIRCO's ``shared_concept``: an object the reference and the target share."""
    kept = [c for c in reference if c is not None and c in _objects(target)]
    return f"a {kept[0][1]} {kept[0][0]}" if kept else "coloured shapes"


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
        objects = _objects(target)
        queries.append({"reference": add(reference), "target": add(target),
                        "is_gt": lambda p, objects=objects: _objects(scenes[p]) == objects,
                        "caption": edit_caption(edits), "concept": _concept(reference, target),
                        "aspects": _aspects(edits)})
        for scene in layouts[1:] + negatives:
            add(scene)
    while len(scenes) < gallery_size:
        add(sample_scene(rng))

    return _write_circo(out, rng, seed, scenes, lambda position: render_scene(scenes[position], image_size,
                                                                               _CIRCO_BACKGROUND),
                        queries, num_val, image_size)


# ---------------------------------------------------------------------------------------------- the setting counts
def render_photo(scene: Scene, size: int, rng: np.random.Generator,
                 background: tuple[int, int, int] = _CIRCO_BACKGROUND) -> Image.Image:
    """A ``size`` x ``size`` "photo" of the scene: each shape in its grid cell at a random size (60-85 % of
    the cell's side) and place inside the cell, so two photos of one scene differ a little."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / 2
    for index, content in enumerate(scene):
        if content is None:
            continue
        side = cell * rng.uniform(*_SHAPE_SCALE)
        x0 = (index % 2) * cell + rng.uniform(0, cell - side)
        y0 = (index // 2) * cell + rng.uniform(0, cell - side)
        draw_shape(draw, content[0], (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[content[1]])
    return image


def setting_caption(rng: np.random.Generator, scene: Scene, background: str | None, cells: bool) -> str:
    """A caption in the style of a detailed alt text, which may say what the image captions never say: where
    each shape is (``cells``) and the ``background`` (None: not said), e.g. "a photo of a red circle at the
    top left and a blue square at the bottom right on a pale blue background" (shapes in random order, a
    random opening)."""
    occupied = [(index, cell) for index, cell in enumerate(scene) if cell is not None]
    phrases = [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}" + (f" at the {CELL_NAMES[index]}" if cells else "")
               for index, (shape, colour) in (occupied[i] for i in rng.permutation(len(occupied)))]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if background is not None:
        text += f" on a {background} background"
    return ("{}", "a photo of {}", "a picture of {}")[rng.integers(3)].format(text)


def _variant(rng: np.random.Generator, scene: Scene, background: str) -> tuple[Scene, str, str]:
    """The scene and background with one difference, and its kind: "recolour" (a shape), "reshape" (a shape
    replaced by an absent kind), "move" (the shapes to other cells) or "background"."""
    occupied = [index for index, cell in enumerate(scene) if cell is not None]
    cells = list(scene)
    change = ("recolour", "reshape", "move", "background")[rng.integers(4)]
    chosen = occupied[rng.integers(len(occupied))]
    shape, colour = cells[chosen]
    absent = [s for s in SHAPES if s not in {cell[0] for cell in scene if cell is not None}]
    if change == "reshape" and not absent:
        change = "move"
    if change == "recolour":
        others = [c for c in COLOURS if c != colour]
        cells[chosen] = (shape, others[rng.integers(len(others))])
    elif change == "reshape":
        cells[chosen] = (absent[rng.integers(len(absent))], colour)
    elif change == "move":
        while tuple(cells) == scene:
            cells = [scene[i] for i in rng.permutation(4)]
    else:
        others = [b for b in BACKGROUNDS if b != background]
        background = others[rng.integers(len(others))]
    return tuple(cells), background, change


def _setting_pair_item(seed: int, index: int) -> tuple[Scene, str, str, np.random.Generator]:
    """Item ``index`` of :func:`setting_captioned_photo`'s stream before rendering: its scene, background
    name, caption and the generator its photo is drawn with."""
    rng = np.random.default_rng([seed, _PRETRAINING_STREAM, index // 2])
    scene = sample_scene(rng)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    say_cells, say_background = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    variant, other_background, change = _variant(rng, scene, background)
    say_cells |= change == "move"
    say_background |= change == "background"
    if index % 2:
        scene, background = variant, other_background
    rng = np.random.default_rng([seed, _PRETRAINING_STREAM, index // 2, index % 2])
    caption = setting_caption(rng, scene, background if say_background else None, say_cells)
    return scene, background, caption, rng


def setting_captioned_photo(seed: int, index: int, image_size: int = 64) -> tuple[Image.Image, str]:
    """The ``index``-th pair of an endless stream: a :func:`render_photo` of a random scene on one of the
    :data:`BACKGROUNDS` and its :func:`setting_caption`, which says the cells and the background each with
    probability 1/2. Pairs ``2k`` and ``2k + 1`` show a scene and a variant with one difference (a shape
    recoloured or replaced, the shapes moved, another background) that both captions mention, so a
    contrastive batch holding both must tell them apart by that detail. Each pair has its own seed: any
    subset can be drawn in any order (e.g. by data-loader workers)."""
    scene, background, caption, rng = _setting_pair_item(seed, index)
    return render_photo(scene, image_size, rng, BACKGROUNDS[background]), caption


def setting_pair_caption(seed: int, index: int) -> str:
    """The caption of :func:`setting_captioned_photo` ``(seed, index)``, without rendering its photo."""
    return _setting_pair_item(seed, index)[2]


def _kept_cells(reference: Scene, target: Scene) -> dict[str, int]:
    """shape -> the reference's cell of every shape the edits keep (untouched or recoloured)."""
    cells = {cell[0]: index for index, cell in enumerate(reference) if cell is not None}
    return {cell[0]: cells[cell[0]] for cell in target if cell is not None and cell[0] in cells}


def _fits(scene: Scene, objects: frozenset[tuple[str, str]], kept: dict[str, int]) -> bool:
    """Whether ``scene`` has exactly ``objects`` with every kept shape in its reference cell."""
    return _objects(scene) == objects and all(scene[i] is not None and scene[i][0] == s for s, i in kept.items())


def _all_layouts(objects: Iterable[tuple[str, str]]) -> list[Scene]:
    """Every placement of the objects on the 4 cells, in a fixed order."""
    objects = sorted(objects)
    layouts = []
    for cells in itertools.permutations(range(4), len(objects)):
        scene: list[Cell] = [None] * 4
        for obj, cell in zip(objects, cells):
            scene[cell] = obj
        layouts.append(tuple(scene))
    return layouts


def make_complementary_circo(root: str | Path, seed: int = 0, num_val: int = 120, num_test: int = 60,
                             gallery_size: int = 1500, image_size: int = 64) -> Path:
    """Write a synthetic CIRCO (the files of :func:`make_synthetic_circo`) in which images and captions carry
    complementary information on purpose; return ``<root>/CIRCO``.

    Every image is a :func:`render_photo` of a scene on one of the :data:`BACKGROUNDS` (its setting; one
    scene can be in the gallery several times). The image captions name the objects, never where they
    are or the background. A query's ground truths are the images in the reference's setting — its
    background, every shape the edit keeps (untouched or recoloured) in its reference cell, an added
    shape in any free cell — with the target's objects. Per query the gallery holds 2-4 ground truths
    (the target first) and:

    * the reference and 2 more photos of it: the setting without the edit, which an image-only search
      finds first;
    * 3 distractors with the target's objects in another setting (a kept shape moved, another
      background): what the edited caption says, which the captions cannot tell from the ground truths;
    * 2 hard negatives in the reference's setting (:func:`synthetic.scenes.hard_negatives`: partial or
      wrong edits);

    and random scenes on random backgrounds up to ``gallery_size`` images. Queries whose edits keep no
    shape of the reference (nothing would fix the layout) are drawn again.
    """
    out = Path(root) / "CIRCO"
    rng = np.random.default_rng(seed)
    backgrounds = list(BACKGROUNDS)
    scenes: list[Scene] = []
    settings: list[str] = []  # the background of each image

    def add(background: str, *photographed: Scene) -> int:
        scenes.extend(photographed)
        settings.extend([background] * len(photographed))
        return len(scenes) - len(photographed)

    def random_background(avoid: str = "") -> str:
        choices = [b for b in backgrounds if b != avoid]
        return choices[rng.integers(len(choices))]

    queries = []
    for _ in range(num_val + num_test):
        kept: dict[str, int] = {}
        while not kept:
            reference = sample_scene(rng)
            edits, target = sample_query(rng, reference)
            kept = _kept_cells(reference, target)
        objects, background = _objects(target), random_background()
        every = _all_layouts(objects)
        layouts = [every[i] for i in rng.permutation(len(every))]
        fitting = [target] + [s for s in layouts if s != target and _fits(s, objects, kept)]
        moved = [s for s in layouts if not _fits(s, objects, kept)][:_SETTING_DISTRACTORS]
        count = int(rng.integers(_GROUND_TRUTHS[0], _GROUND_TRUTHS[1] + 1))
        negatives = pick_variants(hard_negatives(rng, reference, edits, target), _HARD_NEGATIVES,
                                  {reference, *fitting})
        queries.append({
            "reference": add(background, *[reference] * (1 + _REFERENCE_COPIES)),
            "target": add(background, *[fitting[i % len(fitting)] for i in range(count)]),
            "is_gt": lambda p, objects=objects, kept=kept, background=background:
                settings[p] == background and _fits(scenes[p], objects, kept),
            "caption": edit_caption(edits), "concept": _concept(reference, target), "aspects": _aspects(edits)})
        for scene in moved:
            add(random_background(avoid=background), scene)
        add(background, *negatives)
    while len(scenes) < gallery_size:
        add(random_background(), sample_scene(rng))

    def photo(position: int) -> Image.Image:
        return render_photo(scenes[position], image_size, np.random.default_rng([seed, _PHOTO_STREAM, position]),
                            BACKGROUNDS[settings[position]])

    return _write_circo(out, rng, seed, scenes, photo, queries, num_val, image_size)


def _write_circo(out: Path, rng: np.random.Generator, seed: int, scenes: Sequence[Scene],
                 render: Callable[[int], Image.Image], queries: Sequence[dict[str, Any]], num_val: int,
                 image_size: int) -> Path:
    """Write the gallery (one image per entry of ``scenes``, drawn by ``render(position)``), its captions and
    the annotations; a query's ground truths are the images whose position satisfies ``query["is_gt"]``."""
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
        render(position).save(path, quality=95)
    write_json(out / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
               {"info": {"description": "synthetic COCO 2017 unlabeled"}, "images": images})
    caption_rng = caption_stream(seed)
    write_caption_file(out / CAPTIONS_DIR / "unlabeled2017.json",
                       {str(ids[position]): scene_captions(caption_rng, scenes[position])
                        for position in order})

    val, test = [], []
    for number, query in enumerate(queries):
        is_val = number < num_val
        entry: dict[str, Any] = {"id": number if is_val else number - num_val,
                                 "reference_img_id": ids[query["reference"]]}
        if is_val:
            target_id = ids[query["target"]]
            entry["target_img_id"] = target_id
            # In gallery order, so ground truths are listed consistently.
            entry["gt_img_ids"] = [target_id] + [ids[p] for p in order
                                                 if ids[p] != target_id and query["is_gt"](p)]
        entry["relative_caption"] = query["caption"]
        entry["shared_concept"] = query["concept"]
        if is_val:
            entry["semantic_aspects"] = query["aspects"]
        (val if is_val else test).append(entry)
    write_json(out / "annotations" / "val.json", val)
    write_json(out / "annotations" / "test.json", test)
    return out
