"""One composed query from the shell: a reference image and a modification text against a folder of images.

    python retrieve.py --checkpoint runs/cirr_x/checkpoints/best.pt --reference ref.png \\
        --text "make the circle blue" --gallery_dir photos/ --top_k 10 [--grid out.png]

Prints the top-k gallery paths with their cosine scores; the reference image itself is left out when it is
in the folder, as CIRR evaluation does (--keep_reference keeps it). The gallery features are cached on disk
(feature_cache.py), keyed by the checkpoint's content and the gallery's files (paths, sizes, mtimes), so
the next query against the same folder only encodes the query.  Search is exact (retrieval.py; faiss when
installed, else torch, same results); for galleries past memory, ``--ann hnsw|ivfpq`` searches an
approximate faiss index (ann.py) saved beside the feature cache entry, so later queries load it instead of
the gallery features.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import utils
from precision import EVAL_PRECISION_HELP, PRECISIONS
from search_choices import ANN_KINDS, ENGINES, FOLDER_CACHE_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train_cirr.py / train_fiq.py")
    parser.add_argument("--reference", required=True, help="the reference image")
    parser.add_argument("--text", required=True, help="the modification text")
    parser.add_argument("--gallery_dir", required=True, help="folder of candidate images (searched recursively)")
    parser.add_argument("--top_k", type=int, default=10, help="results to print")
    parser.add_argument("--keep_reference", action="store_true",
                        help="keep the reference image among the results when it is in the folder (by default it is "
                             "left out, as in CIRR evaluation)")
    parser.add_argument("--grid", default=None, help="also draw the query and its top-k into this PNG")
    parser.add_argument("--cache_dir", default=str(FOLDER_CACHE_DIR),
                        help="gallery feature cache (shared with app.py)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoding batch")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu; None: cuda if available")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=EVAL_PRECISION_HELP)
    parser.add_argument("--retrieval_engine", choices=ENGINES, default="auto",
                        help="exact search: faiss, torch, or auto (faiss when installed); the results are the same")
    parser.add_argument("--ann", choices=ANN_KINDS, default=None,
                        help="approximate search with a faiss index saved beside the feature cache; None: exact search")
    return parser


def main(argv: Sequence[str] | None = None) -> list[tuple[Path, float]]:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise utils.UsageError(f"--top_k must be >= 1, got {args.top_k}")
    logger = utils.setup_logging(None)
    # Imported after parsing: --help needs neither torch nor open_clip.
    import torch

    from ann import ANNConfig, ann_search, index_file_name, load_or_build_index
    from data_utils import load_image
    from dataset_registry import Query, folder_task
    from distributed import init_distributed
    from evaluation import ModelRetrieval
    from feature_cache import FolderGalleryCache
    from inference import load_trained_model, preprocessing_settings
    from precision import effective_precision
    from retrieval import topk_retrieval
    from viz.examples import QueryExample, word_selection
    from viz.grid import draw_retrieval_grid

    device = init_distributed(args.device).device
    precision = effective_precision(args.precision, device)
    reference = load_image(args.reference)  # fail on a bad reference before encoding a gallery
    task = folder_task(args.gallery_dir, [Query("0", args.reference, args.text)])  # image names are the files' paths
    files = [Path(name) for name in task.gallery]
    trained = load_trained_model(args.checkpoint, device)
    method = ModelRetrieval(trained.model, "ssn", trained.transform, device, precision, args.batch_size, args.num_workers)
    settings = preprocessing_settings(trained, precision)
    cache = FolderGalleryCache(args.checkpoint, args.gallery_dir, args.cache_dir, settings)

    def gallery_feats() -> torch.Tensor:
        return cache(task, method.name, lambda: method.encode_gallery(task))

    query = method.encode_queries(task)
    # As in CIRR, the reference itself is no answer when it lies in the gallery folder (unless asked to keep it).
    resolved = [f.resolve() for f in files]
    reference_path = Path(args.reference).resolve()
    left_out = reference_path in resolved and not args.keep_reference
    exclude = torch.tensor([resolved.index(reference_path)]) if left_out else None  # None: all G can be returned
    if args.ann:
        # The index file shares the feature cache entry's key (gallery_<key>.pt), so it follows the same inputs.
        config, size, dim = ANNConfig(kind=args.ann), len(files), query.shape[1]
        stem = f"gallery_{cache.key(task, method.name)}"
        index_path = Path(args.cache_dir) / index_file_name(stem, config, size, dim)
        index, _ = load_or_build_index(index_path, config, size, dim, gallery_feats)
        scores, indices = ann_search(index, query, args.top_k, config, exclude)
    else:
        scores, indices = topk_retrieval(query, gallery_feats(), args.top_k, exclude, engine=args.retrieval_engine)
    results = [(files[i], s) for i, s in zip(indices[0].tolist(), scores[0].tolist()) if i >= 0]
    for rank, (path, score) in enumerate(results, start=1):
        print(f"{rank:>3}  {score:.4f}  {path}")

    if args.grid:
        words = word_selection(trained.model, trained.transform(reference)[None], [args.text])[0]
        example = QueryExample(Path(args.reference), args.text, [p for p, _ in results], [s for _, s in results],
                               words=words)
        grid, _ = draw_retrieval_grid([example], args.grid, title=f"query: {args.text}")
        logger.info("grid written to %s", grid)
    return results


if __name__ == "__main__":
    utils.run_cli(main)
