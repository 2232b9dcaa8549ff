"""Speed and memory benchmark of SSN training and retrieval.

Examples::

    python benchmark.py                                                  # tiny config, batch 64, CPU
    python benchmark.py --clip_model_name ViT-B-32 --batch_size 32 --steps 5
    python benchmark.py --skip_step --skip_head --retrieval_gallery 200000 1000000 [--ann hnsw]

The anchors: the official step is the official architecture as the official code builds it (Hugging Face
CLIP towers of the same size with random weights, two vision passes, the official head, loss and Adam
groups; benchmarks/step.py); the official step on our backbone re-states the same head, loss and two passes
on the project's open_clip towers; the backbone-only step is the floor (a zero-cost head).  The SSN model
holds the official model's weights, converted, and its loss is checked equal before timing.  Retrieval is
timed next to faiss's exact ``IndexFlatIP`` search on the same features.

Every time is a median over interleaved repetitions (the candidates alternate), so machine noise falls on
all alike.  Speed targets are printed next to the figures; nothing here
asserts them.  On CPU, glibc's allocator settings change step times by ~10 % (docs/performance.md):
the machine line reports them.
"""
from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING

import utils
from search_choices import ANN_KINDS

if TYPE_CHECKING:
    import torch

    from benchmarks.retrieval import RetrievalResult
# torch and the benchmarks (the model, open_clip) are imported in main, after parsing: --help answers at once.

HEAD_RATIO_TARGET = 0.4
HEAD_OVERHEAD_TARGET = 0.05
OFFICIAL_STEP_RATIO_TARGET = 0.92
RETRIEVAL_RATIO_TARGET = 1.0
MALLOC_SETTINGS = (*utils.MALLOC_ENV_SETTINGS, "LD_PRELOAD")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clip_model_name", default="ViT-Tiny-P8-32", help="open_clip model name")
    parser.add_argument("--batch_size", type=int, default=64, help="triplets per training step")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per measurement (after one warm-up)")
    parser.add_argument("--grad_checkpointing", action="store_true",
                        help="recompute the backbone's blocks in the backward pass (compare the peak memory of two runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; None: torch's choice")
    parser.add_argument("--rank_gallery_size", type=int, default=2265, help="gallery size for queries ranked/s (CIRR val: 2265)")
    parser.add_argument("--skip_step", action="store_true", help="skip the training-step / inference benchmark")
    parser.add_argument("--skip_head", action="store_true", help="skip the head-only comparison with the official head")
    parser.add_argument("--head_batch_size", type=int, default=32, help="batch of the head-only comparison")
    parser.add_argument("--head_steps", type=int, default=None, help="repetitions of the head comparison; None: 2·steps")
    parser.add_argument("--retrieval_gallery", type=int, nargs="*", default=[],
                        help="gallery sizes of the large-scale retrieval runs (e.g. 200000 1000000); none = skip")
    parser.add_argument("--retrieval_queries", type=int, default=1000, help="queries of the large-scale retrieval runs")
    parser.add_argument("--retrieval_dim", type=int, default=512, help="feature dimension of the retrieval runs")
    parser.add_argument("--retrieval_k", type=int, default=50, help="results per query of the retrieval runs")
    parser.add_argument("--retrieval_dtype", choices=("float32", "float16"), default="float32", help="gallery storage")
    parser.add_argument("--retrieval_chunk_size", type=int, default=4096, help="queries per block of the retrieval runs")
    parser.add_argument("--retrieval_features", choices=("random", "clustered"), default="random",
                        help="random unit vectors (worst case for --ann) or clustered ones (neighbourhoods, as real "
                             "features have; benchmarks/retrieval.py)")
    parser.add_argument("--retrieval_repeats", type=int, default=3, help="interleaved repetitions of each retrieval timing")
    parser.add_argument("--ann", choices=ANN_KINDS, default=None,
                        help="also build an approximate index (saved and read back) and report its recall@k vs exact")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, batches and features")
    parser.add_argument("--glibc_malloc_defaults", action="store_true",
                        help="do not tune the allocator as training does (utils.tune_cpu_allocator)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Flag values no benchmark can run with, as one-line errors (:class:`utils.UsageError`) before anything
    is built: every count and size at least 1."""
    counts = {"--batch_size": args.batch_size, "--steps": args.steps, "--rank_gallery_size": args.rank_gallery_size,
              "--head_batch_size": args.head_batch_size, "--head_steps": args.head_steps, "--threads": args.threads,
              "--retrieval_queries": args.retrieval_queries, "--retrieval_dim": args.retrieval_dim,
              "--retrieval_k": args.retrieval_k, "--retrieval_chunk_size": args.retrieval_chunk_size,
              "--retrieval_repeats": args.retrieval_repeats}
    for flag, value in counts.items():
        if value is not None and value < 1:  # None: the option's automatic choice
            raise utils.UsageError(f"{flag} must be >= 1, got {value}")
    for size in args.retrieval_gallery:
        if size < 1:
            raise utils.UsageError(f"--retrieval_gallery sizes must be >= 1, got {size}")


def _device(name: str) -> torch.device:
    """``--device`` as a torch device; an unknown name or a missing CUDA device is a user error."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise utils.UsageError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise utils.UsageError(f"--device {name}: no CUDA device available (torch {torch.__version__})")
    return device


def _machine(device: torch.device, allocator_tuned: bool) -> str:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    malloc = " ".join(f"{key}={os.environ[key]}" for key in MALLOC_SETTINGS if key in os.environ)
    malloc = malloc or ("malloc tuned by mallopt (as training)" if allocator_tuned else "glibc malloc defaults")
    return (f"{device.type} ({name}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {malloc}")


def _print_retrieval(r: RetrievalResult) -> None:
    from benchmarks.common import format_bytes

    print(f"\n== exact retrieval: {r.num_queries} queries x {r.gallery_size} gallery ({r.features} features, D={r.dim}, "
          f"{r.dtype} storage), "
          f"top-{r.k}, median of {r.repeats} interleaved")
    rate = r.num_queries / r.project_s
    print(f"{'project (' + r.engine + ' engine)':<34} {r.project_s:8.3f} s  {rate:8.1f} queries/s")
    print(f"project, torch engine              {r.torch_s:8.3f} s  {r.num_queries / r.torch_s:8.1f} queries/s")
    if r.faiss_s is not None:
        print(f"faiss IndexFlatIP.search alone     {r.faiss_s:8.3f} s  {r.num_queries / r.faiss_s:8.1f} queries/s")
        print(f"project / faiss exact              {r.faiss_ratio:8.3f} x   (target <= {RETRIEVAL_RATIO_TARGET}x, equal results)")
    same = "identical" if r.equal_to_torch else "DIFFERENT"
    print(f"results: {same} to the torch engine's (indices and scores)"
          + ("" if r.same_sets_as_faiss is None else
             f"; top-{r.k} set equal to faiss's for {r.same_sets_as_faiss}/{r.num_queries} queries, "
             f"same order for {r.same_order_as_faiss}/{r.num_queries} (faiss orders near-ties its own way)"))
    print(f"RSS with gallery {format_bytes(r.rss_before_bytes)}   peak RSS {format_bytes(r.peak_rss_bytes)}")
    if r.ann is not None:
        a = r.ann
        print(f"approximate {a.kind}: build + save {a.build_s:.1f} s ({format_bytes(a.file_bytes)}), second run loads it "
              f"in {a.load_s:.2f} s, search {a.search_s:.3f} s, recall@{r.k} vs exact {100 * a.recall:.2f} %")


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the selected benchmarks, print a report and return the raw results."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    import torch

    from benchmarks.common import format_bytes
    from benchmarks.head import VIT_B32_SHAPES, run_head_benchmark
    from benchmarks.retrieval import run_retrieval_benchmark
    from benchmarks.step import run_step_benchmark

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {}
    allocator_tuned = device.type == "cpu" and not args.glibc_malloc_defaults and utils.tune_cpu_allocator()
    print(f"machine: {_machine(device, allocator_tuned)}")

    if not args.skip_step:
        step = run_step_benchmark(args.clip_model_name, args.batch_size, args.steps, device, args.rank_gallery_size,
                                  args.seed, args.grad_checkpointing)
        results["step"] = step
        memory = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
        print(f"\n== training step: {args.clip_model_name} (random weights), batch {args.batch_size}, "
              f"median of {args.steps} interleaved steps" + (", gradient checkpointing" if args.grad_checkpointing else ""))
        per = args.batch_size
        for label, seconds in (("SSN step", step.ssn_step_s),
                               ("official step (HF towers)", step.official_step_s),
                               ("official on our backbone", step.official_ours_step_s),
                               ("backbone-only step", step.backbone_step_s)):
            print(f"{label:<26}{seconds:8.3f} s   {per / seconds:8.2f} triplets/s")
        print(f"SSN / official step       {step.official_ratio:8.3f} x   (target <= {OFFICIAL_STEP_RATIO_TARGET}x; "
              f"floor backbone-only / official {step.floor_ratio:.3f}x)")
        print(f"SSN / official on ours    {step.official_ours_ratio:8.3f} x")
        print(f"SSN head overhead         {100 * step.head_overhead:+7.1f} %   (over backbone-only; target <= "
              f"{100 * HEAD_OVERHEAD_TARGET:.0f} %)")
        print(f"same weights, loss equal to the official model's (|diff| {step.official_loss_diff:.1e}); "
              f"Hugging Face attention: {step.attention}")
        print(f"{memory}: after SSN warm-up {format_bytes(step.ssn_peak_bytes)}, whole run {format_bytes(step.peak_bytes)}")
        print(f"gallery encoded     SSN {per / step.ssn_gallery_s:8.1f} img/s   backbone {per / step.backbone_gallery_s:8.1f} img/s")
        print(f"queries ranked      SSN {per / step.ssn_query_s:8.1f} q/s     backbone {per / step.backbone_query_s:8.1f} q/s"
              f"   (encode + top-50 of {step.rank_gallery_size})")

    if not args.skip_head:
        repeats = args.head_steps or 2 * args.steps
        head = run_head_benchmark(batch=args.head_batch_size, repeats=repeats, seed=args.seed)
        results["head"] = head
        print(f"\n== SSN head vs official head: forward + backward, batch {args.head_batch_size}, ViT-B/32 shapes "
              f"{VIT_B32_SHAPES}, median of {repeats}")
        print(f"outputs and gradients equal (max |diff| {head.max_abs_diff:.2e})")
        print(f"ours {head.ours_s:.3f} s   official {head.official_s:.3f} s   ratio {head.ratio:.2f}x   "
              f"(target <= {HEAD_RATIO_TARGET}x)")

    for size in args.retrieval_gallery:
        retrieval = run_retrieval_benchmark(
            size, args.retrieval_queries, args.retrieval_dim, args.retrieval_k, getattr(torch, args.retrieval_dtype),
            args.retrieval_chunk_size, args.retrieval_repeats, args.ann, args.seed, args.retrieval_features,
        )
        results.setdefault("retrieval", []).append(retrieval)
        _print_retrieval(retrieval)
    return results


if __name__ == "__main__":
    utils.run_cli(main)
