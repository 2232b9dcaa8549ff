"""Image captions: what a captioner such as BLIP-2 would say about each image, N per image.

The captions carry a captioner's typical noise (an object missed, a colour got wrong, varied wording).
Zero-shot methods such as CVSI precompute such captions for the evaluation galleries; the generators
write them to ``<dataset>/image_captions/*.json`` (:func:`write_caption_file`) from a random stream of
their own (:func:`caption_stream`), so captions leave the images and annotations unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synthetic.files import write_json
from synthetic.garments import Garment
from synthetic.scenes import COLOURS, Scene

__all__ = [
    "SYNTHETIC_CAPTIONS_PER_IMAGE",
    "CAPTIONS_DIR",
    "caption_stream",
    "scene_captions",
    "garment_captions",
    "write_caption_file",
]

SYNTHETIC_CAPTIONS_PER_IMAGE = 15
CAPTIONS_DIR = "image_captions"  # beside the dataset's own folders
_CAPTION_MISS_RATE = 0.15  # per caption: one object left out (scenes with 2+ objects)
_CAPTION_COLOUR_ERROR_RATE = 0.1  # per caption: one object described with a wrong colour

_SCENE_TEMPLATES = ("{}", "a picture of {}", "{} on a white background", "an image showing {}",
                    "a drawing of {}")


def caption_stream(seed: int) -> np.random.Generator:
    """A stream of its own, so that captions leave the images and annotations unchanged."""
    return np.random.default_rng([seed, 0xCA])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_phrases(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_captions(rng: np.random.Generator, scene: Scene,
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


def garment_captions(rng: np.random.Generator, category: str, garment: Garment,
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
    write_json(Path(path), {"index_names": list(captions),
                            "target_captions": [list(c) for c in captions.values()]})
