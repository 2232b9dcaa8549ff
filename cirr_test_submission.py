"""Write the two CIRR test1 submission files for the evaluation server.

    python cirr_test_submission.py --checkpoint runs/cirr_x/checkpoints/best.pt --submission_name ssn_vitb32

Writes recall_submission_<name>.json (top 50, reference excluded) and recall_subset_submission_<name>.json
(top 3 within the query's image set), after checking them against every test1 query.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import utils
from precision import EVAL_PRECISION_HELP, PRECISIONS
from search_choices import ENGINE_HELP, ENGINES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CIRR checkpoint written by train_cirr.py")
    parser.add_argument("--submission_name", required=True, help="files are named recall_submission_<name>.json etc.")
    parser.add_argument("--data_root", default=None, help="dataset folder; None: the --data_root of the training run")
    parser.add_argument("--output_dir", default=None, help="None: <run>/submission")
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoding batch")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu; None: cuda if available")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=EVAL_PRECISION_HELP)
    parser.add_argument("--retrieval_engine", choices=ENGINES, default="auto", help=ENGINE_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    args = build_parser().parse_args(argv)
    utils.setup_logging(None)
    # Imported after parsing: --help needs neither torch nor open_clip.
    from inference import write_test_outputs
    from retrieval import use_engine

    with use_engine(args.retrieval_engine):
        recall_path, subset_path = write_test_outputs(
            args.checkpoint, args.submission_name, dataset="cirr", data_root=args.data_root,
            output_dir=args.output_dir, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
            precision=args.precision,
        )
    return recall_path, subset_path


if __name__ == "__main__":
    utils.run_cli(main)
