"""Each thing said once (issue 15): the precision fallback and open_clip's random-weights warning."""
import logging

import torch

import precision
from model import create_backbone


def test_precision_fallback_is_reported_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(precision, "_REPORTED_FALLBACKS", set())
    logger = logging.getLogger("cir")
    monkeypatch.setattr(logger, "propagate", False)  # as after setup_logging: caught once, by this handler
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="cir"):
            for _ in range(3):  # training, validation and the submission each ask
                assert precision.effective_precision("amp", torch.device("cpu")) == "fp32"
            assert precision.effective_precision("amp_bf16", torch.device("cpu")) == "amp_bf16"
    finally:
        logger.removeHandler(caplog.handler)
    said = [r.getMessage() for r in caplog.records if "running in fp32" in r.getMessage()]
    assert said == ["precision amp requested on cpu: running in fp32"]


def test_random_weights_do_not_repeat_open_clip_s_warning(caplog):
    with caplog.at_level(logging.WARNING):
        create_backbone("ViT-Tiny-P8-32", None)
        logging.warning("No pretrained weights loaded: said outside create_backbone, still shown")
    said = [r.getMessage() for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    assert said == ["No pretrained weights loaded: said outside create_backbone, still shown"]


def test_readme_carries_the_printed_legend():
    # The README explains the metric names with the very words the scripts print under their tables.
    from pathlib import Path

    from metrics import metric_meanings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    keys = ["R@1", "Rs@1", "Avg", "mean", "harmonic_mean", "geometric_mean", "dress_R@10", "avg_R@10", "mAP@10",
            "mAP@10_addition"]
    for key, meaning in metric_meanings(keys).items():
        assert meaning in readme, key
    assert metric_meanings(["avg_R@10", "mean"])["mean"] in readme  # FashionIQ's mean
