"""Tests for feature_cache.py: gallery features encoded once per checkpoint, task, method, settings and image
files; sealed entries."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from dataset_registry import Query, RetrievalTask, folder_task
from feature_cache import (
    FolderGalleryCache, cache_key, cached_gallery_features, checkpoint_gallery_encoder, checkpoint_identity,
    file_list_identity,
)


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
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        (images / name).write_bytes(name.encode())

    def task(name, split, gallery):
        return RetrievalTask(name, "fashioniq", split, tmp_path, gallery, [Query("0", gallery[0], "x")],
                             lambda image: images / image, [])

    calls = []

    def compute(rows):
        return lambda: calls.append(rows) or torch.ones(rows, 2) * len(calls)

    dress = encode(task("dress", "val", ["a", "b"]), "ssn", compute(2))
    assert torch.equal(encode(task("dress", "val", ["a", "b"]), "ssn", compute(2)), dress) and len(calls) == 1
    encode(task("shirt", "val", ["a", "b"]), "ssn", compute(2))
    encode(task("dress", "test", ["a", "b"]), "ssn", compute(2))
    encode(task("dress", "val", ["a", "b"]), "sum", compute(2))
    assert len(calls) == 4
    # The key: "<task>/<split>", the names, method and settings, and the identity of the image files.
    files = file_list_identity([images / "a", images / "b"])
    key = cache_key(checkpoint_identity(checkpoint), "dress/val", ["a", "b"], "ssn", {"precision": "fp32", "files": files})
    assert (tmp_path / "cache" / f"gallery_{key}.pt").is_file()
    (images / "b").write_bytes(b"c")  # an image replaced on disk (same size): encoded again
    encode(task("dress", "val", ["a", "b"]), "ssn", compute(2))
    assert len(calls) == 5


def test_folder_gallery_cache_is_shared_by_path_spellings_and_follows_the_files(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(name.encode())
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2, 3) * len(calls)

    cache = tmp_path / "cache"
    settings = {"precision": "fp32"}
    first = FolderGalleryCache(checkpoint, folder, cache, settings)
    task = folder_task(folder)
    features = first(task, "ssn", compute)
    monkeypatch.chdir(tmp_path)  # retrieve.py and the page may name the folder differently: one entry
    again = FolderGalleryCache(checkpoint, "photos", cache, settings)
    assert again.key(task, "ssn") == first.key(task, "ssn")
    assert torch.equal(again(folder_task("photos"), "ssn", compute), features) and len(calls) == 1
    assert (cache / f"gallery_{first.key(task, 'ssn')}.pt").is_file()  # the key names the entry (ANN files too)
    assert first.key(task, "sum") != first.key(task, "ssn")
    assert FolderGalleryCache(checkpoint, folder, cache, {"precision": "bf16"}).key(task, "ssn") != first.key(task, "ssn")
    (folder / "a.png").write_bytes(b"another image")
    # One instance keys every method of its load by the files as it first read them; the next load sees the change.
    assert first.key(task, "ssn") == again.key(task, "ssn")
    later = FolderGalleryCache(checkpoint, folder, cache, settings)
    assert later.key(task, "ssn") != first.key(task, "ssn")
    later(task, "ssn", compute)
    assert len(calls) == 2


def test_file_identity_sees_a_same_sized_rewrite_with_its_mtime_restored(tmp_path):
    """An image rewritten in place, same size, modification time set back: the ctime still changes."""
    image = tmp_path / "image.png"
    image.write_bytes(b"old content")
    before = image.stat()
    identity = file_list_identity([image])
    assert file_list_identity([image]) == identity
    image.write_bytes(b"new content")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_list_identity([image]) != identity
    replacement = tmp_path / "other.png"  # replaced by another file renamed over it
    replacement.write_bytes(b"new content")
    identity = file_list_identity([image])
    os.replace(replacement, image)
    assert file_list_identity([image]) != identity


def test_damaged_or_unsealed_cache_entries_are_encoded_again(tmp_path, caplog):
    names = ["a", "b", "c"]
    good = torch.arange(6.0).view(3, 2)
    cached_gallery_features(tmp_path, "ckpt", "cirr/val", names, "ssn", lambda: good)
    (entry,) = tmp_path.glob("gallery_*.pt")
    data = bytearray(entry.read_bytes())
    stored = good.numpy().tobytes()
    offset = bytes(data).index(stored)  # the features' bytes in the archive: flip one bit of the first value
    data[offset] ^= 0x01
    entry.write_bytes(bytes(data))
    assert torch.load(entry, weights_only=True)["features"][0, 0] != 0.0  # loads fine, with a wrong value
    calls = []
    with caplog.at_level(logging.WARNING, logger="cir.feature_cache"):
        again = cached_gallery_features(tmp_path, "ckpt", "cirr/val", names, "ssn",
                                        lambda: calls.append(1) or good.clone())
    assert calls == [1] and torch.equal(again, good)
    assert f"feature cache entry {entry}: damaged" in caplog.text
    assert torch.equal(cached_gallery_features(tmp_path, "ckpt", "cirr/val", names, "ssn", lambda: 1 / 0), good)

    torch.save({"format_version": 2, "names": names, "features": good + 1}, entry)  # a valid but unsealed entry
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cir.feature_cache"):
        assert torch.equal(cached_gallery_features(tmp_path, "ckpt", "cirr/val", names, "ssn", lambda: good), good)
    assert "unsealed" in caplog.text
