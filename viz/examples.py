"""Which validation queries to show, and what to show of them.

:func:`retrieval_examples` turns features already computed for validation into :class:`QueryExample`
rows: the top-k with scores, the ground truth's rank (ties broken as the metrics break them, see
:func:`target_ranks`), and the caption's words with their SSN upgradation weight ``s_t``
(:func:`word_selection`, :func:`caption_words`). :func:`select_examples` picks a mix of successes and failures.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_utils import load_image
from dataset_registry import RetrievalTask
from model.backbone import text_mask_from_ids
from retrieval import topk_retrieval

__all__ = [
    "QueryExample",
    "caption_words",
    "word_selection",
    "target_ranks",
    "select_examples",
    "retrieval_examples",
]


@dataclass
class QueryExample:
    """One query as drawn in a grid row.

    ``target`` / ``target_rank`` are None when the ground truth is unknown (``retrieve.py``); ``words``
    is None when no SSN word selection was computed.
    """

    reference: Path
    caption: str
    retrieved: list[Path]
    scores: list[float]
    target: Path | None = None
    target_rank: int | None = None  # 1-based rank of the target in the full ranking
    words: list[tuple[str, float]] | None = None  # caption words with their mean s_t

    @property
    def success(self) -> bool | None:
        """True when the target is ranked first (what R@1 counts), None without a target."""
        return None if self.target_rank is None else self.target_rank == 1

    @property
    def target_position(self) -> int | None:
        """0-based position of the target among ``retrieved``, None if it is not shown."""
        if self.target is None or self.target not in self.retrieved:
            return None
        return self.retrieved.index(self.target)


def caption_words(tokenizer: Any, token_ids: Sequence[int], weights: Sequence[float]) -> list[tuple[str, float]]:
    """Group BPE tokens back into words with the open_clip tokenizer's decoder.

    A word ends at a token ending in ``</w>``; its weight is the mean ``s_t`` of its pieces. Padding and
    the start / end tokens (which SSN also weighs) are left out: they are not words of the caption.
    """
    decoder = getattr(tokenizer, "decoder", None)
    if decoder is None:
        raise TypeError(f"{type(tokenizer).__name__} has no BPE decoder; word weights need open_clip's SimpleTokenizer")
    special = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    # The caption ends at its end-of-text token, not at the first id 0 (CLIP's BPE id of "!").
    length = int(text_mask_from_ids(torch.as_tensor([list(token_ids)]), tokenizer.eot_token_id).sum())
    words: list[tuple[str, float]] = []
    pieces: list[int] = []
    values: list[float] = []
    for token_id, weight in zip(token_ids[:length], weights[:length]):
        if token_id in special:
            continue
        pieces.append(token_id)
        values.append(float(weight))
        if decoder[token_id].endswith("</w>"):
            words.append((tokenizer.decode(pieces).strip(), float(np.mean(values))))
            pieces, values = [], []
    if pieces:  # a caption cut at the context length ends mid-word
        words.append((tokenizer.decode(pieces).strip(), float(np.mean(values))))
    return words


@torch.no_grad()
def word_selection(model: Any, reference_images: Tensor, captions: Sequence[str]) -> list[list[tuple[str, float]]]:
    """Per caption, its words with SSN's upgradation weight ``s_t`` (1 = upgrade, 0 = degrade)."""
    device = next(model.parameters()).device
    token_ids = model.backbone.tokenize(captions).to(device)
    s_t = model.text_selection(reference_images.to(device), token_ids).float().cpu()
    return [caption_words(model.backbone.tokenizer, ids.tolist(), weights.tolist())
            for ids, weights in zip(token_ids.cpu(), s_t)]


def target_ranks(
    query_feats: Tensor,
    gallery_feats: Tensor,
    target_indices: Tensor,
    exclude_indices: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """1-based rank of each query's target in the order of :func:`retrieval.topk_retrieval`.

    Rank = 1 + (items scoring higher) + (items scoring equal with a lower gallery index), with the
    excluded item (CIRR: the reference) removed, so ties are broken exactly as the metrics break them.
    """
    num_g = gallery_feats.shape[0]
    dtype = torch.promote_types(query_feats.dtype, torch.float32)
    gallery = gallery_feats.double()
    positions = torch.arange(num_g)
    ranks = []
    for q0 in range(0, query_feats.shape[0], chunk_size):
        # topk_retrieval's scores: float64 dot products rounded to the score dtype.
        sims = (query_feats[q0 : q0 + chunk_size].double() @ gallery.T).to(dtype)  # [cq, G]
        targets = target_indices[q0 : q0 + chunk_size]
        if exclude_indices is not None:
            excluded = exclude_indices[q0 : q0 + chunk_size]
            rows = (excluded >= 0).nonzero().squeeze(1)
            sims[rows, excluded[rows]] = float("-inf")
        target_scores = sims.gather(1, targets[:, None])  # [cq, 1]
        ties_before = (sims == target_scores) & (positions[None] < targets[:, None])
        ranks.append(1 + (sims > target_scores).sum(1) + ties_before.sum(1))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def select_examples(ranks: Sequence[int], count: int) -> list[int]:
    """Indices of ``count`` queries, half successes (rank 1) and half failures, spread over the set.

    When one kind runs short the other fills in. Successes come first, each kind in query order.
    """
    successes = [i for i, rank in enumerate(ranks) if rank == 1]
    failures = [i for i, rank in enumerate(ranks) if rank != 1]
    want_success = min(len(successes), max(count - len(failures), (count + 1) // 2))
    want_failure = min(len(failures), count - want_success)

    def spread(items: list[int], n: int) -> list[int]:
        # Evenly spaced picks show a variety of queries rather than the first few.
        return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)] if n else []

    return spread(successes, want_success) + spread(failures, want_failure)


def retrieval_examples(
    model: Any,
    task: RetrievalTask,
    transform: Callable[[Any], Tensor],
    query_feats: Tensor,
    gallery_feats: Tensor,
    num_examples: int,
    exclude_reference: bool,
    top_k: int = 10,
) -> list[QueryExample]:
    """Grid rows for ``num_examples`` validation queries of ``task`` from features already computed.

    Args:
        model: the SSNModel (only used for the word weights of the chosen queries).
        task: the queries and gallery the features came from; ``task.image_path`` gives the files to show.
        transform: the model's preprocessing (the chosen references are encoded again for ``s_t``).
        query_feats, gallery_feats: [Q, D] and [G, D], rows in the task's query and gallery order.
        exclude_reference: remove the reference from its own ranking (CIRR), as the metrics do.
    """
    name_index = {name: i for i, name in enumerate(task.gallery)}
    references = [query.reference for query in task.queries]
    targets = [query.target for query in task.queries]
    missing = sorted({t for t in targets if t not in name_index})
    if missing:
        raise ValueError(f"targets not in the gallery: {missing[:5]}")
    target_idx = torch.tensor([name_index[t] for t in targets], dtype=torch.long)
    exclude = (torch.tensor([name_index.get(r, -1) for r in references], dtype=torch.long)
               if exclude_reference else None)
    scores, top = topk_retrieval(query_feats, gallery_feats, top_k, exclude)
    ranks = target_ranks(query_feats, gallery_feats, target_idx, exclude).tolist()
    # The top-k list is what the metrics count; the counted rank only matters beyond it (a rounding
    # difference between the two matmuls must not put the frame and the printed rank apart).
    for q, (row, target) in enumerate(zip(top.tolist(), target_idx.tolist())):
        ranks[q] = row.index(target) + 1 if target in row else max(ranks[q], len(row) + 1)
    chosen = select_examples(ranks, num_examples)
    if not chosen:
        return []
    images = torch.stack([transform(load_image(task.image_path(references[q]))) for q in chosen])
    words = word_selection(model, images, [task.queries[q].caption for q in chosen])
    return [
        QueryExample(
            reference=Path(task.image_path(references[q])),
            caption=task.queries[q].caption,
            retrieved=[Path(task.image_path(task.gallery[i])) for i in top[q].tolist()],
            scores=scores[q].tolist(),
            target=Path(task.image_path(targets[q])),
            target_rank=ranks[q],
            words=words[row],
        )
        for row, q in enumerate(chosen)
    ]
