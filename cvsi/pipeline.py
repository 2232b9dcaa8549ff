"""The CVSI method end to end on CIRR, FashionIQ or CIRCO, reusing the project's readers and metrics.

:func:`run` takes the options of ``zero_shot_cvsi.py`` and: reads the split (``data_utils``), gets
captions (imported files and/or BLIP-2) and LLM answers (imported files or a chat-completions server),
encodes everything with the frozen CLIP, fuses the features (:mod:`cvsi.fusion`), and either scores the
val split (``utils.circo_metrics`` / ``cirr_metrics`` / ``fiq_metrics``) or writes test submissions.
Every expensive step goes through a :mod:`cvsi.cache` cache, so an interrupted run resumes and a
repeated run recomputes nothing.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from cvsi.cache import JsonCache, TensorCache, fingerprint, module_fingerprint
from cvsi.captioner import Blip2Captioner, caption_images
from cvsi.fusion import ABLATIONS, PRESETS, FusionWeights, fuse_query, fuse_target, ranking_features, scored_t_c
from cvsi.imports import QueryAnswers, match_answers, read_answer_files, read_caption_sets, write_answer_file
from cvsi.llm import ChatClient, ChatConfig, LLMError, LLMJob, run_jobs
from cvsi.phi import Phi, load_phi
from cvsi.presets import apply_preset
from cvsi.prompts import (
    MODIFY_MARKER, MODIFY_PROMPT, OBJECTS_MARKER, OBJECTS_PROMPT, answer_parsers, build_messages, select_template,
)
from cvsi.pseudo_tokens import encode_with_pseudo_words, fine_grained_prompt, placeholder_token_id
from data_utils import (
    CIRCODataset, CIRRDataset, DataError, FashionIQDataset, ImageFiles, build_transform, collate_batch, join_fiq_captions,
    load_image,
)
from distributed import init_distributed
from feature_cache import checkpoint_identity
from model import create_backbone, parse_pretrained
from model.backbone import CLIPBackbone
from training import FIQ_CATEGORIES, resolve_dataset_root

__all__ = ["Query", "Task", "load_tasks", "image_key", "run", "FULL_ROW"]

_logger = logging.getLogger("cir.cvsi")
FULL_ROW = "CVSI"
SUBMISSION_TOP_K = 50


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Query:
    """One composed query: reference image, modification text ``T`` and what is known of its targets."""

    query_id: str
    reference: str
    caption: str
    target: str = ""
    gt: list[str] = field(default_factory=list)
    aspects: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)


@dataclass
class Task:
    """Queries ranked against one gallery (CIRR, CIRCO, or one FashionIQ category)."""

    name: str
    dataset: str
    split: str
    root: Path
    gallery: list[str]
    queries: list[Query]
    image_path: Callable[[str], Path]
    annotations: list[dict]


def _identity(image: Any) -> Any:
    return image


def load_tasks(dataset: str, root: Path, split: str) -> list[Task]:
    """Read a split with the project's dataset classes (which check the files up front)."""
    if dataset == "circo":
        data = CIRCODataset(root, split, "relative", _identity)
        queries = [Query(str(q["id"]), str(q["reference_img_id"]), q["relative_caption"],
                         str(q.get("target_img_id", "")), [str(i) for i in q.get("gt_img_ids", [])],
                         list(q.get("semantic_aspects", []))) for q in data.triplets]
        return [Task("circo", dataset, split, root, data.image_names, queries, data.image_path, data.triplets)]
    if dataset == "cirr":
        cirr_split = "test1" if split == "test" else split
        data = CIRRDataset(root, cirr_split, "relative", _identity)
        queries = [Query(str(t["pairid"]), t["reference"], t["caption"], t.get("target_hard", ""),
                         members=list(t["img_set"]["members"])) for t in data.triplets]
        return [Task("cirr", dataset, cirr_split, root, data.image_names, queries, data.image_path, data.triplets)]
    tasks = []
    for category in FIQ_CATEGORIES:
        data = FashionIQDataset(root, split, [category], "relative", _identity)
        queries = [Query(f"{category}:{i}", t["candidate"], join_fiq_captions(t["captions"]), t.get("target", ""))
                   for i, t in enumerate(data.triplets)]
        tasks.append(Task(category, dataset, split, root, data.image_names, queries, data.image_path, data.triplets))
    return tasks


def image_key(task: Task, name: str) -> str:
    """Cache key of an image: its path inside the dataset and its size in bytes."""
    path = task.image_path(name)
    return f"{task.dataset}/{path.relative_to(task.root).as_posix()}:{path.stat().st_size}"


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def image_embeddings(
    backbone: CLIPBackbone, keys: Sequence[str], paths: dict[str, Path], transform: Callable, cache: TensorCache,
    batch_size: int, num_workers: int, device: torch.device,
) -> Tensor:
    """Projected image embeddings [N, D] (not normalised: Φ takes them raw), computed if not cached."""
    todo = cache.missing(keys)
    loader = DataLoader(ImageFiles(todo, [paths[key] for key in todo], transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_batch)
    for batch in tqdm(loader, desc="image features", leave=False):
        embeds = backbone.encode_image(batch["image"].to(device)).embeds.float().cpu()
        cache.put(dict(zip(batch["name"], embeds)))
    return cache.stack(keys)


@torch.no_grad()
def caption_set_features(
    backbone: CLIPBackbone, caption_sets: Sequence[Sequence[str]], cache: TensorCache, batch_size: int,
    device: torch.device,
) -> Tensor:
    """[M, D]: for each set, ``mean_i f_t(C_i)`` of the L2-normalised caption features (Eqs. 5, 7).

    An empty set (every answer for it failed) gives a zero row, which drops the term for that query.
    """
    keys = [fingerprint(list(captions)) for captions in caption_sets]
    by_key = {key: list(captions) for key, captions in zip(keys, caption_sets) if captions}
    todo = cache.missing(by_key)
    group: list[str] = []
    for position, key in enumerate(tqdm(todo, desc="caption features", leave=False)):
        group.append(key)
        if sum(len(by_key[k]) for k in group) < 8 * batch_size and position < len(todo) - 1:
            continue
        texts = [c for k in group for c in by_key[k]]
        feats = torch.cat([
            F.normalize(backbone.encode_text(backbone.tokenize(texts[i:i + batch_size]).to(device)).embeds.float(), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]).cpu()
        means, start = {}, 0
        for k in group:
            means[k] = feats[start:start + len(by_key[k])].mean(dim=0)
            start += len(by_key[k])
        cache.put(means)
        group = []
    dim = backbone.embed_dim
    return torch.stack([cache[k] if k in by_key else torch.zeros(dim) for k in keys]) if keys else torch.zeros(0, dim)


@torch.no_grad()
def fine_grained_features(
    backbone: CLIPBackbone, phi: Phi, prompts: Sequence[str], reference_embeds: Tensor, reference_keys: Sequence[str],
    cache: TensorCache, batch_size: int, device: torch.device,
) -> Tensor:
    """``q_f`` [Q, D] (normalised): prompts encoded with ``$`` -> ``Φ(q_v)`` (Eqs. 1-2)."""
    keys = [fingerprint([prompt, ref]) for prompt, ref in zip(prompts, reference_keys)]
    index = {key: i for i, key in enumerate(keys)}
    todo = cache.missing(keys)
    placeholder = placeholder_token_id(backbone)
    for start in tqdm(range(0, len(todo), batch_size), desc="fine-grained features", leave=False):
        rows = [index[k] for k in todo[start:start + batch_size]]
        pseudo = phi(reference_embeds[rows].to(device))  # [b, w]
        embeds = encode_with_pseudo_words(backbone, [prompts[i] for i in rows], pseudo, placeholder)
        cache.put(dict(zip(todo[start:start + batch_size], F.normalize(embeds.float(), dim=-1).cpu())))
    return cache.stack(keys)


# ---------------------------------------------------------------------------------------------- captions, LLM
def gather_captions(args: argparse.Namespace, tasks: Sequence[Task], want_gallery: bool, want_references: bool,
                    device: torch.device) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(image key -> gallery captions, query id -> captions of its reference image).

    Imported files first, each role from its own files (:func:`cvsi.imports.read_caption_sets`); BLIP-2
    (cached, one caption set per image serving both roles) for the rest.
    """
    imported = read_caption_sets(args.captions_file, {t.name: t.gallery for t in tasks},
                                 {t.name: ([q.query_id for q in t.queries], [q.reference for q in t.queries]) for t in tasks})
    limit = args.num_captions or None
    gallery: dict[str, list[str]] = {}
    references: dict[str, list[str]] = {}
    missing: dict[str, Path] = {}
    waiting: list[tuple[str, str]] = []  # (query id, image key) of references to caption
    for task in tasks:
        for name in task.gallery if want_gallery else ():
            key = image_key(task, name)
            if name in imported.gallery:
                gallery[key] = imported.gallery[name][:limit]
            else:
                missing[key] = task.image_path(name)
        for query in task.queries if want_references else ():
            found = imported.reference(query.query_id, query.reference)
            if found is not None:
                references[query.query_id] = found[:limit]
            else:
                key = image_key(task, query.reference)
                missing[key] = task.image_path(query.reference)
                waiting.append((query.query_id, key))
    if missing:
        if not args.captioner:
            example = ", ".join(list(missing)[:3])
            raise DataError(f"{len(missing)} images have no captions in --captions_file and no --captioner was given "
                            f"(e.g. {example})")
        captioner = Blip2Captioner(args.captioner, num_captions=args.num_captions or 15, top_p=args.top_p,
                                   num_beams=args.caption_beams, max_new_tokens=args.caption_max_tokens,
                                   prompt=args.caption_prompt,
                                   seed=args.seed, device=device,
                                   dtype=torch.float16 if args.captioner_fp16 else torch.float32)
        cache = JsonCache(args.cache_dir, "captions", captioner.identity())
        generated = caption_images(captioner, list(missing), lambda key: load_image(missing[key]), cache,
                                   args.caption_batch_size)
        gallery.update({key: captions for key, captions in generated.items() if want_gallery and key not in gallery})
        references.update({query_id: generated[key] for query_id, key in waiting})
    return gallery, references


def _templates(args: argparse.Namespace) -> tuple[str, str]:
    """The dataset's p_m and p_a templates: --modify_prompt_file / --objects_prompt_file entries, else ours."""
    return (select_template(args.modify_prompt_file, args.dataset, "modify", MODIFY_PROMPT, PRESETS),
            select_template(args.objects_prompt_file, args.dataset, "objects", OBJECTS_PROMPT, PRESETS))


def llm_jobs(queries: Sequence[Query], reference_captions: Sequence[list[str]], mode: str, want_modified: bool,
             want_objects: bool, templates: tuple[str, str], answers: str = "parsed") -> list[LLMJob]:
    """The prompts of CVSI (§III-C). ``mode`` 'each' (the paper): one ``p_m`` per reference caption
    ``C_i^B`` and ``p_a`` on ``C_1^B``; 'joined' (the released code): one of each on all captions
    joined by commas. ``answers``: 'parsed' or 'raw' (see :func:`cvsi.prompts.answer_parsers`)."""
    parse = answer_parsers(answers)
    jobs = []
    for query, captions in zip(queries, reference_captions):
        contexts = captions if mode == "each" else [", ".join(captions)]
        if want_modified:
            jobs += [LLMJob(query.query_id, "modified_caption", i,
                            build_messages(templates[0], context, query.caption, MODIFY_MARKER), parse["modify"])
                     for i, context in enumerate(contexts)]
        if want_objects:
            jobs.append(LLMJob(query.query_id, "added_objects", 0,
                               build_messages(templates[1], contexts[0], query.caption, OBJECTS_MARKER), parse["objects"]))
    return jobs


def gather_answers(args: argparse.Namespace, tasks: Sequence[Task], reference_captions: dict[str, list[str]],
                   want_modified: bool, want_objects: bool) -> dict[str, QueryAnswers]:
    """Query id -> LLM answers, from --llm_answers_file or the chat-completions server (cached)."""
    if args.llm_answers_file:
        lists = {t.name: ([q.query_id for q in t.queries], [q.caption for q in t.queries]) for t in tasks}
        answers = match_answers(read_answer_files(args.llm_answers_file), lists)
        lacking = [q.query_id for t in tasks for q in t.queries if q.query_id not in answers]
        if lacking:
            raise DataError(f"--llm_answers_file has no answers for {len(lacking)} queries (e.g. {lacking[:5]})")
        return answers
    config = ChatConfig.from_env(args.llm_base_url, args.llm_model, args.llm_api_key, timeout=args.llm_timeout,
                                 max_retries=args.llm_retries, backoff=args.llm_backoff, concurrency=args.llm_concurrency,
                                 max_tokens=args.llm_max_tokens, stop=tuple(args.llm_stop))
    templates = _templates(args)
    # The cache holds parsed answers, so the parser is part of its identity.
    cache = JsonCache(args.cache_dir, "llm_answers", {**config.identity(), "answers": args.llm_answer})
    client = ChatClient(config)
    answers: dict[str, QueryAnswers] = {}
    failures = []
    for task in tasks:
        references = [reference_captions[q.query_id] for q in task.queries]
        jobs = llm_jobs(task.queries, references, args.caption_context, want_modified, want_objects, templates,
                        args.llm_answer)
        done, failed = run_jobs(client, jobs, cache, desc=f"LLM {task.name}")
        failures += failed
        for query in task.queries:
            answers[query.query_id] = QueryAnswers([], None)
        by_query = dict(zip((q.query_id for q in task.queries), references))
        for job in jobs:
            if job.kind == "modified_caption":
                if job.key in done:
                    answers[job.query_id].modified_captions.append(done[job.key])
                elif args.on_llm_failure == "release_fallback":  # the release: the reference captions themselves
                    captions = by_query[job.query_id]
                    answers[job.query_id].modified_captions += captions if args.caption_context == "joined" \
                        else [captions[job.index]]
            elif job.key in done:  # added objects; a failure leaves them out (the release: empty)
                answers[job.query_id].added_objects = done[job.key]
        write_answer_file(Path(args.output_dir) / f"llm_answers_{task.dataset}_{task.split}_{task.name}.json",
                          [q.query_id for q in task.queries], [q.caption for q in task.queries],
                          [answers[q.query_id] for q in task.queries])
    if failures:
        path = Path(args.output_dir) / f"llm_failures_{tasks[0].dataset}_{tasks[0].split}.json"
        utils.atomic_write_json(path, [vars(f) for f in failures])
        if args.on_llm_failure == "strict":
            raise LLMError(f"{len(failures)} LLM answers failed (listed in {path}). Run again to retry only those "
                           "(the others are cached), or pass --on_llm_failure leave_out / release_fallback")
        _logger.warning("%d LLM answers failed (%s); %s", len(failures), path,
                        "their parts are left out of the queries" if args.on_llm_failure == "leave_out"
                        else "the reference captions stand in for failed modified captions, failed objects are left out")
    return answers


# ---------------------------------------------------------------------------------------------- scoring
def _ranked(query: Tensor, target: Tensor, names: list[str], k: int) -> list[list[str]]:
    """Top-``k`` gallery names per query by dot product (features from :func:`cvsi.fusion.ranking_features`)."""
    _, top = utils.topk_retrieval(query, target, k)
    return [[names[i] for i in row] for row in top.tolist()]


def evaluate(task: Task, query: Tensor, target: Tensor, scoring: str = "paper") -> dict[str, float]:
    """Val metrics of one task with the project's metric code (``scoring``: see :func:`cvsi.fusion.ranking_features`)."""
    q, t = ranking_features(query, target, scoring)
    queries = task.queries
    if task.dataset == "circo":
        ranked = _ranked(q, t, task.gallery, SUBMISSION_TOP_K)
        return utils.circo_metrics(ranked, [x.gt for x in queries], [x.target for x in queries],
                                   [x.aspects for x in queries])
    if task.dataset == "cirr":
        return utils.cirr_metrics(q, t, task.gallery, [x.reference for x in queries], [x.target for x in queries],
                                  [x.members for x in queries])
    return utils.fiq_metrics(q, t, task.gallery, [x.target for x in queries])


def write_rankings(task: Task, query: Tensor, target: Tensor, output_dir: Path, name: str,
                   scoring: str = "paper") -> list[Path]:
    """The task's rankings in the benchmark's own format, checked before they are written.

    On test these are the submissions; on val the same formats under ``*_val_*`` names, so the
    benchmark's own evaluation code can score them (the CIRCO repository's ``src/evaluation.py`` reads
    the CIRCO file as it is):

    * CIRCO: ``{query id: [top-50 image ids as ints]}``, ``circo_{split}_submission_{name}.json`` on
      test (the server's file), ``circo_val_predictions_{name}.json`` on val;
    * CIRR: the two server files ``{"version": "rc2", "metric": "recall" | "recall_subset", pairid:
      [top-50 | top-3 names]}`` (reference removed), ``recall[_subset]_submission_{name}.json`` on test,
      ``cirr_val_recall[_subset]_predictions_{name}.json`` on val;
    * FashionIQ: ``{query id: [top-50 names]}`` per category (``fashioniq_{category}_{split}_rankings_{name}.json``
      on test, ``fashioniq_{category}_val_predictions_{name}.json`` on val).
    """
    queries = task.queries
    q, t = ranking_features(query, target, scoring)
    test = task.split != "val"
    if task.dataset == "cirr":
        recall, subset = utils.cirr_submission(q, t, task.gallery, [x.reference for x in queries],
                                               [x.members for x in queries], [x.query_id for x in queries])
        if test:
            return list(utils.write_cirr_submission(output_dir, name, recall, subset, task.annotations))
        utils.check_cirr_submission(recall, subset, task.annotations)
        paths = [output_dir / f"cirr_val_{metric}_predictions_{name}.json" for metric in ("recall", "recall_subset")]
        for path, content in zip(paths, (recall, subset)):
            utils.atomic_write_json(path, content, indent=None)
        return paths
    ranked = _ranked(q, t, task.gallery, SUBMISSION_TOP_K)
    if task.dataset == "circo":
        # The strict length check lives here; utils.circo_submission only formats (and checks ids).
        expected = min(SUBMISSION_TOP_K, len(task.gallery))
        problems = [f"query {x.query_id}: {len(ids)} predictions, expected {expected}"
                    for x, ids in zip(queries, ranked) if len(ids) != expected]
        if problems:
            raise utils.SubmissionError(problems)
        content = utils.circo_submission(ranked, [int(x.query_id) for x in queries])
        path = output_dir / (f"circo_{task.split}_submission_{name}.json" if test else f"circo_val_predictions_{name}.json")
        utils.atomic_write_json(path, content, indent=None)
        return [path]
    kind = "rankings" if test else "predictions"
    path = output_dir / f"fashioniq_{task.name}_{task.split}_{kind}_{name}.json"
    utils.atomic_write_json(path, {x.query_id: r for x, r in zip(queries, ranked)})
    return [path]


# ---------------------------------------------------------------------------------------------- run
def fusion_rows(args: argparse.Namespace) -> dict[str, FusionWeights]:
    """The weightings to score: the configured CVSI, plus the paper's ablations with ``--ablations``."""
    preset = PRESETS[args.dataset]
    weights = FusionWeights(
        preset.alpha if args.alpha is None else args.alpha,
        preset.beta if args.beta is None else args.beta,
        preset.gamma if args.gamma is None else args.gamma,
    ).without(args.drop or ())
    rows = {FULL_ROW: weights}
    if args.ablations:
        rows.update({name: weights.without(dropped) for name, dropped in ABLATIONS.items()})
    for row, row_weights in rows.items():
        try:
            row_weights.check_usable()
        except ValueError as exc:
            raise ValueError(f"{row}: {exc}") from exc
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run CVSI as configured by ``zero_shot_cvsi.py``'s options.

    Returns:
        {"metrics": {row: metrics}, "files": [paths]} on val (FashionIQ rows summarised over categories;
        the files are the CVSI row's rankings with ``--save_predictions``, else none), {"files": [paths]}
        on test.
    """
    apply_preset(args)
    utils.set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = init_distributed(args.device).device
    rows = fusion_rows(args)
    if args.split == "test" and len(rows) > 1:
        _logger.warning("--ablations is ignored on the test split: only the configured CVSI is submitted")
        rows = {FULL_ROW: rows[FULL_ROW]}
    needed = set().union(*(w.needed() for w in rows.values()))
    _logger.info("fusion %s; components computed: %s", {k: (w.query(), w.target()) for k, w in rows.items()},
                 sorted(needed))

    root = resolve_dataset_root(args.data_root, args.dataset)
    tasks = load_tasks(args.dataset, root, args.split)
    pretrained = parse_pretrained(args.pretrained)
    backbone = create_backbone(args.clip_model_name, pretrained)
    backbone = backbone.to(device).eval().requires_grad_(False)
    backbone_id = {"clip": args.clip_model_name, "pretrained": pretrained, "weights": module_fingerprint(backbone)}
    transform = build_transform(args.transform, backbone.image_size)
    image_cache = TensorCache(args.cache_dir, "image_features", {**backbone_id, "transform": args.transform})
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

    per_row: dict[str, dict[str, dict[str, float]]] = {row: {} for row in rows}
    files: list[Path] = []
    for task in tasks:
        gallery_keys = [image_key(task, n) for n in task.gallery]
        reference_keys = [image_key(task, q.reference) for q in task.queries]
        features: dict[str, Tensor | None] = dict.fromkeys(("q_m", "q_f", "q_v", "t_c", "t_v"))
        if needed & {"t_v", "q_v", "q_f"}:
            paths = {image_key(task, n): task.image_path(n) for n in {*task.gallery, *(q.reference for q in task.queries)}}
            keys = list(dict.fromkeys(gallery_keys + reference_keys))
            embeds = dict(zip(keys, image_embeddings(backbone, keys, paths, transform, image_cache, args.batch_size,
                                                     args.num_workers, device)))
            reference_embeds = torch.stack([embeds[k] for k in reference_keys])
            features["t_v"] = F.normalize(torch.stack([embeds[k] for k in gallery_keys]), dim=-1)
            features["q_v"] = F.normalize(reference_embeds, dim=-1)
        if "t_c" in needed:
            features["t_c"] = caption_set_features(backbone, [gallery_captions[k] for k in gallery_keys], text_cache,
                                                   args.batch_size, device)
        if want_modified:
            features["q_m"] = caption_set_features(
                backbone, [answers[q.query_id].modified_captions for q in task.queries], text_cache, args.batch_size, device)
        if want_objects:
            prompts = [fine_grained_prompt(q.caption, answers[q.query_id].added_objects) for q in task.queries]
            features["q_f"] = fine_grained_features(backbone, phi, prompts, reference_embeds, reference_keys, phi_cache,
                                                    args.batch_size, device)
        for row, weights in rows.items():
            query = fuse_query(weights, features["q_m"], features["q_f"], features["q_v"])
            t_c = None if features["t_c"] is None else scored_t_c(features["t_c"], args.scoring, task.dataset)
            target = fuse_target(weights, t_c, features["t_v"])
            if args.split == "test" or (args.save_predictions and row == FULL_ROW):
                files += write_rankings(task, query, target, output_dir, args.submission_name, args.scoring)
            if args.split != "test":
                per_row[row][task.name] = evaluate(task, query, target, args.scoring)

    if args.split == "test":
        for path in files:
            _logger.info("wrote %s", path)
        return {"files": files}
    metrics = {row: (utils.summarize_fiq(sets) if args.dataset == "fashioniq" else sets[tasks[0].name])
               for row, sets in per_row.items()}
    utils.atomic_write_json(output_dir / f"metrics_{args.dataset}_{args.split}.json", metrics)
    for path in files:
        _logger.info("wrote %s", path)
    return {"metrics": metrics, "files": files}
