"""Fixtures shared by several test files, and the ``slow`` marker (``-m "not slow"`` leaves those tests out)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest


def _reset_project_loggers() -> None:
    logger = logging.getLogger("cir")
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    logger.propagate, logger.level = True, logging.NOTSET
    # A library that calls logging.config.dictConfig disables every logger that exists at that moment.
    for name, child in logging.root.manager.loggerDict.items():
        if name.startswith("cir.") and isinstance(child, logging.Logger):
            child.disabled = False


@pytest.fixture(autouse=True)
def _plain_project_loggers():
    """Each test starts with the ``cir`` loggers as a fresh process has them: a script's
    ``utils.setup_logging`` (its own handlers, no propagation), run by an earlier test or a shared
    fixture, would otherwise hide this test's records from ``caplog``."""
    _reset_project_loggers()
    yield
    _reset_project_loggers()


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # pytest-xdist workers share the cores, and torch's default of one thread per core in each worker
        # oversubscribes them (2 cores, `-m "not slow" -n 2`: 140 s with the default, 88 s with 1 thread each).
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses tests start
        import torch

        torch.set_num_threads(threads)
    config.addinivalue_line("markers", "slow: takes more than ~10 s on 2 CPU cores (end-to-end trainings, torchrun, "
                                       "SIGKILL, resume, a real browser); `pytest -m \"not slow\"` leaves them out")


# The tiny training recipe the shared run uses; tests that start their own short trainings reuse it.
TINY_TRAIN_ARGS = ["--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none", "--transform", "clip",
                   "--num_workers", "0", "--lr", "1e-3", "--optimizer", "adamw", "--grad_clip", "1.0", "--device", "cpu"]
TINY_RUN_EPOCHS, TINY_RUN_BATCH, TINY_CIRR_NUM_TRAIN = 3, 32, 192


@pytest.fixture(scope="session")
def tiny_cirr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CIRR (``<tmp>/cirr_dataset``) for short trainings: ``TINY_CIRR_NUM_TRAIN`` train triplets,
    40 val queries (a val gallery of more than 20 images), 24 test1 queries (a gallery of more than 50), 32-px images.

    Shared by the whole session: tests must not write into it.
    """
    from synthetic import make_synthetic_cirr

    return make_synthetic_cirr(tmp_path_factory.mktemp("tiny_cirr"), seed=3, num_train=TINY_CIRR_NUM_TRAIN,
                               num_val=40, num_test=24, image_size=32)


@pytest.fixture(scope="session")
def tiny_cirr_run(tiny_cirr_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained tiny run reused wherever a test needs "a trained checkpoint": train_cirr.py for
    ``TINY_RUN_EPOCHS`` epochs of batch ``TINY_RUN_BATCH`` on :func:`tiny_cirr_root` with ``--save_best --log_every 1``.

    Tests may add files to it (a validation folder, a feature cache) but must not change what training wrote.
    """
    import train_cirr

    return train_cirr.main(["--data_root", str(tiny_cirr_root.parent), *TINY_TRAIN_ARGS,
                            "--num_epochs", str(TINY_RUN_EPOCHS), "--batch_size", str(TINY_RUN_BATCH),
                            "--save_best", "--log_every", "1", "--output_dir", str(tmp_path_factory.mktemp("tiny_run"))])


@pytest.fixture(scope="session")
def app_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``demo_output/`` as ``demo.py`` lays it out (``data/cirr_dataset``, ``run/checkpoints``).

    The run is a short deterministic training of the tiny model on a small synthetic CIRR (seed 0; about
    half of its 60 validation queries right at R@1), enough for the retrieval page (app.py) to find the
    target of most example queries.
    """
    import train_cirr
    from synthetic import make_synthetic_cirr

    folder = tmp_path_factory.mktemp("app")
    demo = folder / "demo_output"
    data_root = make_synthetic_cirr(demo / "data", seed=0, num_train=960, num_val=60, num_test=6)
    train_cirr.main([
        "--data_root", str(data_root), "--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none",
        "--num_epochs", "5", "--batch_size", "32", "--lr", "1e-3", "--optimizer", "adamw", "--grad_clip", "1.0",
        "--num_workers", "0", "--transform", "clip", "--seed", "0", "--device", "cpu", "--save_best",
        "--validation_frequency", "100", "--output_dir", str(demo / "run"),
    ])
    return folder


def validation_rankings(checkpoint: Path):
    """The val task of a CIRR checkpoint's dataset and, per retrieval method, each query's full ranking.

    Computed as CIRR validation does (evaluation.ModelRetrieval, retrieval.topk_retrieval, the reference
    left out of its own ranking), without the page's code: ``(task, {method: {query_id: [gallery names]}})``.
    """
    import torch

    from dataset_registry import get_dataset, resolve_dataset_root
    from evaluation import ModelRetrieval
    from inference import load_trained_model
    from model import RETRIEVAL_METHODS
    from retrieval import topk_retrieval

    trained = load_trained_model(checkpoint, torch.device("cpu"))
    (task,) = get_dataset("cirr").tasks(resolve_dataset_root(trained.train_args["data_root"], "cirr"), "val")
    index = {name: i for i, name in enumerate(task.gallery)}
    exclude = torch.tensor([index[q.reference] for q in task.queries])
    rankings = {}
    for name in RETRIEVAL_METHODS:
        method = ModelRetrieval(trained.model, name, trained.transform, torch.device("cpu"))
        _, top = topk_retrieval(method.encode_queries(task), method.encode_gallery(task), len(task.gallery), exclude)
        rankings[name] = {q.query_id: [task.gallery[i] for i in row] for q, row in zip(task.queries, top.tolist())}
    return task, rankings


@pytest.fixture(scope="session")
def app_validation_rankings(app_demo_dir: Path):
    """:func:`validation_rankings` of :func:`app_demo_dir`'s run."""
    return validation_rankings(app_demo_dir / "demo_output" / "run" / "checkpoints" / "best.pt")
