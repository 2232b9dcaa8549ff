"""Resumable on-disk caches for everything expensive: captions, LLM answers, image and text features.

A cache lives in ``<root>/<kind>/<fingerprint of the producing model>/`` and maps string keys (a digest
of the input) to values. It is a set of immutable *part* files, each written atomically
(:func:`utils.atomic_write_bytes`) as soon as a batch of results is ready; a run that dies loses at most
the batch in flight, and the next run loads every part and computes only what is missing. The
directory also holds ``identity.json``, the human-readable description of the producing model.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from utils import UserError, atomic_write_bytes, atomic_write_json

__all__ = ["CacheError", "fingerprint", "module_fingerprint", "JsonCache", "TensorCache"]

_DIGEST_CHARS = 24


class CacheError(UserError, RuntimeError):
    """A cache part file is damaged (the message names it)."""


def fingerprint(obj: Any) -> str:
    """Stable digest of a JSON-serialisable value (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def module_fingerprint(module: nn.Module) -> str:
    """Digest of a module's parameters and buffers (names, dtypes, shapes and values).

    Identifies the weights themselves, so random or locally fine-tuned weights get their own caches.
    """
    digest = hashlib.blake2b(digest_size=_DIGEST_CHARS // 2)
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _PartCache:
    """Shared logic: part files in one directory, loaded at start, appended atomically."""

    suffix = ""

    def __init__(self, root: str | os.PathLike, kind: str, identity: Mapping[str, Any]) -> None:
        self.identity = dict(identity)
        self.directory = Path(root) / kind / fingerprint(self.identity)
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / "identity.json"
        if not identity_file.is_file():
            atomic_write_json(identity_file, self.identity)
        self._entries: dict[str, Any] = {}
        for part in sorted(self.directory.glob(f"part-*{self.suffix}")):
            try:
                self._entries.update(self._decode(part.read_bytes()))
            except (ValueError, KeyError, RuntimeError, EOFError) as exc:
                raise CacheError(f"cache part {part} is damaged ({exc}); delete it to recompute its entries") from exc

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not in the cache, first occurrence order, without duplicates."""
        return [key for key in dict.fromkeys(keys) if key not in self._entries]

    def put(self, entries: Mapping[str, Any]) -> None:
        """Store ``entries`` in a new part file (atomically) and in memory."""
        if not entries:
            return
        name = f"part-{time.time_ns():020d}-{secrets.token_hex(4)}{self.suffix}"
        atomic_write_bytes(self.directory / name, self._encode(entries))
        self._entries.update(entries)

    def _encode(self, entries: Mapping[str, Any]) -> bytes:
        raise NotImplementedError

    def _decode(self, data: bytes) -> dict[str, Any]:
        raise NotImplementedError


class JsonCache(_PartCache):
    """Key -> JSON value (captions, LLM answers)."""

    suffix = ".json"

    def _encode(self, entries: Mapping[str, Any]) -> bytes:
        return json.dumps(dict(entries), ensure_ascii=False).encode("utf-8")

    def _decode(self, data: bytes) -> dict[str, Any]:
        entries = json.loads(data.decode("utf-8"))
        if not isinstance(entries, dict):
            raise ValueError(f"expected a JSON object, got {type(entries).__name__}")
        return entries


class TensorCache(_PartCache):
    """Key -> 1-D float tensor (features); a part stores ``{"keys": [...], "values": Tensor[n, D]}``."""

    suffix = ".pt"

    def _encode(self, entries: Mapping[str, Any]) -> bytes:
        buffer = io.BytesIO()
        values = torch.stack([torch.as_tensor(v).detach().float().cpu() for v in entries.values()])
        torch.save({"keys": list(entries), "values": values}, buffer)
        return buffer.getvalue()

    def _decode(self, data: bytes) -> dict[str, Any]:
        try:
            part = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (OSError, MemoryError):
            raise
        except Exception as exc:  # the unpickler fails in many ways on damaged data
            raise ValueError(f"not a readable tensor part ({exc})") from exc
        if not isinstance(part, dict) or not {"keys", "values"} <= part.keys():
            raise ValueError(f"expected a dict with 'keys' and 'values', got {type(part).__name__}")
        keys, values = part["keys"], part["values"]
        if (not isinstance(keys, list) or not isinstance(values, Tensor) or values.ndim != 2
                or len(keys) != values.shape[0]):
            raise ValueError("keys and values do not match")
        return dict(zip(keys, values.unbind(0)))

    def stack(self, keys: Iterable[str]) -> Tensor:
        """[len(keys), D] stacked values (every key must be present)."""
        return torch.stack([self._entries[key] for key in keys])
