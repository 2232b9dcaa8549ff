"""The options of a CVSI run (``zero_shot_cvsi.py``, :mod:`cvsi.demo`): :func:`build_parser` gives the
``argparse.Namespace`` that :func:`cvsi.pipeline.run` takes as its configuration.

Options whose default depends on ``--preset`` (paper / release) default to None here and are filled
by :func:`cvsi.presets.apply_preset`; the fusion weights default to the dataset's
:data:`cvsi.fusion.DATASET_PRESETS` entry.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from cvsi.fusion import COMPONENTS, DATASET_PRESETS, GROUPS, SCORINGS
from cvsi.presets import PRESETS
from dataset_registry import DATASETS
from search_choices import ENGINE_HELP, ENGINES

__all__ = ["DESCRIPTION", "build_parser", "parse_config"]

DESCRIPTION = "CVSI zero-shot composed image retrieval (Ye et al.) on CIRR, FashionIQ or CIRCO."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(DATASETS), required=True,
                      help="a dataset of the registry (dataset_registry.py); the fusion weights default to the paper's for "
                           f"{', '.join(sorted(DATASET_PRESETS))}")
    data.add_argument("--split", choices=("val", "test"), default="val",
                      help="val: print the metric table; test: write the benchmark's submission files")
    data.add_argument("--data_root", required=True, help="the dataset folder or its parent")
    data.add_argument("--transform", choices=("clip", "targetpad"), default="targetpad",
                      help="image preprocessing (the CVSI release uses targetpad)")
    data.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                      help="defaults for the options where the paper and the released code differ (captioning, "
                           "LLM step, failures, scoring; see docs/cvsi.md); options given explicitly win")

    model = parser.add_argument_group("CLIP and Φ")
    model.add_argument("--clip_model_name", default="ViT-B-32", help="any open_clip ViT model name")
    model.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or local file; 'none' for random weights")
    model.add_argument("--phi_checkpoint", default=None, help="LinCIR mapping network Φ checkpoint for the same CLIP")

    fusion = parser.add_argument_group("fusion (defaults: the paper's per-dataset presets)")
    fusion.add_argument("--alpha", type=float, default=None, help="weight of q_m (CIRR/CIRCO 0.6, FashionIQ 0.2)")
    fusion.add_argument("--beta", type=float, default=None, help="weight of q_f (CIRR/CIRCO 0.4, FashionIQ 0.6)")
    fusion.add_argument("--gamma", type=float, default=None, help="weight of t_c (CIRR/CIRCO 0.2, FashionIQ 0.1)")
    fusion.add_argument("--drop", nargs="+", choices=(*COMPONENTS, *GROUPS), default=[],
                        help="components to leave out (weight 0); 'visual' = q_f q_v t_v, 'semantic' = q_m t_c")
    fusion.add_argument("--ablations", action="store_true",
                        help="also score every row of the paper's ablation table (val only; features are shared)")
    fusion.add_argument("--scoring", choices=SCORINGS, default=None,
                        help="'paper': cosine similarity of q and t (Eq. 10); 'release': dot product with the fused "
                             "t unnormalised, t_c re-normalised on FashionIQ (preset paper / release)")

    captions = parser.add_argument_group("captions")
    captions.add_argument("--captions_file", nargs="+", default=[],
                          help="precomputed captions: the CVSI release's pickles or the same dicts as JSON, gallery "
                               "and reference roles kept apart (docs/cvsi.md); images not listed are captioned")
    captions.add_argument("--captioner", default=None, help="BLIP-2 checkpoint name or local path, e.g. Salesforce/blip2-opt-6.7b-coco")
    captions.add_argument("--num_captions", type=int, default=None, help="N captions per image (captioner default 15; caps imported lists)")
    captions.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold (both presets 0.9)")
    captions.add_argument("--caption_beams", type=int, default=None,
                          help="beams to sample within; 1 = plain nucleus sampling (preset paper 1, release 15)")
    captions.add_argument("--caption_max_tokens", type=int, default=30, help="longest caption, in tokens")
    captions.add_argument("--caption_prompt", default=None,
                          help="text the captioner continues (preset paper '', release 'a photo of')")
    captions.add_argument("--caption_batch_size", type=int, default=8, help="images per captioner batch")
    captions.add_argument("--captioner_fp16", action="store_true", help="run the captioner in fp16 (GPU)")

    llm = parser.add_argument_group("LLM (OpenAI-compatible chat completions)")
    llm.add_argument("--llm_answers_file", nargs="+", default=[], help="precomputed answers (CVSI release layout) instead of an LLM")
    llm.add_argument("--llm_base_url", default=None, help="e.g. https://api.openai.com/v1 (env CVSI_LLM_BASE_URL or OPENAI_BASE_URL)")
    llm.add_argument("--llm_model", default=None, help="e.g. gpt-3.5-turbo (env CVSI_LLM_MODEL)")
    llm.add_argument("--llm_api_key", default=None, help="default: env OPENAI_API_KEY")
    llm.add_argument("--llm_concurrency", type=int, default=8, help="requests in flight at once")
    llm.add_argument("--llm_timeout", type=float, default=60.0, help="seconds per request (the openai client's timeout)")
    llm.add_argument("--llm_retries", type=int, default=6,
                     help="the openai client's max_retries (time-outs, connection errors, 408/409/429/5xx), and the "
                          "re-asks after a malformed answer")
    llm.add_argument("--llm_backoff", type=float, default=1.0,
                     help="first delay in seconds before re-asking after a malformed answer, doubled per retry "
                          "(transport retries use the openai client's back-off)")
    llm.add_argument("--llm_max_tokens", type=int, default=None, help="answer length limit (preset paper 256, release 700)")
    llm.add_argument("--llm_stop", nargs="*", default=None,
                     help="stop sequences (preset paper none, release a blank line and <|endoftext|>)")
    llm.add_argument("--llm_answer", choices=("parsed", "raw"), default=None,
                     help="'parsed': the line after the answer marker, cleaned; 'raw': the whole answer stripped "
                          "(preset paper parsed, release raw)")
    llm.add_argument("--caption_context", choices=("each", "joined"), default=None,
                     help="'each': one modified caption per reference caption, objects from C_1 (preset paper); "
                          "'joined': one prompt on all captions joined (preset release)")
    llm.add_argument("--modify_prompt_file", nargs="+", default=[], metavar="[DATASET=]PATH[:NAME]",
                     help="p_m template: a text file, or a Python file of string constants (e.g. the release's "
                          "utils/prompt_templates.py; NAME defaults to the release's choice for the dataset); "
                          "DATASET= limits an entry to one dataset. Default: this project's wording")
    llm.add_argument("--objects_prompt_file", nargs="+", default=[], metavar="[DATASET=]PATH[:NAME]",
                     help="p_a template, as --modify_prompt_file")
    llm.add_argument("--on_llm_failure", choices=("strict", "leave_out", "release_fallback"), default=None,
                     help="answers still failing after the retries: 'strict' stops after listing them (preset paper); "
                          "'leave_out' scores without the failed parts; 'release_fallback' uses the reference "
                          "captions for failed modified captions and no objects (preset release)")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--cache_dir", default="cvsi_cache",
                           help="captions, LLM answers and features kept across runs (keyed by their inputs)")
    run_group.add_argument("--output_dir", default="cvsi_output", help="metrics JSON and submission files")
    run_group.add_argument("--submission_name", default="cvsi", help="the test files are named after it")
    run_group.add_argument("--save_predictions", action="store_true",
                           help="on val, also write the CVSI row's rankings to OUTPUT_DIR/val_predictions/ as the "
                                "test split's files (CIRCO {query id: [50 image ids]}, CIRR's two server files, "
                                "FashionIQ {query id: [50 names]}), for the benchmarks' own evaluation code")
    run_group.add_argument("--batch_size", type=int, default=64, help="images / texts per CLIP batch")
    run_group.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    run_group.add_argument("--device", default=None, help="cuda, cuda:1, cpu; None: cuda if available")
    run_group.add_argument("--seed", type=int, default=0, help="seeds the run (the captioner's sampling too)")
    run_group.add_argument("--retrieval_engine", choices=ENGINES, default="auto", help=ENGINE_HELP)
    return parser


def parse_config(argv: Sequence[str]) -> argparse.Namespace:
    """The configuration of a run from command-line arguments (presets are applied by the run)."""
    return build_parser().parse_args(list(argv))
