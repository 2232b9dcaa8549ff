"""Validate a saved SSN checkpoint on CIRR val or FashionIQ val.

    python validate.py --checkpoint runs/cirr_x/checkpoints/best.pt [--data_root /data/cirr_dataset] [--baselines] [--visualize 8]

The backbone, head and preprocessing come from the checkpoint; the data path defaults to the one the model
was trained with.  Prints a table with its legend and writes it as JSON, by default with the grids and a
report.md in a new folder <run>/validation/<checkpoint>-NNN/ (the run's own files are never replaced).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import utils
from precision import EVAL_PRECISION_HELP, PRECISIONS
from search_choices import ENGINE_HELP, ENGINES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train_cirr.py / train_fiq.py")
    parser.add_argument("--data_root", default=None, help="dataset folder; None: the --data_root of the training run")
    parser.add_argument("--baselines", action="store_true",
                        help="also score image-only, text-only and image+text sum retrieval with the same backbone")
    parser.add_argument("--output", default=None,
                        help="metrics JSON (grids and report.md go beside it); None: "
                             "<run>/validation/<checkpoint>-NNN/validation.json in a new folder")
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoding batch")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu; None: cuda if available")
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
    # Imported after parsing: --help needs neither torch nor open_clip.
    from inference import validate_checkpoint
    from retrieval import use_engine

    with use_engine(args.retrieval_engine):
        return validate_checkpoint(
            args.checkpoint, data_root=args.data_root, baselines=args.baselines, output=args.output,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, precision=args.precision,
            use_cache=not args.no_cache, visualize=args.visualize,
        )


if __name__ == "__main__":
    utils.run_cli(main)
