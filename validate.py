"""Validate a saved SSN checkpoint on CIRR val or FashionIQ val.

    python validate.py --checkpoint runs/cirr_x/checkpoints/best.pt [--data_root /data/cirr_dataset] [--baselines] [--visualize 8]

The backbone, head and preprocessing come from the checkpoint; the data path defaults to the one the model
was trained with.  Prints a table and writes it as JSON (default: next to the checkpoint's run).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

import utils
from distributed import init_distributed
from model import RETRIEVAL_METHODS
from precision import EVAL_PRECISION_HELP, PRECISIONS, effective_precision
from feature_cache import checkpoint_gallery_encoder
from training import (
    FIQ_CATEGORIES, FeatureCallback, RetrievalSet, TrainedModel, evaluate, load_trained_model, preprocessing_settings,
    resolve_dataset_root, retrieval_sets, run_directory,
)
from viz.examples import retrieval_examples
from viz.grid import write_retrieval_examples
from viz.report import write_run_report_safely

_logger = logging.getLogger("cir.validate")


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
    return parser


def visualizer(trained: TrainedModel, args: argparse.Namespace, output: Path) -> FeatureCallback:
    """Draws a retrieval grid per set from the features the metrics were computed with."""
    def draw(retrieval_set: RetrievalSet, names: list[str], gallery: torch.Tensor, queries: torch.Tensor, meta: dict) -> None:
        examples = retrieval_examples(
            trained.model, retrieval_set.queries, retrieval_set.gallery, names, queries, gallery, meta, args.visualize,
            exclude_reference=trained.dataset == "cirr",  # as the metrics: CIRR removes the reference, FashionIQ not
        )
        title = f"{retrieval_set.name} val: {Path(args.checkpoint).name} ({trained.train_args.get('clip_model_name', '?')})"
        png, page = write_retrieval_examples(examples, output, retrieval_set.name, title)
        _logger.info("retrieval examples: %s, %s", png, page)

    return draw


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = build_parser().parse_args(argv)
    logger = utils.setup_logging(None)
    device = init_distributed(args.device).device
    precision = effective_precision(args.precision, device)
    trained = load_trained_model(args.checkpoint, device)
    data_root = args.data_root or trained.train_args.get("data_root")
    if not data_root:
        raise ValueError(f"{args.checkpoint} records no data_root: pass --data_root")
    root = resolve_dataset_root(data_root, trained.dataset)
    sets = retrieval_sets(trained.dataset, root, "val", trained.transform, trained.train_args.get("dress_types", FIQ_CATEGORIES))
    methods = RETRIEVAL_METHODS if args.baselines else ("ssn",)
    output = Path(args.output) if args.output else run_directory(args.checkpoint) / "validation.json"
    gallery_encoder = None
    if not args.no_cache:
        gallery_encoder = checkpoint_gallery_encoder(
            args.checkpoint, run_directory(args.checkpoint) / "feature_cache", "val",
            preprocessing_settings(trained, precision),
        )
    draw = visualizer(trained, args, output) if args.visualize > 0 else None
    results = {
        method: evaluate(trained.model, sets, trained.dataset, device, precision, method, args.batch_size,
                         args.num_workers, gallery_encoder, on_features=draw if method == "ssn" else None)
        for method in methods
    }
    utils.atomic_write_json(output, {"checkpoint": str(args.checkpoint), "dataset": trained.dataset, "split": "val", "metrics": results})
    logger.info("%s val, %s:\n%s", trained.dataset, args.checkpoint, utils.metrics_table(results))
    logger.info("metrics written to %s", output)
    report = write_run_report_safely(run_directory(args.checkpoint), device=str(device), validation_json=output)
    if report is not None:
        logger.info("run report written to %s", report)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
