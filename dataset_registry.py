"""The dataset registry: everything the project knows about a benchmark, in one entry per dataset.

A :class:`DatasetSpec` names a benchmark's folder, its categories, its training triplets, its
retrieval tasks (:class:`RetrievalTask`: queries ranked against one gallery), how a task is scored and
how the scores are summarised, which metric picks the best checkpoint, how test rankings are written
and the official training recipe.  Training, evaluation, validation, submissions, the run report and
CVSI read these entries instead of branching on the dataset's name.

Adding a dataset is one reader in :mod:`data_utils` plus one :func:`register_dataset` call here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

# The readers, metrics and writers (torch, open_clip's constants) are imported inside the entries' functions:
# the training scripts build their parsers from this registry, and `--help` should not wait for torch.

__all__ = [
    "Query",
    "RetrievalTask",
    "DatasetSpec",
    "DATASETS",
    "register_dataset",
    "get_dataset",
    "resolve_dataset_root",
    "folder_task",
    "FIQ_CATEGORIES",
]

FIQ_CATEGORIES = ("dress", "shirt", "toptee")


@dataclass(frozen=True)
class Query:
    """One composed query: a reference image, a modification text and what is known of its targets.

    ``target`` is '' where the split has no ground truth (test).  ``gt``: every ground truth (CIRCO);
    ``aspects``: CIRCO's semantic aspects; ``members``: CIRR's image set (the subset ranking's candidates).
    Sequences are stored as tuples.
    """

    query_id: str
    reference: str
    caption: str
    target: str = ""
    gt: tuple[str, ...] = ()
    aspects: tuple[str, ...] = ()
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("gt", "aspects", "members"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass
class RetrievalTask:
    """Queries ranked against one gallery: CIRR or CIRCO, or one FashionIQ category.

    Attributes:
        name: 'cirr', 'circo' or the FashionIQ category (also the name of its files and cache entries).
        dataset, split: the registry name and the split the task was read from.
        root: the dataset folder.
        gallery: the gallery's image names, in the order of the features ranked against them.
        queries: the queries, in file order.
        image_path: file of a gallery or reference image name.
        annotations: the raw annotation entries (submission checks need them).
    """

    name: str
    dataset: str
    split: str
    root: Path
    gallery: list[str]
    queries: list[Query]
    image_path: Callable[[str], Path]
    annotations: list[dict]


def folder_task(directory: str | os.PathLike, queries: Sequence[Query] = ()) -> RetrievalTask:
    """A folder of images (searched recursively) as a gallery, with ``queries`` against it (none by
    default); the gallery's names are the files' paths, so a query's reference may be any image path.

    Raises:
        DataError: the folder is missing or holds no image file.
    """
    from data_utils import list_gallery_images

    files = list_gallery_images(directory)
    return RetrievalTask("folder", "folder", "", Path(directory), [str(f) for f in files], list(queries),
                         image_path=Path, annotations=[])


TaskReader = Callable[..., list[RetrievalTask]]  # (root, split, categories=None) -> tasks
TaskMetrics = Callable[[RetrievalTask, "Tensor", "Tensor"], dict[str, float]]
TestWriter = Callable[[RetrievalTask, "Tensor", "Tensor", Path, str], list[Path]]


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark, as the rest of the project sees it.

    Attributes:
        name: registry key ('cirr', 'fashioniq', 'circo'); ``title`` its display name; ``aliases`` other
            accepted spellings (matched case-insensitively, ignoring '-' and '_').
        folder, marker: the dataset is at ``<root>`` or ``<root>/<folder>``, recognised by ``<marker>/``.
        categories: FashionIQ's garment categories (one task each); () for the others.
        train_dataset: ``(root, transform, categories=None)`` -> training triplets; None if there are none.
        tasks: ``(root, split, categories=None)`` -> the split's retrieval tasks.
        task_metrics: ``(task, q [Q, D], g [G, D])`` -> the task's metrics (normalised features, row i of
            g is ``task.gallery[i]``).
        summarize: per-task metrics ``{task.name: metrics}`` -> the dataset's figures.
        selection_criteria: metrics a run may pick its best checkpoint by (``--best_metric``); the first
            is the default (:attr:`best_metric`).
        criterion_files: checkpoint file kept per criterion besides ``best.pt`` (CIRR's official trio).
        write_test_outputs: ``(task, q, g, output_dir, name)`` -> files written (submissions, rankings).
        train_defaults: the official recipe's hyper-parameters that differ between datasets.
        val_split, test_split: split names on disk.
        exclude_reference: the reference image is removed from its own ranking (CIRR).
        identifying_metrics: metric keys only this dataset's summaries hold (tells a run report which
            published numbers compare).
    """

    name: str
    title: str
    folder: str
    marker: str
    tasks: TaskReader
    task_metrics: TaskMetrics
    summarize: Callable[[Mapping[str, Mapping[str, float]]], dict[str, float]]
    selection_criteria: tuple[str, ...]
    write_test_outputs: TestWriter
    val_split: str
    test_split: str
    identifying_metrics: tuple[str, ...]
    train_dataset: Callable[..., Dataset] | None = None
    categories: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    criterion_files: Mapping[str, str] = field(default_factory=dict)
    train_defaults: Mapping[str, Any] = field(default_factory=dict)
    exclude_reference: bool = False

    def __post_init__(self) -> None:
        if not self.selection_criteria:
            raise ValueError(f"dataset {self.name!r}: selection_criteria must name at least one metric")
        unknown = sorted(set(self.criterion_files) - set(self.selection_criteria))
        if unknown:
            raise ValueError(f"dataset {self.name!r}: criterion_files for unknown criteria {unknown}")
        # Read-only views: a spec is shared by every caller.
        object.__setattr__(self, "criterion_files", MappingProxyType(dict(self.criterion_files)))
        object.__setattr__(self, "train_defaults", MappingProxyType(dict(self.train_defaults)))

    @property
    def best_metric(self) -> str:
        """The default checkpoint-selection metric (CIRR: 'mean' of the 7 recalls)."""
        return self.selection_criteria[0]

    def score(self, metrics: Mapping[str, float], criterion: str | None = None) -> float:
        """The value of ``criterion`` (default :attr:`best_metric`) that picks the best checkpoint."""
        from metrics import selection_value

        return selection_value(metrics, self.selection_criteria, criterion, what=f"{self.name} checkpoint")

    def check_categories(self, categories: Sequence[str] | None) -> tuple[str, ...]:
        """``categories`` (default: all) checked against the dataset's own; () for a dataset without any."""
        if categories is None:
            return self.categories
        if isinstance(categories, str) or not categories:
            raise ValueError(f"categories must be a non-empty sequence of names, got {categories!r}")
        unknown = [c for c in categories if c not in self.categories]
        if unknown:
            raise ValueError(f"{self.title} has no categories {unknown}; it has {list(self.categories) or 'none'}")
        return tuple(categories)


DATASETS: dict[str, DatasetSpec] = {}


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS`; its name and aliases must be new."""
    taken = {_normalise(n): s.name for s in DATASETS.values() for n in (s.name, *s.aliases)}
    for name in (spec.name, *spec.aliases):
        if _normalise(name) in taken:
            raise ValueError(f"dataset name {name!r} is already registered (by {taken[_normalise(name)]!r})")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as ``name`` or one of its aliases ('FashionIQ', 'fiq', 'CIRR', ...)."""
    wanted = _normalise(name)
    for spec in DATASETS.values():
        if wanted in (_normalise(n) for n in (spec.name, *spec.aliases)):
            return spec
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")


def resolve_dataset_root(data_root: str | os.PathLike, dataset: str) -> Path:
    """Accept the dataset folder itself or its parent (e.g. ``.../cirr_dataset`` or ``...``)."""
    spec = get_dataset(dataset)
    root = Path(data_root).expanduser()
    for candidate in (root, root / spec.folder):
        if (candidate / spec.marker).is_dir():
            return candidate
    raise FileNotFoundError(
        f"--data_root {root}: no {spec.name} dataset there (expected {root}/{spec.marker}/ or "
        f"{root}/{spec.folder}/{spec.marker}/)"
    )


def _no_transform(image: Any) -> Any:
    """Tasks list names and paths; the readers' images are never loaded through them."""
    return image


def _single_task(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The metrics of a dataset with one task per split (CIRR, CIRCO)."""
    if len(per_task) != 1:
        raise ValueError(f"expected the metrics of one task, got {sorted(per_task)}")
    return dict(next(iter(per_task.values())))


def _field(task: RetrievalTask, name: str) -> list:
    return [getattr(query, name) for query in task.queries]


# ---------------------------------------------------------------------------------------------- CIRR
def _cirr_tasks(root: str | os.PathLike, split: str, categories: Sequence[str] | None = None) -> list[RetrievalTask]:
    from data_utils import CIRRDataset

    CIRR.check_categories(categories)
    data = CIRRDataset(root, split, "relative", _no_transform)
    queries = [Query(str(t["pairid"]), t["reference"], t["caption"], t.get("target_hard", ""),
                     members=t["img_set"]["members"]) for t in data.triplets]
    return [RetrievalTask("cirr", "cirr", split, Path(root), list(data.image_names), queries, data.image_path,
                          data.triplets)]


def _cirr_metrics(task: RetrievalTask, q: Tensor, g: Tensor) -> dict[str, float]:
    from metrics import cirr_metrics

    return cirr_metrics(q, g, task.gallery, _field(task, "reference"), _field(task, "target"), _field(task, "members"))


def _cirr_test_outputs(task: RetrievalTask, q: Tensor, g: Tensor, output_dir: Path, name: str) -> list[Path]:
    from submission import cirr_submission, write_cirr_submission

    recall, subset = cirr_submission(q, g, task.gallery, _field(task, "reference"), _field(task, "members"),
                                     _field(task, "query_id"))
    return list(write_cirr_submission(output_dir, name, recall, subset, task.annotations))


def _cirr_train(root: str | os.PathLike, transform: Callable, categories: Sequence[str] | None = None) -> Dataset:
    from data_utils import CIRRDataset

    CIRR.check_categories(categories)
    return CIRRDataset(root, "train", "relative", transform)


CIRR = register_dataset(DatasetSpec(
    name="cirr", title="CIRR", folder="cirr_dataset", marker="cirr",
    tasks=_cirr_tasks, task_metrics=_cirr_metrics, summarize=_single_task,
    selection_criteria=("mean", "harmonic_mean", "geometric_mean"),
    criterion_files={"mean": "best_mean.pt", "harmonic_mean": "best_harmonic.pt", "geometric_mean": "best_geometric.pt"},
    write_test_outputs=_cirr_test_outputs, val_split="val", test_split="test1", identifying_metrics=("R@1",),
    train_dataset=_cirr_train, exclude_reference=True,
    train_defaults={"num_epochs": 50, "batch_size": 128, "lr": 5e-5, "lr_step_size": 10, "optimizer": "adam",
                    "freeze_vision_epoch": -1},
))


# ---------------------------------------------------------------------------------------------- FashionIQ
def _fiq_tasks(root: str | os.PathLike, split: str, categories: Sequence[str] | None = None) -> list[RetrievalTask]:
    from data_utils import FashionIQDataset, join_fiq_captions

    tasks = []
    for category in FASHIONIQ.check_categories(categories):
        data = FashionIQDataset(root, split, [category], "relative", _no_transform)
        queries = [Query(f"{category}:{i}", t["candidate"], join_fiq_captions(t["captions"]), t.get("target", ""))
                   for i, t in enumerate(data.triplets)]
        tasks.append(RetrievalTask(category, "fashioniq", split, Path(root), list(data.image_names), queries,
                                   data.image_path, data.triplets))
    return tasks


def _fiq_metrics(task: RetrievalTask, q: Tensor, g: Tensor) -> dict[str, float]:
    from metrics import fiq_metrics

    return fiq_metrics(q, g, task.gallery, _field(task, "target"))


def _fiq_test_outputs(task: RetrievalTask, q: Tensor, g: Tensor, output_dir: Path, name: str) -> list[Path]:
    from retrieval import ranked_names
    from submission import FIQ_RANKING_LENGTH, write_fiq_rankings

    ranked = ranked_names(q, g, task.gallery, FIQ_RANKING_LENGTH)
    return [write_fiq_rankings(output_dir, task.name, name, _field(task, "query_id"), ranked)]


def _fiq_train(root: str | os.PathLike, transform: Callable, categories: Sequence[str] | None = None) -> Dataset:
    from data_utils import FashionIQDataset

    return FashionIQDataset(root, "train", list(FASHIONIQ.check_categories(categories)), "relative", transform)


def _fiq_summary(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    from metrics import summarize_fiq

    return summarize_fiq(per_task)


FASHIONIQ = register_dataset(DatasetSpec(
    name="fashioniq", title="FashionIQ", folder="fashion-iq", marker="captions", aliases=("fiq",),
    categories=FIQ_CATEGORIES, tasks=_fiq_tasks, task_metrics=_fiq_metrics, summarize=_fiq_summary,
    selection_criteria=("mean",), write_test_outputs=_fiq_test_outputs, val_split="val", test_split="test",
    identifying_metrics=("avg_R@10",), train_dataset=_fiq_train,
    train_defaults={"num_epochs": 100, "batch_size": 384, "lr": 4e-5, "lr_step_size": 5, "optimizer": "adamw",
                    "freeze_vision_epoch": 1},
))


# ---------------------------------------------------------------------------------------------- CIRCO
def _circo_tasks(root: str | os.PathLike, split: str, categories: Sequence[str] | None = None) -> list[RetrievalTask]:
    from data_utils import CIRCODataset

    CIRCO.check_categories(categories)
    data = CIRCODataset(root, split, "relative", _no_transform)
    queries = [Query(str(q["id"]), str(q["reference_img_id"]), q["relative_caption"], str(q.get("target_img_id", "")),
                     gt=[str(i) for i in q.get("gt_img_ids", [])], aspects=q.get("semantic_aspects", []))
               for q in data.triplets]
    return [RetrievalTask("circo", "circo", split, Path(root), list(data.image_names), queries, data.image_path,
                          data.triplets)]


def _circo_metrics(task: RetrievalTask, q: Tensor, g: Tensor) -> dict[str, float]:
    from metrics import circo_metrics
    from retrieval import ranked_names
    from submission import CIRCO_SUBMISSION_LENGTH

    ranked = ranked_names(q, g, task.gallery, CIRCO_SUBMISSION_LENGTH)
    return circo_metrics(ranked, _field(task, "gt"), _field(task, "target"), _field(task, "aspects"))


def _circo_test_outputs(task: RetrievalTask, q: Tensor, g: Tensor, output_dir: Path, name: str) -> list[Path]:
    from retrieval import ranked_names
    from submission import CIRCO_SUBMISSION_LENGTH, write_circo_submission

    ranked = ranked_names(q, g, task.gallery, CIRCO_SUBMISSION_LENGTH)
    return [write_circo_submission(output_dir, name, ranked, [int(i) for i in _field(task, "query_id")],
                                   len(task.gallery))]


CIRCO = register_dataset(DatasetSpec(
    name="circo", title="CIRCO", folder="CIRCO", marker="annotations",
    tasks=_circo_tasks, task_metrics=_circo_metrics, summarize=_single_task, selection_criteria=("mAP@10",),
    write_test_outputs=_circo_test_outputs, val_split="val", test_split="test", identifying_metrics=("mAP@10",),
))
