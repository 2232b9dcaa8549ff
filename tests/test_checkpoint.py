"""Tests for checkpoint.py: atomic weights-only checkpoints, their errors, and CheckpointSaver's files."""

import argparse
import hashlib
import logging
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
from checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    RESUME_KEYS,
    CheckpointError,
    CheckpointSaver,
    load_checkpoint,
    save_checkpoint,
)
from model import CheckpointMismatchError


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def make_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    args = argparse.Namespace(lr=1e-3, dataset="cirr", epochs=2, ks=[1, 5], output=None)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 3,
        "best_metric": 41.5,
        "args": vars(args),
        "metrics": {"R@1": 12.0},
    }
    return model, state


def test_checkpoint_roundtrip(tmp_path):
    model, state = make_state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert loaded["epoch"] == 3 and loaded["args"] == state["args"] and loaded["metrics"] == {"R@1": 12.0}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.param_groups[0]["lr"] == 1e-3
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    # A state that already carries the current format version is accepted as is.
    save_checkpoint(path, {**state, "format_version": CHECKPOINT_FORMAT_VERSION})
    assert load_checkpoint(path)["format_version"] == CHECKPOINT_FORMAT_VERSION


def test_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    _, state = make_state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    load_checkpoint(path)
    assert calls == [True]


def test_save_checkpoint_rejects_non_plain_state(tmp_path):
    for bad in (argparse.Namespace(lr=1.0), tmp_path, np.float64(1.0)):
        with pytest.raises(TypeError, match="checkpoint state"):
            save_checkpoint(tmp_path / "c.pt", {"x": {"y": bad}})
    with pytest.raises(ValueError, match="format_version"):
        save_checkpoint(tmp_path / "c.pt", {"format_version": CHECKPOINT_FORMAT_VERSION + 1})
    assert not (tmp_path / "c.pt").exists()


def test_load_checkpoint_errors_name_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt.*no such file"):
        load_checkpoint(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)

    _, state = make_state()
    good = tmp_path / "good.pt"
    save_checkpoint(good, state)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*corrupt"):
        load_checkpoint(truncated)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(empty)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)  # a torch file, but not ours
    with pytest.raises(CheckpointError, match="foreign.pt.*not a checkpoint"):
        load_checkpoint(foreign)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format_version": 1, "args": argparse.Namespace(lr=1.0)}, unsafe)  # needs full unpickling
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        load_checkpoint(unsafe)

    newer = tmp_path / "newer.pt"
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)
    assert issubclass(CheckpointError, ValueError)


def test_a_checkpoint_is_sealed_by_the_sha256_of_its_bytes_in_the_zip_comment(tmp_path):
    _, state = make_state()
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    data = path.read_bytes()
    comment = zipfile.ZipFile(path).comment
    assert comment == data[-len(comment):] and comment.startswith(b"cir-sha256-v1:")
    assert comment[len(b"cir-sha256-v1:"):].decode() == hashlib.sha256(data[: -len(comment)]).hexdigest()
    # an ordinary torch file: torch.load(weights_only=True) reads it without this project's code
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_unsealed_checkpoints_load_with_a_warning_before_format_3_only(tmp_path, caplog):
    _, state = make_state()
    legacy = tmp_path / "legacy.pt"
    torch.save({**state, "format_version": 2}, legacy)  # as format 2 wrote checkpoints
    with caplog.at_level(logging.WARNING, logger="cir.checkpoint"):
        assert load_checkpoint(legacy)["epoch"] == 3
    assert f"checkpoint {legacy} (format 2) has no content checksum" in caplog.text
    unsealed = tmp_path / "unsealed.pt"
    torch.save({**state, "format_version": CHECKPOINT_FORMAT_VERSION}, unsealed)  # a seal stripped or never written
    with pytest.raises(CheckpointError, match=f"{unsealed}: damaged: a format {CHECKPOINT_FORMAT_VERSION} checkpoint without"):
        load_checkpoint(unsealed)


def test_a_changed_byte_anywhere_is_a_named_error(tmp_path):
    """Every single byte of a small sealed checkpoint flipped in turn: never a silent load."""
    _, state = make_state()
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    good = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    for offset in range(0, len(good)):
        damaged.write_bytes(good[:offset] + bytes([good[offset] ^ 0x20]) + good[offset + 1:])
        with pytest.raises(CheckpointError, match=str(damaged)):
            load_checkpoint(damaged)


def test_writes_fsync_the_file_then_rename_then_fsync_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source, destination):
        events.append(f"rename to {Path(destination).name}")
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _, state = make_state()
    save_checkpoint(tmp_path / "last.pt", state)
    assert events == ["fsync file", "rename to last.pt", "fsync directory"]
    events.clear()
    checkpoint.atomic_link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    assert events == ["rename to best.pt", "fsync directory"]  # a hard link: no data to fsync


# ---------------------------------------------------------------------------------------------
# CheckpointSaver
# ---------------------------------------------------------------------------------------------

CIRR_FILES = {"mean": "best_mean.pt", "harmonic_mean": "best_harmonic.pt", "geometric_mean": "best_geometric.pt"}


class Counter:
    """A checkpoint state that records how often it was built; each build holds a new step number."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"step": self.calls}


def saved_step(path):
    return load_checkpoint(path)["step"]


def test_saver_writes_last_and_builds_the_state_only_when_writing(tmp_path):
    state = Counter()
    saver = CheckpointSaver(tmp_path / "checkpoints", state, checkpoint_every=3)
    assert saver.last_path == tmp_path / "checkpoints" / "last.pt" and saver.last_path.parent.is_dir()
    assert state.calls == 0
    assert [saver.save_step(step) for step in range(1, 7)] == [None, None, saver.last_path, None, None, saver.last_path]
    assert state.calls == 2 and saved_step(saver.last_path) == 2
    assert saver.save_last() == saver.last_path and saved_step(saver.last_path) == 3
    assert CheckpointSaver(tmp_path / "never", state).save_step(4) is None  # checkpoint_every 0: epoch ends only
    with pytest.raises(ValueError, match="checkpoint_every"):
        CheckpointSaver(tmp_path, state, checkpoint_every=-1)


def test_saver_best_files_follow_the_improved_criteria(tmp_path):
    state = Counter()
    saver = CheckpointSaver(tmp_path, state, best_criterion="mean", criterion_files=CIRR_FILES, save_best=True)
    assert saver.best_files(["mean", "geometric_mean"]) == ["best_mean.pt", "best_geometric.pt", "best.pt"]
    assert saver.best_files(["harmonic_mean"]) == ["best_harmonic.pt"]
    assert saver.best_files([]) == []

    written = saver.save_validation(1, ["mean", "harmonic_mean", "geometric_mean"])
    assert [p.name for p in written] == ["best_mean.pt", "best_harmonic.pt", "best_geometric.pt", "best.pt"]
    assert state.calls == 1  # one state, saved once, under four names
    assert len({os.stat(p).st_ino for p in written}) == 1  # hard links where the filesystem has them
    saver.save_validation(2, ["harmonic_mean"])
    assert saved_step(tmp_path / "best_harmonic.pt") == 2
    assert all(saved_step(tmp_path / name) == 1 for name in ("best.pt", "best_mean.pt", "best_geometric.pt"))
    assert saver.save_validation(3, []) == [] and state.calls == 2

    fiq = CheckpointSaver(tmp_path / "fiq", Counter(), best_criterion="mean", save_best=True)
    assert fiq.best_files(["mean"]) == ["best.pt"]


def test_saver_epoch_files_without_save_best(tmp_path):
    saver = CheckpointSaver(tmp_path, Counter(), save_every_validation=True)
    assert saver.save_validation(4, ["mean"]) == [tmp_path / "epoch_4.pt"]
    assert CheckpointSaver(tmp_path / "none", Counter()).save_validation(1, ["mean"]) == []
    # With save_best, only the best files are kept (the official --save_training --save_best).
    both = CheckpointSaver(tmp_path / "both", Counter(), save_best=True, save_every_validation=True)
    assert [p.name for p in both.save_validation(1, ["mean"])] == ["best.pt"]
    assert [p.name for p in both.save_validation(2, [])] == []


def test_saver_disabled_or_vetoed_writes_nothing(tmp_path, caplog):
    state = Counter()
    assert CheckpointSaver(tmp_path / "rank1", state, enabled=False).save_last() is None
    assert not list((tmp_path / "rank1").iterdir())

    reason = {"now": "during 2 non-finite steps in a row"}
    saver = CheckpointSaver(tmp_path / "run", state, save_best=True, veto=lambda: reason["now"])
    with caplog.at_level(logging.WARNING, logger="cir.checkpoint"):
        assert saver.save_last() is None and saver.save_validation(1, ["mean"]) == []
    assert f"not writing {saver.last_path} during 2 non-finite steps in a row" in caplog.text
    assert state.calls == 0 and not list((tmp_path / "run").iterdir())
    reason["now"] = None
    assert saver.save_last() == saver.last_path


def test_saver_clear_and_loading(tmp_path):
    saver = CheckpointSaver(tmp_path, lambda: {key: 0 for key in RESUME_KEYS}, save_best=True)
    saver.save_last()
    saver.save_validation(1, ["mean"])
    (tmp_path / "notes.txt").write_text("kept")
    assert CheckpointSaver.load_resumable(saver.last_path)["epoch"] == 0
    assert [p.name for p in saver.clear()] == ["best.pt", "last.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

    save_checkpoint(tmp_path / "model_only.pt", {"model_config": {}, "model": {}})
    with pytest.raises(CheckpointMismatchError, match="model_only.pt: not a resumable .*missing optimizer, scheduler"):
        CheckpointSaver.load_resumable(tmp_path / "model_only.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointSaver.load(tmp_path / "missing.pt")
