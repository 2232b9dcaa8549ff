"""The CVSI method end to end on any dataset of the registry (:mod:`dataset_registry`).

:func:`run` takes a configuration (:func:`cvsi.params.build_parser`'s options) and: reads the split's
retrieval tasks (``spec.tasks``), gets captions and LLM answers (:mod:`cvsi.semantics`), encodes
everything with the frozen CLIP (:mod:`cvsi.features`), and for each weighting (the configured CVSI and,
with ``--ablations``, the paper's ablation rows) either scores the val split with the project's one
:func:`evaluation.evaluate` (``spec.task_metrics``, ``spec.summarize``) or writes the test files
(``spec.write_test_outputs``). Every expensive step goes through a :mod:`cvsi.cache` cache, so an
interrupted run resumes and a repeated run recomputes nothing.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import utils
from cvsi.cache import TensorCache, module_fingerprint
from cvsi.features import caption_set_features, fine_grained_features, image_embeddings, image_key
from cvsi.fusion import ABLATIONS, DATASET_PRESETS, Components, FusedRetrieval, FusionWeights
from cvsi.phi import load_phi
from cvsi.presets import apply_preset
from cvsi.pseudo_tokens import fine_grained_prompt
from cvsi.semantics import gather_answers, gather_captions
from data_utils import TRANSFORM_REVISION, build_transform
from dataset_registry import DatasetSpec, RetrievalTask, get_dataset, resolve_dataset_root
from evaluation import evaluate
from feature_cache import checkpoint_identity
from metrics import metrics_table, metrics_table_with_legend
from model import create_backbone, parse_pretrained

__all__ = ["FULL_ROW", "PREDICTIONS_DIR", "fusion_rows", "run", "results_text"]

_logger = logging.getLogger("cir.cvsi")
FULL_ROW = "CVSI"
PREDICTIONS_DIR = "val_predictions"  # --save_predictions: val rankings in the test files' formats


def fusion_rows(args: argparse.Namespace) -> dict[str, FusionWeights]:
    """The weightings to score: the configured CVSI, plus the paper's ablations with ``--ablations``.

    α, β, γ default to the dataset's :data:`cvsi.fusion.DATASET_PRESETS` entry; a dataset without one needs all three.
    """
    preset = DATASET_PRESETS.get(args.dataset)
    given = (args.alpha, args.beta, args.gamma)
    if preset is None and None in given:
        raise ValueError(f"CVSI has no fusion weights for dataset {args.dataset!r} (the paper gives them for "
                         f"{', '.join(sorted(DATASET_PRESETS))}): pass --alpha, --beta and --gamma")
    defaults = (0.0, 0.0, 0.0) if preset is None else (preset.weights.alpha, preset.weights.beta, preset.weights.gamma)
    weights = FusionWeights(*(d if g is None else g for d, g in zip(defaults, given))).without(args.drop or ())
    rows = {FULL_ROW: weights}
    if args.ablations:
        rows.update({name: weights.without(dropped) for name, dropped in ABLATIONS.items()})
    for row, row_weights in rows.items():
        try:
            row_weights.check_usable()
        except ValueError as exc:
            raise ValueError(f"{row}: {exc}") from exc
    return rows


def _components(
    args: argparse.Namespace, tasks: list[RetrievalTask], needed: set[str], device: torch.device,
) -> dict[str, Components]:
    """Task name -> the CVSI components with a non-zero weight in some row (the others stay None)."""
    pretrained = parse_pretrained(args.pretrained)
    backbone = create_backbone(args.clip_model_name, pretrained)
    backbone = backbone.to(device).eval().requires_grad_(False)
    backbone_id = {"clip": args.clip_model_name, "pretrained": pretrained, "weights": module_fingerprint(backbone)}
    transform = build_transform(args.transform, backbone.image_size)
    # Keyed by the preprocessing and its code revision: cached image features follow a transform fix.
    image_cache = TensorCache(args.cache_dir, "image_features",
                              {**backbone_id, "transform": args.transform, "transform_revision": TRANSFORM_REVISION})
    text_cache = TensorCache(args.cache_dir, "caption_features", backbone_id)

    phi, phi_cache = None, None
    if "q_f" in needed:
        if not args.phi_checkpoint:
            raise ValueError("the fine-grained feature q_f needs a LinCIR Φ checkpoint: pass --phi_checkpoint "
                             "(or --drop q_f)")
        phi = load_phi(args.phi_checkpoint, backbone.embed_dim, backbone.text_width, device).to(device)
        # q_f depends on the reference image features (so on everything image_cache is keyed by) and on Φ.
        phi_cache = TensorCache(args.cache_dir, "fine_grained_features",
                                {**image_cache.identity, "phi": checkpoint_identity(args.phi_checkpoint)})

    want_modified, want_objects = "q_m" in needed, "q_f" in needed
    want_references = want_modified or want_objects
    gallery_captions, reference_captions = gather_captions(args, tasks, "t_c" in needed, want_references, device) \
        if "t_c" in needed or want_references else ({}, {})
    answers = gather_answers(args, tasks, reference_captions, want_modified, want_objects) if want_references else {}

    components: dict[str, Components] = {}
    for task in tasks:
        gallery_keys = [image_key(task, n) for n in task.gallery]
        reference_keys = [image_key(task, q.reference) for q in task.queries]
        parts = components[task.name] = Components()
        if needed & {"t_v", "q_v", "q_f"}:
            paths = {image_key(task, n): task.image_path(n) for n in {*task.gallery, *(q.reference for q in task.queries)}}
            keys = list(dict.fromkeys(gallery_keys + reference_keys))
            embeds = dict(zip(keys, image_embeddings(backbone, keys, paths, transform, image_cache, args.batch_size,
                                                     args.num_workers, device)))
            reference_embeds = torch.stack([embeds[k] for k in reference_keys])
            parts.t_v = F.normalize(torch.stack([embeds[k] for k in gallery_keys]), dim=-1)
            parts.q_v = F.normalize(reference_embeds, dim=-1)
        if "t_c" in needed:
            parts.t_c = caption_set_features(backbone, [gallery_captions[k] for k in gallery_keys], text_cache,
                                             args.batch_size, device)
        if want_modified:
            parts.q_m = caption_set_features(backbone, [answers[q.query_id].modified_captions for q in task.queries],
                                             text_cache, args.batch_size, device)
        if want_objects:
            prompts = [fine_grained_prompt(q.caption, answers[q.query_id].added_objects) for q in task.queries]
            parts.q_f = fine_grained_features(backbone, phi, prompts, reference_embeds, reference_keys, phi_cache,
                                              args.batch_size, device)
    return components


def _write(spec: DatasetSpec, method: FusedRetrieval, tasks: list[RetrievalTask], output_dir: Path,
           name: str) -> list[Path]:
    """The dataset's test files (submissions, rankings) for ``method``'s rankings of ``tasks``."""
    files: list[Path] = []
    for task in tasks:
        files += spec.write_test_outputs(task, method.encode_queries(task), method.encode_gallery(task), output_dir, name)
    return files


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run CVSI as configured (:func:`cvsi.params.build_parser`'s options; presets are applied here).

    Returns:
        {"metrics": {row: the dataset's figures}, "files": [paths]} on val (the files are the CVSI row's
        rankings under ``output_dir/val_predictions`` with ``--save_predictions``, else none);
        {"files": [paths]} on test.
    """
    apply_preset(args)
    utils.set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = get_dataset(args.dataset)
    args.dataset = spec.name
    rows = fusion_rows(args)
    if args.split == "test" and len(rows) > 1:
        _logger.warning("--ablations is ignored on the test split: only the configured CVSI is submitted")
        rows = {FULL_ROW: rows[FULL_ROW]}
    needed = set().union(*(w.needed() for w in rows.values()))
    _logger.info("fusion %s; components computed: %s", {k: (w.query(), w.target()) for k, w in rows.items()},
                 sorted(needed))

    split = spec.test_split if args.split == "test" else spec.val_split
    tasks = spec.tasks(resolve_dataset_root(args.data_root, spec.name), split)
    components = _components(args, tasks, needed, device)
    preset = DATASET_PRESETS.get(spec.name)
    release_unit_t_c = preset is not None and preset.release_unit_t_c
    methods = {row: FusedRetrieval(row, weights, components, args.scoring, release_unit_t_c)
               for row, weights in rows.items()}

    if args.split == "test":
        files = _write(spec, methods[FULL_ROW], tasks, output_dir, args.submission_name)
        for path in files:
            _logger.info("wrote %s", path)
        return {"files": files}
    metrics = {row: evaluate(method, tasks, spec) for row, method in methods.items()}
    utils.atomic_write_json(output_dir / f"metrics_{spec.name}_{args.split}.json", metrics)
    files = _write(spec, methods[FULL_ROW], tasks, output_dir / PREDICTIONS_DIR, args.submission_name) \
        if args.save_predictions else []
    for path in files:
        _logger.info("wrote %s", path)
    return {"metrics": metrics, "files": files}


def results_text(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A run's val figures as tables, each with its legend: every row's metrics, then CIRCO's mAP@10 per
    semantic aspect."""
    aspect = "mAP@10_"
    main = {row: {k: v for k, v in m.items() if not k.startswith(aspect)} for row, m in metrics.items()}
    text = metrics_table_with_legend(main)
    aspects = {row: {k.removeprefix(aspect): v for k, v in m.items() if k.startswith(aspect)} for row, m in metrics.items()}
    if any(aspects.values()):
        text += ("\n\nmAP@10 per semantic aspect\n" + metrics_table(aspects)
                 + "\neach column: CIRCO mAP@10 over the queries that have this semantic aspect")
    return text
