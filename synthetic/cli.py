"""Command line of the generators: ``python -m synthetic {cirr,fashioniq,circo,all} --output DIR [--seed N]``.

One sub-command per dataset; its size options are the keyword arguments of its ``make_synthetic_*``
function, defaults included (read from the signature, so the two cannot drift apart). ``all`` writes every
dataset at its default sizes.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

from synthetic.circo import make_synthetic_circo
from synthetic.cirr import make_synthetic_cirr
from synthetic.fashioniq import make_synthetic_fashioniq

__all__ = ["DESCRIPTION", "MAKERS", "build_parser", "main"]

DESCRIPTION = "Write small synthetic CIR datasets in the exact CIRR / FashionIQ / CIRCO file layouts."

MAKERS: dict[str, Callable[..., Path]] = {
    "cirr": make_synthetic_cirr,
    "fashioniq": make_synthetic_fashioniq,
    "circo": make_synthetic_circo,
}

_DATASET_HELP = {
    "cirr": "CIRR (cirr_dataset/): sets of six similar shape scenes, edit instructions as captions",
    "fashioniq": "FashionIQ (fashion-iq/): garments of three categories, two captions per triplet",
    "circo": "CIRCO (CIRCO/): one shared gallery of shape scenes, several ground truths per query",
}
# What each size argument of a maker counts; a maker argument missing here fails when the parser is built.
_SIZE_HELP: dict[str, dict[str, str]] = {
    "cirr": {
        "num_train": "train triplets",
        "num_val": "val triplets (queries)",
        "num_test": "test1 triplets (queries)",
        "image_size": "image side in pixels",
    },
    "fashioniq": {
        "num_train_per_category": "train triplets per category (dress, shirt, toptee)",
        "num_val_per_category": "val triplets per category",
        "num_test_per_category": "test triplets per category",
        "image_size": "image side in pixels",
    },
    "circo": {
        "num_val": "val queries",
        "num_test": "test queries",
        "gallery_size": "gallery images at least (references, ground truths, hard negatives, random scenes)",
        "image_size": "image side in pixels",
    },
}
_COMMON = ("root", "seed")  # given by --output and --seed


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help; the size summary in the epilog keeps its lines."""


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, with a one-line error otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _size_options(dataset: str) -> list[tuple[str, int]]:
    """(argument name, default) of every size argument of the dataset's maker, in signature order."""
    parameters = inspect.signature(MAKERS[dataset]).parameters.values()
    return [(p.name, p.default) for p in parameters if p.name not in _COMMON]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR",
                        help="folder to write into; the dataset folder (cirr_dataset, fashion-iq, CIRCO) is created in it")
    parser.add_argument("--seed", type=_at_least(0), default=0, help="random seed; the same seed writes byte-identical files")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m synthetic`` parser: one sub-command per dataset, plus ``all``."""
    summary = "\n".join(f"  {dataset:<10} " + " ".join(f"--{name} {default}" for name, default in _size_options(dataset))
                        for dataset in MAKERS)
    parser = argparse.ArgumentParser(
        prog="python -m synthetic", description=DESCRIPTION, formatter_class=_Formatter,
        epilog=f"size options and their defaults:\n{summary}\n\n"
               "python -m synthetic DATASET --help describes a dataset's options.",
    )
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join([*MAKERS, "all"]) + "}")
    for dataset in MAKERS:
        command = commands.add_parser(dataset, help=_DATASET_HELP[dataset], description=_DATASET_HELP[dataset],
                                      formatter_class=_Formatter)
        _add_common(command)
        for name, default in _size_options(dataset):
            command.add_argument(f"--{name}", type=_at_least(1 if name == "image_size" else 0), default=default,
                                 help=_SIZE_HELP[dataset][name])
    every = commands.add_parser("all", help="every dataset at its default sizes", formatter_class=_Formatter,
                                description="Write every dataset at its default sizes.")
    _add_common(every)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the chosen dataset(s) and print where each went."""
    args = build_parser().parse_args(argv)
    chosen = list(MAKERS) if args.dataset == "all" else [args.dataset]
    for dataset in chosen:
        sizes = {name: getattr(args, name) for name, _ in _size_options(dataset)} if args.dataset != "all" else {}
        print(f"{dataset}: {MAKERS[dataset](args.output, seed=args.seed, **sizes)}")
    return 0
