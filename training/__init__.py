"""Supervised SSN training (open_clip ``open_clip_train`` style), one idea per module.

* :mod:`training.params`      -- the command line of ``train_cirr.py`` / ``train_fiq.py`` and its checks
* :mod:`training.sampler`     -- resumable per-epoch order of the triplets, DataLoader worker seeding
* :mod:`training.train`       -- one optimisation step and one epoch
* :mod:`training.validation`  -- when a run validates (official schedule) and what it measures
* :mod:`training.resilience`  -- pre-emption signals, unreadable samples, non-finite losses, determinism
* :mod:`training.state`       -- the run's progress, RNG states and the checkpoint dictionary
* :mod:`training.resume`      -- loading a checkpoint back into a run
* :mod:`training.run_dir`     -- the run's output folder: choosing, claiming, metrics-log length
* :mod:`training.model_setup` -- the model a run starts from, official width flags, ``torch.compile``
* :mod:`training.main`        -- the run as named stages: prepare, model, data, resume, fit, report

The scripts call :func:`training.params.parse_train_args`, then :func:`training.main.run`; nothing here
imports a script.
"""
