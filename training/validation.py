"""When a run validates (the official schedule plus the last epoch), and what it measures then."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dataset_registry import DatasetSpec, RetrievalTask
from evaluation import FeatureCallback, ModelRetrieval, evaluate
from model import SSNModel
from tracking import Tracker
from viz.examples import retrieval_examples
from viz.grid import write_retrieval_examples

GRID_QUERIES = 8  # queries per retrieval grid drawn at a validation for the experiment tracker


def validation_due(epoch: int, frequency: int, num_epochs: int) -> bool:
    """Whether to validate after the 0-based ``epoch`` of ``num_epochs``.

    As the official scripts: after epochs 0, f, 2f, ... (``epoch % f == 0``, so the first epoch is
    always validated).  In addition after the last epoch, so that every run ends with measured metrics
    (docs/deviations.md).
    """
    return epoch % frequency == 0 or epoch == num_epochs - 1


def validate_model(
    model: SSNModel, tasks: Sequence[RetrievalTask], spec: DatasetSpec, transform: Callable[[Any], torch.Tensor],
    device: torch.device, precision: str = "fp32", batch_size: int = 64, num_workers: int = 0,
    on_features: FeatureCallback | None = None,
) -> dict[str, float]:
    """The dataset's validation figures of SSN retrieval with ``model`` (:func:`evaluation.evaluate`), its
    images read with the training ``transform``; ``on_features`` sees each task's features (e.g.
    :func:`grid_for_tracker`)."""
    method = ModelRetrieval(model, "ssn", transform, device, precision, batch_size, num_workers)
    return evaluate(method, tasks, spec, on_features=on_features)


def grid_for_tracker(
    model: SSNModel, spec: DatasetSpec, transform: Callable[[Any], torch.Tensor], output_dir: Path, tracker: Tracker,
    step: int, num_queries: int = GRID_QUERIES,
) -> FeatureCallback:
    """Draws each validation task's retrieval grid from the features its metrics used, as
    ``<output_dir>/validation_<task>_grid.png`` (and .html; the run report shows them), and logs the
    picture to ``tracker`` at ``step``."""

    def draw(task: RetrievalTask, gallery: torch.Tensor, queries: torch.Tensor) -> None:
        examples = retrieval_examples(model, task, transform, queries, gallery, num_queries,
                                      exclude_reference=spec.exclude_reference)
        png, _ = write_retrieval_examples(examples, output_dir / "validation.json", task.name,
                                          f"{task.name} {task.split} at step {step}")
        tracker.log_image(png, f"retrieval grid {task.name}", step)

    return draw
