"""A trained SSN checkpoint at work: rebuild it alone, validate it, write its test-split files (CIRR: the
test1 submission).

``validate.py``, ``cirr_test_submission.py``, ``retrieve.py`` and ``demo.py`` use this module; it never
imports the training loop (``training/``).  :func:`load_trained_model` rebuilds the model, its
preprocessing and its dataset from the checkpoint file; :func:`run_directory` finds the run folder a
checkpoint belongs to (where validation JSON, feature caches and submissions go by default).
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import utils
from checkpoint import CheckpointError, load_checkpoint
from data_utils import TRANSFORM_REVISION, build_transform
from dataset_registry import DATASETS, RetrievalTask, get_dataset, resolve_dataset_root
from distributed import init_distributed
from evaluation import FeatureCallback, ModelRetrieval, evaluate
from feature_cache import checkpoint_gallery_encoder
from metrics import metric_legend, metrics_table
from model import RETRIEVAL_METHODS, SSNModel, ssn_model_from_checkpoint
from precision import effective_precision
from viz.examples import retrieval_examples
from viz.grid import write_retrieval_examples
from viz.report import write_run_report_safely

# The datasets a training checkpoint can record (``checkpoint["dataset"]``): those with training triplets.
TRAINED_DATASETS = tuple(name for name, spec in DATASETS.items() if spec.train_dataset is not None)
_logger = logging.getLogger("cir")


@dataclass
class TrainedModel:
    """A model rebuilt from a training checkpoint, with what it was trained on and how images are prepared."""

    model: SSNModel
    dataset: str  # its registry name (dataset_registry.DATASETS)
    train_args: dict[str, Any]  # the run's public flags (checkpoint["args"])
    transform: Any  # PIL image -> [3, H, W] tensor, as in training


def run_directory(checkpoint_path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/x.pt`` -> ``<run>``)."""
    checkpoint = Path(checkpoint_path)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


VALIDATION_DIR = "validation"


def new_validation_dir(checkpoint_path: str | os.PathLike) -> Path:
    """A new folder for one validation: ``<run>/validation/<checkpoint stem>-<NNN>/``, NNN one past the highest.

    Validating again never replaces what training or an earlier validation wrote beside the checkpoint.
    """
    parent = run_directory(checkpoint_path) / VALIDATION_DIR
    stem = Path(checkpoint_path).stem
    taken = [int(p.name.rsplit("-", 1)[1]) for p in parent.glob(f"{stem}-*") if p.name.rsplit("-", 1)[1].isdigit()]
    number = max(taken, default=0) + 1
    while True:
        folder = parent / f"{stem}-{number:03d}"
        try:
            folder.mkdir(parents=True)  # claims the number (a concurrent validation takes the next)
            return folder
        except FileExistsError:
            number += 1


def preprocessing_settings(trained: TrainedModel, precision: str) -> dict[str, str]:
    """What, besides the weights, changes a trained model's gallery features (feature cache keys)."""
    args = trained.train_args
    return {"precision": precision, "transform": str(args.get("transform", "clip")),
            "transform_revision": str(TRANSFORM_REVISION),
            "target_ratio": str(args.get("target_ratio", 1.25)), "image_size": str(trained.model.backbone.image_size)}


def load_trained_model(checkpoint_path: str | os.PathLike, device: torch.device) -> TrainedModel:
    """Rebuild the model, its preprocessing and dataset from a training checkpoint alone.

    Raises:
        CheckpointError: unreadable file, or no training dataset recorded in it.
        CheckpointMismatchError: the weights do not fit the recorded model configuration.
    """
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
    if checkpoint.get("dataset") not in TRAINED_DATASETS:
        raise CheckpointError(f"checkpoint {checkpoint_path}: no training dataset recorded (not written by training)")
    model = ssn_model_from_checkpoint(checkpoint, device=device, source=str(checkpoint_path)).eval()
    train_args = checkpoint.get("args", {})
    transform = build_transform(train_args.get("transform", "clip"), model.backbone.image_size, train_args.get("target_ratio", 1.25))
    return TrainedModel(model, checkpoint["dataset"], train_args, transform)


def _data_root(trained: TrainedModel, checkpoint: str | os.PathLike, data_root: str | None) -> str:
    """``data_root`` if given, else the one the model was trained with."""
    root = data_root or trained.train_args.get("data_root")
    if not root:
        raise utils.UsageError(f"{checkpoint} records no data_root: pass --data_root")
    return root


def _grid_writer(trained: TrainedModel, checkpoint: str | os.PathLike, num_queries: int, output: Path) -> FeatureCallback:
    """Draws a retrieval grid per task (PNG + HTML beside ``output``) from the features the metrics used."""
    spec = get_dataset(trained.dataset)

    def draw(task: RetrievalTask, gallery: torch.Tensor, queries: torch.Tensor) -> None:
        # As the metrics: the reference leaves its own ranking where the dataset says so (CIRR).
        examples = retrieval_examples(trained.model, task, trained.transform, queries, gallery, num_queries,
                                      exclude_reference=spec.exclude_reference)
        title = f"{task.name} {task.split}: {Path(checkpoint).name} ({trained.train_args.get('clip_model_name', '?')})"
        png, page = write_retrieval_examples(examples, output, task.name, title)
        logging.getLogger("cir.validate").info("retrieval examples: %s, %s", png, page)

    return draw


def validate_checkpoint(
    checkpoint: str | os.PathLike, data_root: str | None = None, baselines: bool = False, output: str | None = None,
    batch_size: int = 64, num_workers: int = 0, device: str | None = None, precision: str = "fp32",
    use_cache: bool = True, visualize: int = 0,
) -> dict[str, dict[str, float]]:
    """Validate a checkpoint on its dataset's val split; returns ``{method: metrics}``.

    Scores SSN, and with ``baselines`` every other registered retrieval method (image-only, text-only and
    image+text sum) on the same backbone.  Writes the metrics JSON (default: ``validation.json`` in a new
    folder :func:`new_validation_dir`, so that the run's own files stay as training wrote them), with
    ``visualize`` K > 0 a retrieval grid of K queries beside it, and a ``report.md`` beside it (the run's
    report with this validation added).
    Gallery features are cached in ``<run>/feature_cache`` (keyed by the checkpoint's content) unless
    ``use_cache`` is False.
    """
    device_ = init_distributed(device).device
    precision = effective_precision(precision, device_)
    trained = load_trained_model(checkpoint, device_)
    spec = get_dataset(trained.dataset)
    root = resolve_dataset_root(_data_root(trained, checkpoint, data_root), spec.name)
    # FashionIQ is validated on the categories the run trained on (--dress_types).
    tasks = spec.tasks(root, spec.val_split, trained.train_args.get("dress_types"))
    methods = RETRIEVAL_METHODS if baselines else ("ssn",)
    output_path = Path(output) if output else new_validation_dir(checkpoint) / "validation.json"
    _logger.info("validation outputs go to %s%s", output_path.parent,
                 "" if output else " (a new folder: the run's own files are left as they are)")
    gallery_encoder = None
    if use_cache:
        gallery_encoder = checkpoint_gallery_encoder(checkpoint, run_directory(checkpoint) / "feature_cache",
                                                     preprocessing_settings(trained, precision))
    draw = _grid_writer(trained, checkpoint, visualize, output_path) if visualize > 0 else None
    try:
        results = {
            method: evaluate(ModelRetrieval(trained.model, method, trained.transform, device_, precision, batch_size,
                                            num_workers),
                             tasks, spec, gallery_encoder, on_features=draw if method == "ssn" else None)
            for method in methods
        }
    except BaseException:
        if output is None and not any(output_path.parent.iterdir()):
            output_path.parent.rmdir()  # a failed validation leaves no empty folder behind
        raise
    utils.atomic_write_json(output_path, {"checkpoint": str(checkpoint), "dataset": trained.dataset,
                                          "split": spec.val_split, "metrics": results})
    _logger.info("%s val, %s:\n%s\n%s", trained.dataset, checkpoint, metrics_table(results),
                 metric_legend(next(iter(results.values()))))
    _logger.info("metrics written to %s", output_path)
    report = write_run_report_safely(run_directory(checkpoint), device=str(device_), validation_json=output_path,
                                     report_path=output_path.parent / "report.md")
    if report is not None:
        _logger.info("report written to %s", report)
    return results


def write_test_outputs(
    checkpoint: str | os.PathLike, submission_name: str, dataset: str | None = None, data_root: str | None = None,
    output_dir: str | None = None, batch_size: int = 64, num_workers: int = 0, device: str | None = None,
    precision: str = "fp32",
) -> list[Path]:
    """Write the test-split files of a checkpoint's dataset (its registry entry's ``write_test_outputs``,
    one call per task, with that entry's checks); returns their paths.

    CIRR: ``recall_submission_<name>.json`` (each test1 query's top 50, reference excluded) and
    ``recall_subset_submission_<name>.json`` (its top 3 within the query's image set), checked against
    every test1 query as the evaluation server expects.  The files go to ``output_dir`` (default ``<run>/submission``).

    Args:
        dataset: the dataset the caller expects (a script named for one); None: any.

    Raises:
        UsageError: the checkpoint was trained on another dataset than ``dataset``.
    """
    device_ = init_distributed(device).device
    precision = effective_precision(precision, device_)
    trained = load_trained_model(checkpoint, device_)
    spec = get_dataset(trained.dataset)
    if dataset is not None and spec.name != get_dataset(dataset).name:
        raise utils.UsageError(f"{checkpoint} was trained on {trained.dataset}, not {get_dataset(dataset).title}")
    root = resolve_dataset_root(_data_root(trained, checkpoint, data_root), spec.name)
    method = ModelRetrieval(trained.model, "ssn", trained.transform, device_, precision, batch_size, num_workers)
    encode = checkpoint_gallery_encoder(checkpoint, run_directory(checkpoint) / "feature_cache",
                                        preprocessing_settings(trained, precision))
    directory = Path(output_dir) if output_dir else run_directory(checkpoint) / "submission"
    files: list[Path] = []
    for task in spec.tasks(root, spec.test_split):
        gallery = encode(task, method.name, functools.partial(method.encode_gallery, task))
        written = spec.write_test_outputs(task, method.encode_queries(task), gallery, directory, submission_name)
        label = spec.title if task.name == spec.name else f"{spec.title} {task.name}"
        _logger.info("%s test files (%d queries) written:\n  %s", label, len(task.queries),
                     "\n  ".join(map(str, written)))
        files += written
    return files
