"""One trained model and one gallery, answering composed queries one at a time: what ``app.py`` serves.

A query is a reference image file and a modification text T.  :meth:`RetrievalEngine.search` ranks the
gallery for it with every retrieval method of :mod:`model.retrievers` (SSN and the image-only /
text-only / sum baselines), through the same :class:`evaluation.ModelRetrieval` and
:func:`retrieval.topk_retrieval` as validation, so a query of the validation split gets the ranking the
metrics counted.  Scores are cosine similarities ``<q, g>`` of the L2-normalised query feature q [D] and
gallery features g [G, D].  It also returns SSN's per-word upgradation weight ``s_t`` of T
(:func:`viz.examples.word_selection`).

The gallery is either a dataset split the checkpoint knows (its validation gallery, with the split's
queries as examples and their ground truths) or a folder of images (as ``retrieve.py``).  Gallery
features come from the on-disk cache (:mod:`feature_cache`): a dataset split shares the entries of
``validate.py`` / ``demo.py`` in ``<run>/feature_cache``, a folder those of ``retrieve.py``.

As CIRR evaluation does, the reference image is left out of its own results when it lies in the
gallery.  An uploaded image has no gallery name, so "lies in the gallery" means: a gallery file with
the same bytes (:meth:`RetrievalEngine.reference_index`).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data_utils import DataError, load_image
from dataset_registry import Query, RetrievalTask, folder_task, get_dataset, resolve_dataset_root
from evaluation import ModelRetrieval
from feature_cache import FolderGalleryCache, checkpoint_gallery_encoder
from inference import TrainedModel, load_trained_model, preprocessing_settings, run_directory
from model import RETRIEVAL_METHODS
from precision import effective_precision
from retrieval import topk_retrieval
from search_choices import FOLDER_CACHE_DIR
from viz.examples import target_ranks, word_selection

__all__ = ["METHOD_LABELS", "Hit", "SearchResult", "QueryError", "dataset_task",
           "RetrievalEngine"]

METHOD_LABELS = {"ssn": "SSN", "image": "image only", "text": "text only", "sum": "image + text sum"}


class QueryError(ValueError):
    """A query the engine cannot answer (no image, empty text, unreadable image); the message says why."""


@dataclass(frozen=True)
class Hit:
    """One retrieved gallery image."""

    name: str  # the gallery name (dataset image name, or the file's path for a folder)
    path: Path
    score: float  # cosine similarity <q, g>


@dataclass
class SearchResult:
    """The answer to one query, for every retrieval method."""

    rankings: dict[str, list[Hit]]  # method -> top-k, best first
    words: list[tuple[str, float]]  # the text's words with SSN's s_t (1 = upgradation, 0 = degradation)
    excluded: str | None  # gallery name left out as the reference itself
    target: str | None = None  # the ground truth, when the query is one of the gallery's known queries
    target_ranks: dict[str, int] | None = None  # method -> 1-based rank of the target in the full ranking


def dataset_task(trained: TrainedModel, data_root: str | os.PathLike | None = None,
                 task_name: str | None = None) -> RetrievalTask:
    """The validation gallery and queries of the dataset ``trained`` was trained on.

    ``data_root`` defaults to the one recorded in the checkpoint; ``task_name`` picks one of several
    tasks (a FashionIQ category; default: the first the run trained on).

    Raises:
        DataError: no data root recorded or given, or the dataset is not there.
    """
    root = data_root or trained.train_args.get("data_root")
    if not root:
        raise DataError("the checkpoint records no data_root: pass --data_root or --gallery_dir")
    spec = get_dataset(trained.dataset)
    try:
        tasks = spec.tasks(resolve_dataset_root(root, spec.name), spec.val_split, trained.train_args.get("dress_types"))
    except FileNotFoundError as error:
        raise DataError(f"{root}: {spec.name} {spec.val_split} data not found ({error}); pass --data_root or "
                        f"--gallery_dir") from None
    if task_name is None:
        return tasks[0]
    for task in tasks:
        if task.name == task_name:
            return task
    raise DataError(f"{root}: no task {task_name!r} in {spec.name} {spec.val_split}; choose from "
                    f"{[t.name for t in tasks]}")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RetrievalEngine:
    """Answers composed queries against one gallery with a trained model (see the module docstring).

    Args:
        trained: the model, its preprocessing and its training arguments.
        task: the gallery (and, for a dataset split, its known queries).
        gallery_features: method name -> normalised gallery features [G, D], rows in ``task.gallery`` order.
        device, precision: where and how queries are encoded.
        description: one line saying what is served (checkpoint, gallery).
    """

    def __init__(self, trained: TrainedModel, task: RetrievalTask, gallery_features: Mapping[str, Tensor],
                 device: torch.device, precision: str = "fp32", description: str = "") -> None:
        for method, features in gallery_features.items():
            if features.shape[0] != len(task.gallery):
                raise ValueError(f"{method}: {features.shape[0]} gallery features for {len(task.gallery)} images")
        self.trained = trained
        self.task = task
        self.gallery_features = dict(gallery_features)
        self.methods = tuple(gallery_features)
        self.device = device
        self.precision = precision
        self.description = description
        self.paths = [Path(task.image_path(name)) for name in task.gallery]
        self._by_size: dict[int, list[int]] = defaultdict(list)  # file size -> gallery indices
        for index, path in enumerate(self.paths):
            self._by_size[path.stat().st_size].append(index)
        self._known = {(q.reference, q.caption.strip()): q.target for q in task.queries if q.target}
        self._name_index = {name: i for i, name in enumerate(task.gallery)}

    @classmethod
    def open(
        cls, checkpoint: str | os.PathLike, gallery_dir: str | os.PathLike | None = None,
        data_root: str | os.PathLike | None = None, task_name: str | None = None,
        cache_dir: str | os.PathLike | None = None, methods: Sequence[str] = RETRIEVAL_METHODS,
        device: str | torch.device | None = None, precision: str = "fp32", batch_size: int = 64,
    ) -> RetrievalEngine:
        """Load a training checkpoint and its gallery; gallery features from the cache or encoded (then cached).

        Without ``gallery_dir`` the gallery is the checkpoint's validation split (:func:`dataset_task`),
        cached in ``<run>/feature_cache`` as by ``validate.py``; a folder is cached in ``cache_dir``
        (default :data:`search_choices.FOLDER_CACHE_DIR`) as by ``retrieve.py``.  ``device`` None: CUDA when available.

        Raises:
            CheckpointError, CheckpointMismatchError: not a usable training checkpoint.
            DataError: the gallery is missing or empty.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = effective_precision(precision, device)
        trained = load_trained_model(checkpoint, device)
        settings = preprocessing_settings(trained, precision)
        if gallery_dir is None:
            task = dataset_task(trained, data_root, task_name)
            encode = checkpoint_gallery_encoder(checkpoint, run_directory(checkpoint) / "feature_cache", settings)
            where = f"{task.dataset} {task.split}" + (f" ({task.name})" if task.name != task.dataset else "")
        else:
            task = folder_task(gallery_dir)
            encode = FolderGalleryCache(checkpoint, gallery_dir, cache_dir or FOLDER_CACHE_DIR, settings)
            where = str(gallery_dir)
        features: dict[str, Tensor] = {}
        computed: dict[object, Tensor] = {}  # the baselines share one gallery encoding: encode it once
        for name in methods:
            method = ModelRetrieval(trained.model, name, trained.transform, device, precision, batch_size)
            encoder = type(method.retriever).encode_gallery

            def compute(method: ModelRetrieval = method, encoder: object = encoder) -> Tensor:
                if encoder not in computed:
                    computed[encoder] = method.encode_gallery(task)
                return computed[encoder]

            features[name] = encode(task, name, compute)
        model_name = trained.train_args.get("clip_model_name", "?")
        description = (f"checkpoint {checkpoint} ({trained.dataset}, {model_name}); gallery {where}: "
                       f"{len(task.gallery)} images")
        return cls(trained, task, features, device, precision, description)

    # ------------------------------------------------------------------------------------------ queries
    def examples(self, count: int) -> list[Query]:
        """Up to ``count`` example queries spread over the gallery's known queries, in query order.

        A folder has no queries: its examples are gallery images with an empty text.
        """
        if count < 1:
            return []
        if self.task.queries:
            pool = self.task.queries
        else:
            pool = [Query(str(i), name, "") for i, name in enumerate(self.task.gallery)]
        picks = np.unique(np.linspace(0, len(pool) - 1, min(count, len(pool))).round().astype(int))
        return [pool[i] for i in picks]

    def image_path(self, name: str) -> Path:
        """File of a gallery or reference image name."""
        return Path(self.task.image_path(name))

    def reference_index(self, reference: str | os.PathLike) -> int | None:
        """Gallery index of a file with the same bytes as ``reference`` (the lowest such index), or None."""
        reference = Path(reference)
        candidates = self._by_size.get(reference.stat().st_size, [])
        if not candidates:
            return None
        digest = _file_digest(reference)
        return next((i for i in candidates if _file_digest(self.paths[i]) == digest), None)

    def search(self, reference: str | os.PathLike | None, text: str | None, top_k: int = 5,
               exclude_reference: bool = True) -> SearchResult:
        """Rank the gallery for (reference image file, modification text) with every method.

        Args:
            reference: the reference image file (any image PIL reads).
            text: the modification text T.
            top_k: results per method (fewer when the gallery is smaller).
            exclude_reference: leave the reference out of its own results when the gallery holds it.

        Raises:
            QueryError: no reference, an unreadable one, an empty text or top_k < 1.
        """
        if reference is None or not str(reference):
            raise QueryError("pick or upload a reference image")
        text = (text or "").strip()
        if not text:
            raise QueryError("type the modification (what should change in the reference image)")
        if top_k < 1:
            raise QueryError(f"top-k must be at least 1, got {top_k}")
        try:
            image = load_image(reference)
        except DataError as error:
            raise QueryError(str(error)) from None
        index = self.reference_index(reference)
        excluded = index if exclude_reference and index is not None else None
        exclude = None if excluded is None else torch.tensor([excluded])
        # A one-query task through the evaluation code: the same features validation ranks.
        reference_name = self.task.gallery[index] if index is not None else str(reference)
        paths = {reference_name: Path(reference)}
        task = RetrievalTask("query", self.task.dataset, self.task.split, self.task.root, self.task.gallery,
                             [Query("0", reference_name, text)],
                             image_path=lambda name: paths.get(name) or self.image_path(name), annotations=[])
        target = self._known.get((reference_name, text))
        rankings: dict[str, list[Hit]] = {}
        ranks: dict[str, int] = {}
        for name in self.methods:
            method = ModelRetrieval(self.trained.model, name, self.trained.transform, self.device, self.precision)
            features = method.encode_queries(task)  # [1, D]
            gallery = self.gallery_features[name]
            scores, indices = topk_retrieval(features, gallery, top_k, exclude)
            top = indices[0].tolist()
            rankings[name] = [Hit(self.task.gallery[i], self.paths[i], s) for i, s in zip(top, scores[0].tolist())]
            if target is not None:
                target_index = self._name_index[target]
                rank = int(target_ranks(features, gallery, torch.tensor([target_index]), exclude)[0])
                # As the validation grids: the shown list decides within the top-k (the two matmuls may round apart).
                ranks[name] = top.index(target_index) + 1 if target_index in top else max(rank, len(top) + 1)
        words = word_selection(self.trained.model, self.trained.transform(image)[None], [text])[0]
        return SearchResult(rankings, words, None if excluded is None else self.task.gallery[excluded], target,
                            ranks if target is not None else None)
