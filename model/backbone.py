"""open_clip backbone wrapper yielding the features the SSN head needs.

For an image batch it returns the vision transformer's token sequence ``V`` (class token first, then
every patch token, taken *before* the tower's final LayerNorm, as the official SSN code does with
Hugging Face's ``last_hidden_state``) and the projected image embedding ``e_img``.  For a caption batch
it returns the token states ``T`` after the text tower's final LayerNorm, the padding mask ``m`` and the
projected text embedding ``e_txt``.  The image tokens are captured with a forward hook on the vision
transformer, so the tower runs once.

The MLP activation follows the weights: OpenAI's CLIP weights (and a few others) were trained with
QuickGELU ``x·σ(1.702x)``, which open_clip 3.x builds only for ``*-quickgelu`` names or when asked, so
:func:`create_backbone` asks whenever the pretrained tag says so and records the choice in ``describe()``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
from open_clip.transformer import QuickGELU, text_global_pool
from torch import Tensor, nn

from utils import UsageError

from . import hf_clip

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


def text_mask_from_ids(token_ids: Tensor, eot_id: int | None = None) -> Tensor:
    """Mask of the real tokens [B, L] (bool): True from the start token up to the end-of-text token inclusive.

    Never from the id value: CLIP's BPE gives the byte token ``!`` id 0, the padding id.  The end of text is
    the first position holding ``eot_id`` (a row without it, e.g. cut by hand, is all real tokens); with
    ``eot_id`` None it is the row's largest id, the position open_clip's ``argmax`` pooling reads (CLIP's
    end-of-text token 49407 is the largest id of its vocabulary).
    """
    length = token_ids.shape[-1]
    if eot_id is None:
        end = token_ids.argmax(dim=-1)
    else:
        is_eot = token_ids == eot_id
        end = torch.where(is_eot.any(dim=-1), is_eot.int().argmax(dim=-1), length - 1)
    return torch.arange(length, device=token_ids.device) <= end.unsqueeze(-1)


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
        # The tokenizer's end-of-text id gives caption lengths and the text mask (see text_mask_from_ids).
        self.eot_token_id: int | None = getattr(tokenizer, "eot_token_id", None)
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
    def quick_gelu(self) -> bool:
        """True when the towers' MLPs use QuickGELU ``x·σ(1.702x)`` (OpenAI's activation), False for GELU."""
        return any(isinstance(module, QuickGELU) for module in self.clip.modules())

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
            "quick_gelu": self.quick_gelu,
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
        """Tokenise and cut to the longest caption of the batch: [B, L] with L <= context length.

        A caption's length runs to its end-of-text token (:func:`text_mask_from_ids`), so a ``!`` (id 0)
        inside the longest caption does not cut it short.
        """
        token_ids = self.tokenizer(list(captions))
        longest = int(self.text_mask(token_ids).sum(dim=1).max())
        return token_ids[:, :longest].contiguous()

    def text_mask(self, token_ids: Tensor) -> Tensor:
        """token_ids [B, L] -> bool mask [B, L] of the real tokens (start, words, end of text)."""
        return text_mask_from_ids(token_ids, self.eot_token_id)

    def embed_tokens(self, token_ids: Tensor) -> Tensor:
        """token_ids [B, L] -> the text tower's word embeddings [B, L, w] (no positional embedding)."""
        return self._text_tower.token_embedding(token_ids)

    def encode_text(self, token_ids: Tensor) -> TextFeatures:
        """token_ids [B, L] (L <= context length) -> token states [B, L, w], mask [B, L], embeds [B, D].

        The causal attention mask makes the states of real tokens independent of how much padding
        follows, so a batch cut to its longest caption (:meth:`tokenize`) gives the same features as the
        full 77 tokens (tested, including captions with ``!``).
        """
        return self.encode_text_embeddings(self.embed_tokens(token_ids), token_ids)

    def encode_text_embeddings(self, word_embeds: Tensor, token_ids: Tensor) -> TextFeatures:
        """Run the text tower from word embeddings instead of token ids.

        Args:
            word_embeds: [B, L, w] word embeddings, e.g. :meth:`embed_tokens` with some positions
                replaced (a pseudo word such as textual-inversion methods produce).
            token_ids: [B, L] the ids the embeddings stand for; they give the text mask (up to the
                end-of-text token) and the pooled (end-of-text) position.

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
        mask = self.text_mask(token_ids).to(x.dtype)
        return TextFeatures(tokens=x, mask=mask, embeds=pooled)


def parse_pretrained(value: str | None) -> str | None:
    """A ``--pretrained`` flag: None (random weights) for None, '' or 'none' in any case, else the tag / path."""
    return None if value is None or str(value).lower() in ("", "none") else value


def resolve_quick_gelu(model_name: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> bool:
    """Whether ``model_name`` with ``pretrained`` weights must run QuickGELU.

    An explicit ``quick_gelu`` wins.  Otherwise a pretrained tag decides (open_clip's ``quick_gelu``
    metadata: True for OpenAI's weights and a few others), and random weights or a local file get the model
    config's own activation (True for ``*-quickgelu`` names: name a local file of OpenAI-style weights so).
    """
    if quick_gelu is not None:
        return bool(quick_gelu)
    if pretrained and not Path(pretrained).is_file():
        return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    return bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RANDOM_INIT_WARNING)


_RANDOM_INIT_WARNING = "No pretrained weights loaded"


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (root logger).

    Random weights are either asked for (training logs its own line saying so) or the start of loading a
    checkpoint's weights, where the warning is wrong; said once per backbone it filled the demo's output.
    """
    root, quiet = logging.getLogger(), _RandomInitWarningFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def create_backbone(
    model_name: str,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
) -> CLIPBackbone:
    """Build an open_clip backbone whose activation follows its weights.

    Args:
        model_name: any open_clip model name with a ViT vision tower (``ViT-B-32``, ``ViT-L-14``, one of
            the shipped tiny configs, ...).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a path to a local
            checkpoint file, or None for random weights.  Also a Hugging Face CLIP directory (``config.json``
            + ``model.safetensors`` / ``pytorch_model.bin``): the architecture is then the directory's config,
            ``model_name`` is not used, and the backbone is named ``hf-clip-<digest>`` (:mod:`model.hf_clip`).
        quick_gelu: force QuickGELU (True) or GELU (False); None follows the weights
            (:func:`resolve_quick_gelu`), e.g. QuickGELU for ``ViT-B-32`` with ``openai``.
    """
    # ---- Hugging Face CLIP directory (model/hf_clip.py): architecture from its config.json, then its weights
    if hf_clip.is_hf_clip_dir(pretrained):
        hf_model_name, hf_state = hf_clip.load_hf_clip_dir(pretrained)
        backbone = create_backbone(hf_model_name, None, device=device, precision=precision, quick_gelu=quick_gelu)
        backbone.clip.load_state_dict(hf_state)
        return backbone
    # ---- end of the Hugging Face hook
    if model_name not in open_clip.list_models():
        raise UsageError(
            f"unknown open_clip model {model_name!r}; shipped tiny configs: {list_shipped_configs()}"
        )
    if pretrained and not Path(pretrained).is_file():
        known = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in known:
            raise UsageError(
                f"{pretrained!r} is neither a local checkpoint file nor a pretrained tag of {model_name} "
                f"(known tags: {known})"
            )
    use_quick_gelu = resolve_quick_gelu(model_name, pretrained, quick_gelu)
    # force_quick_gelu also keeps open_clip's tag check quiet; the keyword sets GELU for a -quickgelu name.
    with _quiet_random_init():
        clip_model = open_clip.create_model(
            model_name, pretrained=pretrained or None, precision=precision, device=device,
            force_quick_gelu=use_quick_gelu, quick_gelu=use_quick_gelu,
        )
    return CLIPBackbone(clip_model, _tokenizer(model_name), model_name)


@functools.lru_cache(maxsize=8)
def _tokenizer(model_name: str) -> Any:
    """``open_clip.get_tokenizer(model_name)``, built once per name: reading the BPE vocabulary takes ~0.1 s, and
    the CVSI demo and the tests build many backbones.  The backbone takes open_clip's own text
    tower, whose ``SimpleTokenizer`` keeps no state but a memo of BPE results: sharing one is safe."""
    return open_clip.get_tokenizer(model_name)
