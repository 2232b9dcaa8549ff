"""Training-step and inference benchmark: the SSN step against the official step and a backbone-only step.

Three anchors, all on the same batch, each step a forward, the loss, backward and an Adam step:

* **official step** (the anchor of the speed target): the official architecture as the official code builds
  it (:class:`benchmarks.official_ssn.OfficialSSN`): Hugging Face ``CLIPTextModelWithProjection`` and
  ``CLIPVisionModelWithProjection`` towers of the same size (random weights), two vision passes
  (references, then targets), the official head forward (full sequence-first encoder, one pass per branch)
  and probability-target loss, Adam with the official parameter groups
  (:func:`benchmarks.official_ssn.official_optimizer`).  Captions are the batch's token ids padded to its
  longest caption with the end-of-text id and an attention mask, as the official ``tokenizer(padding=True)``.
* **official step on our backbone**: the same official head, loss and two vision passes re-stated on the
  project's open_clip backbone (:mod:`benchmarks.official_head`), so that the head and loss can be told
  apart from the tower implementation.
* **backbone-only step** (the floor): the project's backbone encodes the two image batches in one pass and
  the captions (cut to the batch's longest caption, as SSN does), and a symmetric contrastive loss is taken
  between ``normalize(e_img_r + e_txt)`` and ``normalize(e_img_t)``: a zero-cost head.

SSN step: ``SSNModel.forward`` (one vision pass for references and targets, one text pass, the head),
``ssn_loss``, backward and Adam with the official groups.  The SSN model holds the official model's
weights converted (:func:`model.official.ssn_model_from_official`), and before timing its loss is checked
equal to the official model's on an unpadded sub-batch.  Inference: gallery images encoded per second (SSN
target feature vs plain image embedding) and queries encoded and ranked per second against a gallery.
"""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPConfig, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from model import SSNModel, ssn_loss
from model.hf_clip import CLIP_EOT_IDS
from model.official import ssn_model_from_official
from retrieval import topk_retrieval
from utils import UsageError

from .common import interleaved_medians, peak_memory_bytes, reset_peak_memory
from .official_head import official_compose, official_ssn_loss, official_target
from .official_ssn import OfficialSSN, official_optimizer

CAPTIONS = (
    "is red and has no people in the background",
    "make the dog bigger and put it on a sofa",
    "same shirt but with long sleeves and a darker colour",
    "replace the cat with two birds",
)
CONTRASTIVE_SCALE = 100.0
LR, LR_RATIO = 1e-6, 0.2


@dataclass(frozen=True)
class StepResult:
    batch_size: int
    ssn_step_s: float
    official_step_s: float  # Hugging Face towers + official head and loss
    official_ours_step_s: float  # official head and loss on our backbone
    backbone_step_s: float
    official_loss_diff: float  # |our loss - official loss| in the equality check
    attention: str  # the Hugging Face towers' attention implementation
    ssn_peak_bytes: int  # CUDA max allocated during SSN steps; CPU peak RSS after the SSN warm-up
    peak_bytes: int  # peak over the whole measurement
    ssn_gallery_s: float  # per batch of gallery images
    backbone_gallery_s: float
    ssn_query_s: float  # per batch of queries, encoded and ranked
    backbone_query_s: float
    rank_gallery_size: int

    @property
    def ssn_triplets_per_s(self) -> float:
        return self.batch_size / self.ssn_step_s

    @property
    def head_overhead(self) -> float:
        """SSN step time over backbone-only step time, minus one (0.05 = 5 % slower)."""
        return self.ssn_step_s / self.backbone_step_s - 1

    @property
    def official_ratio(self) -> float:
        """SSN step time over the official step's (0.9 = 10 % faster than the official code)."""
        return self.ssn_step_s / self.official_step_s

    @property
    def official_ours_ratio(self) -> float:
        """SSN step time over the official step re-stated on our backbone."""
        return self.ssn_step_s / self.official_ours_step_s

    @property
    def floor_ratio(self) -> float:
        """Backbone-only step time over the official step's: what a zero-cost head would reach."""
        return self.backbone_step_s / self.official_step_s


def hf_clip_config(clip_model_name: str) -> CLIPConfig:
    """The Hugging Face ``CLIPConfig`` of an open_clip ViT config (QuickGELU, as OpenAI's CLIP): the towers
    the official code would load for that size."""
    cfg = open_clip.get_model_config(clip_model_name)
    if cfg is None or "width" not in cfg.get("vision_cfg", {}) or "heads" not in cfg.get("text_cfg", {}):
        raise UsageError(f"--clip_model_name {clip_model_name}: not an open_clip ViT config with a transformer text tower")
    vision, text, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    return CLIPConfig(
        text_config=dict(hidden_size=text["width"], num_attention_heads=text["heads"], num_hidden_layers=text["layers"],
                         intermediate_size=int(text.get("mlp_ratio", 4.0) * text["width"]),
                         max_position_embeddings=text["context_length"], vocab_size=text["vocab_size"],
                         projection_dim=embed, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=vision["width"], num_attention_heads=vision["width"] // vision.get("head_width", 64),
                           num_hidden_layers=vision["layers"], intermediate_size=int(vision.get("mlp_ratio", 4.0) * vision["width"]),
                           patch_size=vision["patch_size"], image_size=vision["image_size"], projection_dim=embed,
                           hidden_act="quick_gelu"),
        projection_dim=embed,
    )


def official_and_ssn_models(clip_model_name: str, device: torch.device, seed: int = 0) -> tuple[OfficialSSN, SSNModel]:
    """The official model (Hugging Face towers of ``clip_model_name``'s size, random weights, head widths =
    text width as in the official CIRR recipe) and our SSN model holding the same weights."""
    config = hf_clip_config(clip_model_name)
    torch.manual_seed(seed)
    width = config.text_config.hidden_size
    official = OfficialSSN(CLIPTextModelWithProjection(config.text_config), CLIPVisionModelWithProjection(config.vision_config),
                           projection_dim=width, hidden_dim=width)
    ours = ssn_model_from_official(official.state_dict(), config.to_dict(), source=f"official {clip_model_name}")
    return official.to(device), ours.to(device)


def synthetic_batch(model: SSNModel, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Random images and real-looking captions: our token ids (cut to the batch's longest caption) and the
    official step's ``input_ids`` / ``attention_mask`` of the same captions."""
    gen = torch.Generator().manual_seed(seed)
    size = model.backbone.image_size
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    token_ids = model.backbone.tokenize(captions).to(device)
    mask = model.backbone.text_mask(token_ids)
    return {
        "reference": torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        "target": torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        "token_ids": token_ids,
        # The official tokenizer(padding=True): padded with the end-of-text id, an attention mask.
        "input_ids": token_ids.masked_fill(~mask, CLIP_EOT_IDS[1]),
        "attention_mask": mask.long(),
    }


def backbone_contrastive_loss(model: SSNModel, reference: Tensor, target: Tensor, token_ids: Tensor) -> Tensor:
    """The baseline objective: symmetric InfoNCE between image+text sums and target embeddings."""
    batch = reference.shape[0]
    images = model.backbone.encode_image(torch.cat([reference, target])).embeds
    text = model.backbone.encode_text(token_ids).embeds
    queries = F.normalize(F.normalize(images[:batch], dim=-1) + F.normalize(text, dim=-1), dim=-1)
    targets = F.normalize(images[batch:], dim=-1)
    logits = CONTRASTIVE_SCALE * queries @ targets.T
    labels = torch.arange(batch, device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def official_on_our_backbone_loss(model: SSNModel, reference: Tensor, target: Tensor, token_ids: Tensor) -> Tensor:
    """The official training objective on our backbone: separate reference and target vision passes,
    the official head forward and the official probability-target loss."""
    ref = model.backbone.encode_image(reference)
    tgt = model.backbone.encode_image(target)
    text = model.backbone.encode_text(token_ids)
    q_pos, q_neg = official_compose(model.head, ref.tokens, ref.embeds, text.tokens, text.embeds, text.mask)
    return official_ssn_loss(q_pos, q_neg, official_target(model.head, tgt.tokens, tgt.embeds))


def check_official_step_equal(
    official: OfficialSSN, model: SSNModel, batch: dict[str, Tensor], samples: int = 4, rtol: float = 1e-4
) -> float:
    """Assert that our loss, the official model's and the official step on our backbone agree on the first
    ``samples`` triplets; return the largest absolute difference to the official model's loss.

    Eval mode (dropout off) and one caption repeated, so that no caption is padded: the official fusion
    layer attends to padding, ours masks it, and on unpadded input the two are the same computation.
    """
    states = official.training, model.training
    official.eval(), model.eval()
    token_ids = batch["token_ids"][:1].expand(samples, -1)
    token_ids = token_ids[:, : int(model.backbone.text_mask(token_ids[:1]).sum())]
    reference, target = batch["reference"][:samples], batch["target"][:samples]
    try:
        with torch.no_grad():
            expected = official(reference, token_ids, torch.ones_like(token_ids), target).item()
            losses = {"our SSN loss": ssn_loss(*model(reference, target, token_ids)).item(),
                      "the official step on our backbone": official_on_our_backbone_loss(model, reference, target, token_ids).item()}
    finally:
        official.train(states[0]), model.train(states[1])
    for name, loss in losses.items():
        if abs(loss - expected) > rtol * max(1.0, abs(expected)):
            raise AssertionError(f"{name} {loss} differs from the official model's loss {expected}")
    return max(abs(loss - expected) for loss in losses.values())


def run_step_benchmark(
    clip_model_name: str = "ViT-Tiny-P8-32",
    batch_size: int = 64,
    steps: int = 5,
    device: torch.device | str = "cpu",
    rank_gallery_size: int = 2265,
    seed: int = 0,
    grad_checkpointing: bool = False,
) -> StepResult:
    """Median times of the SSN step, the official step (Hugging Face towers), the official step on our
    backbone and the backbone-only step, measured interleaved, and of inference.  Each step has its own
    Adam optimiser (SSN and official-on-our-backbone: the official groups of our model; official: the
    official code's groups; backbone-only: the backbone at lr·ratio).  ``grad_checkpointing`` recomputes the
    towers' blocks in the backward pass of every step, ours and the Hugging Face ones alike."""
    device = torch.device(device)
    official, model = official_and_ssn_models(clip_model_name, device, seed)
    official.train(), model.train()
    model.backbone.set_grad_checkpointing(grad_checkpointing)
    if grad_checkpointing:
        official.clip_text_model.gradient_checkpointing_enable()
        official.clip_vision_model.gradient_checkpointing_enable()
    batch = synthetic_batch(model, batch_size, device, seed)
    loss_diff = check_official_step_equal(official, model, batch, samples=min(4, batch_size))
    optimizers = {
        "ssn": model.configure_optimizers(lr=LR, lr_ratio=LR_RATIO),
        "official": official_optimizer(official, lr=LR, lr_ratio=LR_RATIO),
        "official_ours": model.configure_optimizers(lr=LR, lr_ratio=LR_RATIO),
        "backbone": torch.optim.Adam(model.backbone.parameters(), lr=LR * LR_RATIO),
    }
    losses = {
        "ssn": lambda: ssn_loss(*model(batch["reference"], batch["target"], batch["token_ids"])),
        "official": lambda: official(batch["reference"], batch["input_ids"], batch["attention_mask"], batch["target"]),
        "official_ours": lambda: official_on_our_backbone_loss(model, batch["reference"], batch["target"], batch["token_ids"]),
        "backbone": lambda: backbone_contrastive_loss(model, batch["reference"], batch["target"], batch["token_ids"]),
    }

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        losses[name]().backward()
        optimizers[name].step()

    reset_peak_memory(device)
    step("ssn")  # warm-up; also allocates the SSN optimiser state
    ssn_peak = peak_memory_bytes(device)
    steps_s = interleaved_medians({name: (lambda name=name: step(name)) for name in losses}, steps, device)
    peak = peak_memory_bytes(device)
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    attention = str(official.clip_vision_model.config._attn_implementation)
    del optimizers, official

    model.eval()
    gallery = F.normalize(torch.randn(rank_gallery_size, model.backbone.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1).to(device)

    def query_and_rank(method: str) -> None:
        queries = model.encode_query(batch["reference"], batch["token_ids"], method)
        topk_retrieval(queries, gallery, k=50)

    with torch.no_grad():
        inference_s = interleaved_medians(
            {
                "ssn_gallery": lambda: model.encode_gallery(batch["target"], "ssn"),
                "backbone_gallery": lambda: model.encode_gallery(batch["target"], "image"),
                "ssn_query": lambda: query_and_rank("ssn"),
                "backbone_query": lambda: query_and_rank("sum"),
            },
            steps, device,
        )
    return StepResult(
        batch_size=batch_size,
        ssn_step_s=steps_s["ssn"],
        official_step_s=steps_s["official"],
        official_ours_step_s=steps_s["official_ours"],
        backbone_step_s=steps_s["backbone"],
        official_loss_diff=loss_diff,
        attention=attention,
        ssn_peak_bytes=ssn_peak,
        peak_bytes=max(peak, peak_memory_bytes(device)),
        ssn_gallery_s=inference_s["ssn_gallery"],
        backbone_gallery_s=inference_s["backbone_gallery"],
        ssn_query_s=inference_s["ssn_query"],
        backbone_query_s=inference_s["backbone_query"],
        rank_gallery_size=rank_gallery_size,
    )
