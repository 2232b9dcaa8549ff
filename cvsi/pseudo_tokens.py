"""Text encoding with a pseudo word: the fine-grained query feature ``q_f`` of CVSI (Eq. 2).

The prompt ``"a photo of $ that {T}. And the photo should have {objects}."`` is tokenised with the
backbone's own tokenizer; at every position holding the placeholder ``$`` (CLIP BPE id 259) the word
embedding is replaced by ``Φ(q_v)`` and the text tower runs from those embeddings
(:meth:`model.backbone.CLIPBackbone.encode_text_embeddings`), so any open_clip text tower works.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from model.backbone import CLIPBackbone

__all__ = [
    "PSEUDO_WORD", "placeholder_token_id", "fine_grained_prompt", "encode_with_pseudo_words",
    "encode_ids_with_pseudo_words",
]

PSEUDO_WORD = "$"


def placeholder_token_id(backbone: CLIPBackbone) -> int:
    """The id of ``$`` in the backbone's tokenizer (259 for CLIP's BPE); it must be a single token."""
    ids = backbone.tokenize([PSEUDO_WORD])
    words = ids[backbone.text_mask(ids)][1:-1].tolist()  # the real tokens without start and end of text
    if len(words) != 1:
        raise ValueError(f"the tokenizer of {backbone.model_name} splits {PSEUDO_WORD!r} into {len(words)} tokens")
    return words[0]


def _clean(text: str) -> str:
    return text.strip().rstrip(".").strip()


def fine_grained_prompt(relative_caption: str, added_objects: str | None) -> str:
    """``F_G`` = "a photo of $ that {T}. And the photo should have {objects}." (without the second
    sentence when no objects are known)."""
    prompt = f"a photo of {PSEUDO_WORD} that {_clean(relative_caption)}"
    if added_objects and _clean(added_objects):
        prompt += f". And the photo should have {_clean(added_objects)}"
    return prompt + "."


def encode_with_pseudo_words(
    backbone: CLIPBackbone, prompts: Sequence[str], pseudo_words: Tensor, placeholder_id: int
) -> Tensor:
    """Projected text features [B, D] (not normalised) of ``prompts`` with ``$`` replaced.

    Args:
        backbone: the frozen CLIP.
        prompts: B prompts, each containing the placeholder at least once.
        pseudo_words: [B, w] embeddings ``Φ(q_v)`` put at the placeholder positions of each prompt.
        placeholder_id: from :func:`placeholder_token_id`.
    """
    if pseudo_words.shape[0] != len(prompts):
        raise ValueError(f"{pseudo_words.shape[0]} pseudo words for {len(prompts)} prompts")
    return encode_ids_with_pseudo_words(backbone, backbone.tokenize(prompts), pseudo_words, placeholder_id)


def encode_ids_with_pseudo_words(
    backbone: CLIPBackbone, token_ids: Tensor, pseudo_words: Tensor, placeholder_id: int
) -> Tensor:
    """:func:`encode_with_pseudo_words` on tokenised prompts ``token_ids`` [B, L]; differentiable in
    ``pseudo_words`` [B, w] (Φ is trained through it, :mod:`cvsi.phi_training`)."""
    if pseudo_words.shape != (token_ids.shape[0], backbone.text_width):
        raise ValueError(
            f"pseudo_words must be [{token_ids.shape[0]}, {backbone.text_width}], got {tuple(pseudo_words.shape)}"
        )
    token_ids = token_ids.to(pseudo_words.device)
    where = token_ids == placeholder_id  # [B, L]
    lacking = [i for i, row in enumerate(where.any(dim=1).tolist()) if not row]
    if lacking:
        raise ValueError(f"prompts {lacking} have no {PSEUDO_WORD!r} placeholder (truncated?)")
    words = backbone.embed_tokens(token_ids)  # [B, L, w]
    words = torch.where(where.unsqueeze(-1), pseudo_words.unsqueeze(1).to(words.dtype), words)
    return backbone.encode_text_embeddings(words, token_ids).embeds
