"""Results you can see: retrieval grids (PNG + HTML), SSN word selection, training curves, run reports.

* :func:`retrieval_examples` turns features already computed for validation into :class:`QueryExample`
  rows (top-k, scores, the ground truth's rank, the caption's words with their SSN weight ``s_t``);
  :func:`draw_retrieval_grid` and :func:`write_retrieval_html` draw them.
* :func:`plot_training_curves` draws loss and every validation recall per epoch from ``metrics.jsonl``.
* :func:`write_run_report` writes ``report.md`` into a run folder: metrics next to the published SSN
  numbers (docs/benchmarks.md), curves, grids, arguments and environment.
* :func:`list_gallery_images` lists a gallery folder for the single-query CLI ``retrieve.py``.

Grids are composed with PIL (exact tile geometry, see :class:`GridLayout`); curves use matplotlib's Agg
canvas directly, so nothing here needs a display or changes matplotlib's global backend.
"""
from __future__ import annotations

import html
import io
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
import torch
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

import utils
from data_utils import DataError, load_image
from model.backbone import text_mask_from_ids

__all__ = [
    "GT_COLOUR",
    "PUBLISHED_SSN",
    "QueryExample",
    "GridLayout",
    "caption_words",
    "word_selection",
    "target_ranks",
    "select_examples",
    "retrieval_examples",
    "draw_retrieval_grid",
    "write_retrieval_html",
    "grid_paths",
    "write_retrieval_examples",
    "read_epoch_metrics",
    "best_epoch",
    "plot_training_curves",
    "write_run_report",
    "write_run_report_safely",
    "IMAGE_EXTENSIONS",
    "list_gallery_images",
]

_logger = logging.getLogger("cir.visualize")

# Green means "correct" everywhere: the ground-truth frame and the SUCCESS marker.
GT_COLOUR = (0, 170, 0)
GT_COLOUR_HEX = "#{:02x}{:02x}{:02x}".format(*GT_COLOUR)
FAILURE_COLOUR = (205, 30, 30)
NEUTRAL_COLOUR = (110, 110, 110)
TILE_BORDER = (200, 200, 200)
REFERENCE_BORDER = (60, 60, 60)
UPGRADE_COLOUR = (25, 85, 215)  # s_t -> 1: the word is kept (upgradation)
DEGRADE_COLOUR = (225, 110, 0)  # s_t -> 0: the word is shifted away (degradation)
TEXT_COLOUR = (20, 20, 20)
MUTED_TEXT = (110, 110, 110)

# docs/benchmarks.md. Published numbers are on the real benchmarks with ViT-B/32 (CIRR: test split).
PUBLISHED_SSN: dict[str, dict[str, Any]] = {
    "cirr": {
        "label": "published SSN, ViT-B/32, real CIRR test",
        "metrics": {"R@1": 43.91, "R@5": 77.25, "R@10": 86.48, "R@50": 97.45,
                    "Rs@1": 71.76, "Rs@2": 88.63, "Rs@3": 95.54, "Avg": 74.51},
    },
    "fashioniq": {
        "label": "published SSN, ViT-B/32, real FashionIQ val",
        "metrics": {"dress_R@10": 34.36, "dress_R@50": 60.78, "shirt_R@10": 38.13, "shirt_R@50": 61.83,
                    "toptee_R@10": 44.26, "toptee_R@50": 69.05, "avg_R@10": 38.92, "avg_R@50": 63.89},
    },
}

_RECALL_NAME = re.compile(r"Rs?@\d+$")
# Arguments a shared report must not print.


# ---------------------------------------------------------------------------------------------- examples
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
    """1-based rank of each query's target in the order of :func:`utils.topk_retrieval`.

    Rank = 1 + (items scoring higher) + (items scoring equal with a lower gallery index), with the
    excluded item (CIRR: the reference) removed, so ties are broken exactly as the metrics break them.
    """
    num_g = gallery_feats.shape[0]
    gallery = gallery_feats.float()
    positions = torch.arange(num_g)
    ranks = []
    for q0 in range(0, query_feats.shape[0], chunk_size):
        sims = query_feats[q0 : q0 + chunk_size].float() @ gallery.T  # [cq, G]
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
    queries: Dataset,
    gallery: Dataset,
    gallery_names: Sequence[str],
    query_feats: Tensor,
    gallery_feats: Tensor,
    metadata: Mapping[str, Sequence],
    num_examples: int,
    exclude_reference: bool,
    top_k: int = 10,
) -> list[QueryExample]:
    """Grid rows for ``num_examples`` validation queries from features already computed.

    Args:
        model: the SSNModel (only used for the word weights of the chosen queries).
        queries, gallery: the datasets the features came from (``relative`` / ``classic`` mode); their
            ``image_path`` gives the files to show, ``queries[i]`` the reference image for ``s_t``.
        metadata: from :func:`training.encode_queries` (``reference_name``, ``target_name``, ``caption``).
        exclude_reference: remove the reference from its own ranking (CIRR), as the metrics do.
    """
    name_index = {name: i for i, name in enumerate(gallery_names)}
    references, targets = metadata["reference_name"], metadata["target_name"]
    missing = sorted({t for t in targets if t not in name_index})
    if missing:
        raise ValueError(f"targets not in the gallery: {missing[:5]}")
    target_idx = torch.tensor([name_index[t] for t in targets], dtype=torch.long)
    exclude = (torch.tensor([name_index.get(r, -1) for r in references], dtype=torch.long)
               if exclude_reference else None)
    scores, top = utils.topk_retrieval(query_feats, gallery_feats, top_k, exclude)
    ranks = target_ranks(query_feats, gallery_feats, target_idx, exclude).tolist()
    # The top-k list is what the metrics count; the counted rank only matters beyond it (a rounding
    # difference between the two matmuls must not put the frame and the printed rank apart).
    for q, (row, target) in enumerate(zip(top.tolist(), target_idx.tolist())):
        ranks[q] = row.index(target) + 1 if target in row else max(ranks[q], len(row) + 1)
    chosen = select_examples(ranks, num_examples)
    if not chosen:
        return []
    items = [queries[q] for q in chosen]
    words = word_selection(model, torch.stack([item["reference_image"] for item in items]),
                           [metadata["caption"][q] for q in chosen])
    return [
        QueryExample(
            reference=Path(queries.image_path(references[q])),
            caption=metadata["caption"][q],
            retrieved=[Path(gallery.image_path(gallery_names[i])) for i in top[q].tolist()],
            scores=scores[q].tolist(),
            target=Path(gallery.image_path(targets[q])),
            target_rank=ranks[q],
            words=words[row],
        )
        for row, q in enumerate(chosen)
    ]


# ---------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a retrieval grid; tests and readers locate tiles with :meth:`tile_origin`.

    Columns: 0 = reference, 1..top_k = retrieved at that rank, top_k + 1 = the ground truth.
    """

    top_k: int = 10
    tile: int = 96
    frame: int = 5  # ground-truth frame width, drawn outside the tile
    gap: int = 12
    separator: int = 20  # extra space between the reference, the ranking and the ground truth
    margin: int = 12
    status_width: int = 120
    title_height: int = 58
    line_height: int = 36  # one caption line: the words and their s_t below
    caption_lines: int = 1
    label_height: int = 20

    @property
    def row_height(self) -> int:
        return self.caption_lines * self.line_height + self.tile + 2 * self.frame + self.label_height + self.gap

    def column_x(self, column: int) -> int:
        x = self.margin + self.status_width + self.separator + self.frame
        step = self.tile + self.gap + 2 * self.frame
        extra = (self.separator if column >= 1 else 0) + (self.separator if column > self.top_k else 0)
        return x + column * step + extra

    def tile_origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left pixel of a tile's image (frames lie ``frame`` pixels outside it)."""
        y = self.title_height + row * self.row_height + self.caption_lines * self.line_height + self.frame
        return self.column_x(column), y

    def size(self, rows: int) -> tuple[int, int]:
        width = self.column_x(self.top_k + 1) + self.tile + self.frame + self.margin
        return width, self.title_height + rows * self.row_height + self.margin


@dataclass
class _Fonts:
    """DejaVu Sans ships with matplotlib, so text looks the same on every machine."""

    size: int = 14

    def __post_init__(self) -> None:
        regular = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
        bold = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))
        self.text = ImageFont.truetype(regular, self.size)
        self.small = ImageFont.truetype(regular, self.size - 3)
        self.bold = ImageFont.truetype(bold, self.size)
        self.title = ImageFont.truetype(bold, self.size + 3)


def _word_colour(weight: float) -> tuple[int, int, int]:
    """Blue for upgradation, orange for degradation, fading to grey as s_t approaches 0.5."""
    strength = min(1.0, abs(weight - 0.5) * 2) ** 0.5
    base = UPGRADE_COLOUR if weight >= 0.5 else DEGRADE_COLOUR
    return tuple(int(round(c * strength + m * (1 - strength))) for c, m in zip(base, MUTED_TEXT))  # type: ignore[return-value]


def _caption_runs(example: QueryExample) -> list[tuple[str, float | None]]:
    return list(example.words) if example.words is not None else [(w, None) for w in example.caption.split()]


def _layout_caption(runs: list[tuple[str, float | None]], fonts: _Fonts, start: int, width: int,
                    draw: ImageDraw.ImageDraw) -> list[tuple[int, int, str, float | None]]:
    """(x, line, word, weight) for each word, wrapping at ``width`` pixels."""
    placed, x, line = [], start, 0
    for word, weight in runs:
        w = int(max(draw.textlength(word, font=fonts.text), draw.textlength(f"{weight:.2f}", font=fonts.small)
                    if weight is not None else 0))
        if x + w > start + width and x > start:
            x, line = start, line + 1
        placed.append((x, line, word, weight))
        x += w + 8
    return placed


def _paste_tile(canvas: Image.Image, path: Path, origin: tuple[int, int], size: int) -> None:
    image = ImageOps.contain(load_image(path), (size, size), Image.Resampling.LANCZOS)
    canvas.paste(image, (origin[0] + (size - image.width) // 2, origin[1] + (size - image.height) // 2))


def _frame(draw: ImageDraw.ImageDraw, origin: tuple[int, int], size: int, colour: tuple[int, int, int], width: int) -> None:
    x, y = origin
    draw.rectangle([x - width, y - width, x + size + width - 1, y + size + width - 1], outline=colour, width=width)


def draw_retrieval_grid(
    examples: Sequence[QueryExample], path: str | os.PathLike, title: str = "", layout: GridLayout | None = None,
) -> tuple[Path, GridLayout]:
    """Draw one row per query into a PNG; return its path and the layout used.

    A row: SUCCESS / FAILURE marker, the caption (words coloured by ``s_t`` when known), the reference,
    the top-k with rank and score under each (ground truth framed in green), and the ground truth itself.
    """
    if not examples:
        raise ValueError("draw_retrieval_grid needs at least one example")
    fonts = _Fonts()
    top_k = max(len(e.retrieved) for e in examples)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    base = layout or GridLayout(top_k=top_k)
    caption_start = base.column_x(0)
    caption_width = base.size(1)[0] - caption_start - base.margin
    lines = max(1 + max(line for _, line, _, _ in _layout_caption(_caption_runs(e), fonts, caption_start, caption_width, probe))
                for e in examples)
    layout = dataclasses.replace(base, top_k=top_k, caption_lines=max(base.caption_lines, lines))
    canvas = Image.new("RGB", layout.size(len(examples)), "white")
    draw = ImageDraw.Draw(canvas)

    draw.text((layout.margin, layout.margin), title or "Composed image retrieval", fill=TEXT_COLOUR, font=fonts.title)
    legend = [("upgradation word (s_t > 0.5)", UPGRADE_COLOUR), ("degradation word (s_t < 0.5)", DEGRADE_COLOUR)]
    if any(e.target is not None for e in examples):
        legend = [("SUCCESS = target ranked #1", GT_COLOUR), ("FAILURE", FAILURE_COLOUR),
                  ("ground truth: green frame", GT_COLOUR), *legend]
    x = layout.margin
    for text, colour in legend:
        draw.rectangle([x, layout.margin + 28, x + 12, layout.margin + 40], fill=colour)
        draw.text((x + 18, layout.margin + 26), text, fill=TEXT_COLOUR, font=fonts.small)
        x += 36 + int(draw.textlength(text, font=fonts.small))

    for row, example in enumerate(examples):
        ref_x, tile_y = layout.tile_origin(row, 0)
        caption_y = tile_y - layout.frame - layout.caption_lines * layout.line_height
        for word_x, line, word, weight in _layout_caption(_caption_runs(example), fonts, caption_start, caption_width, draw):
            y = caption_y + line * layout.line_height
            draw.text((word_x, y), word, fill=TEXT_COLOUR if weight is None else _word_colour(weight), font=fonts.text)
            if weight is not None:
                draw.text((word_x, y + 17), f"{weight:.2f}", fill=MUTED_TEXT, font=fonts.small)

        # The marker: a coloured block readable at a glance.
        success = example.success
        status = {True: ("SUCCESS", GT_COLOUR), False: ("FAILURE", FAILURE_COLOUR), None: ("QUERY", NEUTRAL_COLOUR)}[success]
        block = [layout.margin, tile_y, layout.margin + layout.status_width, tile_y + layout.tile]
        draw.rectangle(block, fill=status[1])
        draw.text((block[0] + 10, tile_y + 22), status[0], fill="white", font=fonts.title)
        if example.target_rank is not None:
            detail = f"target rank {example.target_rank}"
            draw.text((block[0] + 10, tile_y + 52), detail, fill="white", font=fonts.small)

        _paste_tile(canvas, example.reference, (ref_x, tile_y), layout.tile)
        _frame(draw, (ref_x, tile_y), layout.tile, REFERENCE_BORDER, 2)
        draw.text((ref_x, tile_y + layout.tile + layout.frame + 2), "reference", fill=TEXT_COLOUR, font=fonts.small)

        target_position = example.target_position
        for position, (image_path, score) in enumerate(zip(example.retrieved, example.scores)):
            origin = layout.tile_origin(row, position + 1)
            _paste_tile(canvas, image_path, origin, layout.tile)
            is_target = position == target_position
            _frame(draw, origin, layout.tile, GT_COLOUR if is_target else TILE_BORDER, layout.frame if is_target else 1)
            label = f"#{position + 1}  {score:.3f}"
            draw.text((origin[0], origin[1] + layout.tile + layout.frame + 2), label,
                      fill=GT_COLOUR if is_target else TEXT_COLOUR, font=fonts.bold if is_target else fonts.small)

        if example.target is not None:
            origin = layout.tile_origin(row, layout.top_k + 1)
            _paste_tile(canvas, example.target, origin, layout.tile)
            _frame(draw, origin, layout.tile, GT_COLOUR, layout.frame)
            draw.text((origin[0], origin[1] + layout.tile + layout.frame + 2), f"target (#{example.target_rank})",
                      fill=GT_COLOUR, font=fonts.bold)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    utils.atomic_write_bytes(path, buffer.getvalue())
    return path, layout


def _relative(path: Path, start: Path) -> str:
    """A link from ``start`` to ``path``; absolute when no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:
        return path.resolve().as_uri()


def write_retrieval_html(
    examples: Sequence[QueryExample], path: str | os.PathLike, title: str = "", grid_png: str | os.PathLike | None = None,
) -> Path:
    """A self-contained HTML page of the same rows; images are linked relative to the page."""
    path = Path(path)
    folder = path.parent
    esc = html.escape
    rows = []
    for number, example in enumerate(examples, start=1):
        status = {True: "success", False: "failure", None: "query"}[example.success]
        if example.words is not None:
            caption = " ".join(
                f'<span class="word" style="color:rgb{_word_colour(weight)}" title="s_t = {weight:.3f}">'
                f"{esc(word)}<sub>{weight:.2f}</sub></span>"
                for word, weight in example.words
            )
        else:
            caption = esc(example.caption)
        rank = "" if example.target_rank is None else f" &middot; target rank {example.target_rank}"
        cells = [f'<td class="tile ref"><img src="{esc(_relative(example.reference, folder))}" '
                 f'title="{esc(str(example.reference))}"><br>reference</td>']
        for position, (image_path, score) in enumerate(zip(example.retrieved, example.scores)):
            gt = " gt" if position == example.target_position else ""
            cells.append(f'<td class="tile{gt}"><img src="{esc(_relative(image_path, folder))}" '
                         f'title="{esc(str(image_path))}"><br>#{position + 1} &middot; {score:.3f}</td>')
        if example.target is not None:
            cells.append(f'<td class="tile gt target"><img src="{esc(_relative(example.target, folder))}" '
                         f'title="{esc(str(example.target))}"><br>target (#{example.target_rank})</td>')
        rows.append(
            f'<div class="query {status}"><p><span class="badge">{status.upper()}</span> '
            f'<b>{number}.</b> <span class="caption" data-caption="{esc(example.caption)}">{caption}</span>{rank}</p>'
            f'<table><tr>{"".join(cells)}</tr></table></div>'
        )
    grid_link = f'<p><a href="{esc(_relative(Path(grid_png), folder))}">grid as PNG</a></p>' if grid_png else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title or "Retrieval examples")}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.query {{ border-left: 10px solid #6e6e6e; padding: 0.2em 0.8em; margin-bottom: 1.2em; }}
.query.success {{ border-color: rgb{GT_COLOUR}; }} .query.failure {{ border-color: rgb{FAILURE_COLOUR}; }}
.badge {{ color: white; font-weight: bold; padding: 0.1em 0.5em; background: #6e6e6e; }}
.success .badge {{ background: rgb{GT_COLOUR}; }} .failure .badge {{ background: rgb{FAILURE_COLOUR}; }}
.word {{ margin-right: 0.35em; font-size: 1.1em; }} .word sub {{ color: #777; font-size: 0.65em; }}
.tile {{ text-align: center; font-size: 0.8em; padding: 4px; }}
.tile img {{ width: 96px; height: 96px; object-fit: contain; border: 1px solid #ccc; padding: 4px; }}
.tile.gt img {{ border: 5px solid rgb{GT_COLOUR}; padding: 0; }} .tile.ref img {{ border: 2px solid #3c3c3c; }}
</style></head><body>
<h1>{esc(title or "Retrieval examples")}</h1>
<p>SUCCESS = the ground truth is ranked first (R@1). The ground truth is framed in green.
Caption words are coloured by SSN's selection weight s<sub>t</sub>:
<span style="color:rgb{UPGRADE_COLOUR}">blue = upgradation (kept)</span>,
<span style="color:rgb{DEGRADE_COLOUR}">orange = degradation (shifted away)</span>.</p>
{grid_link}
{chr(10).join(rows)}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_bytes(path, page.encode("utf-8"))
    return path


def grid_paths(metrics_json: str | os.PathLike, set_name: str) -> tuple[Path, Path]:
    """Where ``validate.py --visualize`` puts a retrieval set's grid: beside the metrics JSON."""
    metrics_json = Path(metrics_json)
    stem = metrics_json.with_name(f"{metrics_json.stem}_{set_name}_grid")
    return stem.with_suffix(".png"), stem.with_suffix(".html")


def write_retrieval_examples(
    examples: Sequence[QueryExample], metrics_json: str | os.PathLike, set_name: str, title: str,
) -> tuple[Path, Path]:
    """Grid PNG and HTML page for one retrieval set, named by :func:`grid_paths`."""
    png, page = grid_paths(metrics_json, set_name)
    draw_retrieval_grid(examples, png, title)
    write_retrieval_html(examples, page, title, grid_png=png)
    return png, page


# ---------------------------------------------------------------------------------------------- curves
def read_epoch_metrics(metrics_log: str | os.PathLike) -> pd.DataFrame:
    """Per-epoch training loss and validation metrics from ``metrics.jsonl``, indexed by epoch.

    Columns keep their logged names (``train/epoch_loss``, ``val/R@1``, ...). A resumed run logs
    some epochs twice; the last record of an epoch wins.
    """
    metrics_log = Path(metrics_log)
    if not metrics_log.is_file():
        raise FileNotFoundError(f"{metrics_log}: metrics log not found")
    frame = utils.read_metrics_log(metrics_log)
    if frame.empty or "epoch" not in frame:
        raise ValueError(f"{metrics_log}: no per-epoch records")
    columns = [c for c in frame.columns if c == "train/epoch_loss" or c.startswith("val/")]
    per_epoch = frame.dropna(subset=["epoch"]).groupby("epoch")[columns].last()
    per_epoch.index = per_epoch.index.astype(int)
    return per_epoch.dropna(how="all")


def best_epoch(per_epoch: pd.DataFrame, key: str = "val/mean") -> int | None:
    """The epoch the training loop keeps as best: the first with the highest ``key`` (None if unlogged)."""
    if key not in per_epoch or per_epoch[key].isna().all():
        return None
    return int(per_epoch[key].idxmax())


def plot_training_curves(
    metrics_log: str | os.PathLike, output: str | os.PathLike, figsize: tuple[float, float] = (12.0, 4.5), dpi: int = 100,
    best_key: str = "val/mean",
) -> Path:
    """PNG of the loss (per step and per epoch) and every validation recall per epoch, best epoch marked.

    The image is exactly ``figsize * dpi`` pixels. The best epoch is chosen by ``best_key`` (the
    training run's ``--best_metric``; default the mean recall).
    """
    metrics_log = Path(metrics_log)
    per_epoch = read_epoch_metrics(metrics_log)
    steps = utils.read_metrics_log(metrics_log)
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    loss_ax, recall_ax = figure.subplots(1, 2)

    epoch_loss = per_epoch["train/epoch_loss"].dropna() if "train/epoch_loss" in per_epoch else pd.Series(dtype=float)
    if "train/loss" in steps and "step" in steps and not epoch_loss.empty:
        # Per-step losses on the epoch axis: steps per epoch from the step count at the last epoch end.
        ends = steps.dropna(subset=["train/epoch_loss"])
        steps_per_epoch = float(ends["step"].iloc[-1]) / max(float(ends["epoch"].iloc[-1]), 1.0)
        step_loss = steps.dropna(subset=["train/loss"])
        loss_ax.plot(step_loss["step"] / steps_per_epoch, step_loss["train/loss"], color="0.7", lw=1, label="step loss")
    if not epoch_loss.empty:
        loss_ax.plot(epoch_loss.index, epoch_loss.values, "o-", color="C0", label="epoch mean loss")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")

    recalls = [c for c in per_epoch.columns if c.startswith("val/") and _RECALL_NAME.search(c)]
    for i, column in enumerate(recalls):
        series = per_epoch[column].dropna()
        recall_ax.plot(series.index, series.values, "o-", ms=3, color=f"C{i % 10}", label=column.removeprefix("val/"))
    if "val/mean" in per_epoch:
        mean = per_epoch["val/mean"].dropna()
        recall_ax.plot(mean.index, mean.values, "k--", lw=2, label="mean")
    recall_ax.set(title="validation recall (%)", xlabel="epoch", ylabel="recall (%)")

    best = best_epoch(per_epoch, best_key)
    if best is not None:
        for ax in (loss_ax, recall_ax):
            ax.axvline(best, color=GT_COLOUR_HEX, ls=":", lw=2)
        value = per_epoch.loc[best, best_key]
        recall_ax.plot([best], [value], "*", ms=16, color=GT_COLOUR_HEX, label=f"best: epoch {best} ({value:.2f})")
    for ax in (loss_ax, recall_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if loss_ax.lines:
        loss_ax.legend(fontsize=7, loc="upper right")
    if recall_ax.lines:
        # Outside the axes: recall lines cross the whole plot.
        recall_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=2 if len(recall_ax.lines) > 12 else 1)
    figure.suptitle(f"{metrics_log.parent.name}: training curves")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    utils.atomic_write_bytes(output, buffer.getvalue())
    return output


# ---------------------------------------------------------------------------------------------- report
def _read_json_if_present(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _dataset_of(metrics: Mapping[str, float]) -> str | None:
    """Which published numbers are comparable, judged by the metric names themselves."""
    if "R@1" in metrics:
        return "cirr"
    if "avg_R@10" in metrics:
        return "fashioniq"
    return None


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _environment(device: str | None) -> list[tuple[str, str]]:
    return [
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("open_clip", open_clip.__version__),
        ("device", device or ("cuda" if torch.cuda.is_available() else "cpu")),
        ("CUDA available", str(torch.cuda.is_available())),
    ]


def write_run_report(
    run_dir: str | os.PathLike, device: str | None = None, validation_json: str | os.PathLike | None = None,
) -> Path:
    """Write ``<run_dir>/report.md`` (and ``curves.png`` from ``metrics.jsonl``) and return its path.

    Uses whatever the run folder holds: ``args.json``, ``summary.json`` (best validation during
    training), ``metrics.jsonl``, and the validation JSON of ``validate.py`` (default
    ``<run_dir>/validation.json``) with the grids beside it. Missing parts are left out.
    """
    run_dir = Path(run_dir)
    validation_json = Path(validation_json) if validation_json else run_dir / "validation.json"
    args = _read_json_if_present(run_dir / "args.json") or {}
    summary = _read_json_if_present(run_dir / "summary.json") or {}
    validation = _read_json_if_present(validation_json) or {}

    per_epoch = None
    curves = run_dir / "curves.png"
    best_key = f"val/{summary.get('best_metric_name', 'mean')}"
    if (run_dir / "metrics.jsonl").is_file():
        per_epoch = read_epoch_metrics(run_dir / "metrics.jsonl")
        plot_training_curves(run_dir / "metrics.jsonl", curves, best_key=best_key)
    best = summary.get("best_epoch") or (best_epoch(per_epoch, best_key) if per_epoch is not None else None)

    columns: list[tuple[str, Mapping[str, float]]] = []
    if summary.get("best_metrics"):
        by = summary.get("best_metric_name", "mean")
        columns.append((f"ours: best val during training by {by}{f' (epoch {best})' if best else ''}", summary["best_metrics"]))
    for method, metrics in (validation.get("metrics") or {}).items():
        columns.append((f"ours: validate.py, {method}", metrics))
    dataset = next((_dataset_of(m) for _, m in columns if _dataset_of(m)), None)
    published = PUBLISHED_SSN.get(dataset or "")
    if published:
        columns.append((published["label"], published["metrics"]))
    keys: list[str] = list(published["metrics"]) if published else []
    for _, metrics in columns:
        keys += [k for k in metrics if k not in keys]

    model = args.get("clip_model_name", "?")
    lines = [f"# Run report: {run_dir.name}", "", f"Written {datetime.now():%Y-%m-%d %H:%M:%S}.", "", "## Metrics (%)", ""]
    if columns:
        lines += [
            f"**ours** = this run: `{model}` (pretrained: `{args.get('pretrained', '?')}`) on the *val* split of "
            f"`{args.get('data_root', '?')}` (the data this run used). "
            "**published** = the SSN paper (docs/benchmarks.md): real benchmark, OpenAI ViT-B/32. "
            "The columns are comparable only when ours is also the real benchmark with ViT-B/32; "
            "on synthetic data this table is a functional check, not a reproduction.",
            "",
            _markdown_table(["metric", *(label for label, _ in columns)],
                            [[key, *(f"{m[key]:.2f}" if key in m else "-" for _, m in columns)] for key in keys]),
        ]
    else:
        lines.append("No metrics yet.")
    if curves.is_file():
        lines += ["", "## Training curves", "", f"![training curves]({curves.name})"]
    grids = sorted(validation_json.parent.glob(f"{validation_json.stem}_*_grid.png"))
    if grids:
        lines += ["", "## Retrieval examples", ""]
        for png in grids:
            page = png.with_suffix(".html")
            link = f" ([HTML page]({_relative(page, run_dir)}))" if page.is_file() else ""
            lines += [f"![retrieval grid]({_relative(png, run_dir)}){link}", ""]
    if summary:
        rows = [[k, v] for k, v in summary.items() if k not in ("best_metrics", "best_by")]
        rows += [[f"best {criterion}", f"{b['value']:.2f} (epoch {b['epoch']})"]
                 for criterion, b in (summary.get("best_by") or {}).items()]
        lines += ["", "## Training summary", "", _markdown_table(["", "value"], rows)]
    if args:
        shown = {k: ("(set, not shown)" if k in utils.SECRET_ARGS and v else v) for k, v in args.items()}
        lines += ["", "## Arguments", "", _markdown_table(["argument", "value"], sorted(shown.items()))]
    lines += ["", "## Environment", "", _markdown_table(["", "version"], _environment(device)), ""]
    report = run_dir / "report.md"
    utils.atomic_write_bytes(report, "\n".join(lines).encode("utf-8"))
    return report


def write_run_report_safely(run_dir: str | os.PathLike, **kwargs: Any) -> Path | None:
    """:func:`write_run_report` for the end of a run: a failure is logged, never raised.

    The report is a by-product; a plotting problem must not turn a finished training into a crash.
    """
    try:
        return write_run_report(run_dir, **kwargs)
    except Exception as error:  # anything matplotlib / PIL / IO may raise; checkpoints are already on disk
        _logger.warning("run report not written to %s (%s: %s); checkpoints and metrics are unaffected",
                        run_dir, type(error).__name__, error)
        return None


# ---------------------------------------------------------------------------------------------- folders
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def list_gallery_images(directory: str | os.PathLike) -> list[Path]:
    """Image files under ``directory`` (recursively), sorted so features line up with names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: gallery directory not found")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files
