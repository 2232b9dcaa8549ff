"""The whole SSN job on the embedded default, on CPU in a few minutes.

1. writes a synthetic CIRR dataset (coloured-shape scenes, real CIRR file layout);
2. trains SSN on the tiny shipped open_clip config (random weights), as train_cirr.py does;
3. validates the best checkpoint as validate.py does, beside image-only, text-only and image+text-sum
   retrieval on the same backbone, and draws retrieval examples;
4. writes the CIRR test1 submission files as cirr_test_submission.py does.

    python demo.py --output_dir demo_output

Each step logs when it starts; long loops log a progress line every 30 s (a bar on a terminal).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import utils

STEPS = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output",
                        help="folder for the dataset (data/) and the run (run/); a previous demo there is replaced")
    parser.add_argument("--seed", type=int, default=0, help="seeds the synthetic data and the training")
    parser.add_argument("--clip_model_name", default="ViT-Tiny-P8-32", help="open_clip model, random weights")
    parser.add_argument("--num_epochs", type=int, default=8, help="training epochs")
    parser.add_argument("--num_workers", type=int, default=2, help="data loader workers")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = build_parser().parse_args(argv)
    start = time.time()
    output_dir = Path(args.output_dir)
    logger = utils.setup_logging(None)
    # Imported after parsing: --help needs neither torch nor open_clip.
    from inference import new_validation_dir, validate_checkpoint, write_test_outputs
    from metrics import metrics_table_with_legend
    from synthetic import make_synthetic_cirr
    from training.main import run
    from training.params import parse_train_args

    logger.info("[1/%d] writing a synthetic CIRR dataset to %s", STEPS, output_dir / "data")
    data_root = make_synthetic_cirr(output_dir / "data", seed=args.seed)
    logger.info("synthetic CIRR dataset written to %s", data_root)

    # A tiny randomly initialised backbone needs a larger learning rate than the fine-tuning recipe
    # (lr 5e-5 for pretrained CLIP); the parameter groups and their ratios are the official ones.
    logger.info("[2/%d] training SSN for %d epochs (the longest step; each epoch logs its loss and time)",
                STEPS, args.num_epochs)
    run_dir = run(parse_train_args("cirr", [
        "--data_root", str(data_root), "--clip_model_name", args.clip_model_name, "--pretrained", "none",
        "--num_epochs", str(args.num_epochs), "--batch_size", "64", "--lr", "1e-3", "--lr_ratio", "0.2",
        "--lr_step_size", "6", "--optimizer", "adamw", "--grad_clip", "1.0", "--transform", "clip",
        "--num_workers", str(args.num_workers), "--seed", str(args.seed), "--save_best",
        "--output_dir", str(output_dir / "run"), "--overwrite",  # running the demo again replaces its run
    ]), "cirr")
    checkpoint = run_dir / "checkpoints" / "best.pt"
    utils.setup_logging(None)  # the run's log.txt ends with its training
    logger.info("[3/%d] validating %s with the image-only, text-only and sum baselines", STEPS, checkpoint)
    validation = new_validation_dir(checkpoint)
    results = validate_checkpoint(checkpoint, baselines=True, visualize=6, output=str(validation / "validation.json"))
    logger.info("[4/%d] writing the CIRR test1 submission", STEPS)
    recall_path, subset_path = write_test_outputs(checkpoint, "demo", dataset="cirr")

    ssn_avg = results["ssn"]["Avg"]
    best_baseline = max(results[m]["Avg"] for m in results if m != "ssn")
    print("\nCIRR-format synthetic val (300 queries), recalls in %:")
    print(metrics_table_with_legend(results))
    print(f"\nSSN Avg {ssn_avg:.2f} vs best baseline {best_baseline:.2f} "
          f"({'SSN ahead' if ssn_avg > best_baseline else 'SSN NOT ahead'}); total time {time.time() - start:.0f} s")
    print(f"""
Where everything went:
  dataset             {data_root}
  run (args, log)     {run_dir}/args.json, {run_dir}/log.txt
  metrics log         {run_dir}/metrics.jsonl
  checkpoints         {run_dir}/checkpoints/ (best.pt, last.pt)
  curves and report   {run_dir}/curves.png, {run_dir}/report.md
  validation          {validation}/validation.json, report.md
  retrieval examples  {validation}/validation_cirr_grid.png (and .html)
  test1 submission    {recall_path}
                      {subset_path}""")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
