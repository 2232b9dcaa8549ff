"""Write the two CIRR test1 submission files for the evaluation server.

    python cirr_test_submission.py --checkpoint runs/cirr_x/checkpoints/best.pt --submission_name ssn_vitb32

Writes recall_submission_<name>.json (top 50, reference excluded) and recall_subset_submission_<name>.json
(top 3 within the query's image set), after checking them against every test1 query.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import utils
from feature_cache import checkpoint_gallery_encoder
from distributed import init_distributed
from precision import EVAL_PRECISION_HELP, PRECISIONS, effective_precision
from training import (
    encode_gallery, encode_queries, load_trained_model, preprocessing_settings, resolve_dataset_root, retrieval_sets,
    run_directory,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--submission_name", required=True, help="files are named recall_submission_<name>.json etc.")
    parser.add_argument("--data_root", default=None, help="default: the --data_root of the training run")
    parser.add_argument("--output_dir", default=None, help="default: <run>/submission")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=EVAL_PRECISION_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    args = build_parser().parse_args(argv)
    logger = utils.setup_logging(None)
    device = init_distributed(args.device).device
    precision = effective_precision(args.precision, device)
    trained = load_trained_model(args.checkpoint, device)
    if trained.dataset != "cirr":
        raise ValueError(f"{args.checkpoint} was trained on {trained.dataset}, not CIRR")
    data_root = args.data_root or trained.train_args.get("data_root")
    if not data_root:
        raise ValueError(f"{args.checkpoint} records no data_root: pass --data_root")
    (test_set,) = retrieval_sets("cirr", resolve_dataset_root(data_root, "cirr"), "test1", trained.transform)
    encode = checkpoint_gallery_encoder(args.checkpoint, run_directory(args.checkpoint) / "feature_cache", "test1",
                                        preprocessing_settings(trained, precision))
    names, gallery = encode(test_set, "ssn", lambda: encode_gallery(
        trained.model, test_set.gallery, device, precision, "ssn", args.batch_size, args.num_workers))
    queries, meta = encode_queries(trained.model, test_set.queries, device, precision, "ssn", args.batch_size, args.num_workers)
    recall, subset = utils.cirr_submission(queries, gallery, names, meta["reference_name"], meta["members"], meta["pair_id"])
    output_dir = Path(args.output_dir) if args.output_dir else run_directory(args.checkpoint) / "submission"
    paths = utils.write_cirr_submission(output_dir, args.submission_name, recall, subset, test_set.queries.triplets)
    logger.info("CIRR test1 submission (%d queries) written and checked:\n  %s\n  %s", len(queries), *paths)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
