"""Mixed precision in one place (open_clip ``precision.py`` style).

Training, ``--precision``:

* ``amp``: fp16 autocast and a GradScaler (loss scaling), on CUDA.  On CPU it runs fp32: CPU fp16
  kernels are slow, and bf16 is the CPU's reduced precision.
* ``amp_bf16``: bf16 autocast without a scaler (bf16 has fp32's exponent range), on CUDA and on CPU
  (``torch.autocast('cpu', dtype=torch.bfloat16)``, which runs the GPU users' autocast code path in CI;
  fast on CPUs with AVX512-bf16 / AMX, emulated and slow elsewhere).
* ``fp32``: no autocast.

Other devices run fp32.  Evaluation (validation during training, ``validate.py``,
``cirr_test_submission.py``, ``retrieve.py``) runs fp32 by default, as the official evaluation;
AMP there is opt-in (training's ``--eval_precision``, the scripts' ``--precision``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, ContextManager

if TYPE_CHECKING:  # torch is imported where used: the scripts' parsers read PRECISIONS before torch is needed
    import torch

PRECISIONS = ("amp", "amp_bf16", "fp32")
EVAL_PRECISION_HELP = ("precision of the evaluation forward passes: fp32 as the official evaluation (default), "
                       "or amp / amp_bf16 to autocast them (faster on GPU; features differ at the autocast's precision)")
_logger = logging.getLogger("cir")
_REPORTED_FALLBACKS: set[tuple[str, str]] = set()


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision that actually runs on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "fp32" or device.type == "cuda" or (device.type == "cpu" and precision == "amp_bf16"):
        return precision
    if (precision, device.type) not in _REPORTED_FALLBACKS:  # said once per process, not per caller
        _REPORTED_FALLBACKS.add((precision, device.type))
        _logger.info("precision %s requested on %s: running in fp32", precision, device.type)
    return "fp32"


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Autocast context for the forward pass (a no-op in fp32)."""
    import torch

    if precision == "amp":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 AMP; disabled it passes calls straight through."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "amp")
