"""One evaluation for every dataset and retrieval method.

:func:`evaluate` ranks each :class:`dataset_registry.RetrievalTask` with a :class:`RetrievalMethod` (anything that
turns a task's gallery and queries into normalised features) and scores it with the dataset's entry of
the registry: ``spec.task_metrics`` per task, ``spec.summarize`` over the tasks.  :class:`ModelRetrieval`
is the method of a trained model and one of its :mod:`model.retrievers` (SSN or a baseline); CVSI
provides its own over its fused features.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

import utils
from data_utils import ImageFiles, load_image, make_loader
from dataset_registry import DatasetSpec, RetrievalTask, get_dataset
from model import SSNModel
from model.retrievers import Retriever, get_retriever
from precision import autocast

__all__ = ["RetrievalMethod", "QueryImages", "gallery_images", "ModelRetrieval", "GalleryEncoder",
           "FeatureCallback", "evaluate"]


class RetrievalMethod(Protocol):
    """A way to rank a task's gallery for its queries: both encoded to L2-normalised features.

    Attributes:
        name: identifies the features (feature-cache keys, result tables), e.g. 'ssn' or 'image'.
    """

    name: str

    def encode_gallery(self, task: RetrievalTask) -> Tensor:
        """[G, D] features, row i for ``task.gallery[i]``."""
        ...

    def encode_queries(self, task: RetrievalTask) -> Tensor:
        """[Q, D] features, row i for ``task.queries[i]``."""
        ...


class QueryImages(Dataset):
    """Items ``{"reference_image", "caption"}`` of a task's queries, in query order."""

    def __init__(self, task: RetrievalTask, transform: Callable[[Any], Tensor]) -> None:
        self.task, self.transform = task, transform

    def __len__(self) -> int:
        return len(self.task.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        query = self.task.queries[index]
        return {"reference_image": self.transform(load_image(self.task.image_path(query.reference))),
                "caption": query.caption}


def gallery_images(task: RetrievalTask, transform: Callable[[Any], Tensor]) -> ImageFiles:
    """Items ``{"name", "image"}`` of a task's gallery, in gallery order."""
    return ImageFiles(task.gallery, [task.image_path(name) for name in task.gallery], transform)


class ModelRetrieval:
    """A :class:`RetrievalMethod` from a model and one of its retrievers (``"ssn"``, ``"image"``, ...).

    Images are read with ``transform`` (the model's preprocessing) in batches of ``batch_size`` by
    ``num_workers`` DataLoader workers; features are computed under ``precision`` autocast on ``device``
    and returned as float32 on the CPU.
    """

    def __init__(
        self, model: SSNModel, retriever: str | Retriever, transform: Callable[[Any], Tensor], device: torch.device,
        precision: str = "fp32", batch_size: int = 64, num_workers: int = 0,
    ) -> None:
        self.model = model
        self.retriever = get_retriever(retriever)
        self.transform = transform
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size = batch_size
        self.num_workers = num_workers

    @property
    def name(self) -> str:
        return self.retriever.name

    @torch.no_grad()
    def encode_gallery(self, task: RetrievalTask) -> Tensor:
        self.model.eval()
        features = []
        loader = make_loader(gallery_images(task, self.transform), self.batch_size, self.num_workers, self.device)
        for batch in utils.progress(loader, f"{task.name} gallery"):
            with autocast(self.precision, self.device):
                images = batch["image"].to(self.device, non_blocking=True)
                features.append(self.retriever.encode_gallery(self.model, images).float().cpu())
        return torch.cat(features)

    @torch.no_grad()
    def encode_queries(self, task: RetrievalTask) -> Tensor:
        self.model.eval()
        features = []
        loader = make_loader(QueryImages(task, self.transform), self.batch_size, self.num_workers, self.device)
        for batch in utils.progress(loader, f"{task.name} queries"):
            token_ids = self.model.backbone.tokenize(batch["caption"]).to(self.device)
            with autocast(self.precision, self.device):
                images = batch["reference_image"].to(self.device, non_blocking=True)
                features.append(self.retriever.encode_query(self.model, images, token_ids).float().cpu())
        return torch.cat(features)


# gallery_encoder(task, method name, compute) -> [G, D]: may replace the encoding (a feature cache calls
# compute() on a miss).  on_features(task, gallery [G, D], queries [Q, D]) sees each task's features.
GalleryEncoder = Callable[[RetrievalTask, str, Callable[[], Tensor]], Tensor]
FeatureCallback = Callable[[RetrievalTask, Tensor, Tensor], None]


def evaluate(
    method: RetrievalMethod,
    tasks: Sequence[RetrievalTask],
    spec: DatasetSpec | str,
    gallery_encoder: GalleryEncoder | None = None,
    on_features: FeatureCallback | None = None,
) -> dict[str, float]:
    """The dataset's figures for ``method`` on ``tasks``: ``spec.summarize({task.name: spec.task_metrics(...)})``.

    CIRR: R@k, Rs@k, Avg and the means of the recalls; FashionIQ: R@10 / R@50 per category, averaged;
    CIRCO: mAP@k and R@k (:mod:`metrics`).  Each task's gallery is encoded first (through
    ``gallery_encoder`` when given), then its queries; ``on_features`` runs after the task is scored.
    """
    spec = get_dataset(spec) if isinstance(spec, str) else spec
    if not tasks:
        raise ValueError(f"no {spec.name} tasks to evaluate")
    per_task: dict[str, dict[str, float]] = {}
    for task in tasks:
        def compute(task: RetrievalTask = task) -> Tensor:
            return method.encode_gallery(task)

        gallery = gallery_encoder(task, method.name, compute) if gallery_encoder else compute()
        queries = method.encode_queries(task)
        if gallery.shape[0] != len(task.gallery) or queries.shape[0] != len(task.queries):
            raise ValueError(f"{method.name} on {task.name}: {gallery.shape[0]} gallery and {queries.shape[0]} query "
                             f"features for {len(task.gallery)} images and {len(task.queries)} queries")
        per_task[task.name] = spec.task_metrics(task, queries, gallery)
        if on_features is not None:
            on_features(task, gallery, queries)
    return spec.summarize(per_task)
