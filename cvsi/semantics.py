"""CVSI's semantic side (§III-C): the captions of every image (imported files, else BLIP-2) and the LLM's
answers to the two prompts (an imported answer file, else a chat-completions server), all cached.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

import utils
from cvsi.cache import JsonCache
from cvsi.captioner import Blip2Captioner, caption_images
from cvsi.features import image_key
from cvsi.imports import QueryAnswers, match_answers, read_answer_files, read_caption_sets, write_answer_file
from cvsi.llm import ChatClient, ChatConfig, LLMError, LLMJob, run_jobs
from cvsi.prompts import (
    MODIFY_MARKER, MODIFY_PROMPT, OBJECTS_MARKER, OBJECTS_PROMPT, answer_parsers, build_messages, select_template,
)
from data_utils import DataError, load_image
from dataset_registry import DATASETS, Query, RetrievalTask

__all__ = ["gather_captions", "llm_jobs", "gather_answers"]

_logger = logging.getLogger("cir.cvsi")


def gather_captions(args: argparse.Namespace, tasks: Sequence[RetrievalTask], want_gallery: bool, want_references: bool,
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
    return (select_template(args.modify_prompt_file, args.dataset, "modify", MODIFY_PROMPT, DATASETS),
            select_template(args.objects_prompt_file, args.dataset, "objects", OBJECTS_PROMPT, DATASETS))


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


def gather_answers(args: argparse.Namespace, tasks: Sequence[RetrievalTask], reference_captions: dict[str, list[str]],
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
