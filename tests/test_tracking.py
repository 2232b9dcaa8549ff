"""Experiment tracking (tracking.py), read back from what the trackers wrote: comet_ml's offline archive (no
network) and TensorBoard's event files, after a tiny training run with both."""
from __future__ import annotations

import json
import logging
import math
import sys
import zipfile
from pathlib import Path

import pytest

import train_cirr
import tracking
import utils
from synthetic import make_synthetic_cirr

SECRET = "not-a-real-key-7f3a9c"  # must appear nowhere in what the trackers write
EPOCHS = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking")
    data = make_synthetic_cirr(root / "data", num_train=64, num_val=16, num_test=6, image_size=32)
    argv = ["--data_root", str(data), "--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none",
            "--num_epochs", str(EPOCHS), "--batch_size", "32", "--lr", "1e-3", "--optimizer", "adamw",
            "--num_workers", "0", "--device", "cpu", "--log_every", "1", "--output_dir", str(root / "run"),
            "--tensorboard", "--comet_offline", "--api_key", SECRET]
    saved_argv = sys.argv
    sys.argv = ["train_cirr.py", *argv]  # as typed in a shell: the key is on the command line
    try:
        return train_cirr.main(argv)
    finally:
        sys.argv = saved_argv


def _jsonl_metrics(run: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of metrics.jsonl, what every tracker must have received."""
    logged: dict[str, dict[int, float]] = {}
    for record in utils.read_metrics_log(run / "metrics.jsonl").to_dict("records"):
        for key, value in record.items():
            if key not in ("time", "step", "epoch") and not (isinstance(value, float) and math.isnan(value)):
                logged.setdefault(key, {})[int(record["step"])] = value
    return logged


def _comet_archive(run: Path) -> tuple[list[dict], zipfile.ZipFile]:
    (archive,) = (run / tracking.COMET_OFFLINE_DIR).glob("*.zip")
    bundle = zipfile.ZipFile(archive)
    messages = [json.loads(line) for line in bundle.read("messages.json").decode().splitlines() if line.strip()]
    return messages, bundle


def test_comet_offline_archive_holds_params_metrics_and_pictures(tracked_run: Path) -> None:
    messages, bundle = _comet_archive(tracked_run)
    params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
              for m in messages if m["type"] == "parameter_msg" and m["payload"]["param"]["source"] == "manual"}
    assert params["lr"] == 1e-3 and params["num_epochs"] == EPOCHS and params["clip_model_name"] == "ViT-Tiny-P8-32"
    assert "api_key" not in params
    for name in bundle.namelist():
        assert SECRET.encode() not in bundle.read(name), f"the API key is in {name}"

    metrics: dict[str, dict[int, float]] = {}
    for m in messages:
        if m["type"] == "metric_msg":
            metric = m["payload"]["metric"]
            metrics.setdefault(metric["metricName"], {})[metric["step"]] = metric["metricValue"]
    expected = _jsonl_metrics(tracked_run)
    assert "train/loss" in expected and "val/R@1" in expected and len(expected["train/loss"]) > EPOCHS  # per step
    assert len(expected["val/mean"]) == EPOCHS  # per validation
    for key, by_step in expected.items():
        assert metrics[key] == pytest.approx(by_step), key

    images: dict[str, list[bytes]] = {}  # comet's log_image: a "visualization" upload, the file inside the zip
    for m in messages:
        if m["type"] == "file_upload" and m["payload"]["upload_type"] == "visualization":
            name = m["payload"]["additional_params"]["figName"]
            images.setdefault(name, []).append(bundle.read(m["payload"]["file_path"]))
    assert len(images["retrieval grid cirr"]) == EPOCHS and len(images["training curves"]) == 1
    assert all(data.startswith(PNG_MAGIC) for pictures in images.values() for data in pictures)
    assert images["training curves"][0] == (tracked_run / "curves.png").read_bytes()
    assert images["retrieval grid cirr"][-1] == (tracked_run / "validation_cirr_grid.png").read_bytes()


def test_tensorboard_events_read_back(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / tracking.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for key, by_step in _jsonl_metrics(tracked_run).items():
        logged = {event.step: event.value for event in events.Scalars(key)}
        assert logged == pytest.approx(by_step), key
    grids = events.Images("retrieval grid cirr")
    assert len(grids) == EPOCHS and grids[-1].encoded_image_string.startswith(PNG_MAGIC)
    assert len(events.Images("training curves")) == 1
    (params,) = [tag for tag in tags["tensors"] if tag.startswith("params")]
    text = events.Tensors(params)[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.001 |" in text and "api_key" not in text and SECRET not in text


def test_report_shows_the_grids_the_tracker_got(tracked_run: Path) -> None:
    assert "](validation_cirr_grid.png)" in (tracked_run / "report.md").read_text()


def test_no_tracker_without_flags_and_clear_messages(tmp_path, monkeypatch, caplog) -> None:
    assert not tracking.create_tracker(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cir.tracking"):
        logging.getLogger("cir.tracking").addHandler(caplog.handler)
        try:
            assert not tracking.create_tracker(tmp_path, api_key=SECRET)
        finally:
            logging.getLogger("cir.tracking").removeHandler(caplog.handler)
    assert "needs both --api_key and --workspace" in caplog.text and SECRET not in caplog.text
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # makes `import comet_ml` fail
    with pytest.raises(utils.UserError, match="pip install comet_ml"):  # one line from every script, no traceback
        tracking.create_tracker(tmp_path, comet_offline=True)
    assert not (tmp_path / tracking.COMET_OFFLINE_DIR).exists()
