"""On-disk cache of gallery features, so that validation and submission encode a gallery once per checkpoint.

An entry is keyed by the checkpoint's identity (a hash of the file's bytes, so a retrained or copied
checkpoint is recognised by content, not by path), the dataset split, a hash of the ordered image name
list and the retrieval method, plus any extra settings that change the features (precision,
preprocessing).  Entries are written atomically (:func:`utils.atomic_write_bytes`): an interrupted run
never leaves a truncated file behind, and concurrent writers of the same key leave one complete entry.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dataset_registry import RetrievalTask
from utils import atomic_write_bytes

_logger = logging.getLogger("cir.feature_cache")
_HASH_BLOCK = 1 << 20
CACHE_FORMAT_VERSION = 1


def checkpoint_identity(checkpoint_path: str | os.PathLike) -> str:
    """SHA-256 of the checkpoint file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(checkpoint_path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_list_identity(files: Sequence[Path]) -> str:
    """Hash of every file's resolved path, size and modification time: a rewritten image changes it."""
    identities = []
    for path in files:
        stat = Path(path).stat()
        identities.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
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
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            _logger.warning("%s: unreadable feature cache entry (%s); re-encoding", path, error)
        else:
            if isinstance(entry, dict) and entry.get("names") == names and len(entry.get("features", ())) == len(names):
                _logger.info("gallery features for %s (%s) loaded from cache %s", split, method, path)
                return entry["features"]
            _logger.warning("cache entry %s holds another gallery; re-encoding", path)
    features = compute()
    if features.shape[0] != len(names):
        raise ValueError(f"compute() returned {features.shape[0]} feature rows for the {len(names)} gallery names of {split}")
    buffer = io.BytesIO()
    torch.save({"names": names, "features": features.detach().cpu().contiguous()}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    _logger.info("gallery features for %s (%s) computed and cached in %s", split, method, path)
    return features


def checkpoint_gallery_encoder(
    checkpoint_path: str | os.PathLike, cache_dir: str | os.PathLike, settings: Mapping[str, str],
) -> Callable[[RetrievalTask, str, Callable[[], Tensor]], Tensor]:
    """A ``gallery_encoder`` for :func:`evaluation.evaluate`: galleries of a fixed checkpoint, cached.

    The checkpoint is hashed once; each task is keyed by ``<task name>/<split>`` (e.g. ``cirr/val``,
    ``dress/val``), its gallery names and the method, plus ``settings`` (precision, preprocessing).
    """
    identity = checkpoint_identity(checkpoint_path)

    def encode(task: RetrievalTask, method: str, compute: Callable[[], Tensor]) -> Tensor:
        return cached_gallery_features(cache_dir, identity, f"{task.name}/{task.split}", task.gallery, method, compute,
                                       settings)

    return encode
