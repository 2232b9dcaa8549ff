"""When a run validates (the official schedule plus the last epoch), and what it measures then."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from dataset_registry import DatasetSpec, RetrievalTask
from evaluation import ModelRetrieval, evaluate
from model import SSNModel


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
) -> dict[str, float]:
    """The dataset's validation figures of SSN retrieval with ``model`` (:func:`evaluation.evaluate`), its
    images read with the training ``transform``."""
    method = ModelRetrieval(model, "ssn", transform, device, precision, batch_size, num_workers)
    return evaluate(method, tasks, spec)
