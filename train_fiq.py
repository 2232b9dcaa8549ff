"""Train SSN on FashionIQ (AdamW, vision tower frozen from the second epoch, randomised captions).

    python train_fiq.py --data_root /data/fashion-iq --num_epochs 100 --batch_size 384 --lr 4e-5 \\
        --save_training --save_best
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import utils
from training.params import parse_train_args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_train_args("fashioniq", argv)
    from training.main import run  # after parsing: --help needs neither torch nor open_clip

    return run(args, "fashioniq")


if __name__ == "__main__":
    utils.run_cli(main)
