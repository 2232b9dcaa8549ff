"""Retrieval grids: one row per query, as a PNG (exact tile geometry) and as an HTML page.

A row: SUCCESS / FAILURE marker, the caption (words coloured by SSN's ``s_t`` when known), the reference,
the top-k with rank and score under each (ground truth framed in green), and the ground truth itself.
:func:`write_retrieval_examples` writes both beside a metrics JSON, named by :func:`grid_paths`.
"""
from __future__ import annotations

import dataclasses
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont, ImageOps

import utils
from data_utils import load_image
from viz.examples import QueryExample
from viz.style import (
    DEGRADE_COLOUR, FAILURE_COLOUR, GT_COLOUR, MUTED_TEXT, NEUTRAL_COLOUR, REFERENCE_BORDER, TEXT_COLOUR,
    TILE_BORDER, UPGRADE_COLOUR, word_colour,
)

__all__ = [
    "GridLayout",
    "draw_retrieval_grid",
    "relative_link",
    "write_retrieval_html",
    "grid_paths",
    "write_retrieval_examples",
]


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
            draw.text((word_x, y), word, fill=TEXT_COLOUR if weight is None else word_colour(weight), font=fonts.text)
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


def relative_link(path: Path, start: Path) -> str:
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
                f'<span class="word" style="color:rgb{word_colour(weight)}" title="s_t = {weight:.3f}">'
                f"{esc(word)}<sub>{weight:.2f}</sub></span>"
                for word, weight in example.words
            )
        else:
            caption = esc(example.caption)
        rank = "" if example.target_rank is None else f" &middot; target rank {example.target_rank}"
        cells = [f'<td class="tile ref"><img src="{esc(relative_link(example.reference, folder))}" '
                 f'title="{esc(str(example.reference))}"><br>reference</td>']
        for position, (image_path, score) in enumerate(zip(example.retrieved, example.scores)):
            gt = " gt" if position == example.target_position else ""
            cells.append(f'<td class="tile{gt}"><img src="{esc(relative_link(image_path, folder))}" '
                         f'title="{esc(str(image_path))}"><br>#{position + 1} &middot; {score:.3f}</td>')
        if example.target is not None:
            cells.append(f'<td class="tile gt target"><img src="{esc(relative_link(example.target, folder))}" '
                         f'title="{esc(str(example.target))}"><br>target (#{example.target_rank})</td>')
        rows.append(
            f'<div class="query {status}"><p><span class="badge">{status.upper()}</span> '
            f'<b>{number}.</b> <span class="caption" data-caption="{esc(example.caption)}">{caption}</span>{rank}</p>'
            f'<table><tr>{"".join(cells)}</tr></table></div>'
        )
    grid_link = f'<p><a href="{esc(relative_link(Path(grid_png), folder))}">grid as PNG</a></p>' if grid_png else ""
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
