"""The official SSN head forward, re-stated in our own words as the baseline of the head benchmark.

It follows REFERENCE §1 step by step the way the official code runs it: the full sequence-first
``nn.TransformerEncoder`` over every token, the positive and negative branches in two separate passes,
no key padding mask.  It reads the weights of an :class:`model.SSNHead`, so both forwards share
parameters and can be compared output for output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model import SSNHead


def _pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens, the official way (no clamp; every caption has a real token)."""
    return (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def official_compose(
    head: SSNHead, ref_tokens: Tensor, ref_embed: Tensor, text_tokens: Tensor, text_embed: Tensor, text_mask: Tensor
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


def official_target(head: SSNHead, tgt_tokens: Tensor, tgt_embed: Tensor) -> Tensor:
    """Target feature ``t`` [B, D] from the full fusion sequence of the target's image tokens."""
    sequence = (head.image_token_proj_layer(tgt_tokens) + head.token_type_embeddings.weight[0]).permute(1, 0, 2)
    fused = head.fusion_layer(sequence).permute(1, 0, 2)
    return F.normalize(0.01 * fused[:, 0] + tgt_embed, dim=-1)
