"""CVSI on a synthetic CIRCO where images and captions carry complementary information, on CPU.

    python -m cvsi.demo --output_dir cvsi_demo

1. writes a synthetic CIRCO (:func:`synthetic.circo.make_complementary_circo`) whose ground truths are in the
   reference's setting (its background and layout) with the edit applied, next to near-copies of the
   reference without the edit (an image search finds those first) and the edited objects in another
   setting (the image captions, which never say where a shape is or what the background is, cannot tell
   those from the ground truths);
2. trains a tiny CLIP contrastively (:mod:`cvsi.clip_training`) on other random scenes with alt-text-like
   captions (:func:`synthetic.circo.setting_captioned_photo`), then Φ for it from those captions alone,
   LinCIR-style (:mod:`cvsi.phi_training`); both are kept under ``OUTPUT_DIR/models`` and reused by a later
   run with the same settings;
3. starts a chat-completions server on 127.0.0.1 whose "LLM" applies the synthetic edit instructions to
   the captions it is given (so the two CVSI prompts get meaningful answers);
4. runs CVSI (:func:`cvsi.pipeline.run` with ``zero_shot_cvsi.py``'s options) on val with the paper's
   ablation rows, with the paper's CIRCO weights, once per single channel (answers and features come from
   the caches), and on test (the CIRCO submission file); prints every row in one table with a legend.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch.utils.data import Dataset

import utils
from cvsi.cache import fingerprint
from cvsi.clip_training import ContrastiveConfig, save_clip, train_contrastive
from cvsi.fusion import DATASET_PRESETS
from cvsi.loopback import LoopbackChatServer, Reply, chat_reply
from cvsi.params import parse_config
from cvsi.phi_training import TRAIN_STATE_FILE, PhiTrainingConfig, train_phi
from cvsi.pipeline import FULL_ROW, run
from cvsi.prompts import MODIFY_MARKER, OBJECTS_MARKER
from data_utils import build_transform
from metrics import metric_legend, metrics_table
from synthetic import CAPTIONS_DIR
from synthetic.circo import make_complementary_circo, setting_captioned_photo, setting_pair_caption

__all__ = ["CHANNELS", "DEMO_WEIGHTS", "PAPER_ROW", "LEGEND", "PretrainingPairs", "synthetic_editor", "build_parser",
           "table_text", "main"]

_logger = logging.getLogger("cir.cvsi.demo")
_OBJECT = re.compile(r"\ban? (\w+) (circle|square|triangle)\b")
_EDIT = re.compile(r"make the (circle|square|triangle) (\w+)|remove the (circle|square|triangle)|add an? (\w+) (circle|square|triangle)")
# α, β, γ of the demo's CVSI row: the paper's CIRCO γ; α and β chosen on seed 0's val split. The paper's
# CIRCO weights (α 0.6, β 0.4: no q_v) are scored as a row of their own.
DEMO_WEIGHTS = (0.7, 0.1, 0.2)
PAPER_ROW = "CVSI, the paper's CIRCO weights"
# Single channels: row -> (α, β, γ) that rank by one query component against one gallery component.
CHANNELS = {
    "only q_m→t_c": (1.0, 0.0, 1.0),
    "only q_m→t_v": (1.0, 0.0, 0.0),
    "only q_f→t_c": (0.0, 1.0, 1.0),
    "only q_f→t_v": (0.0, 1.0, 0.0),
    "only q_v→t_c": (0.0, 0.0, 1.0),
    "only q_v→t_v": (0.0, 0.0, 0.0),
}
_IMAGE_SIZE = 64  # pixels of the gallery images and of the CLIP's training photos
_MODEL_REVISION = 1  # bump when the pretraining pairs or the trainings change what a cached model holds
_TABLE_METRICS = ("mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@50")
LEGEND = """\
q_v, t_v: CLIP image features of the reference / gallery image; q_m: mean text feature of the LLM's edited
captions of the reference; t_c: mean text feature of the gallery image's captions; q_f: "a photo of $ that
{{T}}. And the photo should have {{objects}}." encoded with $ = Φ(q_v).
CVSI: q = α q_m + β q_f + (1−α−β) q_v and t = γ t_c + (1−γ) t_v, ranked by cosine similarity ({weights}).
w/o …: the paper's ablation rows (Table III): CVSI with the named components' weights set to 0.
only a→b: ranked by cos(a, b) alone, one query component against one gallery component."""


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


class PretrainingPairs(Dataset):
    """The tiny CLIP's training pairs: :func:`synthetic.circo.setting_captioned_photo` ``0 … size − 1`` of
    stream ``seed``, each photo preprocessed as CVSI preprocesses the gallery (the ``clip`` transform)."""

    def __init__(self, seed: int, size: int, model_image_size: int) -> None:
        self.seed, self.size = seed, size
        self.transform = build_transform("clip", model_image_size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = setting_captioned_photo(self.seed, index, _IMAGE_SIZE)
        return self.transform(image), caption


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="cvsi_demo")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, both trainings and the runs")
    parser.add_argument("--clip_model_name", default="ViT-Tiny-P16-64", help="a tiny open_clip config (model/model_configs)")
    parser.add_argument("--num_val", type=int, default=120, help="val queries")
    parser.add_argument("--num_test", type=int, default=60, help="test queries")
    parser.add_argument("--gallery_size", type=int, default=1500, help="gallery images at least")
    parser.add_argument("--num_captions", type=int, default=5, help="captions per image CVSI uses (the files hold 15)")
    parser.add_argument("--pretraining_pairs", type=int, default=20000, help="image-caption pairs the CLIP is trained on")
    parser.add_argument("--clip_steps", type=int, default=600, help="contrastive training steps of the CLIP")
    parser.add_argument("--clip_batch_size", type=int, default=128)
    parser.add_argument("--phi_steps", type=int, default=300, help="Φ training steps (on the pretraining captions only)")
    parser.add_argument("--phi_batch_size", type=int, default=128)
    for name, symbol, value in zip(("alpha", "beta", "gamma"), "αβγ", DEMO_WEIGHTS):
        parser.add_argument(f"--{name}", type=float, default=value, help=f"the CVSI row's {symbol}")
    return parser


def _pretrained_clip(args: argparse.Namespace, models: Path) -> Path:
    """The tiny CLIP trained on the pretraining pairs: read from ``models`` or trained and written there."""
    config = ContrastiveConfig(clip_model_name=args.clip_model_name, steps=args.clip_steps,
                               batch_size=args.clip_batch_size, group_size=2, seed=args.seed)
    identity = {**asdict(config), "pairs": args.pretraining_pairs, "revision": _MODEL_REVISION}
    path = models / f"clip_{fingerprint(identity)}.pt"
    if path.is_file():
        _logger.info("CLIP: reusing %s", path)
        return path
    image_size = open_clip.get_model_config(args.clip_model_name)["vision_cfg"]["image_size"]
    backbone, log = train_contrastive(config, PretrainingPairs(args.seed, args.pretraining_pairs, image_size))
    save_clip(backbone, path)
    utils.atomic_write_json(path.with_suffix(".json"), {"identity": identity, "log": log})
    return path


def _trained_phi(args: argparse.Namespace, clip_path: Path, models: Path) -> Path:
    """Φ for the tiny CLIP, trained on the pretraining captions (text only) with LinCIR's template mask
    ("a photo of $", the start of CVSI's q_f prompt); a finished run in ``models`` is resumed, i.e. reused."""
    corpus = models / f"captions_{args.seed}_{args.pretraining_pairs}_r{_MODEL_REVISION}.txt"
    if not corpus.is_file():
        captions = [setting_pair_caption(args.seed, i) for i in range(args.pretraining_pairs)]
        utils.atomic_write_bytes(corpus, ("\n".join(captions) + "\n").encode("utf-8"))
    config = PhiTrainingConfig(captions=[str(corpus)], clip_model_name=args.clip_model_name, pretrained=str(clip_path),
                               batch_size=args.phi_batch_size, learning_rate=2e-3, max_train_steps=args.phi_steps,
                               mask="template", checkpointing_steps=args.phi_steps, log_every=100, seed=args.seed)
    config.output_dir = str(models / f"phi_{fingerprint({**config.identity(), 'steps': args.phi_steps})}")
    config.resume = (Path(config.output_dir) / "checkpoints" / TRAIN_STATE_FILE).is_file()
    return train_phi(config)["latest"]


def table_text(rows: dict[str, dict[str, float]], weights: str) -> str:
    """The demo's table (the leading metrics of every row) with its legend underneath."""
    shown = {row: {k: metrics[k] for k in _TABLE_METRICS if k in metrics} for row, metrics in rows.items()}
    keys = list(dict.fromkeys(k for metrics in shown.values() for k in metrics))
    return f"{metrics_table(shown)}\n\n{LEGEND.format(weights=weights)}\n{metric_legend(keys)}"


def _weights(alpha: float, beta: float, gamma: float) -> list[str]:
    return ["--alpha", str(alpha), "--beta", str(beta), "--gamma", str(gamma)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    utils.setup_logging(None)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    root = make_complementary_circo(out / "data", seed=args.seed, num_val=args.num_val, num_test=args.num_test,
                                    gallery_size=args.gallery_size, image_size=_IMAGE_SIZE)
    seconds["data"] = time.perf_counter() - started
    clip_path = _pretrained_clip(args, out / "models")
    seconds["CLIP"] = time.perf_counter() - started - sum(seconds.values())
    phi_path = _trained_phi(args, clip_path, out / "models")
    seconds["Φ"] = time.perf_counter() - started - sum(seconds.values())

    common = ["--dataset", "circo", "--data_root", str(root), "--clip_model_name", args.clip_model_name,
              "--pretrained", str(clip_path), "--phi_checkpoint", str(phi_path), "--transform", "clip",
              "--captions_file", str(root / CAPTIONS_DIR / "unlabeled2017.json"), "--num_captions",
              str(args.num_captions), "--seed", str(args.seed), "--cache_dir", str(out / "cache"), "--num_workers", "0"]
    demo_weights = _weights(args.alpha, args.beta, args.gamma)
    paper = DATASET_PRESETS["circo"].weights
    results: dict[str, Any] = {}
    with LoopbackChatServer(synthetic_editor) as server:
        common += ["--llm_base_url", server.base_url, "--llm_model", "synthetic-editor", "--llm_concurrency", "4"]
        results["val"] = run(parse_config([*common, *demo_weights, "--split", "val", "--ablations",
                                           "--output_dir", str(out / "run")]))
        results["val_llm_requests"] = server.requests

        def score(row: str, weights: tuple[float, float, float]) -> dict[str, float]:
            """The val metrics of one more weighting (every answer and feature is in the caches now)."""
            folder = out / "run" / "rows" / re.sub(r"\W+", "_", row).strip("_")
            return run(parse_config([*common, *_weights(*weights), "--split", "val", "--output_dir", str(folder)]))[
                "metrics"][FULL_ROW]

        results["paper_weights"] = score(PAPER_ROW, (paper.alpha, paper.beta, paper.gamma))
        results["channels"] = {row: score(row, weights) for row, weights in CHANNELS.items()}
        results["rows_llm_requests"] = server.requests - results["val_llm_requests"]
        results["test"] = run(parse_config([*common, *demo_weights, "--split", "test", "--output_dir", str(out / "run")]))
    seconds["CVSI runs"] = time.perf_counter() - started - sum(seconds.values())
    results["seconds"] = seconds

    val = results["val"]["metrics"]
    rows = {FULL_ROW: val[FULL_ROW], PAPER_ROW: results["paper_weights"],
            **{row: metrics for row, metrics in val.items() if row != FULL_ROW}, **results["channels"]}
    print(f"\nSynthetic CIRCO val, {args.num_val} queries:")
    print(table_text(rows, f"α {args.alpha}, β {args.beta}, γ {args.gamma}; the paper's CIRCO weights: "
                           f"α {paper.alpha}, β {paper.beta}, γ {paper.gamma}"))
    best = max(results["channels"], key=lambda row: results["channels"][row]["mAP@10"])
    full, single = val[FULL_ROW]["mAP@10"], results["channels"][best]["mAP@10"]
    print(f"\nCVSI mAP@10 {full:.2f}; the best single channel ({best}) {single:.2f}: {full - single:+.2f}")
    print(f"LLM requests: {results['val_llm_requests']} for the first val run, {results['rows_llm_requests']} for "
          "the other rows (every answer cached)")
    print(f"test submission: {results['test']['files'][0]}")
    print("seconds: " + ", ".join(f"{stage} {value:.0f}" for stage, value in seconds.items())
          + f"; total {sum(seconds.values()):.0f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
