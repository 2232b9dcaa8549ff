"""The model a run starts from, the official width flags checked against it, and ``torch.compile``."""
from __future__ import annotations

import argparse
import importlib
import logging
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoint import CheckpointError, load_checkpoint
from model import SSNModel, build_ssn_model, ssn_model_from_checkpoint

_logger = logging.getLogger("cir")


def _project_checkpoint(pretrained: str | None) -> dict[str, Any] | None:
    """The checkpoint a ``--pretrained`` file holds when this project wrote it; None for anything else (an
    open_clip weights file, whose errors open_clip reports)."""
    if not pretrained or not Path(pretrained).is_file():
        return None
    try:
        checkpoint = load_checkpoint(pretrained)
    except CheckpointError:
        return None
    return checkpoint if "model_config" in checkpoint and "model" in checkpoint else None


def initial_model(args: argparse.Namespace, pretrained: str | None, device: torch.device) -> SSNModel:
    """The model a run starts from: ``--clip_model_name`` with ``--pretrained`` weights (tag, file or Hugging
    Face directory) and a fresh head; or, when ``--pretrained`` is a checkpoint of this project (a run's
    ``best.pt``, a ``convert_official_checkpoint.py`` output), its backbone and head, fine-tuned with a fresh
    optimiser, schedule and epoch count (``--resume`` continues a run instead)."""
    checkpoint = _project_checkpoint(pretrained)
    if checkpoint is None:
        return build_ssn_model(args.clip_model_name, pretrained=pretrained, nhead=args.nhead, device=device)
    if checkpoint["model_config"].get("nhead") != args.nhead:
        raise ValueError(f"--nhead {args.nhead} differs from the {checkpoint['model_config'].get('nhead')} heads of "
                         f"--pretrained {pretrained}")
    model = ssn_model_from_checkpoint(checkpoint, device=device, source=str(pretrained))
    _logger.info("starting from %s: backbone %s and head from the checkpoint (--clip_model_name not used)",
                 pretrained, model.backbone.model_name)
    return model


def check_official_dims(args: argparse.Namespace, model: SSNModel) -> None:
    """The official ``--projection_dim`` / ``--hidden_dim`` flags must agree with the backbone's text width."""
    for flag in ("projection_dim", "hidden_dim"):
        value = getattr(args, flag)
        if value is not None and value != model.head.width:
            raise ValueError(
                f"--{flag} {value} does not match {args.clip_model_name}'s text width {model.head.width}; "
                "the head width follows the backbone (omit the flag)"
            )


def compile_for_training(model: nn.Module, device: torch.device) -> bool:
    """``torch.compile`` the model's forward (the training step's) in place; returns whether it did.

    ``nn.Module.compile`` keeps the parameter names, so checkpoints and DDP wrapping are unchanged;
    evaluation calls other methods and stays eager.  Compilation is tried on a one-line function
    first: where it is unavailable (unsupported Python or platform, no C++ compiler for the CPU
    backend) a warning is logged and the model is left eager.
    """
    try:
        if not importlib.import_module("torch._dynamo").is_dynamo_supported():
            raise RuntimeError(f"torch.compile does not support Python {platform.python_version()} on this platform")
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except (RuntimeError, OSError, ImportError) as error:
        reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
        _logger.warning("--torch_compile: compilation is unavailable here (%s); training runs eagerly", reason)
        return False
    model.compile()
    return True
