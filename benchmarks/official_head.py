"""The official SSN head forward and loss, re-stated in our own words as the baseline of the benchmarks.

It follows docs/ssn.md step by step the way the official code runs it: the full sequence-first
``nn.TransformerEncoder`` over every token, the positive and negative branches in two separate passes,
no key padding mask, and both KL terms with a probability target.  It reads the weights of an
:class:`model.SSNHead`, so both forwards share parameters and can be compared output for output; any module
with the official head's submodules works too, such as the official ``Model`` re-stated in
:mod:`benchmarks.official_ssn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.loss import LOGIT_SCALE


def _pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens, the official way (no clamp; every caption has a real token)."""
    return (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def official_compose(
    head: nn.Module, ref_tokens: Tensor, ref_embed: Tensor, text_tokens: Tensor, text_embed: Tensor, text_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """``(q⁺, q⁻)`` [B, D] from the full fusion sequence, one encoder pass per branch."""
    projected = head.image_token_proj_layer(ref_tokens)
    global_image = projected[:, :1].expand(-1, text_tokens.shape[1], -1)
    s_t = head.text_token_selection_mask(torch.cat([text_tokens, global_image], -1))
    upgradation, degradation = text_tokens * s_t, text_tokens * (1 - s_t)
    prototype_query = _pool(degradation, text_mask)[:, None].expand(-1, projected.shape[1], -1)
    s_v = head.image_token_selection_mask(torch.cat([projected, prototype_query], -1))
    image_type, text_type = head.token_type_embeddings.weight
    num_image = projected.shape[1]
    queries = []
    for image_part, text_part in ((projected * s_v, upgradation), (projected * (1 - s_v), degradation)):
        sequence = torch.cat([image_part + image_type, text_part + text_type], 1).permute(1, 0, 2)  # [N, B, w]
        fused = head.fusion_layer(sequence).permute(1, 0, 2)  # [B, N, w]
        combined = torch.cat([_pool(fused[:, num_image:], text_mask), fused[:, 0]], -1)
        dynamic = head.dynamic_scalar(combined)
        residual = head.output_layer(F.relu(head.combiner_layer(combined)))
        query = 0.01 * residual + dynamic * text_embed + (1 - dynamic) * ref_embed
        queries.append(F.normalize(query, dim=-1))
    return queries[0], queries[1]


def official_target(head: nn.Module, tgt_tokens: Tensor, tgt_embed: Tensor) -> Tensor:
    """Target feature ``t`` [B, D] from the full fusion sequence of the target's image tokens."""
    sequence = (head.image_token_proj_layer(tgt_tokens) + head.token_type_embeddings.weight[0]).permute(1, 0, 2)
    fused = head.fusion_layer(sequence).permute(1, 0, 2)
    return F.normalize(0.01 * fused[:, 0] + tgt_embed, dim=-1)


def _kl_probability_target(log_q: Tensor, p: Tensor) -> Tensor:
    """``nn.KLDivLoss()(log_q, p)`` with the default 'mean' reduction: ``mean(p·(log p − log_q))`` over
    all entries, ``0·log 0 = 0``; ``p`` is a probability tensor that carries gradient."""
    return (torch.xlogy(p, p) - p * log_q).mean()


def official_ssn_loss(q_pos: Tensor, q_neg: Tensor, target: Tensor, kl_weight: float = 1.0) -> Tensor:
    """The official SSN objective: contrastive term plus ``KL(softmax(I) ‖ softmax(S⁺)) − KL(softmax(S⁺) ‖
    softmax(S⁻))``, each KL taken against probabilities (softmax outputs), as the official code does."""
    batch = q_pos.shape[0]
    labels = torch.arange(batch, device=q_pos.device)
    s_pos = LOGIT_SCALE * q_pos @ target.T
    s_neg = LOGIT_SCALE * q_neg @ target.T
    ideal = F.softmax(LOGIT_SCALE * torch.eye(batch, device=q_pos.device, dtype=s_pos.dtype), dim=-1)
    contrastive = (F.cross_entropy(s_pos, labels) + F.cross_entropy(s_pos.T, labels)) / 2
    kl_to_ideal = _kl_probability_target(F.log_softmax(s_pos, dim=-1), ideal)
    kl_pos_neg = _kl_probability_target(F.log_softmax(s_neg, dim=-1), F.softmax(s_pos, dim=-1))
    return contrastive + kl_weight * (kl_to_ideal - kl_pos_neg)
