"""A run's progress and everything a checkpoint holds to resume it exactly (weights aside: the model's)."""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import utils
from checkpoint import CHECKPOINT_FORMAT_VERSION
from dataset_registry import DatasetSpec
from model import SSNModel
from training.sampler import ResumableSampler


@dataclass
class TrainState:
    """Progress of a run; everything here goes into checkpoints."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # batches consumed over the run (skipped steps included)
    optimizer_steps: int = 0  # steps that updated the weights (skipped and non-finite ones excluded)
    step_in_epoch: int = 0  # batches of the current epoch consumed
    epoch_loss_sum: float = 0.0  # sum over the current epoch's trained triplets of their loss
    epoch_samples: int = 0  # triplets trained on in the current epoch
    # Per checkpoint-selection criterion (DatasetSpec.selection_criteria): {"value", "epoch", "metrics"} of its best
    # validation.
    best_by: dict[str, dict[str, Any]] = field(default_factory=dict)
    nonfinite_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    amp_overflow_steps: int = 0  # fp16 AMP steps the GradScaler skipped for an overflow (over the run)
    bad_samples: list[dict[str, Any]] = field(default_factory=list)  # samples skipped (--skip_bad_samples)
    # The last completed epoch is due a validation that has not finished (last.pt is written before validating).
    validation_pending: bool = False

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> "TrainState":
        """The state saved by :func:`checkpoint_state` (format 1 checkpoints resume at an epoch start)."""
        return cls(
            epoch=checkpoint["epoch"],
            global_step=checkpoint["global_step"],
            # Checkpoints from before the count: every consumed batch counts (they never recorded a run without steps).
            optimizer_steps=checkpoint.get("optimizer_steps", checkpoint["global_step"]),
            step_in_epoch=checkpoint.get("step_in_epoch", 0),
            epoch_loss_sum=checkpoint.get("epoch_loss_sum", 0.0),
            epoch_samples=checkpoint.get("epoch_samples", 0),
            best_by=checkpoint.get("best_by", _legacy_best_by(checkpoint)),
            amp_overflow_steps=checkpoint.get("amp_overflow_steps", 0),
            bad_samples=list(checkpoint.get("bad_samples", [])),
            validation_pending=checkpoint.get("validation_pending", False),
        )

    def record_validation(self, metrics: dict[str, float], spec: DatasetSpec) -> list[str]:
        """Keep the best value of each of the dataset's selection criteria; returns those these metrics improved."""
        improved = []
        for criterion in spec.selection_criteria:
            score = spec.score(metrics, criterion)
            if score > self.best_by.get(criterion, {}).get("value", -math.inf):
                self.best_by[criterion] = {"value": score, "epoch": self.epoch, "metrics": dict(metrics)}
                improved.append(criterion)
        return improved

    def end_epoch(self) -> float:
        """Close the current epoch; returns its mean loss per trained triplet."""
        mean_loss = self.epoch_loss_sum / max(self.epoch_samples, 1)
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_samples = 0, 0.0, 0
        return mean_loss


def _legacy_best_by(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``best_by`` of a checkpoint written before it existed: the arithmetic mean's best, epoch unknown."""
    if not math.isfinite(checkpoint["best_metric"]):
        return {}
    return {"mean": {"value": checkpoint["best_metric"], "epoch": None, "metrics": checkpoint["best_metrics"]}}


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as plain types (``torch.load(weights_only=True)`` can read them)."""
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": python_version, "state": list(python_state), "gauss_next": python_gauss},
        "numpy": {"keys": numpy_keys.tolist(), "pos": int(numpy_pos), "has_gauss": int(numpy_has_gauss),
                  "cached_gaussian": float(numpy_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states :func:`rng_state` recorded (format 1 checkpoints: the state words only)."""
    python, numpy = state["python"], state["numpy"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        np.random.set_state(("MT19937", np.array(numpy["keys"], dtype=np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["cached_gaussian"]))
    else:
        random.setstate((3, tuple(python), None))
        np.random.set_state(("MT19937", np.array(numpy, dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    model: SSNModel, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    state: TrainState, args: argparse.Namespace, dataset: str, sampler: ResumableSampler | None = None,
    metrics_log_lines: int | None = None, run_id: str | None = None,
) -> dict[str, Any]:
    """Everything needed to resume exactly: weights, optimiser, scheduler, scaler, RNGs, data position.

    ``best_metric`` / ``best_metrics`` are the best validation by ``--best_metric``; ``best_by`` holds
    the best of every selection criterion; ``run_id`` names the run (``training.run_dir``).
    """
    best = state.best_by.get(args.best_metric, {})
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "dataset": dataset,
        "model_config": model.config(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "optimizer_steps": state.optimizer_steps,
        "validation_pending": state.validation_pending,
        "step_in_epoch": state.step_in_epoch,
        "epoch_loss_sum": state.epoch_loss_sum,
        "epoch_samples": state.epoch_samples,
        "best_metric": best.get("value", -math.inf),
        "best_metrics": best.get("metrics") or {},
        "best_by": state.best_by,
        "amp_overflow_steps": state.amp_overflow_steps,
        "bad_samples": list(state.bad_samples),
        "args": utils.public_args(vars(args)),
        "rng": rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else {},
        "metrics_log_lines": metrics_log_lines,
        "run_id": run_id,
    }
