"""The command line of ``train_cirr.py`` / ``train_fiq.py``: flags, per-dataset defaults and their checks.

The flags are the official SSN scripts' plus this project's (resume, precision, speed); the defaults that
differ between datasets are each dataset's official recipe (``DatasetSpec.train_defaults`` in the registry).
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from dataset_registry import get_dataset
from precision import EVAL_PRECISION_HELP, PRECISIONS
from utils import UsageError

# This module imports no torch (nor the loss registry, which does): `train_cirr.py --help` answers at once.

# Default of --max_bad_sample_fraction: a few broken files among thousands stay far below 1 % of the triplets,
# a broken copy of a dataset (wrong files, a half-extracted archive) far above; and a run that skipped more than
# 1 % of its triplets no longer trained on the benchmark's training set.
MAX_BAD_SAMPLE_FRACTION = 0.01


def build_train_parser(dataset: str) -> argparse.ArgumentParser:
    """Flags of train_cirr.py / train_fiq.py; defaults are the official recipe of ``dataset``.

    The dataset's registry entry supplies the recipe (``train_defaults``), its categories (``--dress_types``,
    only for a dataset that has them) and the metrics a best checkpoint may be chosen by (``--best_metric``).
    """
    spec = get_dataset(dataset)
    if spec.train_dataset is None:
        raise ValueError(f"{spec.title} has no training triplets: SSN cannot be trained on it")
    criteria = spec.selection_criteria
    parser = argparse.ArgumentParser(
        description=f"Train SSN on {spec.title}; the defaults are the official recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data_root", required=True, help=f"dataset folder ({spec.folder}) or its parent")
    data.add_argument("--dataset", default=spec.title, help="kept for the official command line; must name this script's dataset")
    data.add_argument("--transform", choices=("clip", "targetpad"), default="clip",
                      help="clip: CLIP's resize + centre crop (official SSN); targetpad: CLIP4Cir's pad to --target_ratio first")
    data.add_argument("--target_ratio", type=float, default=1.25, help="largest aspect ratio --transform targetpad keeps")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    data.add_argument("--skip_bad_samples", action="store_true",
                      help="skip training samples whose image cannot be read (each is logged and listed in "
                           "<output_dir>/bad_samples.json) instead of stopping with an error naming the file")
    data.add_argument("--max_bad_sample_fraction", type=float, default=MAX_BAD_SAMPLE_FRACTION, metavar="F",
                      help="with --skip_bad_samples: stop with an error once more than this fraction of the training "
                           "samples were unreadable (a broken dataset, not a few bad files)")
    if spec.categories:
        data.add_argument("--dress_types", nargs="+", default=list(spec.categories), choices=spec.categories,
                          help="categories to train and validate on")
    mdl = parser.add_argument_group("model")
    mdl.add_argument("--model", default="ssn", choices=("ssn",), help="kept for the official command line")
    mdl.add_argument("--clip_model_name", default="ViT-B-32", help="open_clip model name (e.g. ViT-B-32, ViT-L-14, ViT-Tiny-P8-32)")
    mdl.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or a local checkpoint file; 'none' for random weights. The activation follows the tag "
                     "(QuickGELU for openai); for a local file of OpenAI-style weights use a -quickgelu --clip_model_name. "
                     "Also a Hugging Face CLIP directory (config.json + weights; its config gives the architecture), or a "
                     "checkpoint of this project (e.g. from convert_official_checkpoint.py) to fine-tune its backbone and head")
    mdl.add_argument("--nhead", type=int, default=8, help="attention heads of the fusion layer")
    mdl.add_argument("--projection_dim", type=int, default=None, help="official flag; must equal the backbone's text width if given")
    mdl.add_argument("--hidden_dim", type=int, default=None, help="official flag; must equal the backbone's text width if given")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--num_epochs", type=int, help="epochs to train")
    opt.add_argument("--batch_size", type=int, help="triplets per step and process")
    opt.add_argument("--lr", type=float, help="learning rate of the head (the backbone's: lr·lr_ratio)")
    opt.add_argument("--lr_ratio", type=float, default=0.2, help="backbone lr = lr·ratio (head groups scale from it)")
    opt.add_argument("--lr_step_size", type=int, help="epochs between learning-rate decays (StepLR)")
    opt.add_argument("--lr_gamma", type=float, default=0.1, help="learning-rate decay factor (StepLR)")
    opt.add_argument("--optimizer", choices=("adam", "adamw"), help="optimiser")
    opt.add_argument("--weight_decay", type=float, default=None, help="None: the optimiser's own")
    opt.add_argument("--loss", default="ssn", help="training objective: a name in model/loss.py's LOSSES registry")
    opt.add_argument("--kl_weight", type=float, default=1.0, help="weight of the KL terms of the SSN loss")
    opt.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm; 0 = off (official)")
    opt.add_argument("--freeze_vision_epoch", type=int,
                     help="freeze the vision tower from this epoch on (0-based); -1 = never (FashionIQ recipe: 1)")
    opt.add_argument("--max_nonfinite_steps", type=int, default=10, help="stop after this many consecutive non-finite steps")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default=None, help="None: runs/<dataset>_<timestamp>")
    run.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation, data order and workers")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu; None: cuda if available")
    run.add_argument("--precision", choices=PRECISIONS, default="amp",
                     help="training precision: amp (fp16 + GradScaler) on CUDA, amp_bf16 on CUDA and CPU; "
                          "what does not apply to the device runs fp32 (precision.py)")
    run.add_argument("--eval_precision", choices=PRECISIONS, default="fp32", help=EVAL_PRECISION_HELP)
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --output_dir that holds another run: every output of that run (checkpoints, "
                          "logs, metrics, validation, feature cache, report, submission) is deleted first")
    run.add_argument("--resume", default=None,
                     help="checkpoint to resume from (e.g. <output_dir>/checkpoints/last.pt), also mid-epoch; "
                          "the output directory defaults to the checkpoint's run")
    run.add_argument("--checkpoint_every", type=int, default=0, metavar="N",
                     help="also write checkpoints/last.pt every N optimisation steps (0 = at epoch ends only)")
    run.add_argument("--deterministic", action="store_true",
                     help="torch.use_deterministic_algorithms(True) (and deterministic cuDNN / cuBLAS on CUDA): "
                          "a resumed run then matches an uninterrupted one bit for bit on CPU")
    run.add_argument("--validation_frequency", type=int, default=1,
                     help="validate after 0-based epochs 0, N, 2N, ... (official) and after the last epoch")
    run.add_argument("--eval_batch_size", type=int, default=64, help="images per batch in validation")
    run.add_argument("--save_training", action="store_true", help="official flag: keep a checkpoint per validation (with --save_best: only the best)")
    run.add_argument("--save_best", action="store_true",
                     help="keep checkpoints/best.pt by --best_metric, and the best checkpoint of each official "
                          "selection criterion (CIRR: best_mean.pt, best_harmonic.pt, best_geometric.pt)")
    run.add_argument("--best_metric", choices=criteria, default=criteria[0],
                     help="the validation metric best.pt and summary.json follow (CIRR: mean, harmonic or geometric mean of the "
                          "7 recalls; FashionIQ: mean of avg R@10 and R@50)")
    run.add_argument("--log_every", type=int, default=10, help="log training loss every N steps")
    speed = parser.add_argument_group("speed and memory (docs/performance.md)")
    speed.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the model's training forward; where compilation is unavailable, "
                            "training runs eagerly after a warning")
    speed.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute the backbone's transformer blocks in the backward pass (same gradients, "
                            "about one more forward pass of compute, a fraction of the activation memory): "
                            "what lets ViT-L/14 train at batch 128 on a 24 GB GPU")
    tracking = parser.add_argument_group("experiment tracking (optional; tracking.py)")
    tracking.add_argument("--tensorboard", action="store_true",
                          help="log parameters, losses, validation metrics, retrieval grids and curves as TensorBoard "
                               "events in <output_dir>/tensorboard")
    tracking.add_argument("--comet_offline", action="store_true",
                          help="log the same to a comet_ml offline archive in <output_dir>/comet (no network; "
                               "`comet upload <zip>` sends it later)")
    tracking.add_argument("--api_key", default=None,
                          help="comet_ml API key: with --workspace, log to comet_ml online (never written to the run's "
                               "files nor logged)")
    tracking.add_argument("--workspace", default=None, help="comet_ml workspace")
    tracking.add_argument("--project_name", default="ssn", help="comet_ml project")
    parser.set_defaults(**spec.train_defaults)
    return parser


def parse_train_args(dataset: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a training script's command line; ``--dataset`` must name ``dataset`` (the official flag)."""
    args = build_train_parser(dataset).parse_args(argv)
    try:
        named = get_dataset(args.dataset).name
    except ValueError:
        named = None
    if named != get_dataset(dataset).name:
        raise UsageError(f"--dataset {args.dataset} does not match this script, which trains on {dataset}")
    from model.loss import LOSSES  # after parsing: --help needs no torch

    if args.loss not in LOSSES:
        raise UsageError(f"--loss {args.loss}: unknown; registered losses: {sorted(LOSSES)}")
    return args


def check_train_args(args: argparse.Namespace, distributed: bool) -> None:
    """Flag values no run can start with (before any output is written)."""
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint_every must be >= 0, got {args.checkpoint_every}")
    if args.validation_frequency < 1:
        raise UsageError(f"--validation_frequency must be >= 1, got {args.validation_frequency}")
    if not 0.0 <= args.max_bad_sample_fraction <= 1.0:
        raise UsageError(f"--max_bad_sample_fraction must be in [0, 1], got {args.max_bad_sample_fraction}")
    if args.skip_bad_samples and distributed:
        # A skipped sample shrinks one rank's batch, and the gathered loss needs equal batches on every rank.
        raise UsageError("--skip_bad_samples is single-process only; fix or remove the bad files for torchrun")
