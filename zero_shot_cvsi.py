"""CVSI zero-shot composed image retrieval (Ye et al.) on CIRR, FashionIQ or CIRCO.

    python zero_shot_cvsi.py --dataset circo --split val --data_root /data/CIRCO \\
        --clip_model_name ViT-L-14 --pretrained openai --phi_checkpoint lincir_large.pt \\
        --captioner Salesforce/blip2-opt-6.7b-coco --llm_model gpt-3.5-turbo

Val splits print a metric table (CIRCO mAP@k, R@k and per-aspect mAP@10; CIRR R@k / Rs@k; FashionIQ
R@10 / R@50); test splits write the benchmark submission files. The options: cvsi/params.py; the
method: cvsi/pipeline.py; docs/cvsi.md.
"""
from __future__ import annotations

from typing import Any, Sequence

import utils
from cvsi.params import build_parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    utils.setup_logging(None)
    # Imported after parsing: --help needs no torch, open_clip or transformers.
    from cvsi.pipeline import results_text, run
    from retrieval import use_engine

    with use_engine(args.retrieval_engine):
        result = run(args)
    if "metrics" in result:
        print(results_text(result["metrics"]))
    return result


if __name__ == "__main__":
    utils.run_cli(main)
