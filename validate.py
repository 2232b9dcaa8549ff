"""Validate a saved SSN checkpoint on CIRR val or FashionIQ val.

    python validate.py --checkpoint runs/cirr_x/checkpoints/best.pt [--data_root /data/cirr_dataset] [--baselines] [--visualize 8]

The backbone, head and preprocessing come from the checkpoint; the data path defaults to the one the model
was trained with.  Prints a table and writes it as JSON (default: next to the checkpoint's run).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import utils
from inference import validate_checkpoint
from precision import EVAL_PRECISION_HELP, PRECISIONS
from retrieval import ENGINE_HELP, ENGINES, use_engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train_cirr.py / train_fiq.py")
    parser.add_argument("--data_root", default=None, help="default: the --data_root of the training run")
    parser.add_argument("--baselines", action="store_true",
                        help="also score image-only, text-only and image+text sum retrieval with the same backbone")
    parser.add_argument("--output", default=None, help="metrics JSON (default: <run>/validation.json)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=EVAL_PRECISION_HELP)
    parser.add_argument("--no_cache", action="store_true",
                        help="re-encode the galleries instead of using <run>/feature_cache (keyed by the checkpoint's content)")
    parser.add_argument("--visualize", type=int, default=0, metavar="K",
                        help="also write a retrieval grid (PNG + HTML) of K queries, successes and failures, beside the metrics JSON")
    parser.add_argument("--retrieval_engine", choices=ENGINES, default="auto", help=ENGINE_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = build_parser().parse_args(argv)
    utils.setup_logging(None)
    with use_engine(args.retrieval_engine):
        return validate_checkpoint(
            args.checkpoint, data_root=args.data_root, baselines=args.baselines, output=args.output,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, precision=args.precision,
            use_cache=not args.no_cache, visualize=args.visualize,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
