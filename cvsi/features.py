"""CVSI's CLIP features, each computed once and cached (:mod:`cvsi.cache`): image embeddings (``q_v``,
``t_v`` and Φ's input), mean caption features (``q_m``, ``t_c``) and the fine-grained ``q_f``.

Images are cached under a key made of their path inside the dataset and their size
(:func:`image_key`); captions and prompts under a digest of their text.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from cvsi.cache import TensorCache, fingerprint
from cvsi.phi import Phi
from cvsi.pseudo_tokens import encode_with_pseudo_words, placeholder_token_id
from data_utils import ImageFiles, collate_batch
from dataset_registry import RetrievalTask
from model.backbone import CLIPBackbone
from utils import progress

__all__ = ["image_key", "image_embeddings", "caption_set_features", "fine_grained_features"]


def image_key(task: RetrievalTask, name: str) -> str:
    """Cache key of an image: its path inside the dataset and its size in bytes."""
    path = task.image_path(name)
    return f"{task.dataset}/{path.relative_to(task.root).as_posix()}:{path.stat().st_size}"



@torch.no_grad()
def image_embeddings(
    backbone: CLIPBackbone, keys: Sequence[str], paths: dict[str, Path], transform: Callable, cache: TensorCache,
    batch_size: int, num_workers: int, device: torch.device,
) -> Tensor:
    """Projected image embeddings [N, D] (not normalised: Φ takes them raw), computed if not cached."""
    todo = cache.missing(keys)
    loader = DataLoader(ImageFiles(todo, [paths[key] for key in todo], transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_batch)
    for batch in progress(loader, "image features"):
        embeds = backbone.encode_image(batch["image"].to(device)).embeds.float().cpu()
        cache.put(dict(zip(batch["name"], embeds)))
    return cache.stack(keys)


@torch.no_grad()
def caption_set_features(
    backbone: CLIPBackbone, caption_sets: Sequence[Sequence[str]], cache: TensorCache, batch_size: int,
    device: torch.device,
) -> Tensor:
    """[M, D]: for each set, ``mean_i f_t(C_i)`` of the L2-normalised caption features (Eqs. 5, 7).

    An empty set (every answer for it failed) gives a zero row, which drops the term for that query.
    """
    keys = [fingerprint(list(captions)) for captions in caption_sets]
    by_key = {key: list(captions) for key, captions in zip(keys, caption_sets) if captions}
    todo = cache.missing(by_key)
    group: list[str] = []
    for position, key in enumerate(progress(todo, "caption features")):
        group.append(key)
        if sum(len(by_key[k]) for k in group) < 8 * batch_size and position < len(todo) - 1:
            continue
        texts = [c for k in group for c in by_key[k]]
        feats = torch.cat([
            F.normalize(backbone.encode_text(backbone.tokenize(texts[i:i + batch_size]).to(device)).embeds.float(), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]).cpu()
        means, start = {}, 0
        for k in group:
            means[k] = feats[start:start + len(by_key[k])].mean(dim=0)
            start += len(by_key[k])
        cache.put(means)
        group = []
    dim = backbone.embed_dim
    return torch.stack([cache[k] if k in by_key else torch.zeros(dim) for k in keys]) if keys else torch.zeros(0, dim)


@torch.no_grad()
def fine_grained_features(
    backbone: CLIPBackbone, phi: Phi, prompts: Sequence[str], reference_embeds: Tensor, reference_keys: Sequence[str],
    cache: TensorCache, batch_size: int, device: torch.device,
) -> Tensor:
    """``q_f`` [Q, D] (normalised): prompts encoded with ``$`` -> ``Φ(q_v)`` (Eqs. 1-2)."""
    keys = [fingerprint([prompt, ref]) for prompt, ref in zip(prompts, reference_keys)]
    index = {key: i for i, key in enumerate(keys)}
    todo = cache.missing(keys)
    placeholder = placeholder_token_id(backbone)
    for start in progress(range(0, len(todo), batch_size), "fine-grained features"):
        rows = [index[k] for k in todo[start:start + batch_size]]
        pseudo = phi(reference_embeds[rows].to(device))  # [b, w]
        embeds = encode_with_pseudo_words(backbone, [prompts[i] for i in rows], pseudo, placeholder)
        cache.put(dict(zip(todo[start:start + batch_size], F.normalize(embeds.float(), dim=-1).cpu())))
    return cache.stack(keys)
