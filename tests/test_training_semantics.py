"""Training semantics of the official SSN scripts (issue 10, part 4).

Best checkpoints by the three CIRR means, the validation schedule, fp32 evaluation, GradScaler
overflows versus non-finite losses, and CPU bf16 autocast.  The official behaviour comes from our
re-statement in ``tests/reference/official_training.py``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from pathlib import Path
from typing import Iterator

import pytest
import torch

import cirr_test_submission
import evaluation
import retrieve
import train_cirr
import training.params
import training.train
import training.validation
import utils
import validate
from checkpoint import CheckpointSaver, atomic_link_or_copy, load_checkpoint
from data_utils import CIRRDataset, build_transform, collate_batch
from dataset_registry import get_dataset
from model import build_ssn_model
from model.loss import create_loss
from precision import PRECISIONS, effective_precision
from synthetic import make_synthetic_cirr
from training.resilience import NonFiniteLossError
from training.state import TrainState
from training.train import train_one_epoch
from training.validation import validation_due
from tests.reference.official_training import official_best_epochs, official_validated_epochs

TINY = ["--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none", "--transform", "clip", "--num_workers", "0",
        "--batch_size", "8", "--lr", "1e-3", "--optimizer", "adamw"]
CIRR_RECALLS = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3")


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_cirr(tmp_path_factory.mktemp("data"), seed=7, num_train=16, num_val=8, num_test=4, image_size=32)


def cirr_validation(recalls: list[float]) -> dict[str, float]:
    """A CIRR validation result with the given 7 recalls (means as the official script computes them)."""
    metrics = dict(zip(CIRR_RECALLS, recalls))
    metrics["Avg"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    metrics.update(mean=statistics.mean(recalls), harmonic_mean=statistics.harmonic_mean(recalls),
                   geometric_mean=statistics.geometric_mean(recalls))
    return metrics


# ---------------------------------------------------------------------------------------------- best checkpoints
# Three validations whose arithmetic, harmonic and geometric means peak at different ones.
SCRIPTED_RECALLS = [[30.0] * 7, [80.0] * 6 + [2.0], [50.0] * 7]
EPOCHS, FREQUENCY = 4, 2  # the official schedule validates after 0-based epochs 0 and 2; we also after 3


@pytest.fixture(scope="module")
def scripted_run(cirr_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIRR run whose validations return SCRIPTED_RECALLS in turn (the training itself is real)."""
    results = iter(SCRIPTED_RECALLS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.validation, "evaluate", lambda *args, **kwargs: cirr_validation(next(results)))
        return train_cirr.main(["--data_root", str(cirr_root), *TINY, "--num_epochs", str(EPOCHS),
                                "--validation_frequency", str(FREQUENCY), "--save_best", "--best_metric", "harmonic_mean",
                                "--output_dir", str(tmp_path_factory.mktemp("run"))])


def test_validation_schedule_is_the_official_one_plus_the_last_epoch(scripted_run: Path):
    logged = utils.read_metrics_log(scripted_run / "metrics.jsonl").dropna(subset=["val/mean"])["epoch"].astype(int)
    official = [epoch + 1 for epoch in official_validated_epochs(EPOCHS, FREQUENCY)]  # our epochs count completed ones
    assert logged.tolist() == official + [EPOCHS]


def test_cirr_keeps_the_official_three_best_checkpoints(scripted_run: Path):
    validated = official_validated_epochs(EPOCHS, FREQUENCY) + [EPOCHS - 1]
    official = official_best_epochs(list(zip(validated, SCRIPTED_RECALLS)))
    assert len(set(official.values())) > 1  # the scripted means do peak at different validations
    checkpoints = scripted_run / "checkpoints"
    ours = {"arithmetic": "best_mean.pt", "harmonic": "best_harmonic.pt", "geometric": "best_geometric.pt"}
    for name, file in ours.items():
        assert load_checkpoint(checkpoints / file)["epoch"] == official[name] + 1, file


def test_best_pt_follows_best_metric_and_equal_states_are_stored_once(scripted_run: Path):
    checkpoints = scripted_run / "checkpoints"
    best = load_checkpoint(checkpoints / "best.pt")
    harmonic = statistics.harmonic_mean(SCRIPTED_RECALLS[-1])
    assert best["best_metric"] == pytest.approx(harmonic) and best["best_by"]["harmonic_mean"]["epoch"] == EPOCHS
    inode = {name: (checkpoints / name).stat().st_ino for name in ("best.pt", "best_mean.pt", "best_harmonic.pt", "best_geometric.pt")}
    # The last validation is best by harmonic and geometric mean: one file under three names.
    assert inode["best.pt"] == inode["best_harmonic.pt"] == inode["best_geometric.pt"] != inode["best_mean.pt"]
    # best_mean.pt was linked to best_geometric.pt before the last validation replaced the latter: still intact.
    assert load_checkpoint(checkpoints / "best_mean.pt")["epoch"] == 3


def test_summary_and_report_name_the_selection(scripted_run: Path):
    summary = json.loads((scripted_run / "summary.json").read_text())
    assert summary["best_metric_name"] == "harmonic_mean" and summary["best_epoch"] == EPOCHS
    assert summary["best_metrics"] == pytest.approx(cirr_validation(SCRIPTED_RECALLS[-1]))
    assert {criterion: b["epoch"] for criterion, b in summary["best_by"].items()} == {
        "mean": 3, "harmonic_mean": EPOCHS, "geometric_mean": EPOCHS}
    report = (scripted_run / "report.md").read_text()
    assert f"ours: best val during training by harmonic_mean (epoch {EPOCHS})" in report
    assert f"| best mean | {statistics.mean(SCRIPTED_RECALLS[1]):.2f} (epoch 3) |" in report


def test_best_metric_choices_per_dataset(tmp_path: Path):
    assert training.params.build_train_parser("cirr").parse_args(["--data_root", "x"]).best_metric == "mean"
    with pytest.raises(SystemExit):
        training.params.build_train_parser("fashioniq").parse_args(["--data_root", "x", "--best_metric", "harmonic_mean"])

    def best_files(dataset: str, improved: list[str]) -> list[str]:
        """The files a validation improving ``improved`` replaces in a --save_best run selecting by 'mean'."""
        saver = CheckpointSaver(tmp_path / dataset, dict, best_criterion="mean",
                                criterion_files=get_dataset(dataset).criterion_files, save_best=True)
        return saver.best_files(improved)

    # FashionIQ keeps its single metric and file.
    assert best_files("fashioniq", ["mean"]) == ["best.pt"]
    assert best_files("cirr", ["geometric_mean"]) == ["best_geometric.pt"]
    with pytest.raises(ValueError, match="fashioniq checkpoints are selected by one of"):
        get_dataset("fashioniq").score({"mean": 1.0, "harmonic_mean": 1.0}, "harmonic_mean")


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq"])
def test_parser_defaults_are_the_registry_recipe_and_shown_in_help(dataset: str):
    spec = get_dataset(dataset)
    parser = training.params.build_train_parser(dataset)
    args = parser.parse_args(["--data_root", "x"])
    assert {key: getattr(args, key) for key in spec.train_defaults} == dict(spec.train_defaults)
    assert get_dataset(args.dataset) is spec and hasattr(args, "dress_types") == bool(spec.categories)
    options = {block.split()[0]: " ".join(block.split()) for block in parser.format_help().split("\n  --")[1:]}
    for key, value in spec.train_defaults.items():
        assert f"(default: {value})" in options[key], key
    # The official --dataset flag takes any spelling of this script's dataset, and no other dataset.
    other = next(name for name in ("cirr", "fashioniq") if name != dataset)
    assert training.params.parse_train_args(dataset, ["--data_root", "x", "--dataset", spec.title.upper()]).dataset
    with pytest.raises(ValueError, match=f"--dataset {other} does not match this script, which trains on {dataset}"):
        training.params.parse_train_args(dataset, ["--data_root", "x", "--dataset", other])


def test_legacy_checkpoint_resumes_with_its_arithmetic_best():
    legacy = {"epoch": 2, "global_step": 4, "best_metric": 41.5, "best_metrics": {"mean": 41.5}}
    state = TrainState.from_checkpoint(legacy)
    assert state.best_by == {"mean": {"value": 41.5, "epoch": None, "metrics": {"mean": 41.5}}}
    improved = state.record_validation(cirr_validation([40.0] * 7), get_dataset("cirr"))
    assert improved == ["harmonic_mean", "geometric_mean"]  # unknown before; the mean did not improve
    assert TrainState.from_checkpoint({**legacy, "best_metric": -math.inf}).best_by == {}


def test_link_falls_back_to_a_copy_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source, destination = tmp_path / "a.pt", tmp_path / "b.pt"
    source.write_bytes(b"state")
    destination.write_bytes(b"old")

    def no_links(src: os.PathLike, dst: os.PathLike) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    atomic_link_or_copy(source, destination)
    assert destination.read_bytes() == b"state" and destination.stat().st_ino != source.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temporary file left


# ---------------------------------------------------------------------------------------------- validation schedule
@pytest.mark.parametrize("num_epochs, frequency", [(1, 1), (5, 1), (7, 3), (8, 3), (10, 5), (3, 10)])
def test_validation_due_matches_the_official_schedule(num_epochs: int, frequency: int):
    ours = [epoch for epoch in range(num_epochs) if validation_due(epoch, frequency, num_epochs)]
    official = official_validated_epochs(num_epochs, frequency)
    # Ours = the official epochs, plus the last epoch when the official schedule skips it.
    assert ours == sorted(set(official) | {num_epochs - 1})


# ---------------------------------------------------------------------------------------------- precision
def test_precision_that_runs_on_each_device():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert [effective_precision(p, cpu) for p in PRECISIONS] == ["fp32", "amp_bf16", "fp32"]  # CPU fp16 is slow
    assert [effective_precision(p, cuda) for p in PRECISIONS] == list(PRECISIONS)
    assert [effective_precision(p, mps) for p in PRECISIONS] == ["fp32"] * 3
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        effective_precision("fp16", cpu)


@pytest.mark.parametrize("module", [training.params, validate, cirr_test_submission, retrieve], ids=lambda m: m.__name__)
def test_evaluation_defaults_to_fp32_as_the_official(module):
    if module is training.params:
        args = training.params.build_train_parser("cirr").parse_args(["--data_root", "x"])
        assert (args.precision, args.eval_precision) == ("amp", "fp32")
        return
    required = {"validate": [], "cirr_test_submission": ["--submission_name", "s"],
                "retrieve": ["--reference", "r", "--text", "t", "--gallery_dir", "g"]}[module.__name__]
    assert module.build_parser().parse_args(["--checkpoint", "c", *required]).precision == "fp32"


@pytest.fixture
def recorded_autocast(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.dtype | None]]:
    """autocast in the training step and in evaluation, recording each use: (precision asked for, CPU autocast
    dtype in force or None)."""
    seen: list[tuple[str, torch.dtype | None]] = []
    real = training.train.autocast

    @contextlib.contextmanager
    def recording(precision: str, device: torch.device) -> Iterator[None]:
        with real(precision, device):
            seen.append((precision, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
            yield

    for module in (training.train, evaluation):
        monkeypatch.setattr(module, "autocast", recording)
    return seen


def test_amp_bf16_trains_on_cpu_and_validates_in_fp32(cirr_root: Path, tmp_path: Path, recorded_autocast):
    run = train_cirr.main(["--data_root", str(cirr_root), *TINY, "--num_epochs", "1", "--precision", "amp_bf16",
                           "--output_dir", str(tmp_path / "run")])
    summary = json.loads((run / "summary.json").read_text())
    steps = summary["steps"]
    assert steps >= 2 and recorded_autocast[:steps] == [("amp_bf16", torch.bfloat16)] * steps
    assert len(recorded_autocast) > steps and set(recorded_autocast[steps:]) == {("fp32", None)}  # validation
    assert math.isfinite(utils.read_metrics_log(run / "metrics.jsonl")["train/epoch_loss"].dropna().iloc[-1])
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert (summary["precision"], summary["eval_precision"]) == ("amp_bf16", "fp32")
    report = (run / "report.md").read_text()
    assert "| precision | amp_bf16 |" in report and "| eval_precision | fp32 |" in report


# ---------------------------------------------------------------------------------------------- GradScaler
def tiny_batches(cirr_root: Path) -> tuple[dict, dict]:
    """A training batch of 4 triplets and the same batch with NaN reference images (a non-finite loss)."""
    dataset = CIRRDataset(cirr_root, "train", "relative", build_transform("clip", 32))
    batch = collate_batch([dataset[i] for i in range(4)])
    return batch, {**batch, "reference_image": torch.full_like(batch["reference_image"], math.nan)}


@contextlib.contextmanager
def overflowing_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Backward passes give one parameter inf gradients, with a finite loss: an fp16 overflow as the scaler sees it."""
    handle = model.head.output_layer.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_grad_scaler_overflow_is_not_a_nonfinite_step(cirr_root: Path, grad_clip: float | None):
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32")
    optimizer = model.configure_optimizers(1e-3, 0.2, "adamw")
    scaler = torch.amp.GradScaler("cpu")  # enabled, as for --precision amp
    batch, nan_batch = tiny_batches(cirr_root)
    state, cpu = TrainState(), torch.device("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = scaler.get_scale()
    with overflowing_gradients(model):
        train_one_epoch(model, [batch, batch], optimizer, scaler, state, cpu, "fp32", create_loss("ssn"), grad_clip, 2)
    assert scaler.get_scale() == scale / 4  # both steps skipped by the scaler, which halved its scale twice
    assert state.nonfinite_steps == 0 and state.amp_overflow_steps == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train_one_epoch(model, [nan_batch], optimizer, scaler, state, cpu, "fp32", create_loss("ssn"), grad_clip, 2)
    assert state.nonfinite_steps == 1 and state.amp_overflow_steps == 2  # a non-finite loss does count


def test_overflow_at_scale_one_counts_as_nonfinite(cirr_root: Path):
    """At scale <= 1 the scaling cannot have caused the overflow: the gradients themselves are not finite."""
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32")
    optimizer = model.configure_optimizers(1e-3, 0.2, "adamw")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    batch, _ = tiny_batches(cirr_root)
    state = TrainState()
    with overflowing_gradients(model), pytest.raises(NonFiniteLossError, match="2 consecutive"):
        # scale 2: an overflow the scaler calibrates away; then scale 1 and 0.5: non-finite gradients.
        train_one_epoch(model, [batch] * 3, optimizer, scaler, state, torch.device("cpu"), "fp32", create_loss("ssn"), None, 2)
    assert state.amp_overflow_steps == 1 and scaler.get_scale() == 0.25
