"""Fault tolerance of training and the output writers (docs/fault_tolerance.md).

Kill-and-resume (SIGKILL in a subprocess, SIGTERM in a subprocess and in-process) must reach the very
weights, optimiser state and metrics of an uninterrupted run; mismatched checkpoints, non-finite losses,
unreadable images and a full disk must each end in a clear error that keeps the earlier files intact.

Every run is the tiny one: 48 triplets of 32 px images, batch 8 (6 steps per epoch), ViT-Tiny-P8-32 from
random weights, one CPU thread (so in-process and subprocess runs compute the same floating point sums).
"""
from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import random
import runpy
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
import inference
import train_cirr
import training.train
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
    for key in ("args", "run_id"):  # output_dir / resume and the run's id differ by design
        expected.pop(key), actual.pop(key)
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
@pytest.mark.slow  # a training subprocess killed and resumed
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


@pytest.mark.slow  # SIGTERM, then a resume compared with the uninterrupted run
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


@pytest.mark.slow  # a training subprocess
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
def corrupt_train_image(root: Path, keep: float = 0.0) -> tuple[str, int]:
    """Truncate the reference image of the first train triplet (to 40 bytes, the PNG header cut, or to the fraction
    ``keep`` of its bytes); returns its file name and how many triplets use it."""
    triplets = read_json(root / "cirr" / "captions" / "cap.rc2.train.json")
    name = triplets[0]["reference"]
    path = CIRRDataset(root, "train", "relative", lambda image: image).image_path(name)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep else data[:40])
    uses = sum(name in (t["reference"], t["target_hard"]) for t in triplets)
    return path.name, uses


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_training_image_stops_with_its_name(data_copy, tmp_path, workers):
    # Cut in the middle of the image data: the header is intact, so only reading the image fails (in epoch 1).
    file_name, _ = corrupt_train_image(data_copy, keep=0.5)
    with pytest.raises(DataError, match=file_name) as info:
        train_cirr.main(train_args(data_copy, tmp_path / "run", "--num_workers", str(workers), epochs=1))
    assert "Traceback" not in str(info.value)  # a worker's traceback stays out of the message
    assert "--skip_bad_samples" in (tmp_path / "run" / "log.txt").read_text()


def test_skip_bad_samples_counts_and_lists_every_skip(data_copy, tmp_path):
    file_name, uses = corrupt_train_image(data_copy)
    run = train_cirr.main(train_args(data_copy, tmp_path / "run", "--skip_bad_samples", "--max_bad_sample_fraction", "0.5",
                                     epochs=1))
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
    log = (run / "log.txt").read_text().splitlines()  # the error that ended the run is in its log too
    assert any("ERROR" in line and "could not write" in line and "last.pt" in line and "No space left on device" in line
               for line in log)


# ---------------------------------------------------------------------------------------------- damaged checkpoints
def test_bytes_flipped_inside_last_pt_are_always_a_named_error(data, reference_run, tmp_path):
    """30 seeded tries of 8-64 bytes flipped at random places of a training last.pt (tensor data, pickle, zip records,
    the seal): each one a CheckpointError naming the file, never a silent load."""
    good = (reference_run / "checkpoints" / "last.pt").read_bytes()
    rng = random.Random(12)
    damaged = tmp_path / "checkpoints" / "last.pt"
    damaged.parent.mkdir()
    damaged.write_bytes(good)
    for _ in range(30):
        # Flipped in place and put back after the load: rewriting the whole 45 MB file per try took 2 s of 3.
        offsets = rng.sample(range(len(good)), rng.randint(8, 64))
        with damaged.open("r+b") as f:
            for offset in offsets:
                f.seek(offset)
                f.write(bytes([good[offset] ^ rng.randint(1, 255)]))
        with pytest.raises(CheckpointError, match=str(damaged)):
            load_checkpoint(damaged)
        with damaged.open("r+b") as f:
            for offset in offsets:
                f.seek(offset)
                f.write(good[offset:offset + 1])
    assert damaged.read_bytes() == good
    damaged.write_bytes(good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 1]) + good[len(good) // 2 + 1:])
    # as --resume and validate.py meet it
    with pytest.raises(CheckpointError, match=f"{damaged}: damaged"):
        train_cirr.main(train_args(data, tmp_path, "--resume", str(damaged)))
    with pytest.raises(CheckpointError, match=f"{damaged}: damaged"):
        validate.main(["--checkpoint", str(damaged), "--output", str(tmp_path / "v.json")])


# ---------------------------------------------------------------------------------------------- every split up front
def val_image_paths(root: Path) -> list[Path]:
    split_map = read_json(root / "cirr" / "image_splits" / "split.rc2.val.json")
    return [root / relative for relative in split_map.values()]


def test_an_empty_val_split_is_reported_before_training(data_copy, tmp_path):
    (data_copy / "cirr" / "captions" / "cap.rc2.val.json").write_text("[]")
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"\[val\] cirr val: no queries"):
        train_cirr.main(train_args(data_copy, run))
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "metrics.jsonl").exists()


def test_train_and_val_problems_are_reported_together(data_copy, tmp_path):
    split_map = read_json(data_copy / "cirr" / "image_splits" / "split.rc2.train.json")
    missing = data_copy / next(iter(split_map.values()))
    missing.unlink()
    captions = data_copy / "cirr" / "captions" / "cap.rc2.val.json"
    entries = read_json(captions)
    captions.write_text(json.dumps([{**entries[0], "reference": "no-such-image"}, *entries[1:]]))
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"2 data problem\(s\) \(train: 1, val: 1\)") as info:
        train_cirr.main(train_args(data_copy, run))
    assert missing.name in str(info.value) and "no-such-image" in str(info.value)
    # the val annotations repaired, two val images are not images: found before training too, with the train problem
    captions.write_text(json.dumps(entries))
    garbled = val_image_paths(data_copy)[:2]
    for path in garbled:
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"3 data problem\(s\) \(train: 1, val: 2\)") as info:
        train_cirr.main(train_args(data_copy, run))
    assert all(f"{path}: not an image file" in str(info.value) for path in garbled)
    assert not (run / "checkpoints" / "last.pt").exists()


@pytest.mark.slow  # a run stopped in validation, resumed and compared with the uninterrupted run
def test_a_val_image_that_fails_to_decode_costs_no_training(data_copy, reference_run, tmp_path):
    """The header is intact (the up-front check passes), the data cut: validation fails after epoch 1, whose training
    is in last.pt already; with the image repaired, --resume runs that validation and ends as an uninterrupted run."""
    image = val_image_paths(data_copy)[0]
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(DataError, match=f"(?s){image.name}.*--resume {last}"):
        train_cirr.main(train_args(data_copy, run))
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["validation_pending"]) == (1, True)
    image.write_bytes(good)
    train_cirr.main(train_args(data_copy, run, "--resume", str(last)))
    assert_same_run(reference_run, run)
    assert "running the validation of epoch 1" in (run / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------- run folders
def stop_at_step(monkeypatch, step: int, error: BaseException) -> None:
    """Training raises ``error`` in its ``step``-th optimisation step (1-based), as a kill or a bug would end it."""
    calls = 0
    real_step = training.train.train_step

    def train_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == step:
            raise error
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training.train, "train_step", train_step)


@pytest.mark.slow  # two trainings; the folder rules alone: tests/test_run_dir.py
def test_a_run_stopped_before_its_first_checkpoint_still_owns_its_folder(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    stop_at_step(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train_cirr.main(train_args(data, run))
    monkeypatch.undo()
    assert not (run / "checkpoints" / "last.pt").exists()
    run_id = read_json(run / "args.json")["run_id"]
    assert "stopped: interrupted" in (run / "log.txt").read_text()
    before = {name: (run / name).read_bytes() for name in ("args.json", "log.txt", "metrics.jsonl")}

    with pytest.raises(FileExistsError, match=r"stopped before its first checkpoint.*--lr 0\.002.*--overwrite"):
        train_cirr.main(train_args(data, run, "--lr", "2e-3"))  # other flags: refused, nothing appended
    assert {name: (run / name).read_bytes() for name in before} == before

    train_cirr.main(train_args(data, run, epochs=1))  # the same flags: the run starts again
    assert read_json(run / "args.json")["run_id"] == run_id
    steps = [record["step"] for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in record]
    assert steps == list(range(1, STEPS_PER_EPOCH + 1))  # the first attempt's records are gone
    log = (run / "log.txt").read_text()
    assert "stopped: interrupted" in log and f"restarting run {run_id}" in log  # the log keeps both attempts


@pytest.mark.slow  # three trainings, validation and a submission
def test_overwrite_removes_every_output_of_the_old_run(data, tmp_path):
    run = train_cirr.main(train_args(data, tmp_path / "run"))
    best = run / "checkpoints" / "best.pt"
    validate.main(["--checkpoint", str(best), "--visualize", "2"])
    cirr_test_submission.main(["--checkpoint", str(best), "--submission_name", "old"])
    (run / "checkpoints" / ".last.pt.0123456789ab.tmp").write_bytes(b"\0" * 4096)  # a write killed midway
    (run / "notes.txt").write_text("the user's own file")
    clean = train_cirr.main(train_args(data, tmp_path / "clean", "--lr", "2e-3", epochs=1))
    old_only = files_of(run) - files_of(clean)  # validation outputs, feature cache, submission, more checkpoints, ...
    assert {"feature_cache", "submission", "checkpoints", "notes.txt"} <= {name.split("/")[0] for name in old_only}

    train_cirr.main(train_args(data, run, "--lr", "2e-3", "--overwrite", epochs=1))
    assert files_of(run) == files_of(clean) | {"notes.txt"}
    log = (run / "log.txt").read_text()
    assert log.count("training ViT-Tiny-P8-32") == 1 and "--overwrite: deleted run" in log


def files_of(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.slow  # a training and two resumes; the folder rules alone: tests/test_run_dir.py
def test_resume_into_another_runs_folder_is_refused(data, reference_run, tmp_path):
    other = train_cirr.main(train_args(data, tmp_path / "other", epochs=1))
    before = {name: (other / name).read_bytes() for name in files_of(other)}
    last = reference_run / "checkpoints" / "last.pt"
    with pytest.raises(FileExistsError, match=rf"{other} holds run .*not the run of {last}.*empty --output_dir"):
        train_cirr.main(train_args(data, other, "--resume", str(last), epochs=EPOCHS + 1))
    assert {name: (other / name).read_bytes() for name in files_of(other)} == before

    # into an empty folder the run continues there, under its own id
    moved = train_cirr.main(train_args(data, tmp_path / "moved", "--resume", str(last), epochs=EPOCHS + 1))
    run_id = read_json(reference_run / "args.json")["run_id"]
    assert read_json(moved / "args.json")["run_id"] == load_checkpoint(moved / "checkpoints" / "last.pt")["run_id"] == run_id
    # --overwrite of the folder that holds the checkpoint to resume from would delete it
    copy = Path(shutil.copytree(reference_run, tmp_path / "copy"))
    with pytest.raises(FileExistsError, match="--overwrite would delete"):
        train_cirr.main(train_args(data, copy, "--resume", str(copy / "checkpoints" / "last.pt"), "--overwrite"))


@pytest.mark.slow  # a resume and a training; the rule alone: tests/test_run_dir.py
def test_orphaned_temporary_files_are_removed_on_start_and_resume(data, reference_run, tmp_path):
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    orphans = [run / "checkpoints" / ".last.pt.0123456789ab.tmp", run / ".metrics.jsonl.abcdef012345.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * (1 << 20))
    unrelated = run / "checkpoints" / ".notes.tmp"
    unrelated.write_text("not a temporary file of this project")
    train_cirr.main(train_args(data, run, "--resume", str(run / "checkpoints" / "last.pt")))  # nothing left to train
    assert not any(orphan.exists() for orphan in orphans) and unrelated.exists()
    assert "removed 2 temporary file(s) of interrupted writes (2.0 MiB)" in (run / "log.txt").read_text()

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    orphan = fresh / ".args.json.0123456789ab.tmp"
    orphan.write_text("{")
    train_cirr.main(train_args(data, fresh, epochs=1))
    assert not orphan.exists()


# ---------------------------------------------------------------------------------------------- bad samples limit
def test_bad_samples_stop_past_the_limit_and_a_run_without_a_step_never_finishes(data_copy, tmp_path):
    split_map = read_json(data_copy / "cirr" / "image_splits" / "split.rc2.train.json")
    for relative in split_map.values():
        (data_copy / relative).write_bytes(b"not an image")  # every training image unreadable
    run = tmp_path / "run"
    with pytest.raises(DataError, match="more than --max_bad_sample_fraction 0.01 allows"):
        train_cirr.main(train_args(data_copy, run, "--skip_bad_samples"))
    assert read_json(run / "bad_samples.json")["count"] >= 1
    assert not (run / "summary.json").exists() and not (run / "checkpoints" / "best.pt").exists()

    unlimited = tmp_path / "unlimited"
    with pytest.raises(RuntimeError, match="no optimiser step in 6 batches"):
        train_cirr.main(train_args(data_copy, unlimited, "--skip_bad_samples", "--max_bad_sample_fraction", "1", epochs=1))
    assert not (unlimited / "summary.json").exists() and not (unlimited / "checkpoints" / "best.pt").exists()
    assert "no optimiser step" in (unlimited / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------- gallery cache
def test_validation_cache_follows_the_content_of_the_gallery_images(data_copy, reference_run, tmp_path):
    """Every val image replaced (by another one's bytes, modification time kept): the gallery is encoded again and the
    metrics are those of --no_cache."""
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    argv = ["--checkpoint", str(run / "checkpoints" / "last.pt"), "--data_root", str(data_copy),
            "--output", str(tmp_path / "v.json")]
    validate.main(argv)
    assert len(list((run / "feature_cache").glob("gallery_*.pt"))) == 1
    images = val_image_paths(data_copy)
    contents, stats = [p.read_bytes() for p in images], [p.stat() for p in images]
    for path, content, stat in zip(images, contents[1:] + contents[:1], stats):
        path.write_bytes(content)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = validate.main(argv)
    assert len(list((run / "feature_cache").glob("gallery_*.pt"))) == 2  # encoded again, under a new key
    assert after == validate.main(argv + ["--no_cache"])


# ---------------------------------------------------------------------------------------------- fatal errors in the log
def test_an_unexpected_error_goes_to_the_run_log_with_its_traceback(data, tmp_path, monkeypatch):
    stop_at_step(monkeypatch, 2, TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        train_cirr.main(train_args(data, tmp_path / "run"))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "stopped by an unexpected error: TypeError: a bug" in log and "Traceback (most recent call last)" in log


# ---------------------------------------------------------------------------------------------- user errors at the shell
def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**subprocess_env(), **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # four script subprocesses
def test_scripts_end_a_user_error_with_one_line_and_show_the_traceback_with_debug(data, tmp_path):
    missing = tmp_path / "missing.pt"
    train = run_script("train_cirr.py", *train_args(data, tmp_path / "run", "--resume", str(missing)))
    assert train.returncode == 1 and train.stderr == f"train_cirr.py: error: checkpoint {missing}: no such file\n"
    validation = run_script("validate.py", "--checkpoint", str(missing))
    assert validation.returncode == 1 and validation.stderr == f"validate.py: error: checkpoint {missing}: no such file\n"
    for debug in (run_script("train_cirr.py", *train_args(data, tmp_path / "run", "--resume", str(missing)), "--debug"),
                  run_script("validate.py", "--checkpoint", str(missing), env={"CIR_DEBUG": "1"})):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.rstrip().endswith(f"checkpoint {missing}: no such file")


@pytest.mark.slow  # a training subprocess
def test_a_training_error_with_dataloader_workers_ends_the_process(data_copy, tmp_path):
    """Training workers ignore SIGTERM; after an error they must still be shut down, or the interpreter waits for
    them at exit for ever (as it did before)."""
    file_name, _ = corrupt_train_image(data_copy, keep=0.5)
    result = run_script("train_cirr.py", *train_args(data_copy, tmp_path / "run", "--num_workers", "2", epochs=1))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("train_cirr.py: error: ") and file_name in result.stderr


def user_error_commands(data: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Per script: a command line with a user error, and the start of its one-line message."""
    missing = tmp_path / "missing.pt"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return {
        "train_cirr.py": (train_args(data, tmp_path / "r", "--resume", str(missing)), f"checkpoint {missing}: no such file"),
        "train_fiq.py": (["--data_root", str(tmp_path), "--resume", str(missing), "--output_dir", str(tmp_path / "f")],
                         f"checkpoint {missing}: no such file"),
        "validate.py": (["--checkpoint", str(missing)], f"checkpoint {missing}: no such file"),
        "cirr_test_submission.py": (["--checkpoint", str(missing), "--submission_name", "s"],
                                    f"checkpoint {missing}: no such file"),
        "retrieve.py": (["--checkpoint", str(missing), "--reference", str(tmp_path / "ref.png"), "--text", "t",
                         "--gallery_dir", str(tmp_path)], f"{tmp_path / 'ref.png'}: image file not found"),
        "zero_shot_cvsi.py": (["--dataset", "circo", "--data_root", str(tmp_path / "nothing"), "--output_dir",
                               str(tmp_path / "z")], f"--data_root {tmp_path / 'nothing'}: no circo dataset there"),
        "train_phi.py": (["--captions", str(tmp_path / "captions.txt"), "--output_dir", str(tmp_path / "phi")],
                         "train_phi.py: error: "),
        "convert_official_checkpoint.py": ([str(missing), "--output", str(tmp_path / "c.pt"), "--dataset", "cirr"],
                                           f"error: official checkpoint {missing}: no such file"),
        "demo.py": (["--output_dir", str(a_file / "demo")], "Not a directory"),
        "plot_curves.py": ([str(tmp_path / "no_run")], f"{tmp_path / 'no_run' / 'metrics.jsonl'}: metrics log not found"),
        "app.py": ([], "python demo.py --output_dir demo_output"),  # run in tmp_path: no demo_output/ there
        "synthetic": (["cirr", "--output", str(a_file / "data")], "Not a directory"),
    }


@pytest.mark.parametrize("script", ["train_cirr.py", "train_fiq.py", "validate.py", "cirr_test_submission.py",
                                    "retrieve.py", "zero_shot_cvsi.py", "train_phi.py", "convert_official_checkpoint.py",
                                    "demo.py", "plot_curves.py", "app.py", "synthetic"])
def test_every_script_ends_a_user_error_with_one_line(script, data, tmp_path, monkeypatch, capsys):
    """Each entry point as ``python <script>`` runs it (in this process): exit status 1, one line on stderr.

    (The real process exit: ``test_scripts_end_a_user_error_with_one_line_and_show_the_traceback_with_debug``.)
    """
    argv, expected = user_error_commands(data, tmp_path)[script]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *argv])
    with pytest.raises(SystemExit) as exit_info:
        if script == "synthetic":
            runpy.run_module("synthetic", run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO / script), run_name="__main__")
    code, err = exit_info.value.code, capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits with status 1
        code, err = 1, code + "\n"
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0] and (lines[0].startswith(("error: ", "train_phi.py: error: ", "python -m synthetic: error: "))
                                      or lines[0].startswith(f"{script}: error: ")), lines[0]


SCRIPTS = ("train_cirr.py", "train_fiq.py", "validate.py", "cirr_test_submission.py", "retrieve.py", "zero_shot_cvsi.py",
           "train_phi.py", "convert_official_checkpoint.py", "demo.py", "benchmark.py", "plot_curves.py", "app.py",
           "synthetic/__main__.py")


def test_every_script_exits_through_run_cli():
    """The entry point of every script is ``utils.run_cli(main)`` (benchmark.py included, which has no user error
    to provoke above)."""
    for script in SCRIPTS:
        tree = ast.parse((REPO / script).read_text())
        guard = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        entry = guard[0].body if guard else [node for node in tree.body if isinstance(node, ast.Expr)]
        assert any("run_cli(main" in ast.unparse(node) for node in entry), script


def test_a_programming_error_keeps_its_traceback_and_debug_shows_a_user_errors(tmp_path, monkeypatch):
    def bug(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(sys, "argv", ["validate.py", "--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(CheckpointError):  # --debug: the user error propagates with its traceback
        utils.run_cli(validate.main, [*sys.argv[1:], "--debug"])
    monkeypatch.setattr(inference, "validate_checkpoint", bug)
    with pytest.raises(KeyError, match="a bug"):
        runpy.run_path(str(REPO / "validate.py"), run_name="__main__")
