"""The whole pipeline through the scripts' main([...]) on small synthetic datasets (open_clip test style)."""
from __future__ import annotations

import json

import pytest
import torch

import cirr_test_submission
import train_cirr
import train_fiq
import utils
import validate
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import TINY_CIRR_NUM_TRAIN, TINY_RUN_BATCH, TINY_RUN_EPOCHS, TINY_TRAIN_ARGS
from evaluation import ModelRetrieval
from inference import write_test_outputs
from model import CheckpointMismatchError
from synthetic import make_synthetic_fashioniq

TINY = TINY_TRAIN_ARGS


@pytest.fixture(scope="module")
def cirr_root(tiny_cirr_root):
    return tiny_cirr_root


@pytest.fixture(scope="module")
def cirr_run(tiny_cirr_run):
    return tiny_cirr_run


def test_training_writes_run_outputs_and_the_loss_decreases(cirr_run):
    assert (cirr_run / "checkpoints" / "best.pt").is_file() and (cirr_run / "checkpoints" / "last.pt").is_file()
    args = json.loads((cirr_run / "args.json").read_text())
    assert args["clip_model_name"] == "ViT-Tiny-P8-32"
    log = utils.read_metrics_log(cirr_run / "metrics.jsonl")
    epoch_losses = log["train/epoch_loss"].dropna().tolist()
    assert len(epoch_losses) == TINY_RUN_EPOCHS and epoch_losses[-1] < epoch_losses[0]
    assert {"val/R@1", "val/Rs@1", "val/Avg"} <= set(log.columns)
    summary = json.loads((cirr_run / "summary.json").read_text())
    steps_per_epoch = TINY_CIRR_NUM_TRAIN // TINY_RUN_BATCH
    assert summary["epochs"] == TINY_RUN_EPOCHS and summary["steps"] == TINY_RUN_EPOCHS * steps_per_epoch


def test_checkpoint_holds_config_and_state(cirr_run):
    checkpoint = load_checkpoint(cirr_run / "checkpoints" / "last.pt")
    assert checkpoint["model_config"]["clip_model_name"] == "ViT-Tiny-P8-32"
    assert checkpoint["model_config"]["text_width"] == 64
    assert checkpoint["epoch"] == TINY_RUN_EPOCHS and checkpoint["dataset"] == "cirr"
    assert {"optimizer", "scheduler", "scaler", "rng", "args", "format_version"} <= set(checkpoint)


def test_validate_rebuilds_the_model_from_the_checkpoint(cirr_run, tmp_path):
    output = tmp_path / "val.json"
    results = validate.main(["--checkpoint", str(cirr_run / "checkpoints" / "best.pt"), "--baselines",
                             "--output", str(output)])
    assert set(results) == {"ssn", "image", "text", "sum"}
    saved = json.loads(output.read_text())["metrics"]
    best = load_checkpoint(cirr_run / "checkpoints" / "best.pt")["best_metrics"]
    # Validation of the saved weights reproduces the metrics measured during training.
    for key in ("R@1", "R@5", "Rs@1", "Avg"):
        assert saved["ssn"][key] == pytest.approx(best[key], abs=1e-6)


def test_submission_files_are_complete_and_checked(cirr_run, cirr_root, tmp_path):
    recall_path, subset_path = cirr_test_submission.main([
        "--checkpoint", str(cirr_run / "checkpoints" / "best.pt"), "--submission_name", "t",
        "--output_dir", str(tmp_path)])
    assert recall_path.name == "recall_submission_t.json" and subset_path.name == "recall_subset_submission_t.json"
    recall, subset = json.loads(recall_path.read_text()), json.loads(subset_path.read_text())
    triplets = json.loads((cirr_root / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and subset["metric"] == "recall_subset"
    for triplet in triplets:
        ranked = recall[str(triplet["pairid"])]
        assert len(ranked) == 50 and triplet["reference"] not in ranked
        top3 = subset[str(triplet["pairid"])]
        assert len(top3) == 3 and set(top3) <= set(triplet["img_set"]["members"]) - {triplet["reference"]}


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(cirr_run, cirr_root, tmp_path):
    run_dir = train_cirr.main(["--data_root", str(cirr_root), *TINY, "--num_epochs", str(TINY_RUN_EPOCHS + 1),
                               "--batch_size", str(TINY_RUN_BATCH), "--resume", str(cirr_run / "checkpoints" / "last.pt"),
                               "--output_dir", str(tmp_path)])
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == TINY_RUN_EPOCHS + 1
    assert checkpoint["global_step"] == (TINY_RUN_EPOCHS + 1) * (TINY_CIRR_NUM_TRAIN // TINY_RUN_BATCH)


def test_resume_from_another_backbone_names_the_mismatch(cirr_run, cirr_root, tmp_path):
    with pytest.raises(CheckpointMismatchError, match="ViT-Tiny-P8-32.*ViT-Tiny-P16-64|image_token_dim"):
        train_cirr.main(["--data_root", str(cirr_root), *TINY, "--clip_model_name", "ViT-Tiny-P16-64",
                         "--num_epochs", "1", "--batch_size", "32",
                         "--resume", str(cirr_run / "checkpoints" / "last.pt"), "--output_dir", str(tmp_path)])


def test_official_width_flags_are_checked(cirr_root, tmp_path):
    with pytest.raises(ValueError, match="projection_dim 512 does not match"):
        train_cirr.main(["--data_root", str(cirr_root), *TINY, "--projection_dim", "512", "--num_epochs", "1",
                         "--output_dir", str(tmp_path)])


def test_wrong_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cirr dataset"):
        train_cirr.main(["--data_root", str(tmp_path / "nowhere"), *TINY, "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_fashioniq_training_and_validation(tmp_path):
    root = make_synthetic_fashioniq(tmp_path / "data", seed=1, num_train_per_category=48, num_val_per_category=16,
                                    num_test_per_category=4)
    run_dir = train_fiq.main(["--data_root", str(root.parent), *TINY, "--num_epochs", "2", "--batch_size", "24",
                              "--save_training", "--output_dir", str(tmp_path / "run")])
    first = load_checkpoint(run_dir / "checkpoints" / "epoch_1.pt")
    second = load_checkpoint(run_dir / "checkpoints" / "epoch_2.pt")
    assert second["dataset"] == "fashioniq"
    # The FashionIQ recipe freezes the vision tower from the second epoch: only text tower and head move.
    vision = [k for k in first["model"] if ".visual." in k]
    text = [k for k in first["model"] if k.startswith("backbone.clip.transformer.")]
    assert vision and all(torch.equal(first["model"][k], second["model"][k]) for k in vision)
    assert not all(torch.equal(first["model"][k], second["model"][k]) for k in text)
    results = validate.main(["--checkpoint", str(run_dir / "checkpoints" / "epoch_2.pt"),
                             "--output", str(tmp_path / "v.json")])
    assert {"dress_R@10", "shirt_R@50", "toptee_R@10", "avg_R@10", "avg_R@50", "mean"} <= set(results["ssn"])
    # Test outputs come from the dataset's registry entry: a ranking file per category, each checked.
    files = write_test_outputs(run_dir / "checkpoints" / "epoch_2.pt", "t", output_dir=str(tmp_path / "test"))
    assert sorted(f.name for f in files) == [f"fashioniq_{c}_test_rankings_t.json" for c in ("dress", "shirt", "toptee")]
    dress = json.loads(next(f for f in files if "_dress_" in f.name).read_text())
    gallery = json.loads((root / "image_splits" / "split.dress.test.json").read_text())
    assert len(dress) == len(json.loads((root / "captions" / "cap.dress.test.json").read_text()))
    assert all(len(ranked) == len(set(ranked)) == min(50, len(gallery)) and set(ranked) <= set(gallery)
               for ranked in dress.values())
    with pytest.raises(utils.UsageError, match="epoch_2.pt was trained on fashioniq, not CIRR"):
        cirr_test_submission.main(["--checkpoint", str(run_dir / "checkpoints" / "epoch_2.pt"), "--submission_name", "t"])


def test_the_ssn_readme_command_is_accepted(cirr_root):
    """The official training command (SSN README) parses as written, and its widths fit ViT-B-32."""
    from training.model_setup import check_official_dims
    from training.params import build_train_parser
    from model import build_ssn_model

    command = ("--dataset CIRR --model ssn --project_name xxx --workspace xxx --projection_dim 512 --hidden_dim 512 "
               "--num_epochs 50 --batch_size 128 --lr 5e-5 --lr_ratio 0.2 --lr_gamma 0.1 --lr_step_size 10 "
               "--save_training --save_best --validation_frequency 1").split()
    args = build_train_parser("cirr").parse_args(["--data_root", str(cirr_root), *command])
    assert (args.clip_model_name, args.pretrained, args.optimizer) == ("ViT-B-32", "openai", "adam")
    check_official_dims(args, build_ssn_model("ViT-B-32"))  # random weights: same shapes as OpenAI's


def test_validation_reuses_cached_gallery_features(cirr_run, tmp_path, monkeypatch):
    argv = ["--checkpoint", str(cirr_run / "checkpoints" / "best.pt"), "--output", str(tmp_path / "v.json")]
    first = validate.main(argv)
    assert list((cirr_run / "feature_cache").glob("gallery_*.pt"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the gallery was encoded again")

    monkeypatch.setattr(ModelRetrieval, "encode_gallery", no_encoding)
    assert validate.main(argv) == first
    with pytest.raises(AssertionError, match="encoded again"):
        validate.main(argv + ["--no_cache"])


def test_a_fresh_run_never_overwrites_a_previous_one(cirr_run, cirr_root):
    before = (cirr_run / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train_cirr.main(["--data_root", str(cirr_root), *TINY, "--num_epochs", "1", "--batch_size", "32",
                         "--save_best", "--output_dir", str(cirr_run)])
    assert (cirr_run / "checkpoints" / "best.pt").read_bytes() == before


@pytest.mark.slow
def test_overwrite_replaces_a_previous_run(cirr_root, tmp_path):
    argv = ["--data_root", str(cirr_root), *TINY, "--num_epochs", "1", "--batch_size", "96", "--output_dir", str(tmp_path)]
    train_cirr.main(argv)
    train_cirr.main(argv + ["--overwrite"])
    records = utils.read_metrics_log(tmp_path / "metrics.jsonl")
    assert records["train/epoch_loss"].notna().sum() == 1  # the old run's log is gone, not mixed in


def test_public_args_leave_out_secrets():
    assert utils.public_args({"api_key": "SECRET-KEY", "lr": 1e-3}) == {"lr": 1e-3}


@pytest.mark.slow
def test_secrets_stay_out_of_recorded_arguments(cirr_root, tmp_path):
    run_dir = train_cirr.main(["--data_root", str(cirr_root), *TINY, "--num_epochs", "1", "--batch_size", "96",
                               "--api_key", "SECRET-KEY", "--output_dir", str(tmp_path)])
    for path in [run_dir / "args.json", run_dir / "report.md"]:
        assert "SECRET-KEY" not in path.read_text()
    assert "api_key" not in load_checkpoint(run_dir / "checkpoints" / "last.pt")["args"]


def test_bad_flags_are_rejected_before_training(cirr_root, tmp_path):
    with pytest.raises(ValueError, match="validation_frequency"):
        train_cirr.main(["--data_root", str(cirr_root), *TINY, "--validation_frequency", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="does not match this script"):
        train_fiq.main(["--data_root", str(cirr_root), *TINY, "--dataset", "CIRR", "--output_dir", str(tmp_path)])


def test_incomplete_checkpoints_name_the_file(cirr_run, tmp_path):
    checkpoint = load_checkpoint(cirr_run / "checkpoints" / "last.pt")
    del checkpoint["optimizer"], checkpoint["dataset"]
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, checkpoint)
    with pytest.raises(CheckpointMismatchError, match="broken.pt.*missing optimizer"):
        train_cirr.main(["--data_root", str(cirr_root_of(cirr_run)), *TINY, "--resume", str(broken),
                         "--output_dir", str(tmp_path / "o")])
    with pytest.raises(CheckpointError, match="broken.pt: no training dataset"):
        validate.main(["--checkpoint", str(broken)])


def cirr_root_of(run_dir):
    return json.loads((run_dir / "args.json").read_text())["data_root"]
