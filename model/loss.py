"""The SSN training objective (docs/ssn.md, the objective)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
