"""Train SSN on CIRR.  Example (the SSN README's command plus the data path):

    python train_cirr.py --data_root /data/cirr_dataset --dataset CIRR --model ssn --projection_dim 512 \\
        --hidden_dim 512 --num_epochs 50 --batch_size 128 --lr 5e-5 --lr_ratio 0.2 --lr_gamma 0.1 \\
        --lr_step_size 10 --save_training --save_best --validation_frequency 1
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import utils
from training.params import parse_train_args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_train_args("cirr", argv)
    from training.main import run  # after parsing: --help needs neither torch nor open_clip

    return run(args, "cirr")


if __name__ == "__main__":
    utils.run_cli(main)
