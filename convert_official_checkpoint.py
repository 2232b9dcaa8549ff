"""Convert a checkpoint of the official SSN code (starxing-yuu/SSN) into a checkpoint of this project.

    python convert_official_checkpoint.py saved_models/combiner_arithmetic.pt \\
        --clip_config clip-vit-base-patch32/config.json --output runs/official_cirr/checkpoints/best.pt \\
        --dataset cirr [--data_root /data/cirr_dataset]

The output is read by validate.py, cirr_test_submission.py and retrieve.py like any training checkpoint
(model/official.py describes the conversion).  Without --clip_config the architecture is derived from the
weights, which works for OpenAI's ViT-B/32, ViT-B/16 and ViT-L/14 (the official default is ViT-B/32).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("official", help="the official checkpoint ({'epoch': e, 'Model': state_dict})")
    parser.add_argument("--clip_config", default=None,
                        help="the Hugging Face CLIP config.json (or its directory) the model was trained from; "
                             "None derives it from the weights (OpenAI ViT-B/32, B/16, L/14 only)")
    parser.add_argument("--output", required=True, help="the project checkpoint to write")
    parser.add_argument("--dataset", required=True, choices=("cirr", "fashioniq"), help="the dataset it was trained on")
    parser.add_argument("--data_root", default=None, help="recorded as the dataset location for validate.py")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert; returns the exit status (bad input: one line on stderr, status 1)."""
    args = build_parser().parse_args(argv)
    # Imported after parsing: --help needs neither torch nor open_clip.
    from checkpoint import load_weights_only, save_checkpoint
    from model.hf_clip import HFCLIPError, read_hf_config
    from model.official import (
        OfficialCheckpointError, converted_checkpoint, official_state_dict, ssn_model_from_official,
    )

    output = Path(args.output)
    try:
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"{output}: exists (--overwrite replaces it)")
        hf_config = read_hf_config(args.clip_config) if args.clip_config else None
        official = load_weights_only(Path(args.official), OfficialCheckpointError, "official checkpoint")
        state, epoch = official_state_dict(official, args.official)
        model = ssn_model_from_official(state, hf_config, source=args.official,
                                        config_source=args.clip_config or "config.json")
        record = {"pretrained": None, "transform": "clip", "target_ratio": 1.25, "data_root": args.data_root,
                  "converted_from": str(args.official), "clip_config": args.clip_config, "official_epoch": epoch}
        output.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(output, converted_checkpoint(model, args.dataset, epoch, record))
    except (OfficialCheckpointError, HFCLIPError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.official} (epoch {epoch}) -> {output}: backbone {model.backbone.model_name} "
          f"({'QuickGELU' if model.backbone.quick_gelu else 'GELU'}), dataset {args.dataset}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
