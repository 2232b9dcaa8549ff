"""Tests for feature_cache.py: gallery features encoded once per checkpoint, task, method and settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataset_registry import Query, RetrievalTask
from feature_cache import cache_key, cached_gallery_features, checkpoint_gallery_encoder, checkpoint_identity


def test_feature_cache_encodes_once_per_key(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    identity = checkpoint_identity(checkpoint)
    names = ["a", "b", "c"]
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).view(3, 2) + len(calls)

    cache = tmp_path / "cache"
    first = cached_gallery_features(cache, identity, "cirr/val", names, "ssn", compute)
    second = cached_gallery_features(cache, identity, "cirr/val", names, "ssn", compute)
    assert len(calls) == 1 and torch.equal(first, second)
    cached_gallery_features(cache, identity, "cirr/val", names, "image", compute)  # another method
    checkpoint.write_bytes(b"retrained weights")
    cached_gallery_features(cache, checkpoint_identity(checkpoint), "cirr/val", names, "ssn", compute)
    assert len(calls) == 3
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_feature_cache_key_depends_on_name_order_and_extra_settings():
    base = cache_key("ckpt", "cirr/val", ["a", "b"], "ssn")
    assert cache_key("ckpt", "cirr/val", ["b", "a"], "ssn") != base
    assert cache_key("ckpt", "cirr/val", ["a", "b"], "ssn", {"precision": "amp"}) != base
    assert cache_key("ckpt", "cirr/val", ["a", "b"], "ssn") == base


def test_feature_cache_rejects_features_that_do_not_fit_the_names(tmp_path):
    with pytest.raises(ValueError, match="2 feature rows for the 1 gallery names of cirr/val"):
        cached_gallery_features(tmp_path, "ckpt", "cirr/val", ["a"], "ssn", lambda: torch.zeros(2, 2))
    assert not list(tmp_path.iterdir())


def test_checkpoint_gallery_encoder_keys_each_task_by_name_and_split(tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    encode = checkpoint_gallery_encoder(checkpoint, tmp_path / "cache", {"precision": "fp32"})

    def task(name, split, gallery):
        return RetrievalTask(name, "fashioniq", split, tmp_path, gallery, [Query("0", gallery[0], "x")], Path, [])

    calls = []

    def compute(rows):
        return lambda: calls.append(rows) or torch.ones(rows, 2) * len(calls)

    dress = encode(task("dress", "val", ["a", "b"]), "ssn", compute(2))
    assert torch.equal(encode(task("dress", "val", ["a", "b"]), "ssn", compute(2)), dress) and len(calls) == 1
    encode(task("shirt", "val", ["a", "b"]), "ssn", compute(2))
    encode(task("dress", "test", ["a", "b"]), "ssn", compute(2))
    encode(task("dress", "val", ["a", "b"]), "sum", compute(2))
    assert len(calls) == 4
    # The key is the one the inference tools always used: "<task>/<split>", the names, method and settings.
    key = cache_key(checkpoint_identity(checkpoint), "dress/val", ["a", "b"], "ssn", {"precision": "fp32"})
    assert (tmp_path / "cache" / f"gallery_{key}.pt").is_file()
