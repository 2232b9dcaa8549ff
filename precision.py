"""Mixed precision in one place (open_clip ``precision.py`` style).

``--precision amp`` (fp16 autocast + GradScaler) and ``amp_bf16`` (bf16 autocast, no scaler) apply on
CUDA; on CPU every mode runs in plain fp32, because CPU autocast is slow for these models and the
GradScaler is CUDA-only.
"""
from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch

PRECISIONS = ("amp", "amp_bf16", "fp32")
_logger = logging.getLogger("cir")


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision actually used on ``device`` (AMP steps aside on CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if device.type != "cuda" and precision != "fp32":
        _logger.info("precision %s requested on %s: running in fp32", precision, device.type)
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Autocast context for the forward pass (a no-op in fp32)."""
    if precision == "amp":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 AMP; disabled it passes calls straight through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "amp")
