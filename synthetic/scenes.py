"""Scenes of coloured shapes on a 2x2 grid: sampling, edits, hard negatives and rendering.

A scene is a tuple of 4 cells in reading order, each None or ``(shape, colour)``; every shape type appears at
most once, so "the circle" is unambiguous. An edit is ``(op, shape, colour)`` with op in ``{"recolour",
"remove", "add"}`` (colour "" for remove); a query is one or two edits on different shapes, and its caption
the edits as instructions ("make the circle blue and remove the square"). The CIRR and CIRCO generators
build on these; the FashionIQ garments share the colours and the shape drawing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "Cell",
    "Scene",
    "Edit",
    "MAX_FAILED_DRAWS",
    "apply_edit",
    "apply_edits",
    "edits_by_op",
    "sample_edit",
    "sample_scene",
    "sample_query",
    "edit_text",
    "edit_caption",
    "hard_negatives",
    "pick_variants",
    "single_edit_links",
    "draw_shape",
    "render_scene",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 70, 230),
    "yellow": (240, 210, 0), "purple": (140, 40, 190), "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle")

# A scene is a tuple of 4 cells in reading order, each None or (shape, colour); every shape type
# appears at most once so that "the circle" is unambiguous.
Cell = tuple[str, str] | None
Scene = tuple[Cell, ...]
# An edit is (op, shape, colour) with op in {"recolour", "remove", "add"}; colour is "" for remove.
Edit = tuple[str, str, str]

# Consecutive rejected draws after which a generator gives up instead of looping forever.
MAX_FAILED_DRAWS = 10_000


def _shape_cell(scene: Scene, shape: str) -> int | None:
    for index, cell in enumerate(scene):
        if cell is not None and cell[0] == shape:
            return index
    return None


def apply_edit(scene: Scene, edit: Edit) -> Scene | None:
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


def apply_edits(scene: Scene | None, edits: Sequence[Edit]) -> Scene | None:
    """Apply edits in order; None as soon as one does not apply."""
    for edit in edits:
        if scene is None:
            return None
        scene = apply_edit(scene, edit)
    return scene


def edits_by_op(scene: Scene) -> dict[str, list[Edit]]:
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


def sample_edit(rng: np.random.Generator, scene: Scene, avoid_shape: str = "") -> Edit | None:
    """A random applicable edit of ``scene`` not touching ``avoid_shape``; None if there is none."""
    # Pick the operation first so recolours (the most numerous edits) do not dominate.
    groups = {op: [e for e in edits if e[1] != avoid_shape]
              for op, edits in edits_by_op(scene).items()}
    groups = {op: edits for op, edits in groups.items() if edits}
    if not groups:
        return None
    ops = sorted(groups)
    edits = groups[ops[rng.integers(len(ops))]]
    return edits[rng.integers(len(edits))]


def sample_scene(rng: np.random.Generator, min_shapes: int = 1, max_shapes: int = 3) -> Scene:
    """A random scene of ``min_shapes``..``max_shapes`` distinct shapes in random cells and colours."""
    count = int(rng.integers(min_shapes, max_shapes + 1))
    shapes = rng.permutation(len(SHAPES))[:count]
    cells = rng.permutation(4)[:count]
    colours = list(COLOURS)
    scene: list[Cell] = [None] * 4
    for shape, cell in zip(shapes, cells):
        scene[cell] = (SHAPES[shape], colours[rng.integers(len(colours))])
    return tuple(scene)


def sample_query(rng: np.random.Generator, scene: Scene) -> tuple[list[Edit], Scene]:
    """One or two edits (on different shapes) and the resulting target scene."""
    while True:
        first = sample_edit(rng, scene)
        middle = apply_edit(scene, first)
        if rng.random() < 0.5:
            return [first], middle
        second = sample_edit(rng, middle, avoid_shape=first[1])
        if second is not None:
            return [first, second], apply_edit(middle, second)


def edit_text(edit: Edit) -> str:
    """One edit as an instruction: "make the circle blue", "remove the square", "add a red triangle"."""
    op, shape, colour = edit
    if op == "recolour":
        return f"make the {shape} {colour}"
    if op == "remove":
        return f"remove the {shape}"
    return f"add a {colour} {shape}"


def edit_caption(edits: Sequence[Edit]) -> str:
    """A query's relative caption: its edits' instructions joined by "and"."""
    return " and ".join(edit_text(e) for e in edits)


def hard_negatives(rng: np.random.Generator, reference: Scene, edits: Sequence[Edit],
                   target: Scene) -> list[list[Scene]]:
    """Near-variants of the target, grouped by kind, each group shuffled.

    Kinds: only some of the edits applied; the right edits with a wrong colour/shape/object;
    the target with an untouched shape recoloured; a random single edit of reference or target.
    """
    partial = [apply_edits(reference, [e]) for e in edits] if len(edits) > 1 else []
    wrong: list[Scene | None] = []
    for index, (op, shape, colour) in enumerate(edits):
        others = [e for j, e in enumerate(edits) if j != index]
        if op in ("recolour", "add"):
            wrong += [apply_edits(reference, [(op, shape, c)] + others)
                      for c in COLOURS if c != colour]
        if op == "add":
            wrong += [apply_edits(reference, [(op, s, colour)] + others)
                      for s in SHAPES if s != shape]
        if op == "remove":
            wrong += [apply_edits(reference, [(op, s, "")] + others) for s in SHAPES if s != shape]
    touched = {e[1] for e in edits}
    untouched = [apply_edit(target, e) for e in edits_by_op(target).get("recolour", [])
                 if e[1] not in touched]
    random_edit = [apply_edit(s, e) for s in (reference, target)
                   for edits_ in edits_by_op(s).values() for e in edits_]
    groups = []
    for group in (partial, wrong, untouched, random_edit):
        group = [s for s in group if s is not None]
        groups.append([group[i] for i in rng.permutation(len(group))])
    return groups


def pick_variants(groups: list[list[Scene]], count: int, exclude: set[Scene]) -> list[Scene]:
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


def single_edit_links(members: Sequence[Scene]) -> list[tuple[int, int, Edit]]:
    """All (a, b, edit) with members[b] == edit applied to members[a]."""
    index = {scene: i for i, scene in enumerate(members)}
    links = []
    for a, scene in enumerate(members):
        for edits in edits_by_op(scene).values():
            for edit in edits:
                b = index.get(apply_edit(scene, edit))
                if b is not None:
                    links.append((a, b, edit))
    return links


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
               fill: tuple[int, int, int]) -> None:
    """Draw a filled circle, square or (upward) triangle inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_scene(scene: Scene, size: int, background: tuple[int, int, int]) -> Image.Image:
    """A ``size`` x ``size`` RGB image of the scene, one shape per occupied grid cell."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / 2
    margin = cell * 0.1  # shapes fill ~80% of the cell so they survive downscaling to 32 px
    for index, content in enumerate(scene):
        if content is None:
            continue
        x0, y0 = (index % 2) * cell, (index // 2) * cell
        box = (x0 + margin, y0 + margin, x0 + cell - margin - 1, y0 + cell - margin - 1)
        draw_shape(draw, content[0], box, COLOURS[content[1]])
    return image
