"""Tests for utils.py: atomic writes, seeding, logging and the metrics log."""

import errno
import json
import logging
import os
import random

import numpy as np
import pytest
import torch

import utils
from utils import (
    MetricsLogger,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    read_metrics_log,
    seed_worker,
    set_seed,
    setup_logging,
)

# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def test_atomic_torch_save_round_trips_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(path, {"w": torch.arange(3.0)})
    atomic_torch_save(path, {"w": torch.ones(2)})  # replaces the old file
    assert torch.equal(torch.load(path)["w"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


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


def test_metrics_logger_passes_metrics_to_its_tracker(tmp_path):
    calls = []

    class Recorder:
        def log_metrics(self, metrics, step=None, epoch=None):
            calls.append((metrics, step, epoch))

    logger = MetricsLogger(tmp_path, tracker=Recorder())
    logger.log({"R@1": torch.tensor(1.5)}, step=5, prefix="val/")
    logger.log({"loss": 2.0}, step=6, epoch=1, prefix="train/")
    logger.close()
    assert calls == [({"val/R@1": 1.5}, 5, None), ({"train/loss": 2.0}, 6, 1)]
    assert read_metrics_log(tmp_path / "metrics.jsonl")["val/R@1"].tolist()[0] == 1.5
