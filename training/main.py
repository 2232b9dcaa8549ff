"""A training run as named stages: prepare, model, data, resume, fit, report.

:func:`run` chains them; ``train_cirr.py`` / ``train_fiq.py`` parse their command line with
:func:`training.params.parse_train_args` and call :func:`run`.

Fault tolerance (docs/fault_tolerance.md): ``checkpoints/last.pt`` is written atomically at every epoch
end (before the epoch's validation) and every ``--checkpoint_every`` steps; ``--resume`` continues from
any of them exactly.  SIGTERM / SIGINT write ``last.pt`` at the next step boundary and return early (no
summary.json).  Checkpoints are never written during a streak of non-finite steps, so after a
:class:`training.resilience.NonFiniteLossError` ``last.pt`` holds the last good state.  Every split is
checked before the first step; the output folder is claimed before anything is written to it
(:mod:`training.run_dir`); once the run log is open, the error that ends a run is recorded in it.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import utils
from checkpoint import CheckpointSaver
from data_utils import DataError, DataReport, SkipBadSamples, build_transform, check_image_headers, make_loader
from dataset_registry import DatasetSpec, RetrievalTask, get_dataset, resolve_dataset_root
from distributed import DistributedEnv, any_rank, barrier, cleanup_distributed, init_distributed, wrap_model
from inference import run_directory
from metrics import metric_meanings, metrics_table, metrics_table_with_legend
from model import SSNModel, parse_pretrained
from model.loss import create_loss
from precision import effective_precision, grad_scaler
from training.model_setup import check_official_dims, compile_for_training, initial_model
from training.params import check_train_args
from training.resilience import (
    BadSampleLog, NoOptimizerStepError, PreemptionHandler, enable_determinism, log_fatal, release_frames,
)
from training.resume import resume
from training.run_dir import claim_output_dir, count_lines, output_directory, truncate_metrics_log
from training.sampler import ResumableSampler, loader_seed, train_worker_init
from training.state import TrainState, checkpoint_state
from training.train import train_one_epoch
from training.validation import grid_for_tracker, validate_model, validation_due
from tracking import Tracker, create_tracker
from viz.report import write_run_report_safely


@dataclass
class RunContext:
    """What the prepare stage settles for the whole run: flags, processes, precisions, output folder."""

    args: argparse.Namespace
    spec: DatasetSpec  # the dataset's registry entry
    env: DistributedEnv
    precision: str  # training precision that runs on the device (after effective_precision)
    eval_precision: str
    output_dir: Path
    logger: logging.Logger
    run_id: str | None  # the run's id (training.run_dir); None on ranks other than 0
    resume_checkpoint: dict[str, Any] | None = None  # the --resume checkpoint, read once; dropped once loaded

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


@dataclass
class TrainData:
    """The training triplets in resumable order, and the validation tasks."""

    train_set: Dataset
    val_tasks: list[RetrievalTask]
    transform: Callable[[Any], torch.Tensor]  # images -> model input, in training and validation
    sampler: ResumableSampler
    loader: DataLoader
    # Seeds the DataLoader workers only (the order comes from the sampler); reseeded every epoch.
    loader_generator: torch.Generator


@dataclass
class Optimization:
    """The model and what updates it, at the run's current progress."""

    model: SSNModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler
    state: TrainState


SKIP_HINT = "(--skip_bad_samples skips unreadable training samples, listing them in bad_samples.json)"


# ---------------------------------------------------------------------------------------------- stages
def prepare(args: argparse.Namespace, dataset: str) -> RunContext:
    """Processes and device, flag checks, the checkpoint to resume from, the output folder (claimed, then
    logged to), determinism and seeds."""
    spec = get_dataset(dataset)
    env = init_distributed(args.device)
    precision = effective_precision(args.precision, env.device)
    eval_precision = effective_precision(args.eval_precision, env.device)
    check_train_args(args, env.is_distributed)
    output_dir = output_directory(args, spec.name)
    # Read (and its checksum verified) before the folder is claimed: whose run it continues decides whether
    # the folder may be used.
    resume_checkpoint = CheckpointSaver.load_resumable(args.resume, map_location="cpu") if args.resume else None
    # Rank 0 owns every output (log file, metrics, checkpoints, validation); other ranks only train.
    run_id, notes = None, []
    if env.is_master:
        run_id, notes = claim_output_dir(output_dir, args, resume_checkpoint.get("run_id") if resume_checkpoint else None)
    (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    logger = utils.setup_logging(output_dir if env.is_master else None)
    for note in notes:
        logger.warning(note)
    if env.device.type == "cpu" and utils.tune_cpu_allocator():
        logger.info("glibc allocator tuned for CPU training (utils.tune_cpu_allocator)")
    if args.deterministic:
        enable_determinism(env.device)
    utils.set_seed(args.seed)
    return RunContext(args, spec, env, precision, eval_precision, output_dir, logger, run_id, resume_checkpoint)


def build_model(run: RunContext) -> SSNModel:
    """The model the run starts from (see :func:`training.model_setup.initial_model`), set up for speed."""
    args = run.args
    pretrained = parse_pretrained(args.pretrained)
    model = initial_model(args, pretrained, run.device)
    check_official_dims(args, model)
    if args.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    if args.torch_compile:
        compile_for_training(model, run.device)
    if pretrained is None:
        run.logger.info("backbone %s starts from random weights (--pretrained none)", args.clip_model_name)
    return model


def read_splits(run: RunContext, root: Path, transform: Callable[[Any], torch.Tensor]) -> tuple[Dataset, list[RetrievalTask]]:
    """The training triplets and the validation tasks (of the categories trained on), every split checked
    before training: each dataset's own checks (files exist, annotations well-formed and consistent), at
    least one batch of triplets, queries and a gallery in every validation task, and every image file's
    header (training images only without ``--skip_bad_samples``, which skips them when read).

    Raises:
        DataError: every problem of every split, in one report (a broken dataset fails here, not in epoch 37).
    """
    args, spec = run.args, run.spec
    categories = getattr(args, "dress_types", None)  # the flag exists for datasets with categories
    report = DataReport(f"{spec.title} under {root}")
    unreadable_train_images: list[str] = []
    train_set = report.read("train", lambda: spec.train_dataset(root, transform, categories))
    val_tasks = report.read(spec.val_split, lambda: spec.tasks(root, spec.val_split, categories)) or []
    if train_set is not None:
        global_batch = args.batch_size * run.env.world_size
        if len(train_set) < global_batch:
            report.add("train", [f"{len(train_set)} training triplets is less than one batch of {global_batch}"])
        if not args.skip_bad_samples and hasattr(train_set, "image_files"):
            unreadable_train_images = check_image_headers(train_set.image_files())
            report.add("train", unreadable_train_images)
    for task in val_tasks:
        where = f"{task.name} {task.split}"
        if not task.queries:
            report.add(task.split, [f"{where}: no queries (its annotation file lists none)"])
        if not task.gallery:
            report.add(task.split, [f"{where}: empty gallery (its image list names no image)"])
        files = {task.image_path(name) for name in task.gallery} | {task.image_path(q.reference) for q in task.queries}
        report.add(task.split, check_image_headers(sorted(files)))
    report.raise_if_any(SKIP_HINT if unreadable_train_images else "")
    return train_set, val_tasks


def load_data(run: RunContext, model: SSNModel) -> TrainData:
    """Training triplets and validation tasks (:func:`read_splits`, every split checked up front),
    preprocessed for ``model``'s image size."""
    args = run.args
    root = resolve_dataset_root(args.data_root, run.spec.name)
    transform = build_transform(args.transform, model.backbone.image_size, args.target_ratio)
    train_set, val_tasks = read_splits(run, root, transform)
    sampler = ResumableSampler(len(train_set), args.batch_size, args.seed, num_replicas=run.env.world_size,
                               rank=run.env.rank)
    loader_generator = torch.Generator()
    train_data = SkipBadSamples(train_set) if args.skip_bad_samples else train_set
    loader = make_loader(train_data, args.batch_size, args.num_workers, run.device, drop_last=True,
                         generator=loader_generator, sampler=sampler, worker_init_fn=train_worker_init)
    return TrainData(train_set, val_tasks, transform, sampler, loader, loader_generator)


def start_or_resume(run: RunContext, model: SSNModel, data: TrainData) -> Optimization:
    """Optimiser, schedule and GradScaler, fresh or loaded from ``--resume`` with the run's progress.

    Resuming in the checkpoint's own folder drops the metrics logged after the checkpoint was written.
    """
    args = run.args
    optimizer = model.configure_optimizers(args.lr, args.lr_ratio, args.optimizer, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    scaler = grad_scaler(run.precision, run.device)
    state = TrainState()
    if args.resume:
        checkpoint, run.resume_checkpoint = run.resume_checkpoint, None  # freed once loaded
        state, metrics_log_lines = resume(checkpoint, args.resume, model, optimizer, scheduler, scaler, data.sampler, args)
        del checkpoint
        if metrics_log_lines is not None and run_directory(args.resume).resolve() == run.output_dir.resolve():
            dropped = truncate_metrics_log(run.metrics_path, metrics_log_lines)
            if dropped:
                run.logger.info("dropped %d metrics records logged after the checkpoint was written", dropped)
        run.logger.info("resumed from %s at epoch %d, step %d of %d (global step %d)", args.resume, state.epoch + 1,
                        state.step_in_epoch, data.sampler.steps_per_epoch, state.global_step)
    return Optimization(model, optimizer, scheduler, scaler, state)


def open_tracker(run: RunContext) -> Tracker:
    """Rank 0: the experiment tracker(s) the flags ask for (tracking.py), given the run's parameters; other
    ranks: none."""
    if not run.env.is_master:
        return Tracker()
    args = run.args
    tracker = create_tracker(run.output_dir, args.tensorboard, args.comet_offline, args.api_key, args.workspace,
                             args.project_name)
    tracker.log_params(utils.public_args(vars(args)))
    return tracker


def open_metrics_log(run: RunContext, state: TrainState, tracker: Tracker) -> utils.MetricsLogger | None:
    """Rank 0: the metrics logger, passing every record on to ``tracker``; other ranks: None.

    ``args.json`` was written when the folder was claimed; a resumed run keeps it and records its own
    command line beside it.
    """
    if not run.env.is_master:
        return None
    args = run.args
    if args.resume:
        utils.atomic_write_json(run.output_dir / f"args_resume_step{state.global_step}.json",
                                {"run_id": run.run_id, **utils.public_args(vars(args))})
    return utils.MetricsLogger(run.output_dir, tracker=tracker)


class Trainer:
    """The fit stage: epochs of training, validation on rank 0 and checkpoints, until done or pre-empted."""

    def __init__(self, run: RunContext, data: TrainData, opt: Optimization) -> None:
        self.run, self.data, self.opt = run, data, opt
        args, env = run.args, run.env
        self.loss_fn = create_loss(args.loss, kl_weight=args.kl_weight)
        # Rank 0 writes every checkpoint; never during a streak of non-finite steps.
        self.checkpoints = CheckpointSaver(
            run.checkpoint_dir, self.checkpoint_state, best_criterion=args.best_metric,
            criterion_files=run.spec.criterion_files, save_best=args.save_best, save_every_validation=args.save_training,
            checkpoint_every=args.checkpoint_every, enabled=env.is_master, veto=self.nonfinite_streak,
        )
        bad_samples_file = "bad_samples.json" if env.is_master else f"bad_samples_rank{env.rank}.json"
        self.bad_samples = (BadSampleLog(run.output_dir / bad_samples_file, opt.state.bad_samples, len(data.train_set),
                                         run.args.max_bad_sample_fraction)
                            if run.args.skip_bad_samples else None)
        self.train_model: nn.Module = wrap_model(opt.model, env)  # DDP broadcasts rank 0's weights to every rank here
        self.tracker = open_tracker(run)  # closed by run(), after the report
        self.metrics_logger = open_metrics_log(run, opt.state, self.tracker)
        self.preemption = PreemptionHandler()
        run.logger.info(
            "training %s on %s (%d triplets, %d steps/epoch of %d x %d triplets) on %s, precision %s (validation %s); "
            "outputs in %s", run.args.clip_model_name, run.spec.name, len(data.train_set), data.sampler.steps_per_epoch,
            env.world_size, run.args.batch_size, run.device, run.precision, run.eval_precision, run.output_dir)

    def fit(self) -> None:
        """Train the remaining epochs; returns early (``last.pt`` written) when a signal asks to stop.

        A validation that a stop interrupted (``state.validation_pending`` in the checkpoint) runs first.
        """
        run, state = self.run, self.opt.state
        with self.preemption:
            try:
                if state.validation_pending:
                    run.logger.info("running the validation of epoch %d, which the previous run did not finish", state.epoch)
                    self.validate_and_checkpoint()
                while state.epoch < run.args.num_epochs and not self.preemption.requested:
                    start = time.time()
                    try:
                        if not self.train_epoch():
                            break
                    except DataError as error:
                        if self.bad_samples is not None:
                            raise
                        raise DataError(f"{error}\n{SKIP_HINT}", error.problems) from error
                    self.end_epoch(start)
            finally:
                self.close()

    def train_epoch(self) -> bool:
        """Train the current epoch from where it stands; False when a signal stopped it inside."""
        args, model, state, sampler = self.run.args, self.opt.model, self.opt.state, self.data.sampler
        epoch = state.epoch
        if 0 <= args.freeze_vision_epoch <= epoch and model.vision_tower_trainable:
            model.freeze_vision_tower()
            self.train_model = wrap_model(model, self.run.env)  # DDP must see which parameters still train
        sampler.set_epoch(epoch, start_step=state.step_in_epoch)
        self.data.loader_generator.manual_seed(loader_seed(args.seed, epoch, state.step_in_epoch))
        train_one_epoch(
            self.train_model, self.data.loader, self.opt.optimizer, self.opt.scaler, state, self.run.device,
            self.run.precision, self.loss_fn, args.grad_clip or None, args.max_nonfinite_steps, self.metrics_logger,
            args.log_every, args.num_epochs, self.bad_samples, self.on_step_end,
        )
        return state.step_in_epoch == sampler.steps_per_epoch

    def on_step_end(self) -> bool:
        """After every step: checkpoint and stop on a signal to any rank, else checkpoint every N steps."""
        if any_rank(self.preemption.requested, self.run.env):  # every rank stops at the same step
            self.checkpoints.save_last()
            return True
        self.checkpoints.save_step(self.opt.state.global_step)
        return False

    def end_epoch(self, start: float) -> None:
        """Close a completed epoch: schedule step, logs, ``last.pt``, then validation when due (and ``last.pt``
        again, with its result), so that a failing validation never costs the epoch's training."""
        run, opt, state = self.run, self.opt, self.opt.state
        opt.scheduler.step()
        epoch_loss = state.end_epoch()
        if self.metrics_logger is not None:
            self.metrics_logger.log({"epoch_loss": epoch_loss, "epoch_time_s": time.time() - start,
                                     "lr": opt.scheduler.get_last_lr()[0]}, step=state.global_step, epoch=state.epoch,
                                    prefix="train/")
        run.logger.info("epoch %d/%d: loss %.4f (%.1f s)", state.epoch, run.args.num_epochs, epoch_loss, time.time() - start)
        state.validation_pending = validation_due(state.epoch - 1, run.args.validation_frequency, run.args.num_epochs)
        self.checkpoints.save_last()
        if state.validation_pending:
            self.validate_and_checkpoint()
        barrier(run.env)  # the other ranks wait for rank 0's validation and checkpoints

    def validate_and_checkpoint(self) -> None:
        """The pending validation (rank 0), then ``last.pt`` with its result."""
        if self.run.env.is_master:
            try:
                self.validate()
            except DataError as error:
                raise DataError(f"{error}\n(validation after epoch {self.opt.state.epoch} failed; "
                                f"{self.checkpoints.last_path} holds the epoch's training: fix the data, then --resume "
                                f"{self.checkpoints.last_path} runs this validation and continues)", error.problems) from error
        self.opt.state.validation_pending = False
        self.checkpoints.save_last()

    def validate(self) -> None:
        """Rank 0: validation metrics logged and recorded; best (or per-validation) checkpoints written.

        Before the run's first optimiser step no best checkpoint is recorded: such a model trained nothing.
        """
        run, args, state = self.run, self.run.args, self.opt.state
        grids = (grid_for_tracker(self.opt.model, run.spec, self.data.transform, run.output_dir, self.tracker,
                                  state.global_step) if self.tracker else None)  # pictures only for a tracker
        metrics = validate_model(self.opt.model, self.data.val_tasks, run.spec, self.data.transform, run.device,
                                 run.eval_precision, args.eval_batch_size, args.num_workers, on_features=grids)
        self.metrics_logger.log(metrics, step=state.global_step, epoch=state.epoch, prefix="val/")
        run.logger.info("validation after epoch %d:\n%s", state.epoch, metrics_table(metrics))
        if state.optimizer_steps == 0:
            run.logger.warning("no optimiser step so far: validation after epoch %d is not recorded as a best", state.epoch)
            return
        improved = state.record_validation(metrics, run.spec)
        self.checkpoints.save_validation(state.epoch, improved)

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint of the run as it stands (:func:`training.state.checkpoint_state`)."""
        run, opt = self.run, self.opt
        return checkpoint_state(opt.model, opt.optimizer, opt.scheduler, opt.scaler, opt.state, run.args, run.spec.name,
                                self.data.sampler, count_lines(run.metrics_path), run.run_id)

    def nonfinite_streak(self) -> str | None:
        """Why no checkpoint may be written now (a good one is never replaced by a non-finite state), or None."""
        steps = self.opt.state.nonfinite_steps
        return f"during {steps} non-finite steps in a row" if steps else None

    def close(self) -> None:
        """Flush the metrics log and the list of skipped samples (also after an error)."""
        if self.metrics_logger is not None:
            self.metrics_logger.close()
        if self.bad_samples is not None:
            self.bad_samples.write()
            self.run.logger.info("%d training sample(s) skipped as unreadable; listed in %s",
                                 len(self.bad_samples.records), self.bad_samples.path)


def report_stop(run: RunContext, trainer: Trainer) -> None:
    """A run a signal stopped: where it stands and how to continue it."""
    received = trainer.preemption.received
    state = trainer.opt.state
    run.logger.warning("stopped by %s at epoch %d, step %d of %d; continue with --resume %s",
                       received.name if received else "a signal to another rank", state.epoch + 1, state.step_in_epoch,
                       trainer.data.sampler.steps_per_epoch, run.checkpoint_dir / "last.pt")


def report(run: RunContext, state: TrainState, tracker: Tracker) -> None:
    """Rank 0 after the last epoch: ``summary.json``, then curves and ``report.md`` (the curves also to ``tracker``).

    A plotting failure is logged as a warning: the checkpoints are already saved.
    """
    args = run.args
    # Every validation records every criterion; only a legacy checkpoint resumed after its last epoch lacks one.
    best = state.best_by.get(args.best_metric, {"value": None, "epoch": None, "metrics": None})
    summary = {
        "best_metric_name": args.best_metric, "best_metric": best["value"], "best_epoch": best["epoch"],
        "best_metrics": best["metrics"],
        "legend": metric_meanings([*(best["metrics"] or {}), *state.best_by]),  # what each metric name means
        "best_by": {criterion: {"value": b["value"], "epoch": b["epoch"]} for criterion, b in state.best_by.items()},
        "epochs": state.epoch, "steps": state.global_step,
        "precision": run.precision, "eval_precision": run.eval_precision,  # what ran, after effective_precision
        "amp_overflow_steps": state.amp_overflow_steps,
    }
    utils.atomic_write_json(run.output_dir / "summary.json", summary)
    write_run_report_safely(run.output_dir, device=str(run.device))
    if tracker and (run.output_dir / "curves.png").is_file():
        tracker.log_image(run.output_dir / "curves.png", "training curves", state.global_step)
    if best["metrics"]:
        run.logger.info("best validation (epoch %s):\n%s", best["epoch"], metrics_table_with_legend(best["metrics"]))
    value = "-" if best["value"] is None else f"{best['value']:.2f}"
    meaning = summary["legend"].get(args.best_metric, "")
    run.logger.info("done: best %s %s (epoch %s; %s = %s); checkpoints in %s", args.best_metric, value, best["epoch"],
                    args.best_metric, meaning, run.checkpoint_dir)


# ---------------------------------------------------------------------------------------------- entry points
def run(args: argparse.Namespace, dataset: str) -> Path:
    """Train SSN on ``dataset`` (a registry name with training triplets: 'cirr', 'fashioniq') with periodic
    validation and checkpoints; returns the output folder.

    The error that ends the run is recorded in its ``log.txt`` too (once the folder is claimed and the
    log open); a run that took no optimiser step ends in :class:`training.resilience.NoOptimizerStepError`
    instead of a summary.
    """
    context = prepare(args, dataset)
    trainer = None
    try:
        model = build_model(context)
        data = load_data(context, model)
        trainer = Trainer(context, data, start_or_resume(context, model, data))
        trainer.fit()
        cleanup_distributed()
        state = trainer.opt.state
        if state.epoch < args.num_epochs:
            report_stop(context, trainer)
        elif state.optimizer_steps == 0:
            raise NoOptimizerStepError(
                f"no optimiser step in {state.global_step} batches (every batch was skipped: unreadable samples or "
                f"non-finite losses, see {context.output_dir / 'log.txt'}): the run trained nothing; no summary.json")
        elif context.env.is_master:
            report(context, state, trainer.tracker)
    except BaseException as error:
        log_fatal(context.logger, error)
        release_frames(error)
        raise
    finally:
        if trainer is not None:
            trainer.tracker.close()  # after the report, which logs the curves (comet's offline archive is written now)
    return context.output_dir

