"""One optimisation step and one epoch of SSN training."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn

import utils
from distributed import unwrap_model
from precision import autocast
from training.resilience import BadSampleLog, NonFiniteLossError
from training.state import TrainState

_logger = logging.getLogger("cir")


def gradient_norm(model: nn.Module) -> torch.Tensor:
    """Total 2-norm of the gradients (non-finite if any gradient is)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def train_step(
    model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    state: TrainState, device: torch.device, precision: str, loss_fn: nn.Module, grad_clip: float | None,
    max_nonfinite_steps: int,
) -> dict[str, torch.Tensor] | None:
    """One optimisation step; returns the loss terms, or None if the step was skipped as non-finite.

    fp32 and bf16: a non-finite loss or gradient norm skips the optimiser step and counts as a
    non-finite step.  fp16 AMP: the GradScaler skips steps whose scaled gradients overflowed and halves
    its scale; that is how it calibrates the scale (from 2^16, a few skips in a row at the start are
    normal), so such a step is only counted in ``state.amp_overflow_steps``.  A non-finite loss counts
    as non-finite, and so does an overflow at a scale of 1 or less, where the gradients themselves are
    not finite (otherwise the scaler would skip them silently for ever).  ``max_nonfinite_steps``
    non-finite steps in a row raise :class:`NonFiniteLossError`; skipped steps never update the weights
    or the optimiser state.

    ``loss_fn(q⁺, q⁻, t)`` (:func:`model.loss.create_loss`) returns the loss terms, ``"loss"`` with its graph;
    it sees the global batch of a distributed run itself (:class:`model.loss.SSNLoss` gathers every rank's
    features), and ``model`` may be wrapped in DistributedDataParallel.
    """
    reference = batch["reference_image"].to(device, non_blocking=True)
    target = batch["target_image"].to(device, non_blocking=True)
    token_ids = unwrap_model(model).backbone.tokenize(batch["caption"]).to(device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, device):
        features = model(reference, target, token_ids)  # (q⁺, q⁻, t), each [b, D]
    terms = loss_fn(*features)  # outside autocast; SSNLoss computes in fp32 (fp16 loses the scale-100 softmax)
    loss = terms["loss"]
    scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif not scaler.is_enabled():
        grad_norm = gradient_norm(model)  # with AMP the scaler checks the gradients itself
    loss_finite = bool(torch.isfinite(loss))
    overflow = False
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped by the scaler when the unscaled gradients hold inf / NaN
        scaler.update()
        overflow = scaler.get_scale() < scale  # the scale only drops after an overflow
        finite = loss_finite and not (overflow and scale <= 1.0)
    else:
        finite = loss_finite and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
    if not finite:
        state.nonfinite_steps += 1
        _logger.warning("non-finite loss or gradient at step %d (loss %s): step skipped (%d in a row)",
                        state.global_step + 1, loss.item(), state.nonfinite_steps)
        if state.nonfinite_steps >= max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_steps} consecutive non-finite steps (last loss {loss.item()}) at step "
                f"{state.global_step + 1}; training stopped, the last checkpoint holds the last good state"
            )
        return None
    if overflow:  # neither a failure nor an update: the non-finite streak is left as it is
        state.amp_overflow_steps += 1
        _logger.info("fp16 gradient overflow at step %d: skipped by the GradScaler, scale lowered to %g",
                     state.global_step + 1, scaler.get_scale())
    else:
        state.nonfinite_steps = 0
        state.optimizer_steps += 1
    state.epoch_loss_sum += loss.item() * reference.shape[0]
    state.epoch_samples += reference.shape[0]
    return terms


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    device: torch.device,
    precision: str,
    loss_fn: nn.Module,
    grad_clip: float | None,
    max_nonfinite_steps: int,
    metrics_logger: utils.MetricsLogger | None = None,
    log_every: int = 10,
    num_epochs: int | None = None,
    bad_samples: BadSampleLog | None = None,
    on_step_end: Callable[[], bool] | None = None,
) -> float:
    """Train on the loader's batches (the rest of the epoch when resumed mid-epoch).

    ``state`` is advanced batch by batch (steps, epoch loss sums), so a checkpoint taken at any step
    boundary resumes exactly.  Batches holding :class:`data_utils.SkippedSample` markers
    (``--skip_bad_samples``) record them in ``bad_samples``.  ``on_step_end`` runs after every batch;
    returning True stops the epoch early (pre-emption).  Returns the epoch's mean loss per trained
    triplet so far.
    """
    model.train()
    progress = utils.progress(loader, f"epoch {state.epoch + 1}/{num_epochs or '?'}", initial=state.step_in_epoch)
    for batch in progress:
        skipped = batch.pop("skipped_samples", [])
        if skipped:
            if bad_samples is None:
                raise ValueError("the batch holds skipped samples but no BadSampleLog was given")
            bad_samples.add(skipped, state.epoch, state.global_step + 1)
        terms = None
        if "reference_image" in batch:  # else every sample of the batch was unreadable
            terms = train_step(model, batch, optimizer, scaler, state, device, precision, loss_fn, grad_clip,
                               max_nonfinite_steps)
        state.step_in_epoch += 1
        state.global_step += 1
        if terms is not None:
            progress.set_postfix(loss=f"{state.epoch_loss_sum / state.epoch_samples:.4f}")
            if metrics_logger is not None and state.global_step % log_every == 0:
                metrics_logger.log(
                    {**{k: v.item() for k, v in terms.items()}, "lr": optimizer.param_groups[0]["lr"]},
                    step=state.global_step, epoch=state.epoch, prefix="train/",
                )
        if on_step_end is not None and on_step_end():
            break
    return state.epoch_loss_sum / max(state.epoch_samples, 1)
