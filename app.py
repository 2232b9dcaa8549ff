"""An interactive retrieval page: pick or upload a reference image, type the modification, see the rankings.

    python app.py                                           # the demo's checkpoint and synthetic gallery
    python app.py --checkpoint RUN/checkpoints/best.pt      # that run's validation gallery
    python app.py --checkpoint RUN/checkpoints/best.pt --gallery_dir photos/

Serves a local Gradio page (http://127.0.0.1:7860 by default) showing the top-k gallery images with
their scores for SSN and the image-only / text-only / sum baselines side by side, and SSN's per-word
weights s_t coloured on the text.  Gallery features are cached on disk (feature_cache.py): the demo's
and a run's validation gallery share the entries validate.py wrote, a folder those of retrieve.py.
With no arguments it serves the checkpoint and data of ``python demo.py --output_dir demo_output``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import utils
from search_choices import FOLDER_CACHE_DIR

DEMO_CHECKPOINT = Path("demo_output") / "run" / "checkpoints" / "best.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help=f"a checkpoint written by train_cirr.py / train_fiq.py (default: the demo's, {DEMO_CHECKPOINT})")
    parser.add_argument("--gallery_dir", default=None,
                        help="folder of images to search (recursively); default: the checkpoint's validation gallery")
    parser.add_argument("--data_root", default=None, help="dataset folder, if not where the checkpoint was trained")
    parser.add_argument("--task", default=None, help="FashionIQ category to serve (default: the first trained on)")
    parser.add_argument("--cache_dir", default=None,
                        help=f"feature cache of a --gallery_dir (default {FOLDER_CACHE_DIR}, shared with retrieve.py)")
    parser.add_argument("--top_k", type=int, default=5, help="results per method shown first (the page can change it)")
    parser.add_argument("--keep_reference", action="store_true",
                        help="keep the reference image in its own results by default (CIRR evaluation leaves it out)")
    parser.add_argument("--num_examples", type=int, default=8, help="example queries offered on the page")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--precision", choices=("amp", "amp_bf16", "fp32"), default="fp32",
                        help="precision of the encoders (amp falls back to fp32 on CPU)")
    parser.add_argument("--batch_size", type=int, default=64, help="gallery encoding batch size")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise utils.UsageError(f"--top_k must be >= 1, got {args.top_k}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEMO_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        raise utils.UserError(f"{checkpoint} not found: create the demo's checkpoint and gallery with "
                              f"`python demo.py --output_dir demo_output` (about a minute on CPU), or pass --checkpoint")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page: no calls home
    # Imported after parsing: --help and argument errors need neither torch nor Gradio.
    from webapp.engine import RetrievalEngine
    from webapp.page import PAGE_CSS, build_page

    utils.setup_logging(None)
    engine = RetrievalEngine.open(checkpoint, args.gallery_dir, args.data_root, args.task, args.cache_dir,
                                  device=args.device, precision=args.precision, batch_size=args.batch_size)
    page = build_page(engine, args.top_k, not args.keep_reference, args.num_examples)
    page.launch(server_name=args.host, server_port=args.port, css=PAGE_CSS, show_error=True)


if __name__ == "__main__":
    utils.run_cli(main)
