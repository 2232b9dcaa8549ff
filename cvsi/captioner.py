"""BLIP-2 captioner through Hugging Face ``transformers``: N nucleus-sampled captions per image.

CVSI (following LDRE) captions every reference and gallery image N = 15 times with nucleus sampling
(top-p 0.9) using BLIP-2 OPT-6.7b fine-tuned for COCO captioning (``Salesforce/blip2-opt-6.7b-coco``);
any BLIP-2 checkpoint name or local directory with a processor works. The released code samples within
15 beams (``num_beams=15``: each beam step draws its candidates by nucleus sampling, and the N captions
are the N final beams) and lets the language model continue the prompt "a photo of", the prompt the
COCO captioning checkpoint was fine-tuned with; ``num_beams`` and ``prompt`` reproduce that.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from cvsi.cache import JsonCache, fingerprint
from utils import progress

__all__ = ["Blip2Captioner", "caption_images", "DEFAULT_CAPTIONER"]

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-6.7b-coco"
_logger = logging.getLogger("cir.cvsi.captioner")


class Blip2Captioner:
    """``C = {C_i}_{i=1..N} = BLIP-2(I)`` (Eqs. 3-4).

    Args:
        model_name_or_path: a Hugging Face BLIP-2 checkpoint name or a local directory holding the model
            and its processor (``save_pretrained`` output).
        num_captions: N captions per image.
        top_p: nucleus sampling threshold.
        num_beams: 1 for plain nucleus sampling; B > 1 samples within B beams (``num_captions <= B``).
        max_new_tokens: caption length limit.
        prompt: optional text the language model continues (the release: "a photo of"); not part of
            the caption.
        seed: base seed; a batch's sampling seed is derived from it and the batch's image keys, so the
            same images give the same captions whatever else ran before.
        device, dtype: where and in which precision the model runs (fp16 halves the memory on GPU).
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_captions: int = 15,
        top_p: float = 0.9,
        num_beams: int = 1,
        max_new_tokens: int = 30,
        prompt: str = "",
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        try:
            from transformers import Blip2ForConditionalGeneration, Blip2Processor
        except ImportError as exc:
            raise ImportError("the BLIP-2 captioner needs transformers: pip install -r requirement.txt") from exc
        if num_captions < 1 or num_beams < 1:
            raise ValueError(f"num_captions and num_beams must be >= 1, got {num_captions} and {num_beams}")
        if num_beams > 1 and num_captions > num_beams:
            raise ValueError(f"beam sampling returns at most num_beams={num_beams} captions, asked for {num_captions}")
        self.model_name_or_path = model_name_or_path
        self.num_captions, self.top_p, self.num_beams, self.max_new_tokens = num_captions, top_p, num_beams, max_new_tokens
        self.prompt, self.seed, self.device = prompt, seed, torch.device(device)
        self.processor = Blip2Processor.from_pretrained(model_name_or_path)
        self.model = Blip2ForConditionalGeneration.from_pretrained(model_name_or_path, dtype=dtype)
        self.model.to(self.device).eval()
        self.dtype = dtype

    def identity(self) -> dict[str, Any]:
        """Everything that determines the captions (cache identity)."""
        return {"captioner": self.model_name_or_path, "num_captions": self.num_captions, "top_p": self.top_p,
                "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens, "prompt": self.prompt, "seed": self.seed,
                "dtype": str(self.dtype)}

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], seed: int) -> list[list[str]]:
        """N captions for each of B images: B lists of N strings, sampled under ``seed``."""
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=list(images), text=text, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        input_ids = inputs["input_ids"].to(self.device) if text else None
        attention_mask = inputs["attention_mask"].to(self.device) if text else None
        torch.manual_seed(seed)
        output = self.model.generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
            do_sample=True, top_p=self.top_p, num_beams=self.num_beams, num_return_sequences=self.num_captions,
            max_new_tokens=self.max_new_tokens, min_new_tokens=1,
        )  # [B * N, L]
        output = self._strip_prompt(output, input_ids, len(images))
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * self.num_captions:(i + 1) * self.num_captions] for i in range(len(images))]

    def _strip_prompt(self, output: torch.Tensor, input_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Decoder-only language models return the prompt (image tokens, BOS, text) before the caption."""
        config = self.model.config
        if config.text_config.is_encoder_decoder:
            return output
        if input_ids is None:
            prefix = torch.tensor([config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id])
            input_ids = prefix.to(output.device).expand(batch, -1)
        prompt = input_ids.repeat_interleave(self.num_captions, dim=0)  # [B * N, P]
        if output.shape[1] >= prompt.shape[1] and torch.equal(output[:, :prompt.shape[1]], prompt):
            return output[:, prompt.shape[1]:]
        return output


def caption_images(
    captioner: Blip2Captioner,
    keys: Sequence[str],
    load: Callable[[str], Image.Image],
    cache: JsonCache,
    batch_size: int = 8,
) -> dict[str, list[str]]:
    """Captions of every image key, generating (batched) only those missing from ``cache``.

    Each batch is written to the cache as soon as it is done, so a killed run resumes after the last
    finished batch.

    Args:
        keys: image keys (see :func:`cvsi.pipeline.image_key`), the cache keys.
        load: key -> PIL image.
    """
    todo = cache.missing(keys)
    if todo:
        _logger.info("captioning %d images (%d cached) with %s", len(todo), len(keys) - len(todo),
                     captioner.model_name_or_path)
    for start in progress(range(0, len(todo), batch_size), "captions"):
        batch = todo[start:start + batch_size]
        seed = int(fingerprint([captioner.seed, batch])[:8], 16)
        captions = captioner.caption([load(key) for key in batch], seed)
        cache.put(dict(zip(batch, captions)))
    return {key: cache[key] for key in keys}
