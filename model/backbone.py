"""open_clip backbone wrapper yielding the features the SSN head needs.

For an image batch it returns the vision transformer's token sequence ``V`` (class token first, then
every patch token, taken *before* the tower's final LayerNorm, as the official SSN code does with
Hugging Face's ``last_hidden_state``) and the projected image embedding ``e_img``.  For a caption batch
it returns the token states ``T`` after the text tower's final LayerNorm, the padding mask ``m`` and the
projected text embedding ``e_txt``.  The image tokens are captured with a forward hook on the vision
transformer, so the tower runs once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# The tiny configs shipped with the project become ordinary open_clip model names.
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ImageFeatures:
    tokens: Tensor  # [B, 1+P, d_img], class token first, before the final LayerNorm
    embeds: Tensor  # [B, D], projected, not normalised


@dataclass(frozen=True)
class TextFeatures:
    tokens: Tensor  # [B, L, w], after the final LayerNorm
    mask: Tensor  # [B, L], 1 for real tokens (start, words, end), 0 for padding
    embeds: Tensor  # [B, D], projected, not normalised


def list_shipped_configs() -> list[str]:
    """Names of the model configs shipped in ``model/model_configs``."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


class CLIPBackbone(nn.Module):
    """An open_clip ViT model with token-level outputs for both towers.

    Args:
        clip_model: an ``open_clip`` ``CLIP`` or ``CustomTextCLIP`` model with a ViT vision tower.
        tokenizer: the matching open_clip tokenizer.
        model_name: the open_clip model name (stored in checkpoints to rebuild the model).
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any, model_name: str) -> None:
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(f"model {model_name!r} has no ViT vision tower; SSN needs image tokens")
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.model_name = model_name
        # CustomTextCLIP keeps its text tower in `.text`; CLIP keeps the same modules on itself.
        self._text_tower = getattr(clip_model, "text", clip_model)
        if getattr(self._text_tower, "cls_emb", None) is not None:
            raise ValueError(f"model {model_name!r} has a CoCa-style text class token; not supported")
        self._captured_tokens: Tensor | None = None
        # CLIP's contrastive temperature is not used by composed retrieval: keep it out of the optimiser.
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(clip_model, name, None), nn.Parameter):
                getattr(clip_model, name).requires_grad_(False)
        visual.transformer.register_forward_hook(self._capture_image_tokens)

    # ---------------------------------------------------------------- dimensions
    @property
    def image_token_dim(self) -> int:
        """Width ``d_img`` of the vision transformer's tokens."""
        return self.clip.visual.transformer.width

    @property
    def text_width(self) -> int:
        """Width ``w`` of the text transformer's token states."""
        return self._text_tower.transformer.width

    @property
    def embed_dim(self) -> int:
        """Size ``D`` of the joint image-text embedding."""
        return self.clip.visual.output_dim

    @property
    def image_size(self) -> int:
        """Input resolution of the vision tower, in pixels."""
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def vision_tower(self) -> nn.Module:
        """The open_clip vision transformer."""
        return self.clip.visual

    def describe(self) -> dict[str, Any]:
        """Shapes that identify the backbone (checked when a checkpoint is loaded)."""
        return {
            "clip_model_name": self.model_name,
            "image_token_dim": self.image_token_dim,
            "text_width": self.text_width,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block of both towers in the backward pass instead of storing its
        activations (open_clip's ``set_grad_checkpointing``): the same gradients, roughly one extra
        forward pass of compute, and activation memory of one block per tower plus the block inputs."""
        self.clip.set_grad_checkpointing(enable)

    # ---------------------------------------------------------------- images
    def _capture_image_tokens(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        # open_clip's transformer may run sequence-first; the head wants [B, N, C].
        self._captured_tokens = output if getattr(module, "batch_first", True) else output.transpose(0, 1)

    def encode_image(self, images: Tensor) -> ImageFeatures:
        """images [B, 3, H, W] -> tokens [B, 1+P, d_img] and embeds [B, D] in one pass."""
        self._captured_tokens = None
        embeds = self.clip.encode_image(images)
        tokens, self._captured_tokens = self._captured_tokens, None
        if tokens is None:
            raise RuntimeError("vision transformer hook did not fire; unsupported open_clip version")
        return ImageFeatures(tokens=tokens, embeds=embeds)

    # ---------------------------------------------------------------- text
    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Tokenise and cut to the longest caption of the batch: [B, L] with L <= context length."""
        token_ids = self.tokenizer(list(captions))
        longest = int((token_ids != 0).sum(dim=1).max())
        return token_ids[:, :longest].contiguous()

    def embed_tokens(self, token_ids: Tensor) -> Tensor:
        """token_ids [B, L] -> the text tower's word embeddings [B, L, w] (no positional embedding)."""
        return self._text_tower.token_embedding(token_ids)

    def encode_text(self, token_ids: Tensor) -> TextFeatures:
        """token_ids [B, L] (L <= context length) -> token states [B, L, w], mask [B, L], embeds [B, D].

        The causal attention mask makes the states of real tokens independent of how much padding
        follows, so a batch cut to its longest caption gives the same features as the full 77 tokens.
        """
        return self.encode_text_embeddings(self.embed_tokens(token_ids), token_ids)

    def encode_text_embeddings(self, word_embeds: Tensor, token_ids: Tensor) -> TextFeatures:
        """Run the text tower from word embeddings instead of token ids.

        Args:
            word_embeds: [B, L, w] word embeddings, e.g. :meth:`embed_tokens` with some positions
                replaced (a pseudo word such as textual-inversion methods produce).
            token_ids: [B, L] the ids the embeddings stand for; they give the padding mask and the
                pooled (end-of-text) position.

        Returns:
            The same :class:`TextFeatures` as :meth:`encode_text` computes from ``token_ids``.
        """
        if word_embeds.shape[:2] != token_ids.shape:
            raise ValueError(
                f"word_embeds {tuple(word_embeds.shape)} do not match token_ids {tuple(token_ids.shape)}"
            )
        tower = self._text_tower
        seq_len = token_ids.shape[1]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = word_embeds.to(cast_dtype)
        x = x + tower.positional_embedding[:seq_len].to(cast_dtype)
        attn_mask = tower.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:seq_len, :seq_len]
        x = tower.transformer(x, attn_mask=attn_mask)
        x = tower.ln_final(x)  # [B, L, w]
        pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        pooled = text_global_pool(x, token_ids, pool_type, eos_token_id=eos_id)
        projection = tower.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        mask = (token_ids != 0).to(x.dtype)
        return TextFeatures(tokens=x, mask=mask, embeds=pooled)

def parse_pretrained(value: str | None) -> str | None:
    """A ``--pretrained`` flag: None (random weights) for None, '' or 'none' in any case, else the tag / path."""
    return None if value is None or str(value).lower() in ("", "none") else value


def create_backbone(
    model_name: str,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> CLIPBackbone:
    """Build an open_clip backbone.

    Args:
        model_name: any open_clip model name with a ViT vision tower (``ViT-B-32``, ``ViT-L-14``, one of
            the shipped tiny configs, ...).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a path to a local
            checkpoint file, or None for random weights.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; shipped tiny configs: {list_shipped_configs()}"
        )
    if pretrained and not Path(pretrained).is_file():
        known = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in known:
            raise ValueError(
                f"{pretrained!r} is neither a local checkpoint file nor a pretrained tag of {model_name} "
                f"(known tags: {known})"
            )
    clip_model = open_clip.create_model(
        model_name, pretrained=pretrained or None, precision=precision, device=device
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    return CLIPBackbone(clip_model, tokenizer, model_name)
