"""Training objectives, chosen by name (:data:`LOSSES`, :func:`create_loss`); SSN's is the default.

A loss is an ``nn.Module`` that takes the model's features of the local batch and owns the cross-rank
gather (as open_clip's ``ClipLoss``), so the training step never needs to know how a loss sees the
global batch.  The SSN objective itself is in :func:`ssn_loss_terms` (docs/ssn.md, the objective).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed import all_gather_with_grad

__all__ = ["LOGIT_SCALE", "ssn_loss_terms", "ssn_loss", "SSNLoss", "LOSSES", "register_loss", "create_loss"]

LOGIT_SCALE = 100.0


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) from log-probabilities, mean over all B² entries (``nn.KLDivLoss()``'s 'mean' reduction,
    written out because torch announces that 'mean' will change meaning)."""
    return (log_p.exp() * (log_p - log_q)).mean()


def ssn_loss_terms(
    q_pos: Tensor, q_neg: Tensor, target: Tensor, kl_weight: float = 1.0, logit_scale: float = LOGIT_SCALE
) -> dict[str, Tensor]:
    """The loss and its parts.

    With ``S⁺ = s·q⁺tᵀ``, ``S⁻ = s·q⁻tᵀ`` [B, B], ``I = s·eye(B)`` and ``y = arange(B)``:
    ``L = ½[CE(S⁺, y) + CE(S⁺ᵀ, y)] + kl_weight·[KL(softmax(I) ‖ softmax(S⁺)) − KL(softmax(S⁺) ‖ softmax(S⁻))]``.
    Both KL terms are computed from log-probabilities: the same value as the official probability-target
    form, but finite gradients once softmax(S⁺) underflows to 0 (docs/ssn.md).

    q_pos, q_neg, target: [B, D], L2-normalised.  In distributed training pass the gathered global batch.
    """
    batch = q_pos.shape[0]
    labels = torch.arange(batch, device=q_pos.device)
    s_pos = logit_scale * q_pos @ target.T  # [B, B]
    s_neg = logit_scale * q_neg @ target.T  # [B, B]
    s_ideal = logit_scale * torch.eye(batch, device=q_pos.device, dtype=s_pos.dtype)
    contrastive = (F.cross_entropy(s_pos, labels) + F.cross_entropy(s_pos.T, labels)) / 2
    log_pos = F.log_softmax(s_pos, dim=-1)
    kl_to_ideal = _kl(F.log_softmax(s_ideal, dim=-1), log_pos)
    kl_pos_neg = _kl(log_pos, F.log_softmax(s_neg, dim=-1))
    kl = kl_to_ideal - kl_pos_neg
    return {
        "loss": contrastive + kl_weight * kl,
        "contrastive": contrastive.detach(),
        "kl_ideal": kl_to_ideal.detach(),
        "kl_pos_neg": kl_pos_neg.detach(),
    }


def ssn_loss(
    q_pos: Tensor, q_neg: Tensor, target: Tensor, kl_weight: float = 1.0, logit_scale: float = LOGIT_SCALE
) -> Tensor:
    """Scalar SSN loss; see :func:`ssn_loss_terms`."""
    return ssn_loss_terms(q_pos, q_neg, target, kl_weight, logit_scale)["loss"]


class SSNLoss(nn.Module):
    """The SSN objective of :func:`ssn_loss_terms` on the global batch of a (possibly distributed) run.

    ``forward(q⁺, q⁻, t)`` takes this rank's features, each [b, D], casts them to fp32 (the scale-100
    logits and their softmax are where fp16 loses precision) and, with ``gather``, concatenates every
    rank's features in rank order with :func:`distributed.all_gather_with_grad` ([N·b, D]; a no-op in one
    process).  Every rank then computes the same loss over all N·b triplets, and DDP's gradient average
    gives exactly the gradient of one process with the whole batch (tests/test_distributed.py).

    Args:
        kl_weight: weight of the KL terms.
        logit_scale: the fixed similarity scale s.
        gather: gather the features of every rank (False: each rank's loss sees its own batch only).
    """

    def __init__(self, kl_weight: float = 1.0, logit_scale: float = LOGIT_SCALE, gather: bool = True) -> None:
        super().__init__()
        self.kl_weight = kl_weight
        self.logit_scale = logit_scale
        self.gather = gather

    def forward(self, q_pos: Tensor, q_neg: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The terms of :func:`ssn_loss_terms` ('loss' with its graph; 'contrastive', 'kl_ideal',
        'kl_pos_neg' detached) on the gathered fp32 features."""
        features = [f.float() for f in (q_pos, q_neg, target)]
        if self.gather:
            features = [all_gather_with_grad(f) for f in features]
        return ssn_loss_terms(*features, kl_weight=self.kl_weight, logit_scale=self.logit_scale)

    def extra_repr(self) -> str:
        return f"kl_weight={self.kl_weight}, logit_scale={self.logit_scale}, gather={self.gather}"


LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str, loss_class: type[nn.Module]) -> type[nn.Module]:
    """Make ``loss_class`` available to :func:`create_loss` (and training's ``--loss``) as ``name``."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    LOSSES[name] = loss_class
    return loss_class


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """A new instance of the loss registered as ``name``, e.g. ``create_loss("ssn", kl_weight=1.0)``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {tuple(LOSSES)}")
    return LOSSES[name](**kwargs)


register_loss("ssn", SSNLoss)
