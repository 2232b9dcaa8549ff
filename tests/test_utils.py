"""Tests for atomic writes, checkpoints, seeding and logging in utils.py."""

import argparse
import errno
import json
import logging
import os
import random
import sys
import types

import numpy as np
import pytest
import torch

import utils
from utils import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    MetricsLogger,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_metrics_log,
    save_checkpoint,
    seed_worker,
    set_seed,
    setup_logging,
)

# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def test_atomic_write_bytes_and_json(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"old")
    assert path.read_bytes() == b"old"
    atomic_write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    atomic_write_json(path, {"a": 1}, indent=None)
    assert path.read_text() == '{"a":1}\n'
    assert os.listdir(tmp_path) == ["f.json"]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"previous")
    monkeypatch.setattr(utils.os, failing, _disk_full)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b"new contents")
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["ckpt.bin"]  # temp file removed


def test_atomic_write_missing_dir_names_path(tmp_path):
    path = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError, match="missing"):
        atomic_write_json(path, {})


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

    monkeypatch.setattr(utils.torch, "load", spy)
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


# ---------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_set_seed_reproducible():
    set_seed(123)
    first = _draw()
    set_seed(123)
    assert _draw() == first
    set_seed(124)
    assert _draw() != first


def test_seed_worker_follows_torch_seed():
    torch.manual_seed(77)
    seed_worker(0)
    drawn = (random.random(), float(np.random.rand()))
    random.seed(77)
    np.random.seed(77)
    assert drawn == (random.random(), float(np.random.rand()))


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def test_setup_logging_writes_file_without_duplicate_handlers(tmp_path):
    logger = setup_logging(tmp_path)
    logger = setup_logging(tmp_path)
    try:
        assert logger.name == "cir" and len(logger.handlers) == 2
        logging.getLogger("cir.train").info("hello from a child logger")
        for handler in logger.handlers:
            handler.flush()
        text = (tmp_path / "log.txt").read_text()
        assert text.count("hello from a child logger") == 1
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def test_metrics_logger_jsonl_roundtrip(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": torch.tensor(0.5), "lr": 1e-4}, step=1, epoch=0, prefix="train/")
        logger.log({"loss": np.float32(0.25)}, step=2, epoch=0, prefix="train/")
        logger.log({"R@1": 40.0, "mean": 60.0}, epoch=0, prefix="val/")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    frame = read_metrics_log(tmp_path / "metrics.jsonl")
    assert len(frame) == 3
    assert frame["train/loss"].iloc[:2].tolist() == [0.5, 0.25]
    assert frame["val/R@1"].iloc[2] == 40.0
    assert frame["step"].iloc[1] == 2 and frame["epoch"].tolist() == [0, 0, 0]

    # Appending from a new logger (resumed run) keeps earlier rows.
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": 0.1}, step=3)
    assert len(read_metrics_log(tmp_path / "metrics.jsonl")) == 4


def test_read_metrics_log_truncated_and_corrupt(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert read_metrics_log(path)["step"].tolist() == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics_log(path)


def test_metrics_logger_comet(tmp_path, monkeypatch):
    calls = []

    class FakeExperiment:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def log_parameters(self, params):
            calls.append(("params", params))

        def log_metrics(self, metrics, step=None, epoch=None):
            calls.append(("metrics", metrics, step, epoch))

        def end(self):
            calls.append(("end",))

    monkeypatch.setitem(sys.modules, "comet_ml", types.SimpleNamespace(Experiment=FakeExperiment))
    logger = MetricsLogger(tmp_path, "key", "ws", "proj", run_args={"lr": 1.0})
    logger.log({"R@1": 1.0}, step=5, prefix="val/")
    logger.close()
    assert calls == [
        ("init", {"api_key": "key", "workspace": "ws", "project_name": "proj"}),
        ("params", {"lr": 1.0}),
        ("metrics", {"val/R@1": 1.0}, 5, None),
        ("end",),
    ]


def test_metrics_logger_comet_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # makes `import comet_ml` fail
    with pytest.raises(ImportError, match="comet_ml is not installed"):
        MetricsLogger(tmp_path, "key", "ws")
    # Without credentials comet_ml is never imported.
    MetricsLogger(tmp_path).close()
