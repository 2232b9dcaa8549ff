"""CVSI end to end on synthetic CIRCO, on CPU in about a minute.

    python -m cvsi.demo --output_dir cvsi_demo

1. writes a synthetic CIRCO copy (coloured-shape scenes, several ground truths per query) with its
   image caption files (``image_captions/unlabeled2017.json``, the CVSI release's caption layout);
2. saves a randomly initialised Φ in LinCIR's checkpoint layout for the tiny open_clip config;
3. starts a chat-completions server on 127.0.0.1 whose "LLM" applies the synthetic edit instructions
   to the captions it is given (so the two CVSI prompts get meaningful answers);
4. runs CVSI (:func:`cvsi.pipeline.run` with ``zero_shot_cvsi.py``'s options) on val with the paper's
   ablation rows, then again (everything cached: no LLM request), then on test (CIRCO submission file).

CLIP and Φ have random weights here, so the numbers only show that the pipeline works: the semantic
components (captions, modified captions) carry the signal.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

import utils
from cvsi.loopback import LoopbackChatServer, Reply, chat_reply
from cvsi.params import parse_config
from cvsi.phi import Phi, save_phi
from cvsi.pipeline import results_text, run
from cvsi.prompts import MODIFY_MARKER, OBJECTS_MARKER
from model import create_backbone
from synthetic import CAPTIONS_DIR, make_synthetic_circo

_OBJECT = re.compile(r"\ban? (\w+) (circle|square|triangle)\b")
_EDIT = re.compile(r"make the (circle|square|triangle) (\w+)|remove the (circle|square|triangle)|add an? (\w+) (circle|square|triangle)")


def _describe(objects: dict[str, str]) -> str:
    phrases = [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}" for shape, colour in objects.items()]
    if not phrases:
        return "an empty white picture"
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def synthetic_editor(request: dict[str, Any]) -> Reply:
    """A rule-based stand-in for the LLM that understands the synthetic captions and edit instructions."""
    prompt = request["messages"][-1]["content"]
    content = prompt[prompt.rfind("Image Content:"):]
    caption = content.split("\n", 1)[0].removeprefix("Image Content:")
    instruction = content[content.find("Instruction:"):].split("\n", 1)[0].removeprefix("Instruction:")
    objects: dict[str, str] = {}
    for colour, shape in _OBJECT.findall(caption):
        objects.setdefault(shape, colour)
    added: dict[str, str] = {}
    for recolour_shape, recolour, removed, add_colour, add_shape in _EDIT.findall(instruction):
        if recolour_shape:
            objects[recolour_shape] = added[recolour_shape] = recolour
        elif removed:
            objects.pop(removed, None)
        else:
            objects[add_shape] = added[add_shape] = add_colour
    if prompt.rstrip().endswith(OBJECTS_MARKER):
        return chat_reply(f"{OBJECTS_MARKER} {_describe(added) if added else 'nothing new'}")
    return chat_reply(f"{MODIFY_MARKER} {_describe(objects)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="cvsi_demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip_model_name", default="ViT-Tiny-P16-64")
    parser.add_argument("--num_val", type=int, default=120)
    parser.add_argument("--num_test", type=int, default=60)
    parser.add_argument("--gallery_size", type=int, default=1500)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    logger = utils.setup_logging(None)
    root = make_synthetic_circo(out / "data", seed=args.seed, num_val=args.num_val, num_test=args.num_test,
                                gallery_size=args.gallery_size)
    logger.info("synthetic CIRCO written to %s", root)

    torch.manual_seed(args.seed)
    backbone = create_backbone(args.clip_model_name)
    phi_path = out / "phi_random.pt"
    save_phi(phi_path, Phi(backbone.embed_dim, backbone.text_width))

    common = ["--dataset", "circo", "--data_root", str(root), "--clip_model_name", args.clip_model_name,
              "--pretrained", "none", "--phi_checkpoint", str(phi_path), "--transform", "clip",
              "--captions_file", str(root / CAPTIONS_DIR / "unlabeled2017.json"), "--seed", str(args.seed),
              "--cache_dir", str(out / "cache"), "--output_dir", str(out / "run"), "--num_workers", "0"]
    results: dict[str, Any] = {}
    with LoopbackChatServer(synthetic_editor) as server:
        llm = ["--llm_base_url", server.base_url, "--llm_model", "synthetic-editor", "--llm_concurrency", "4"]
        for label, extra in (("val", ["--split", "val", "--ablations"]), ("val again", ["--split", "val"]),
                             ("test", ["--split", "test"])):
            before = server.requests
            print(f"\n=== {label} ===")
            results[label] = run(parse_config(common + llm + extra))
            if "metrics" in results[label]:
                print(results_text(results[label]["metrics"]))
            print(f"LLM requests this run: {server.requests - before}")
    metrics = results["val"]["metrics"]["CVSI"]
    print("\nCVSI on synthetic CIRCO val: " + ", ".join(f"mAP@{k} {metrics[f'mAP@{k}']:.2f}" for k in (5, 10, 25, 50)))
    print(f"test submission: {results['test']['files'][0]}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
