"""Training curves of a run, on demand: loss and every validation recall per epoch, best epoch marked.

    python plot_curves.py runs/cirr_x [--output curves.png]

Reads ``<run>/metrics.jsonl`` (also while training is still running) and writes ``<run>/curves.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import utils


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="a run folder holding metrics.jsonl, or the metrics.jsonl file itself")
    parser.add_argument("--output", default=None, help="PNG to write; None: curves.png beside metrics.jsonl")
    parser.add_argument("--width", type=float, default=12.0, help="figure width in inches (100 dpi)")
    parser.add_argument("--height", type=float, default=4.5, help="figure height in inches (100 dpi)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    from viz.curves import plot_training_curves  # after parsing: --help needs no matplotlib / torch

    run = Path(args.run)
    metrics_log = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    output = Path(args.output) if args.output else metrics_log.with_name("curves.png")
    path = plot_training_curves(metrics_log, output, figsize=(args.width, args.height))
    print(path)
    return path


if __name__ == "__main__":
    utils.run_cli(main)
