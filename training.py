"""One training loop and one evaluation for CIRR and FashionIQ (open_clip ``train.py`` style).

``train_cirr.py`` and ``train_fiq.py`` are argparse front ends over :func:`run_training`;
``validate.py`` and ``cirr_test_submission.py`` reuse :func:`encode_gallery` / :func:`encode_queries`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import utils
from data_utils import CIRRDataset, FashionIQDataset, build_transform, collate_batch
from distributed import DistributedEnv, init_distributed
from model import SSNModel, build_ssn_model, check_model_config, ssn_loss_terms, ssn_model_from_checkpoint
from precision import PRECISIONS, autocast, effective_precision, grad_scaler

FIQ_CATEGORIES = ("dress", "shirt", "toptee")
_logger = logging.getLogger("cir")


# ---------------------------------------------------------------------------------------------- data
def resolve_dataset_root(data_root: str | os.PathLike, dataset: str) -> Path:
    """Accept the dataset folder itself or its parent (``.../cirr_dataset`` or ``...``)."""
    root = Path(data_root).expanduser()
    marker, folder = {"cirr": ("cirr", "cirr_dataset"), "fashioniq": ("captions", "fashion-iq")}[dataset]
    for candidate in (root, root / folder):
        if (candidate / marker).is_dir():
            return candidate
    raise FileNotFoundError(
        f"--data_root {root}: no {dataset} dataset there (expected {root}/{marker}/ or {root}/{folder}/{marker}/)"
    )


@dataclass
class RetrievalSet:
    """Queries and the gallery they are ranked against (one per FashionIQ category)."""

    name: str
    queries: Dataset
    gallery: Dataset


def retrieval_sets(
    dataset: str, root: Path, split: str, transform: Any, dress_types: Sequence[str] = FIQ_CATEGORIES
) -> list[RetrievalSet]:
    if dataset == "cirr":
        return [RetrievalSet("cirr", CIRRDataset(root, split, "relative", transform), CIRRDataset(root, split, "classic", transform))]
    return [
        RetrievalSet(
            category,
            FashionIQDataset(root, split, [category], "relative", transform),
            FashionIQDataset(root, split, [category], "classic", transform),
        )
        for category in dress_types
    ]


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool = False,
    drop_last: bool = False, generator: torch.Generator | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0 and shuffle,
        collate_fn=collate_batch,
        worker_init_fn=utils.seed_worker,
        generator=generator,
    )


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode_gallery(
    model: SSNModel, gallery: Dataset, device: torch.device, precision: str = "fp32", method: str = "ssn",
    batch_size: int = 64, num_workers: int = 0,
) -> tuple[list[str], torch.Tensor]:
    """Names and normalised features [G, D] of every gallery image."""
    model.eval()
    names: list[str] = []
    features = []
    for batch in tqdm(make_loader(gallery, batch_size, num_workers, device), desc="gallery", leave=False):
        with autocast(precision, device):
            features.append(model.encode_gallery(batch["image"].to(device, non_blocking=True), method).float().cpu())
        names.extend(batch["name"])
    return names, torch.cat(features)


@torch.no_grad()
def encode_queries(
    model: SSNModel, queries: Dataset, device: torch.device, precision: str = "fp32", method: str = "ssn",
    batch_size: int = 64, num_workers: int = 0,
) -> tuple[torch.Tensor, dict[str, list]]:
    """Normalised query features [Q, D] and the queries' metadata (names, captions, members, ...)."""
    model.eval()
    features = []
    metadata: dict[str, list] = {}
    for batch in tqdm(make_loader(queries, batch_size, num_workers, device), desc="queries", leave=False):
        token_ids = model.backbone.tokenize(batch["caption"]).to(device)
        with autocast(precision, device):
            features.append(
                model.encode_query(batch["reference_image"].to(device, non_blocking=True), token_ids, method).float().cpu()
            )
        for key, value in batch.items():
            if key != "reference_image":
                metadata.setdefault(key, []).extend(value)
    return torch.cat(features), metadata


def evaluate(
    model: SSNModel, sets: Sequence[RetrievalSet], dataset: str, device: torch.device, precision: str = "fp32",
    method: str = "ssn", batch_size: int = 64, num_workers: int = 0,
) -> dict[str, float]:
    """Validation recalls: CIRR R@k / Rs@k / Avg, or FashionIQ R@10 / R@50 per category and averaged."""
    per_set = {}
    for retrieval_set in sets:
        names, gallery = encode_gallery(model, retrieval_set.gallery, device, precision, method, batch_size, num_workers)
        queries, meta = encode_queries(model, retrieval_set.queries, device, precision, method, batch_size, num_workers)
        if dataset == "cirr":
            per_set[retrieval_set.name] = utils.cirr_metrics(
                queries, gallery, names, meta["reference_name"], meta["target_name"], meta["members"]
            )
        else:
            per_set[retrieval_set.name] = utils.fiq_metrics(queries, gallery, names, meta["target_name"])
    return per_set["cirr"] if dataset == "cirr" else utils.summarize_fiq(per_set)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float = -math.inf
    best_metrics: dict[str, float] | None = None
    nonfinite_steps: int = 0  # consecutive steps with a non-finite loss or gradient


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(
    model: SSNModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    device: torch.device,
    precision: str,
    kl_weight: float,
    grad_clip: float | None,
    max_nonfinite_steps: int,
    metrics_logger: utils.MetricsLogger | None = None,
    log_every: int = 10,
    num_epochs: int | None = None,
) -> float:
    """One pass over the training triplets; returns the mean loss per triplet."""
    model.train()
    total_loss, total_samples = 0.0, 0
    progress = tqdm(loader, desc=f"epoch {state.epoch + 1}/{num_epochs or '?'}", leave=False)
    for batch in progress:
        reference = batch["reference_image"].to(device, non_blocking=True)
        target = batch["target_image"].to(device, non_blocking=True)
        token_ids = model.backbone.tokenize(batch["caption"]).to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            q_pos, q_neg, target_features = model(reference, target, token_ids)
        # The loss in fp32: scale-100 logits and their softmax are where fp16 loses precision.
        terms = ssn_loss_terms(q_pos.float(), q_neg.float(), target_features.float(), kl_weight=kl_weight)
        loss = terms["loss"]
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            grad_norm = None
        finite = bool(torch.isfinite(loss)) and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        if not finite and not scaler.is_enabled():
            # fp32 has no scaler to skip the step: skip it here, and stop if it keeps happening.
            state.nonfinite_steps += 1
            _logger.warning("non-finite loss or gradient at step %d: step skipped", state.global_step)
            if state.nonfinite_steps >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{state.nonfinite_steps} consecutive non-finite steps (last loss {loss.item()}); "
                    "training stopped, the last checkpoint is the last good state"
                )
            state.global_step += 1
            continue
        scaler.step(optimizer)  # with AMP the scaler itself skips steps whose gradients overflowed
        scaler.update()
        state.nonfinite_steps = 0
        state.global_step += 1
        batch_size = reference.shape[0]
        total_loss += loss.item() * batch_size
        total_samples += batch_size
        progress.set_postfix(loss=f"{total_loss / total_samples:.4f}")
        if metrics_logger is not None and state.global_step % log_every == 0:
            metrics_logger.log(
                {"loss": loss.item(), **{k: v.item() for k, v in terms.items() if k != "loss"},
                 "lr": optimizer.param_groups[0]["lr"]},
                step=state.global_step, epoch=state.epoch, prefix="train/",
            )
    return total_loss / max(total_samples, 1)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "numpy": np.random.get_state()[1].tolist(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    model: SSNModel, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    state: TrainState, args: argparse.Namespace, dataset: str,
) -> dict[str, Any]:
    return {
        "format_version": utils.CHECKPOINT_FORMAT_VERSION,
        "dataset": dataset,
        "model_config": model.config(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_metric": state.best_metric,
        "best_metrics": state.best_metrics or {},
        "args": {k: v for k, v in vars(args).items()},
        "rng": _rng_state(),
    }


# ---------------------------------------------------------------------------------------------- arguments
def build_train_parser(dataset: str) -> argparse.ArgumentParser:
    """Flags of train_cirr.py / train_fiq.py; defaults are the official recipe of each dataset."""
    cirr = dataset == "cirr"
    parser = argparse.ArgumentParser(description=f"Train SSN on {'CIRR' if cirr else 'FashionIQ'}")
    data = parser.add_argument_group("data")
    data.add_argument("--data_root", required=True, help="dataset folder (cirr_dataset / fashion-iq) or its parent")
    data.add_argument("--dataset", default="CIRR" if cirr else "FashionIQ", help="kept for the official command line")
    data.add_argument("--transform", choices=("clip", "targetpad"), default="targetpad")
    data.add_argument("--target_ratio", type=float, default=1.25)
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    if not cirr:
        data.add_argument("--dress_types", nargs="+", default=list(FIQ_CATEGORIES), choices=FIQ_CATEGORIES)
    mdl = parser.add_argument_group("model")
    mdl.add_argument("--model", default="ssn", choices=("ssn",))
    mdl.add_argument("--clip_model_name", default="ViT-B-32", help="open_clip model name (e.g. ViT-B-32, ViT-L-14, ViT-Tiny-P8-32)")
    mdl.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or a local checkpoint file; 'none' for random weights")
    mdl.add_argument("--nhead", type=int, default=8, help="attention heads of the fusion layer")
    mdl.add_argument("--projection_dim", type=int, default=None, help="official flag; must equal the backbone's text width if given")
    mdl.add_argument("--hidden_dim", type=int, default=None, help="official flag; must equal the backbone's text width if given")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--num_epochs", type=int, default=50 if cirr else 100)
    opt.add_argument("--batch_size", type=int, default=128 if cirr else 384)
    opt.add_argument("--lr", type=float, default=5e-5 if cirr else 4e-5)
    opt.add_argument("--lr_ratio", type=float, default=0.2, help="backbone lr = lr·ratio (head groups scale from it)")
    opt.add_argument("--lr_step_size", type=int, default=10 if cirr else 5)
    opt.add_argument("--lr_gamma", type=float, default=0.1)
    opt.add_argument("--optimizer", choices=("adam", "adamw"), default="adam" if cirr else "adamw")
    opt.add_argument("--weight_decay", type=float, default=None, help="default: the optimiser's own")
    opt.add_argument("--kl_weight", type=float, default=1.0)
    opt.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm; 0 = off (official)")
    opt.add_argument("--freeze_vision_epoch", type=int, default=-1 if cirr else 1,
                     help="freeze the vision tower from this epoch on (0-based); -1 = never (FashionIQ recipe: 1)")
    opt.add_argument("--max_nonfinite_steps", type=int, default=10, help="stop after this many consecutive non-finite steps")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default=None, help="default: runs/<dataset>_<timestamp>")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    run.add_argument("--precision", choices=PRECISIONS, default="amp", help="AMP on CUDA; CPU always runs fp32")
    run.add_argument("--resume", default=None, help="checkpoint to resume from (e.g. <output_dir>/checkpoints/last.pt)")
    run.add_argument("--validation_frequency", type=int, default=1, help="validate every N epochs")
    run.add_argument("--eval_batch_size", type=int, default=64)
    run.add_argument("--save_training", action="store_true", help="official flag: keep a checkpoint per validation (with --save_best: only the best)")
    run.add_argument("--save_best", action="store_true", help="keep checkpoints/best.pt by the validation metric")
    run.add_argument("--log_every", type=int, default=10, help="log training loss every N steps")
    comet = parser.add_argument_group("comet_ml (optional)")
    comet.add_argument("--api_key", default=None)
    comet.add_argument("--workspace", default=None)
    comet.add_argument("--project_name", default="ssn")
    return parser


def _check_official_dims(args: argparse.Namespace, model: SSNModel) -> None:
    for flag in ("projection_dim", "hidden_dim"):
        value = getattr(args, flag)
        if value is not None and value != model.head.width:
            raise ValueError(
                f"--{flag} {value} does not match {args.clip_model_name}'s text width {model.head.width}; "
                "the head width follows the backbone (omit the flag)"
            )


# ---------------------------------------------------------------------------------------------- main loop
def run_training(args: argparse.Namespace, dataset: str) -> Path:
    """Train SSN with periodic validation and checkpointing; returns the output directory."""
    env: DistributedEnv = init_distributed(args.device)
    device = env.device
    precision = effective_precision(args.precision, device)
    output_dir = Path(args.output_dir or f"runs/{dataset}_{datetime.now():%Y%m%d_%H%M%S}")
    checkpoint_dir = output_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    logger = utils.setup_logging(output_dir)
    utils.set_seed(args.seed)

    root = resolve_dataset_root(args.data_root, dataset)
    pretrained = None if str(args.pretrained).lower() in ("", "none") else args.pretrained
    model = build_ssn_model(args.clip_model_name, pretrained=pretrained, nhead=args.nhead, device=device)
    _check_official_dims(args, model)
    if pretrained is None:
        logger.info("backbone %s starts from random weights (--pretrained none)", args.clip_model_name)
    transform = build_transform(args.transform, model.backbone.image_size, args.target_ratio)
    # Datasets check every file they reference up front: a broken dataset fails here, not in epoch 37.
    if dataset == "cirr":
        train_set: Dataset = CIRRDataset(root, "train", "relative", transform)
    else:
        train_set = FashionIQDataset(root, "train", args.dress_types, "relative", transform)
    val_sets = retrieval_sets(dataset, root, "val", transform, getattr(args, "dress_types", FIQ_CATEGORIES))
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = make_loader(train_set, args.batch_size, args.num_workers, device, shuffle=True, drop_last=True, generator=generator)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training triplets is less than one batch of {args.batch_size}")

    optimizer = model.configure_optimizers(args.lr, args.lr_ratio, args.optimizer, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    scaler = grad_scaler(precision, device)
    state = TrainState()

    if args.resume:
        checkpoint = utils.load_checkpoint(args.resume, map_location="cpu")
        check_model_config(checkpoint.get("model_config", {}), model.config(), args.resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState(checkpoint["epoch"], checkpoint["global_step"], checkpoint["best_metric"], checkpoint["best_metrics"] or None)
        _restore_rng_state(checkpoint["rng"])
        generator.manual_seed(args.seed + state.epoch)
        logger.info("resumed from %s at epoch %d (step %d)", args.resume, state.epoch, state.global_step)

    utils.atomic_write_json(output_dir / "args.json", vars(args))
    metrics_logger = utils.MetricsLogger(
        output_dir, comet_api_key=args.api_key, comet_workspace=args.workspace,
        comet_project=args.project_name, run_args=vars(args),
    )
    logger.info("training %s on %s (%d triplets, %d steps/epoch) on %s, precision %s; outputs in %s",
                args.clip_model_name, dataset, len(train_set), len(train_loader), device, precision, output_dir)

    try:
        while state.epoch < args.num_epochs:
            epoch = state.epoch
            if 0 <= args.freeze_vision_epoch <= epoch:
                model.freeze_vision_tower()
            generator.manual_seed(args.seed + epoch)  # the shuffle of an epoch does not depend on resumes
            start = time.time()
            epoch_loss = train_one_epoch(
                model, train_loader, optimizer, scaler, state, device, precision, args.kl_weight,
                args.grad_clip or None, args.max_nonfinite_steps, metrics_logger, args.log_every, args.num_epochs,
            )
            scheduler.step()
            state.epoch += 1
            metrics_logger.log({"epoch_loss": epoch_loss, "epoch_time_s": time.time() - start,
                                "lr": scheduler.get_last_lr()[0]}, step=state.global_step, epoch=state.epoch, prefix="train/")
            logger.info("epoch %d/%d: loss %.4f (%.1f s)", state.epoch, args.num_epochs, epoch_loss, time.time() - start)

            if state.epoch % args.validation_frequency == 0 or state.epoch == args.num_epochs:
                metrics = evaluate(model, val_sets, dataset, device, precision, "ssn", args.eval_batch_size, args.num_workers)
                metrics_logger.log(metrics, step=state.global_step, epoch=state.epoch, prefix="val/")
                logger.info("validation after epoch %d:\n%s", state.epoch, utils.metrics_table(metrics))
                score = utils.best_metric(metrics, dataset)
                improved = score > state.best_metric
                if improved:
                    state.best_metric, state.best_metrics = score, metrics
                ckpt = checkpoint_state(model, optimizer, scheduler, scaler, state, args, dataset)
                if args.save_best and improved:
                    utils.save_checkpoint(checkpoint_dir / "best.pt", ckpt)
                elif args.save_training and not args.save_best:
                    utils.save_checkpoint(checkpoint_dir / f"epoch_{state.epoch}.pt", ckpt)
            utils.save_checkpoint(checkpoint_dir / "last.pt", checkpoint_state(model, optimizer, scheduler, scaler, state, args, dataset))
    finally:
        metrics_logger.close()

    summary = {"best_metric": state.best_metric, "best_metrics": state.best_metrics, "epochs": state.epoch,
               "steps": state.global_step}
    utils.atomic_write_json(output_dir / "summary.json", summary)
    logger.info("done: best %s %.2f; checkpoints in %s", "mean recall", state.best_metric, checkpoint_dir)
    return output_dir


def main_for(dataset: str, argv: Sequence[str] | None) -> Path:
    args = build_train_parser(dataset).parse_args(argv)
    return run_training(args, dataset)



# ---------------------------------------------------------------------------------------------- inference
@dataclass
class TrainedModel:
    model: SSNModel
    dataset: str  # 'cirr' or 'fashioniq'
    train_args: dict[str, Any]
    transform: Any
    checkpoint: dict[str, Any]


def run_directory(checkpoint_path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/x.pt`` -> ``<run>``)."""
    checkpoint = Path(checkpoint_path)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_trained_model(checkpoint_path: str | os.PathLike, device: torch.device) -> TrainedModel:
    """Rebuild the model, its preprocessing and dataset from a training checkpoint alone."""
    checkpoint = utils.load_checkpoint(checkpoint_path, map_location="cpu")
    model = ssn_model_from_checkpoint(checkpoint, device=device, source=str(checkpoint_path)).eval()
    train_args = checkpoint.get("args", {})
    transform = build_transform(train_args.get("transform", "clip"), model.backbone.image_size, train_args.get("target_ratio", 1.25))
    return TrainedModel(model, checkpoint.get("dataset", "cirr"), train_args, transform, checkpoint)
