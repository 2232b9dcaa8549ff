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
from typing import Any
from pathlib import Path

import torch
from torch import Tensor

import utils

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
    compute: Callable[[], tuple[Sequence[str], Tensor]],
    extra: Mapping[str, str] | None = None,
) -> tuple[list[str], Tensor]:
    """Gallery ``(names, features [G, D])`` from the cache, or from ``compute()`` (then stored).

    Args:
        cache_dir: folder of the cache (created if missing).
        checkpoint_id: identity of the weights, e.g. :func:`checkpoint_identity` of the checkpoint file.
        split: dataset and split, e.g. ``"cirr/val"`` or ``"fashioniq/dress/val"``.
        names: the gallery image names in dataset order (``dataset.image_names``).
        method: retrieval method (``"ssn"``, ``"image"``, ...).
        compute: encodes the gallery; must return the same names in the same order.
        extra: other settings the features depend on (precision, transform), as strings.

    Raises:
        ValueError: ``compute`` returned other names than ``names`` (the key would be wrong).
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
                return entry["names"], entry["features"]
            _logger.warning("cache entry %s holds another gallery; re-encoding", path)
    computed_names, features = compute()
    if list(computed_names) != names:
        raise ValueError(f"compute() returned {len(computed_names)} names that differ from the {len(names)} expected for {split}")
    buffer = io.BytesIO()
    torch.save({"names": names, "features": features.detach().cpu().contiguous()}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_bytes(path, buffer.getvalue())
    _logger.info("gallery features for %s (%s) computed and cached in %s", split, method, path)
    return names, features


def checkpoint_gallery_encoder(
    checkpoint_path: str | os.PathLike, cache_dir: str | os.PathLike, split: str, settings: Mapping[str, str],
) -> Callable[[Any, str, Callable[[], tuple[Sequence[str], Tensor]]], tuple[list[str], Tensor]]:
    """A ``gallery_encoder`` for :func:`training.evaluate`: galleries of a fixed checkpoint, cached.

    The checkpoint is hashed once; each retrieval set is keyed by ``<dataset>/<set name>/<split>``, its
    image names and the method, plus ``settings`` (precision, preprocessing).
    """
    identity = checkpoint_identity(checkpoint_path)

    def encode(retrieval_set: Any, method: str, compute: Callable[[], tuple[Sequence[str], Tensor]]) -> tuple[list[str], Tensor]:
        return cached_gallery_features(cache_dir, identity, f"{retrieval_set.name}/{split}",
                                       retrieval_set.gallery.image_names, method, compute, settings)

    return encode
