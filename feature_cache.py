"""On-disk cache of gallery features, so that validation and submission encode a gallery once per checkpoint.

An entry is keyed by the checkpoint's identity (a hash of the file's bytes, so a retrained or copied
checkpoint is recognised by content, not by path), the dataset split, a hash of the ordered image name
list and the retrieval method, plus any extra settings that change the features (precision,
preprocessing) and, for the galleries of :func:`checkpoint_gallery_encoder` and :class:`FolderGalleryCache`,
the identity of the image files themselves (:func:`file_list_identity`): an image replaced on disk gives
another key.  Entries are written atomically (:func:`utils.atomic_write_bytes`) and sealed with a content
checksum (:func:`checkpoint.sealed_bytes`): an interrupted run never leaves a truncated file behind,
concurrent writers of the same key leave one complete entry, and an entry damaged on disk is noticed,
logged and encoded again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from checkpoint import CheckpointError, read_sealed, sealed_bytes
from dataset_registry import RetrievalTask
from utils import atomic_write_bytes

_logger = logging.getLogger("cir.feature_cache")
_HASH_BLOCK = 1 << 20
CACHE_FORMAT_VERSION = 2  # 2: sealed entries; galleries keyed by their files' identity


def checkpoint_identity(checkpoint_path: str | os.PathLike) -> str:
    """SHA-256 of the checkpoint file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(checkpoint_path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_list_identity(files: Sequence[str | os.PathLike]) -> str:
    """Hash of every file's resolved path, size, modification time, status-change time and inode.

    Rewriting a file in place changes its status-change time (ctime), which no program can set back
    (``os.utime`` restores only the modification time), and replacing it by another file (a copy, a
    rename, a fresh download) changes its inode: either gives another identity, even for a same-sized
    file whose modification time was preserved.  No byte is read, so a cache hit costs one ``stat`` per
    image rather than reading the gallery.  (A change of ownership or permissions also changes the
    ctime: the features are then encoded again, needlessly but safely.)

    Raises:
        FileNotFoundError: a file does not exist.
    """
    identities = []
    for path in files:
        stat = Path(path).stat()
        identities.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
    return hashlib.sha256(json.dumps(identities).encode()).hexdigest()


def cache_key(
    checkpoint_id: str, split: str, names: Sequence[str], method: str, extra: Mapping[str, str] | None = None
) -> str:
    """Hex key of one gallery encoding; any change of its inputs gives another key."""
    fields = {
        "version": CACHE_FORMAT_VERSION,
        "checkpoint": checkpoint_id,
        "split": split,
        "names": hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest(),
        "method": method,
        "extra": dict(sorted((extra or {}).items())),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cached_gallery_features(
    cache_dir: str | os.PathLike,
    checkpoint_id: str,
    split: str,
    names: Sequence[str],
    method: str,
    compute: Callable[[], Tensor],
    extra: Mapping[str, str] | None = None,
) -> Tensor:
    """Gallery features [G, D] (row i for ``names[i]``) from the cache, or from ``compute()`` (then stored).

    Args:
        cache_dir: folder of the cache (created if missing).
        checkpoint_id: identity of the weights, e.g. :func:`checkpoint_identity` of the checkpoint file.
        split: task and split, e.g. ``"cirr/val"`` or ``"dress/val"``.
        names: the gallery image names in feature order (``RetrievalTask.gallery``).
        method: retrieval method (``"ssn"``, ``"image"``, ...).
        compute: encodes the gallery in the order of ``names``.
        extra: other settings the features depend on (precision, transform), as strings.

    Raises:
        ValueError: ``compute`` returned another number of rows than there are names.
    """
    names = list(names)
    path = Path(cache_dir) / f"gallery_{cache_key(checkpoint_id, split, names, method, extra)}.pt"
    if path.is_file():
        try:
            entry, sealed = read_sealed(path, CheckpointError, "feature cache entry")
        except (CheckpointError, OSError) as error:  # a cache is rebuilt, never trusted or fatal when damaged
            _logger.warning("%s; re-encoding the gallery", error)
        else:
            if (sealed and isinstance(entry, dict) and entry.get("format_version") == CACHE_FORMAT_VERSION
                    and entry.get("names") == names and len(entry.get("features", ())) == len(names)):
                _logger.info("gallery features for %s (%s) loaded from cache %s", split, method, path)
                return entry["features"]
            _logger.warning("feature cache entry %s is unsealed or holds another gallery; re-encoding", path)
    features = compute()
    if features.shape[0] != len(names):
        raise ValueError(f"compute() returned {features.shape[0]} feature rows for the {len(names)} gallery names of {split}")
    entry = {"format_version": CACHE_FORMAT_VERSION, "names": names, "features": features.detach().cpu().contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, sealed_bytes(entry))
    _logger.info("gallery features for %s (%s) computed and cached in %s", split, method, path)
    return features


def checkpoint_gallery_encoder(
    checkpoint_path: str | os.PathLike, cache_dir: str | os.PathLike, settings: Mapping[str, str],
) -> Callable[[RetrievalTask, str, Callable[[], Tensor]], Tensor]:
    """A ``gallery_encoder`` for :func:`evaluation.evaluate`: galleries of a fixed checkpoint, cached.

    The checkpoint is hashed once; each task is keyed by ``<task name>/<split>`` (e.g. ``cirr/val``,
    ``dress/val``), its gallery names and the method, plus ``settings`` (precision, preprocessing) and
    the identity of the gallery's image files (:func:`file_list_identity`, taken at each call).
    """
    identity = checkpoint_identity(checkpoint_path)

    def encode(task: RetrievalTask, method: str, compute: Callable[[], Tensor]) -> Tensor:
        files = file_list_identity([task.image_path(name) for name in task.gallery])
        return cached_gallery_features(cache_dir, identity, f"{task.name}/{task.split}", task.gallery, method, compute,
                                       {**settings, "files": files})

    return encode


class FolderGalleryCache:
    """A ``gallery_encoder`` for a folder of images (:func:`dataset_registry.folder_task`), shared by
    ``retrieve.py`` and the retrieval page so that either finds the other's entries.

    An entry is keyed by the checkpoint's content, the folder's resolved path (as the split), the image
    names relative to that folder (resolved, so ``photos`` and its absolute path share entries and a
    symlink counts by its target), the method, ``settings`` (precision, preprocessing) and the identity of
    the folder's files (:func:`file_list_identity`).  The identity is taken once per instance, at its first
    use, so that every method of one load (the page encodes the gallery once for its three baselines) is
    keyed by the files it read: one instance serves one load.
    """

    def __init__(self, checkpoint_path: str | os.PathLike, gallery_dir: str | os.PathLike,
                 cache_dir: str | os.PathLike, settings: Mapping[str, str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.checkpoint_id = checkpoint_identity(checkpoint_path)
        self.folder = str(Path(gallery_dir).resolve())
        self.settings = dict(settings)
        self._inputs: dict[tuple[str, ...], tuple[list[str], dict[str, str]]] = {}  # gallery -> (names, extra)

    def _key_inputs(self, task: RetrievalTask) -> tuple[list[str], dict[str, str]]:
        gallery = tuple(task.gallery)
        if gallery not in self._inputs:
            names = [os.path.relpath(Path(name).resolve(), self.folder) for name in gallery]
            self._inputs[gallery] = names, {"files": file_list_identity([Path(n) for n in gallery]), **self.settings}
        return self._inputs[gallery]

    def key(self, task: RetrievalTask, method: str) -> str:
        """The entry's key (:func:`cache_key`): files kept beside it (an ANN index) follow the same inputs."""
        names, extra = self._key_inputs(task)
        return cache_key(self.checkpoint_id, self.folder, names, method, extra)

    def __call__(self, task: RetrievalTask, method: str, compute: Callable[[], Tensor]) -> Tensor:
        """Gallery features [G, D] of ``task`` (rows in ``task.gallery`` order) from the cache, or from
        ``compute()`` (then stored)."""
        names, extra = self._key_inputs(task)
        return cached_gallery_features(self.cache_dir, self.checkpoint_id, self.folder, names, method, compute, extra)
