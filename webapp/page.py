"""The interactive retrieval page (Gradio): pick or upload a reference, type the modification, see the rankings.

:func:`build_page` lays out the page around a :class:`webapp.engine.RetrievalEngine`; :func:`search_page`
is its callback (plain inputs -> three HTML / Markdown strings), so tests call it without a browser.
The page shows, per retrieval method (SSN, then the image-only / text-only / sum baselines), the top-k
gallery images with their cosine scores, and the modification text with each word coloured by SSN's
upgradation weight s_t (blue: s_t -> 1, kept; orange: s_t -> 0, shifted away; the colours of the
validation grids, :mod:`viz.style`).  Bad input (no image, empty text, an unreadable upload) becomes a
message on the page.

The callback is registered with ``preprocess=False``: Gradio's own image preprocessing would open an
upload with PIL before the callback runs, so a non-image upload would end in a generic error instead
of a message naming the file.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import gradio as gr

from data_utils import DataError, load_image
from viz.style import DEGRADE_COLOUR, GT_COLOUR, GT_COLOUR_HEX, UPGRADE_COLOUR, word_colour
from webapp.engine import METHOD_LABELS, QueryError, RetrievalEngine, SearchResult

__all__ = ["THUMBNAIL_SIZE", "reference_file", "thumbnail_uri", "render_words", "render_results", "search_page",
           "build_page", "PAGE_CSS"]

THUMBNAIL_SIZE = 160  # longest side, pixels, of the images embedded in the results
MAX_TOP_K = 20

PAGE_CSS = f"""
#results .method {{ margin-bottom: 14px; }}
#results .method h3 {{ margin: 0 0 4px 0; font-size: 1em; }}
#results .hits {{ display: flex; flex-wrap: wrap; gap: 8px; }}
#results figure {{ margin: 0; width: 104px; text-align: center; font-size: 0.78em; }}
#results figure img {{ width: 96px; height: 96px; object-fit: contain; border: 1px solid #ccc; padding: 3px;
                      image-rendering: pixelated; }}
#results figure.gt img {{ border: 4px solid {GT_COLOUR_HEX}; padding: 0; }}
#results figcaption .name {{ color: #666; overflow-wrap: anywhere; }}
#words .word {{ margin-right: 0.4em; font-size: 1.15em; font-weight: 600; }}
#words .word sub {{ color: #777; font-size: 0.65em; font-weight: normal; }}
"""


def reference_file(value: Any) -> tuple[str | None, str]:
    """(server path, name to show) of the reference input: a path, or Gradio's raw ``FileData`` dict."""
    if value is None or value == "":
        return None, ""
    if isinstance(value, Mapping):
        path = value.get("path")
        return path, str(value.get("orig_name") or (Path(path).name if path else ""))
    return str(value), Path(str(value)).name


@lru_cache(maxsize=4096)
def thumbnail_uri(path: str, size: int = THUMBNAIL_SIZE) -> str:
    """A gallery image as a PNG ``data:`` URI no larger than ``size`` (the page serves no files)."""
    image = load_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_words(words: list[tuple[str, float]]) -> str:
    """The text's words coloured by SSN's s_t, each with its value below, and the colour legend."""
    spans = " ".join(
        f'<span class="word" data-word="{html.escape(word)}" data-weight="{weight:.4f}" '
        f'style="color:rgb{word_colour(weight)}" title="s_t = {weight:.3f}">{html.escape(word)}<sub>{weight:.2f}</sub>'
        f"</span>"
        for word, weight in words
    )
    return (f'<div class="words">{spans}</div><p style="font-size:0.85em;color:#666">SSN word selection '
            f's<sub>t</sub>: <span style="color:rgb{UPGRADE_COLOUR}">blue = upgradation (kept, s<sub>t</sub> &rarr; 1)'
            f'</span>, <span style="color:rgb{DEGRADE_COLOUR}">orange = degradation (shifted away, s<sub>t</sub> '
            f'&rarr; 0)</span></p>')


def render_results(result: SearchResult, gallery_root: Path | None = None) -> str:
    """One row per method: its top-k thumbnails with rank, cosine score and name; the ground truth framed green."""
    blocks = []
    for method, hits in result.rankings.items():
        figures = []
        for rank, hit in enumerate(hits, start=1):
            gt = hit.name == result.target
            name = hit.name
            if gallery_root is not None and Path(name).is_relative_to(gallery_root):
                name = str(Path(name).relative_to(gallery_root))  # folder galleries: paths inside the folder
            figures.append(
                f'<figure class="hit{" gt" if gt else ""}" data-rank="{rank}" data-name="{html.escape(hit.name)}" '
                f'data-score="{hit.score:.6f}"><img src="{thumbnail_uri(str(hit.path))}" alt="{html.escape(name)}">'
                f'<figcaption>#{rank} &middot; {hit.score:.3f}<br><span class="name">{html.escape(name)}</span>'
                f"</figcaption></figure>"
            )
        note = ""
        if result.target_ranks is not None:
            rank = result.target_ranks[method]
            colour = f"rgb{GT_COLOUR}" if rank == 1 else "#666"
            note = f' <span style="color:{colour};font-weight:normal">ground truth at rank {rank}</span>'
        blocks.append(f'<div class="method" data-method="{method}"><h3>{html.escape(METHOD_LABELS.get(method, method))}'
                      f'{note}</h3><div class="hits">{"".join(figures)}</div></div>')
    excluded = (f"<p>The reference itself ({html.escape(Path(result.excluded).name)}) is left out of the results, "
                f"as CIRR evaluation does.</p>" if result.excluded else "")
    return excluded + "".join(blocks)


def search_page(engine: RetrievalEngine, reference: Any, text: str | None, top_k: float = 5,
                exclude_reference: bool = True) -> tuple[str, str, str]:
    """The page's callback: (message Markdown, words HTML, results HTML) for one query.

    ``reference`` is an image file path or Gradio's raw ``FileData`` dict (``{"path", "orig_name", ...}``).
    A bad query gives its reason as the message and empty panels.
    """
    path, shown = reference_file(reference)
    root = engine.task.root.resolve() if engine.task.dataset == "folder" else None
    try:
        result = engine.search(path, text, int(top_k), bool(exclude_reference))
        results = render_results(result, root)
    except (QueryError, DataError) as error:  # DataError: a gallery file became unreadable after startup
        # Name the file as the person knows it, not by Gradio's temporary copy.
        message = str(error).replace(path, shown) if path else str(error)
        return f"**Cannot search:** {html.escape(message)}", "", ""
    shown_count = len(next(iter(result.rankings.values())))
    target = f"; ground truth **{html.escape(result.target)}**" if result.target else ""
    return (f"Top {shown_count} of {len(engine.task.gallery)} gallery images{target}.", render_words(result.words),
            results)


def build_page(engine: RetrievalEngine, top_k: int = 5, exclude_reference: bool = True,
               num_examples: int = 8) -> gr.Blocks:
    """The Gradio page over ``engine`` (launch it with ``page.launch(css=PAGE_CSS, ...)``)."""
    examples = engine.examples(num_examples)
    with gr.Blocks(title="Composed image retrieval (SSN)", analytics_enabled=False) as page:
        gr.Markdown("## Composed image retrieval: SSN\nPick an example or upload a reference image, type how "
                    "it should change, and search the gallery. " + html.escape(engine.description))
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                reference = gr.Image(label="reference image", type="filepath", sources=["upload", "clipboard"],
                                     elem_id="reference", height=220)
                text = gr.Textbox(label="modification", placeholder="make the circle blue", elem_id="modification")
                k = gr.Slider(1, MAX_TOP_K, value=min(top_k, MAX_TOP_K), step=1, label="top-k", elem_id="top_k")
                exclude = gr.Checkbox(value=exclude_reference, elem_id="exclude_reference",
                                      label="leave the reference image out of its results (as CIRR evaluation does)")
                search = gr.Button("Search", variant="primary", elem_id="search")
                if examples:
                    with_text = any(q.caption for q in examples)
                    gr.Examples([[str(engine.image_path(q.reference)), q.caption] if with_text
                                 else [str(engine.image_path(q.reference))] for q in examples],
                                [reference, text] if with_text else [reference], label="example queries",
                                examples_per_page=num_examples, elem_id="examples")
            with gr.Column(scale=3):
                message = gr.Markdown(elem_id="message")
                words = gr.HTML(elem_id="words")
                results = gr.HTML(elem_id="results")

        def run(reference_value: Any, text_value: str, k_value: float, exclude_value: bool) -> tuple[str, str, str]:
            return search_page(engine, reference_value, text_value, k_value, exclude_value)

        gr.on([search.click, text.submit], run, [reference, text, k, exclude], [message, words, results],
              preprocess=False, api_name="search")
    return page
