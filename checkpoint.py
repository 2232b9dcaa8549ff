"""Checkpoint files: safe saving and loading, and the files of a training run (:class:`CheckpointSaver`).

A checkpoint is a dict of plain types (tensors, numbers, strings, lists, dicts) saved with a
``format_version``; it is written atomically (:func:`utils.atomic_write_bytes`) and read back with
``torch.load(weights_only=True)``, so loading a file never runs code from it.

Since format 3 every checkpoint (and every gallery feature cache entry) is *sealed*: the file is the
``torch.save`` zip archive whose zip comment (the archive's last bytes, which zip readers and
``torch.load`` skip) is ``cir-sha256-v1:<h>``, with ``h`` the SHA-256 of every byte before the comment.
Loading recomputes ``h`` before unpickling (:func:`read_sealed`): a file changed after it was written
(flipped bits, a partial copy, a hand edit) is refused with an error naming it.  The file stays an
ordinary ``torch.load``-able file.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model import CheckpointMismatchError
from utils import UserError, atomic_write_bytes, fsync_directory

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "sealed_bytes",
    "read_sealed",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights_only",
    "atomic_link_or_copy",
    "RESUME_KEYS",
    "CheckpointSaver",
]

_logger = logging.getLogger("cir.checkpoint")

# 2: step-level resume (step_in_epoch, sampler, full RNG states); 3: sealed (content checksum), run id
CHECKPOINT_FORMAT_VERSION = 3
FIRST_SEALED_VERSION = 3
_CHECKPOINT_VERSION_KEY = "format_version"
# What a checkpoint must hold to resume a run (training writes more: args, sampler, best_by, ...).
RESUME_KEYS = ("model_config", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "global_step")


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, corrupt, damaged, or not one written by :func:`save_checkpoint`."""


# The seal: the zip comment "cir-sha256-v1:" + 64 hex digits.  A zip archive ends with its end-of-central-
# directory record (22 bytes from the signature PK\x05\x06, the comment length in its last 2 bytes),
# followed by the comment.
SEAL_PREFIX = b"cir-sha256-v1:"
_SEAL_LENGTH = len(SEAL_PREFIX) + 64
_EOCD_SIGNATURE, _EOCD_SIZE = b"PK\x05\x06", 22
_HASH_BLOCK = 1 << 20


def sealed_bytes(obj: Any) -> memoryview:
    """``torch.save(obj)`` with the seal as its zip comment (module docstring): the bytes of a sealed file.

    The digest covers every byte before the comment, including the comment's length field.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    size = buffer.tell()
    with buffer.getbuffer() as view:
        if size < _EOCD_SIZE or view[size - _EOCD_SIZE: size - _EOCD_SIZE + 4] != _EOCD_SIGNATURE or view[size - 2: size] != b"\0\0":
            raise RuntimeError("torch.save did not end its archive with a comment-less end-of-central-directory record")
    buffer.seek(size - 2)
    buffer.write(struct.pack("<H", _SEAL_LENGTH))
    with buffer.getbuffer() as view:
        digest = hashlib.sha256(view).hexdigest()
    buffer.write(SEAL_PREFIX + digest.encode("ascii"))
    return buffer.getbuffer()


def _torch_load(source: Any, path: Path, error: type[Exception], what: str, map_location: str | torch.device) -> Any:
    """``torch.load(source, weights_only=True)``; a file it cannot read is ``error("<what> <path>: ...")``."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (OSError, MemoryError):
        raise  # unreadable file or no memory: not a statement about the file's contents
    except Exception as exc:  # a damaged file can fail anywhere in the unpickler (IndexError, KeyError, ...)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"{what} {path}: corrupt or not a weights-only checkpoint ({first_line})") from exc


def read_sealed(
    path: str | os.PathLike, error: type[Exception], what: str, map_location: str | torch.device = "cpu"
) -> tuple[Any, bool]:
    """Load a file written with :func:`sealed_bytes` (or any ``torch.save`` file) with ``weights_only=True``.

    A sealed file's digest is checked before anything is unpickled; the file is read through one open
    handle, so a concurrent atomic replacement cannot pair one file's digest with another's content.

    Returns:
        The loaded object and whether the file was sealed (an unsealed file is not checked).

    Raises:
        ``error``: a missing file, a sealed file whose content no longer matches its digest, or a file
            the weights-only unpickler cannot read; the message starts with ``"<what> <path>:"``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        sealed = False
        if size > _SEAL_LENGTH:
            f.seek(size - _SEAL_LENGTH)
            tail = f.read(_SEAL_LENGTH)
            if tail.startswith(SEAL_PREFIX):
                sealed = True
                digest, remaining = hashlib.sha256(), size - _SEAL_LENGTH
                f.seek(0)
                while remaining:
                    block = f.read(min(_HASH_BLOCK, remaining))
                    if not block:
                        break
                    digest.update(block)
                    remaining -= len(block)
                if digest.hexdigest().encode("ascii") != tail[len(SEAL_PREFIX):]:
                    raise error(f"{what} {path}: damaged: its content no longer matches the SHA-256 stored in it "
                                "(the file changed after it was written); use another copy or checkpoint")
        f.seek(0)
        return _torch_load(f, path, error, what, map_location), sealed


_PLAIN_TYPES = (Tensor, str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Reject anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _PLAIN_TYPES) and not isinstance(obj, (np.generic, np.ndarray)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(obj).__name__}; states may hold only tensors, numbers, strings, "
        "None, lists, tuples and dicts (use vars(args) for a Namespace, str() for a Path, float() for numpy)"
    )


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically save ``state`` plus ``format_version`` so that :func:`load_checkpoint` can read it safely.

    ``state`` may already carry ``format_version``, but only with the current value.
    """
    if state.get(_CHECKPOINT_VERSION_KEY, CHECKPOINT_FORMAT_VERSION) != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"state[{_CHECKPOINT_VERSION_KEY!r}] is {state[_CHECKPOINT_VERSION_KEY]!r}; "
            f"save_checkpoint writes format {CHECKPOINT_FORMAT_VERSION}"
        )
    payload = {_CHECKPOINT_VERSION_KEY: CHECKPOINT_FORMAT_VERSION, **state}
    _check_plain(payload, "state")
    atomic_write_bytes(path, sealed_bytes(payload))


def atomic_link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Make ``destination`` hold ``source``'s bytes, atomically: a hard link, or a copy where links fail.

    The best checkpoints by several criteria are often one and the same state; a hard link stores it
    once.  ``source`` files are only ever replaced (``os.replace``), never written in place, so a
    linked file keeps its contents when either name is later given a new checkpoint.
    """
    source, destination = Path(source), Path(destination)
    tmp = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links (FAT, some network mounts)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, destination)
        fsync_directory(destination.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno or errno.EIO, f"could not write {destination}: {exc.strerror or exc}") from exc


def load_weights_only(
    path: Path, error: type[Exception], what: str, map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` (no code from the file runs), failures as ``error(...)``.

    For files of other code bases (official SSN, LinCIR's Φ); this project's files are sealed
    (:func:`read_sealed`).  A missing file and a file the weights-only unpickler cannot read raise ``error``
    with a message starting with ``"<what> <path>:"``; OSError (other than a missing file) and MemoryError
    pass through.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    return _torch_load(path, path, error, what, map_location)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``, its seal
    verified first.

    A checkpoint of format 1 or 2 (written before checkpoints were sealed) loads with a warning: damage
    to it cannot be detected.

    Returns:
        The saved state dict, including ``format_version``.

    Raises:
        CheckpointError: the file is missing, damaged (its content no longer matches its seal; a format 3
            file without a seal), unreadable as a weights-only checkpoint, or not ours.
    """
    path = Path(path)
    state, sealed = read_sealed(path, CheckpointError, "checkpoint", map_location)
    if not isinstance(state, dict) or _CHECKPOINT_VERSION_KEY not in state:
        raise CheckpointError(
            f"checkpoint {path}: not a checkpoint written by save_checkpoint (no {_CHECKPOINT_VERSION_KEY!r})"
        )
    version = state[_CHECKPOINT_VERSION_KEY]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {path}: invalid format version {version!r}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version!r} is newer than supported ({CHECKPOINT_FORMAT_VERSION})"
        )
    if not sealed:
        if version >= FIRST_SEALED_VERSION:  # every file of this format is sealed: the seal itself was damaged
            raise CheckpointError(f"checkpoint {path}: damaged: a format {version} checkpoint without its content "
                                  "checksum (the file changed after it was written); use another copy or checkpoint")
        _logger.warning("checkpoint %s (format %d) has no content checksum: damage to it cannot be detected; loading "
                        "it anyway (checkpoints written from now on carry one)", path, version)
    return state


class CheckpointSaver:
    """The checkpoint files of a training run: which file is written when, and loading them back.

    Files in ``directory``:

    * ``last.pt``: every epoch end, every ``checkpoint_every`` steps and on pre-emption; runs resume from it.
    * ``best.pt`` (``save_best``): the best validation by ``best_criterion`` (``--best_metric``).
    * ``criterion_files[c]`` (``save_best``): the best by each selection criterion ``c`` (CIRR keeps the
      official ``best_mean.pt``, ``best_harmonic.pt`` and ``best_geometric.pt``).
    * ``epoch_<n>.pt`` (``save_every_validation`` without ``save_best``): one per validation (official
      ``--save_training``).

    A validation that improves several criteria writes its state once; the other names become hard links
    to (or copies of) that file (:func:`atomic_link_or_copy`).

    Args:
        directory: the run's ``checkpoints`` folder (created if missing).
        state: builds the checkpoint dict when a file is due (called only then).
        enabled: False on ranks other than 0, which write nothing.
        veto: returns a reason not to write now (e.g. ``"during 3 non-finite steps in a row"``), logged as
            ``not writing <path> <reason>``; None to write.
    """

    LAST = "last.pt"
    BEST = "best.pt"

    def __init__(
        self,
        directory: str | os.PathLike,
        state: Callable[[], Mapping[str, Any]],
        best_criterion: str = "mean",
        criterion_files: Mapping[str, str] | None = None,
        save_best: bool = False,
        save_every_validation: bool = False,
        checkpoint_every: int = 0,
        enabled: bool = True,
        veto: Callable[[], str | None] | None = None,
    ) -> None:
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        self.directory = Path(directory)
        self.state = state
        self.best_criterion = best_criterion
        self.criterion_files = dict(criterion_files or {})
        self.save_best = save_best
        self.save_every_validation = save_every_validation
        self.checkpoint_every = checkpoint_every
        self.enabled = enabled
        self.veto = veto
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def last_path(self) -> Path:
        return self.directory / self.LAST

    def best_files(self, improved: Sequence[str]) -> list[str]:
        """The files a validation replaces under ``save_best``, given the criteria it ``improved``:
        each improved criterion's own file, then ``best.pt`` when ``best_criterion`` improved."""
        files = [self.criterion_files[c] for c in improved if c in self.criterion_files]
        return files + [self.BEST] if self.best_criterion in improved else files

    def save_last(self) -> Path | None:
        """Write ``last.pt``; returns its path, or None when nothing was written (other rank, veto)."""
        return self._save([self.LAST])

    def save_step(self, global_step: int) -> Path | None:
        """Write ``last.pt`` if ``global_step`` is a multiple of ``checkpoint_every`` (0 = never)."""
        if self.checkpoint_every and global_step % self.checkpoint_every == 0:
            return self.save_last()
        return None

    def save_validation(self, epoch: int, improved: Sequence[str]) -> list[Path]:
        """The files due after a validation at (1-based, completed) ``epoch`` that ``improved`` the given
        criteria: the best files under ``save_best``, else ``epoch_<epoch>.pt`` under ``save_every_validation``."""
        if self.save_best:
            files = self.best_files(improved)
        else:
            files = [f"epoch_{epoch}.pt"] if self.save_every_validation else []
        if not files:
            return []
        written = self._save(files)
        return [self.directory / name for name in files] if written else []

    def clear(self) -> list[Path]:
        """Delete every checkpoint of the folder (a fresh run replacing an old one); returns them."""
        removed = sorted(self.directory.glob("*.pt"))
        for path in removed:
            path.unlink()
        return removed

    @staticmethod
    def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """A checkpoint of this project (:func:`load_checkpoint`)."""
        return load_checkpoint(path, map_location)

    @staticmethod
    def load_resumable(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """A checkpoint a run can resume from: :func:`load_checkpoint` plus every key of ``RESUME_KEYS``.

        Raises:
            CheckpointError: unreadable or foreign file.
            CheckpointMismatchError: a checkpoint of this project that lacks training state (e.g. a
                converted official model).
        """
        checkpoint = load_checkpoint(path, map_location)
        missing = [key for key in RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointMismatchError(f"{path}: not a resumable training checkpoint (missing {', '.join(missing)})")
        return checkpoint

    def _save(self, names: Sequence[str]) -> Path | None:
        """Write the state to ``names[0]``; the other names become links to (or copies of) it."""
        if not self.enabled:
            return None
        path = self.directory / names[0]
        reason = self.veto() if self.veto is not None else None
        if reason:  # e.g. never replace a good checkpoint by a state inside a non-finite streak
            _logger.warning("not writing %s %s", path, reason)
            return None
        save_checkpoint(path, self.state())
        for other in names[1:]:
            atomic_link_or_copy(path, self.directory / other)
        return path
