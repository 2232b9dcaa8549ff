"""Fault tolerance of training and the output writers (docs/fault_tolerance.md).

Kill-and-resume (SIGKILL in a subprocess, SIGTERM in a subprocess and in-process) must reach the very
weights, optimiser state and metrics of an uninterrupted run; mismatched checkpoints, non-finite losses,
unreadable images and a full disk must each end in a clear error that keeps the earlier files intact.

Every run is the tiny one: 48 triplets of 32 px images, batch 8 (6 steps per epoch), ViT-Tiny-P8-32 from
random weights, one CPU thread (so in-process and subprocess runs compute the same floating point sums).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import cirr_test_submission
import train_cirr
import utils
import validate
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from data_utils import CIRRDataset, DataError, build_transform, collate_batch, read_json
import model.loss
from model import CheckpointMismatchError, build_ssn_model, ssn_loss_terms
from model.loss import create_loss
from synthetic import make_synthetic_cirr
from training.resilience import NonFiniteLossError
from training.sampler import ResumableSampler
from training.state import TrainState
from training.train import train_one_epoch

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6
EPOCHS = 2


def train_args(data: Path, output_dir: Path, *extra: str, epochs: int = EPOCHS, model: str = "ViT-Tiny-P8-32") -> list[str]:
    return [
        "--data_root", str(data), "--clip_model_name", model, "--pretrained", "none",
        "--num_epochs", str(epochs), "--batch_size", "8", "--lr", "1e-3", "--optimizer", "adamw",
        "--grad_clip", "1.0", "--num_workers", "0", "--transform", "clip", "--save_best", "--deterministic",
        "--log_every", "1", "--output_dir", str(output_dir), *extra,
    ]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread (as the subprocesses get), and torch's global flags restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_cirr(tmp_path_factory.mktemp("tiny"), num_train=8 * STEPS_PER_EPOCH, num_val=16, num_test=20,
                               image_size=32)


@pytest.fixture
def data_copy(data, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(data, tmp_path / "cirr_dataset"))


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run is compared with."""
    with single_thread():
        return train_cirr.main(train_args(data, tmp_path_factory.mktemp("reference") / "run"))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start_training(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, str(REPO / "train_cirr.py"), *args], cwd=REPO, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for_checkpoint(process: subprocess.Popen, path: Path, log: Path, mid_epoch: bool, timeout: float = 240.0) -> dict:
    """Poll until ``path`` holds a checkpoint (one taken inside an epoch if ``mid_epoch``); return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before a checkpoint appeared:\n{log.read_text()[-3000:]}")
        if path.is_file():
            checkpoint = load_checkpoint(path)  # atomic writes: never a half-written file
            if not mid_epoch or 0 < checkpoint["step_in_epoch"] < STEPS_PER_EPOCH:
                return checkpoint
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint after {timeout} s:\n{log.read_text()[-3000:]}")


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every tensor / scalar inside nested dicts and lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def assert_same_run(expected_dir: Path, actual_dir: Path) -> int:
    """Final checkpoints equal tensor for tensor (weights, optimiser, scheduler, scaler, RNGs, position),
    same best metrics, summary and logged metrics; returns the number of tensors compared."""
    expected = load_checkpoint(expected_dir / "checkpoints" / "last.pt")
    actual = load_checkpoint(actual_dir / "checkpoints" / "last.pt")
    expected.pop("args"), actual.pop("args")  # output_dir / resume differ by design
    expected_leaves, actual_leaves = dict(leaves(expected)), dict(leaves(actual))
    assert expected_leaves.keys() == actual_leaves.keys()
    tensors = 0
    for key, value in expected_leaves.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, actual_leaves[key]), key
            tensors += 1
        else:
            assert value == actual_leaves[key], key
    assert read_json(expected_dir / "summary.json") == read_json(actual_dir / "summary.json")

    def records(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "train/epoch_time_s")} for line in lines]

    assert records(expected_dir) == records(actual_dir)  # no duplicates of the steps redone after the kill
    return tensors


# ---------------------------------------------------------------------------------------------- sampler
def test_resumable_sampler_order_resume_and_shards():
    sampler = ResumableSampler(50, batch_size=4, seed=3)
    assert sampler.steps_per_epoch == 12
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 48 and len(set(epoch0)) == 48
    sampler.set_epoch(0, start_step=5)
    assert list(sampler) == epoch0[20:] and len(sampler) == 28
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # an epoch's order depends on (seed, epoch) only
    with pytest.raises(ValueError, match="start_step"):
        sampler.set_epoch(0, start_step=13)
    shards = [ResumableSampler(50, 4, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    indices = [list(shard) for shard in shards]
    assert all(len(i) == 16 for i in indices) and len({*indices[0], *indices[1], *indices[2]}) == 48
    # Gathered in rank order, the ranks' batches are the batches of one process with batch 3·4.
    single = ResumableSampler(50, 12, seed=3)
    single.set_epoch(2)
    gathered = [index for step in range(4) for shard in indices for index in shard[4 * step: 4 * step + 4]]
    assert gathered == list(single)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(50, 4, num_replicas=2, rank=2)


# ---------------------------------------------------------------------------------------------- exact resume
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(data, reference_run, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "killed.log"
    process = start_training(train_args(data, run, "--checkpoint_every", "1"), log)
    try:
        wait_for_checkpoint(process, run / "checkpoints" / "last.pt", log, mid_epoch=True)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")
    assert killed_at["global_step"] < EPOCHS * STEPS_PER_EPOCH and not (run / "summary.json").exists()

    train_cirr.main(train_args(data, run, "--resume", str(run / "checkpoints" / "last.pt")))
    assert assert_same_run(reference_run, run) > 100
    assert "resumed from" in (run / "log.txt").read_text()


def test_sigterm_in_process_checkpoints_at_step_boundary_and_resumes_exactly(data, reference_run, tmp_path, monkeypatch):
    """SIGTERM arriving during step 3 stops after it; the resumed run equals the uninterrupted one."""
    calls = 0

    def loss_then_signal(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return ssn_loss_terms(*args, **kwargs)

    previous_handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(model.loss, "ssn_loss_terms", loss_then_signal)
    run = train_cirr.main(train_args(data, tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # handlers restored
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (0, 3, 3)
    assert "stopped by SIGTERM at epoch 1, step 3 of 6" in (run / "log.txt").read_text()
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(model.loss, "ssn_loss_terms", ssn_loss_terms)
    train_cirr.main(train_args(data, run, "--resume", str(run / "checkpoints" / "last.pt")))
    assert_same_run(reference_run, run)


def test_sigterm_subprocess_writes_checkpoint_and_exits_zero(data, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    process = start_training(train_args(data, run, "--checkpoint_every", "1", epochs=50), log)
    try:
        first = wait_for_checkpoint(process, run / "checkpoints" / "last.pt", log, mid_epoch=False)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] >= first["global_step"]
    assert "stopped by SIGTERM" in (run / "log.txt").read_text()
    assert not (run / "summary.json").exists()
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- safe loading
def test_resume_with_another_backbone_or_head_names_the_mismatch(data, reference_run, tmp_path):
    last = str(reference_run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointMismatchError, match="ViT-Tiny-P8-32.*ViT-Tiny-P16-64") as info:
        train_cirr.main(train_args(data, tmp_path / "a", "--resume", last, model="ViT-Tiny-P16-64"))
    assert "image_token_dim: checkpoint has 64, model has 96" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="nhead: checkpoint has 8, model has 4"):
        train_cirr.main(train_args(data, tmp_path / "b", "--resume", last, "--nhead", "4"))


def test_validate_rejects_foreign_and_mismatched_checkpoints(reference_run, tmp_path):
    checkpoint = load_checkpoint(reference_run / "checkpoints" / "last.pt")
    # model_config claims another backbone than the weights are: one message, not a stack of keys
    lying = {**checkpoint, "model_config": build_ssn_model("ViT-Tiny-P16-64").config()}
    save_checkpoint(tmp_path / "lying.pt", lying)
    with pytest.raises(CheckpointMismatchError, match=r"weights do not fit.*class_embedding: checkpoint \(64,\), model \(96,\)"):
        validate.main(["--checkpoint", str(tmp_path / "lying.pt"), "--output", str(tmp_path / "v.json")])
    # a bare state dict (e.g. another code base's checkpoint)
    torch.save(checkpoint["model"], tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by save_checkpoint"):
        validate.main(["--checkpoint", str(tmp_path / "bare.pt"), "--output", str(tmp_path / "v.json")])
    assert not (tmp_path / "v.json").exists()


# ---------------------------------------------------------------------------------------------- non-finite
def nan_reference_images(monkeypatch, poisoned_calls: range) -> None:
    """Make the training items fetched in ``poisoned_calls`` (0-based, in loading order) carry a NaN image."""
    calls = 0
    original = CIRRDataset.__getitem__

    def getitem(self: CIRRDataset, index: int) -> dict[str, Any]:
        nonlocal calls
        item = original(self, index)
        if self.split == "train" and self.mode == "relative":
            if calls in poisoned_calls:
                item["reference_image"] = torch.full_like(item["reference_image"], float("nan"))
            calls += 1
        return item

    monkeypatch.setattr(CIRRDataset, "__getitem__", getitem)


def test_persistent_nan_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    nan_reference_images(monkeypatch, range(16, 10**6))  # steps 1-2 good, every later one NaN
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps .* at step 5"):
        train_cirr.main(train_args(data, run, "--checkpoint_every", "1", "--max_nonfinite_steps", "3"))
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == 2  # written after step 2, not replaced during the NaN streak
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    log = (run / "log.txt").read_text()
    assert log.count("step skipped") == 3 and "not writing" in log


def test_single_nan_batch_is_skipped_and_training_continues(data, tmp_path, monkeypatch):
    nan_reference_images(monkeypatch, range(8, 16))  # step 2 only
    run = train_cirr.main(train_args(data, tmp_path / "run", "--max_nonfinite_steps", "2", epochs=1))
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == STEPS_PER_EPOCH and last["epoch_samples"] == 0  # epoch closed
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert (run / "log.txt").read_text().count("step skipped") == 1


def test_amp_path_lets_grad_scaler_skip_and_stops_after_k(data):
    """fp16 AMP semantics (exercised with an enabled CPU GradScaler): a step with a NaN loss is skipped by the
    scaler, which lowers its scale; K in a row stop training; the weights are never touched.  (Overflows with a
    finite loss do not count: tests/test_training_semantics.py.)"""
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32")
    optimizer = model.configure_optimizers(1e-3, 0.2, "adamw")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    dataset = CIRRDataset(data, "train", "relative", build_transform("clip", 32))
    batch = collate_batch([dataset[i] for i in range(4)])
    poisoned = {**batch, "reference_image": torch.full_like(batch["reference_image"], float("nan"))}
    state = TrainState()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = scaler.get_scale()
    train_one_epoch(model, [poisoned, batch], optimizer, scaler, state, torch.device("cpu"), "fp32", create_loss("ssn"), None, 2)
    assert scaler.get_scale() == scale / 2  # one overflow: skipped, scale lowered
    assert state.nonfinite_steps == 0 and state.epoch_samples == 4 and state.global_step == 2
    after_good = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], after_good[k]) for k in before)  # the good step did update
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        train_one_epoch(model, [poisoned] * 3, optimizer, scaler, state, torch.device("cpu"), "fp32", create_loss("ssn"), None, 2)
    assert all(torch.equal(after_good[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- bad data
def corrupt_train_image(root: Path) -> tuple[str, int]:
    """Truncate the reference image of the first train triplet; returns its file name and how many triplets use it."""
    triplets = read_json(root / "cirr" / "captions" / "cap.rc2.train.json")
    name = triplets[0]["reference"]
    path = CIRRDataset(root, "train", "relative", lambda image: image).image_path(name)
    path.write_bytes(path.read_bytes()[:40])
    uses = sum(name in (t["reference"], t["target_hard"]) for t in triplets)
    return path.name, uses


def test_unreadable_training_image_stops_with_its_name(data_copy, tmp_path):
    file_name, _ = corrupt_train_image(data_copy)
    with pytest.raises(DataError, match=file_name):
        train_cirr.main(train_args(data_copy, tmp_path / "run", epochs=1))
    assert "--skip_bad_samples" in (tmp_path / "run" / "log.txt").read_text()


def test_skip_bad_samples_counts_and_lists_every_skip(data_copy, tmp_path):
    file_name, uses = corrupt_train_image(data_copy)
    run = train_cirr.main(train_args(data_copy, tmp_path / "run", "--skip_bad_samples", epochs=1))
    report = read_json(run / "bad_samples.json")
    assert report["count"] == uses == len(report["samples"]) >= 1
    assert all(file_name in sample["error"] and sample["epoch"] == 0 for sample in report["samples"])
    log = (run / "log.txt").read_text()
    assert log.count("skipping training sample") == uses and f"{uses} training sample(s) skipped" in log
    assert load_checkpoint(run / "checkpoints" / "last.pt")["bad_samples"] == report["samples"]


def test_missing_images_are_all_reported_before_training(data_copy, tmp_path):
    split_map = read_json(data_copy / "cirr" / "image_splits" / "split.rc2.train.json")
    names = list(split_map)[:2]
    for name in names:
        (data_copy / split_map[name]).unlink()
    with pytest.raises(DataError, match="2 data problem") as info:
        train_cirr.main(train_args(data_copy, tmp_path / "run"))
    assert all(name in str(info.value) for name in names)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------------------------------------- full disk
def disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_for(name: str, monkeypatch) -> None:
    """``os.open`` fails with ENOSPC for the temporary file of an atomic write to ``name``."""
    real_open = os.open

    def full_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path).name.startswith(f".{name}."):
            disk_full()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(utils.os, "open", full_open)


def test_full_disk_keeps_earlier_outputs(data, reference_run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    last = run / "checkpoints" / "last.pt"
    metrics, submission_dir = run / "validation.json", run / "submission"
    validate.main(["--checkpoint", str(last), "--output", str(metrics)])
    cirr_test_submission.main(["--checkpoint", str(last), "--submission_name", "s", "--output_dir", str(submission_dir)])
    before = {path: path.read_bytes() for path in [metrics, last, *submission_dir.iterdir()]}

    monkeypatch.setattr(utils.os, "fsync", disk_full)
    with pytest.raises(OSError, match="validation.json") as info:
        validate.main(["--checkpoint", str(last), "--output", str(metrics)])
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="recall_submission_s.json"):
        cirr_test_submission.main(["--checkpoint", str(last), "--submission_name", "s", "--output_dir", str(submission_dir)])
    monkeypatch.undo()
    disk_full_for("last.pt", monkeypatch)  # one more epoch, then its checkpoint meets the full disk
    with pytest.raises(OSError, match="last.pt") as info:
        train_cirr.main(train_args(data, run, "--resume", str(last), epochs=EPOCHS + 1))
    assert info.value.errno == errno.ENOSPC
    assert {path: path.read_bytes() for path in before} == before
    assert not list(run.rglob(".*.tmp"))
