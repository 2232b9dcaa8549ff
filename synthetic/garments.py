"""FashionIQ-like garments: one per image, attributes colour, pattern and length.

Each category (dress, shirt, toptee) has its own silhouette and background tone, so the three look
distinct. A garment is ``(colour, pattern, pattern colour, length)``; a triplet changes one or two
attributes and its captions describe the target (:func:`describe_change`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from synthetic.scenes import COLOURS, draw_shape

__all__ = [
    "CATEGORY_BACKGROUNDS",
    "PATTERNS",
    "PATTERN_COLOURS",
    "LENGTHS",
    "Garment",
    "render_garment",
    "sample_garment",
    "change_garment",
    "describe_change",
]

# The categories in generation order, each with its background tone.
CATEGORY_BACKGROUNDS = {"dress": (250, 232, 236), "shirt": (228, 238, 250), "toptee": (244, 240, 222)}
PATTERNS = ("plain", "circle", "square", "triangle", "stripe")
PATTERN_COLOURS = {"white": (255, 255, 255), "black": (20, 20, 20)}
LENGTHS = {"short": 0.55, "mid-length": 0.72, "long": 0.9}  # garment height as a fraction of the image
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


def render_garment(category: str, garment: Garment, size: int) -> Image.Image:
    """A ``size`` x ``size`` RGB image: the category's silhouette in the garment's colour and print."""
    colour, pattern, pattern_colour, length = garment
    image = Image.new("RGB", (size, size), CATEGORY_BACKGROUNDS[category])
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(_garment_outline(category, size, LENGTHS[length]), fill=255)
    cloth = Image.new("RGB", (size, size), COLOURS[colour])
    if pattern != "plain":
        draw, fill = ImageDraw.Draw(cloth), PATTERN_COLOURS[pattern_colour]
        step = size / 4
        if pattern == "stripe":
            for y in range(4):
                draw.rectangle((0, y * step + step * 0.3, size, y * step + step * 0.7), fill=fill)
        else:
            for y in range(4):
                for x in range(4):
                    x0, y0 = x * step + step * 0.2, y * step + step * 0.2
                    draw_shape(draw, pattern, (x0, y0, x0 + step * 0.6, y0 + step * 0.6), fill)
    image.paste(cloth, (0, 0), mask)
    return image


def sample_garment(rng: np.random.Generator) -> Garment:
    """A random garment: colour, pattern (with its colour unless plain) and length."""
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    pattern_colour = "" if pattern == "plain" else list(PATTERN_COLOURS)[rng.integers(2)]
    colours, lengths = list(COLOURS), list(LENGTHS)
    return (colours[rng.integers(len(colours))], pattern, pattern_colour,
            lengths[rng.integers(len(lengths))])


def change_garment(rng: np.random.Generator, garment: Garment, attribute: str) -> Garment:
    """``garment`` with ``attribute`` ("colour", "pattern" or "length") redrawn to a different value."""
    while True:
        new = sample_garment(rng)
        if attribute == "colour" and new[0] != garment[0]:
            return (new[0], *garment[1:])
        if attribute == "pattern" and new[1:3] != garment[1:3]:
            return (garment[0], *new[1:3], garment[3])
        if attribute == "length" and new[3] != garment[3]:
            return (*garment[:3], new[3])


def describe_change(garment: Garment, attribute: str, paraphrase: bool) -> str:
    """A relative caption naming the target's ``attribute`` ("is blue"); ``paraphrase`` words it differently."""
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
