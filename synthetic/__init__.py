"""Small synthetic CIR datasets written in the exact on-disk layouts of CIRR, FashionIQ and CIRCO.

CIRR and CIRCO images are 2x2 grids of coloured shapes (:mod:`synthetic.scenes`) and their captions
describe edits ("make the circle blue and remove the square"), so a model has to compose image and text
to find the target; the galleries hold hard negatives (partial edits, wrong colours, the reference
itself). FashionIQ images are garments (:mod:`synthetic.garments`) whose captions name the changed
attributes. The evaluation splits also get ``image_captions/*.json``: several noisy descriptions per
gallery image, in the style of the BLIP-2 caption files that zero-shot methods such as CVSI precompute
(:mod:`synthetic.captions`). Every generator is deterministic in its seed.

Command line: ``python -m synthetic {cirr,fashioniq,circo,all} --output DIR --seed 0`` (:mod:`synthetic.cli`).
"""

from synthetic.captions import CAPTIONS_DIR, SYNTHETIC_CAPTIONS_PER_IMAGE, write_caption_file
from synthetic.circo import CIRCO_ASPECTS, make_synthetic_circo
from synthetic.cirr import make_synthetic_cirr
from synthetic.fashioniq import make_synthetic_fashioniq

__all__ = [
    "make_synthetic_cirr",
    "make_synthetic_fashioniq",
    "make_synthetic_circo",
    "CIRCO_ASPECTS",
    "SYNTHETIC_CAPTIONS_PER_IMAGE",
    "CAPTIONS_DIR",
    "write_caption_file",
]
