"""Loading a training checkpoint back into a run (``--resume``), also mid-epoch, with named mismatches."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Mapping

import torch

from model import CheckpointMismatchError, SSNModel, check_model_config
from model.ssn_model import check_state_dict
from training.sampler import ResumableSampler
from training.state import TrainState, restore_rng_state

_logger = logging.getLogger("cir")

# Flags that may change between a run and its resume without changing what is computed.
RESUME_FREE_ARGS = frozenset({
    "resume", "output_dir", "overwrite", "num_epochs", "num_workers", "device", "eval_batch_size", "checkpoint_every",
    "log_every", "api_key", "workspace", "project_name", "torch_compile", "grad_checkpointing",
    "max_bad_sample_fraction",
})


def changed_args(saved: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    """The flags (other than :data:`RESUME_FREE_ARGS`) whose value differs from ``saved``, as ``--flag new (was: old)``."""
    return [
        f"--{key} {value!r} (was: {saved[key]!r})"
        for key, value in vars(args).items()
        if key not in RESUME_FREE_ARGS and key in saved and saved[key] != value
    ]


def warn_changed_args(saved: dict[str, Any], args: argparse.Namespace, source: str) -> None:
    """Warn about flags that differ from the checkpoint's run: the resumed run then differs from an uninterrupted one."""
    changed = changed_args(saved, args)
    if changed:
        _logger.warning("resuming from %s with changed flags; the run will not match an uninterrupted one: %s",
                        source, ", ".join(changed))


def resume(
    checkpoint: dict[str, Any], path: str, model: SSNModel, optimizer: torch.optim.Optimizer, scheduler: Any,
    scaler: torch.amp.GradScaler, sampler: ResumableSampler, args: argparse.Namespace,
) -> tuple[TrainState, int | None]:
    """Load a training checkpoint (from ``checkpoint.CheckpointSaver.load_resumable(path)``) into the run
    (weights, optimiser, scheduler, scaler, RNG states); returns its state and the metrics log length it saw.

    Raises:
        CheckpointMismatchError: the checkpoint is for another backbone or head size (names the difference),
            or stopped at a step past the end of an epoch of this run.
    """
    check_model_config(checkpoint["model_config"], model.config(), path)
    check_state_dict(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointMismatchError(f"{path}: optimizer / scheduler state does not fit this run ({error})") from error
    if checkpoint["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    else:  # an fp32 (e.g. CPU) checkpoint resumed with fp16 AMP: there is no scale to carry over
        _logger.warning("resuming %s with fp16 AMP from a checkpoint without GradScaler state: fresh scale", path)
    warn_changed_args(checkpoint.get("args", {}), args, path)
    saved_sampler = checkpoint.get("sampler") or {}
    for key in ("num_samples", "batch_size", "num_replicas"):
        if key in saved_sampler and saved_sampler[key] != getattr(sampler, key):
            _logger.warning("resuming from %s: the sampler's %s was %s, now %s; the epoch order differs",
                            path, key, saved_sampler[key], getattr(sampler, key))
    state = TrainState.from_checkpoint(checkpoint)
    if state.step_in_epoch > sampler.steps_per_epoch:
        raise CheckpointMismatchError(f"{path} stopped at step {state.step_in_epoch} of an epoch, but an epoch now has "
                         f"{sampler.steps_per_epoch} steps (dataset or batch size changed)")
    restore_rng_state(checkpoint["rng"])
    return state, checkpoint.get("metrics_log_lines")
