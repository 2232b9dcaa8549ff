"""Train LinCIR's mapping network Φ for any open_clip model from captions alone (CVSI's q_f needs a Φ
trained for its CLIP).

    python train_phi.py --captions captions.txt --clip_model_name ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --output_dir phi_runs/vit_b16

Writes phi_<step>.pt, phi_latest.pt (and phi_best.pt with --val_fraction) under OUTPUT_DIR/checkpoints in
LinCIR's layout, for zero_shot_cvsi.py --phi_checkpoint. The method and its loss: cvsi/phi_training.py;
docs/cvsi.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

import utils
from cvsi.phi_config import MASKS, TAGGERS, PhiTrainingConfig
from precision import PRECISIONS

_HELP = {
    "captions": "caption corpus: .txt files (one caption per line) and/or .json files (a list of captions, or a "
                "caption file with target_captions / all_captions as CVSI's release and the synthetic data write)",
    "output_dir": "run folder (checkpoints/, config.json, train_log.json)",
    "clip_model_name": "open_clip model name",
    "pretrained": "open_clip pretrained tag or local weights file; 'none' for random weights",
    "batch_size": "captions per step",
    "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps, then a constant learning rate",
    "max_train_steps": "optimisation steps in total (a resumed run may raise it)",
    "dropout": "dropout in Φ",
    "noise_scale": "s: the caption embedding e gets noise σ·n, σ ~ U(0, s), n ~ N(0, I)",
    "mask": "'keywords': noun-phrase runs of the caption become $ (LinCIR); 'template': the caption is "
            "encoded from --template",
    "template": "the masked text for --mask template (and for captions whose $ falls past the context length)",
    "tagger": "part-of-speech tagger for the keywords: 'heuristic' (word lists, no dependency) or 'spacy' "
              "(LinCIR's; needs spaCy and en_core_web_sm)",
    "val_fraction": "fraction of the captions held out; phi_best.pt is the checkpoint with the lowest held-out "
                    "reconstruction error (0: no phi_best.pt)",
    "checkpointing_steps": "write phi_<step>.pt, phi_latest.pt and the training state every this many steps",
    "log_every": "log the mean loss every this many steps",
    "precision": "fp32, or amp (fp16 on CUDA) / amp_bf16 autocast of the forward passes",
    "num_workers": "data loader workers that mask the captions",
    "device": "default: cuda if available, else cpu",
    "seed": "seeds Φ's initial weights, the data order, the noise and dropout of every step",
    "resume": "continue the run in --output_dir from its last checkpoint (same settings required)",
}
_CHOICES = {"mask": MASKS, "tagger": TAGGERS, "precision": PRECISIONS}


def build_parser() -> argparse.ArgumentParser:
    """One option per :class:`PhiTrainingConfig` field, with its default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = PhiTrainingConfig()
    for item in dataclasses.fields(PhiTrainingConfig):
        default = getattr(defaults, item.name)
        flag, help_text = f"--{item.name}", _HELP[item.name]
        if item.name == "captions":
            parser.add_argument(flag, nargs="+", required=True, metavar="FILE", help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, choices=_CHOICES.get(item.name), help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    utils.setup_logging(None)
    config = PhiTrainingConfig(**vars(args))
    from cvsi.phi_training import train_phi  # after parsing: --help needs no torch

    try:
        result = train_phi(config)
    except ValueError as exc:  # bad settings or files: one line, no traceback
        sys.exit(f"train_phi.py: error: {exc}")
    print(f"Φ after step {result['step']}: {result['latest']}" + (f" (best: {result['best']})" if result["best"] else ""))
    return result


if __name__ == "__main__":
    utils.run_cli(main)
