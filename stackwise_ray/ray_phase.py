"""Phases on Ray Train: one `TorchTrainer.fit()` per stack (the driver side; what its
workers run is worker.py).
"""

from __future__ import annotations

import os
import time

import ray.train
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import storage
from .checkpoint import load_metadata
from .config import StackWiseConfig
from .ray_metrics import ascii_tag
from .worker import PhaseInputs, PhaseJob, train_loop_per_worker


def fit_phase(config: StackWiseConfig, part: str, inputs: PhaseInputs | None, store: str, name: str,
              data_ref=None, callbacks=None, train_steps: int | None = None, links=None, board=None,
              labels=None) -> tuple[dict, str] | None:
    """Train the stacks `inputs.plans` describe (one, or all for the end-to-end baseline)
    as the phase `name` (its id) under `store` (a path or URI). The Ray Train run is named
    after the experiment, trial and `part` ("s02", "e2e": run_name), so the dashboard's
    views read like the experiment; it lives in the phase's directory, `store/name/`.

    `inputs` None makes the workers wait for `links` (prestart.PhaseLinks) to hand them
    over (a prestarted phase). `train_steps` overrides the configured step count; `board`
    (console.ProgressBoard) receives rank 0's progress; `labels` ({"experiment", "trial"})
    tag its Ray metrics. Returns (metrics, checkpoint path), or None for a cancelled phase."""
    r = config.ray
    labels = labels or {"experiment": name, "trial": name}
    run = run_name(labels, part)
    job = PhaseJob(config.validate(), name, inputs, train_steps, labels, storage.join(store, f"{name}.fault"),
                   time.time(), data_ref, links, board)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run, storage_path=storage.join(store, name), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        return None
    # Ray's path is on its filesystem (no scheme): name the checkpoint as the store does
    checkpoint = storage.join(store, name, run, os.path.basename(result.checkpoint.path))
    return load_metadata(checkpoint)["metrics"], checkpoint


def run_name(labels: dict, part: str) -> str:
    """`sweep_trunk_mode.t003.s02` (a run of its own: `quickstart.s02`), in ASCII: Ray Train
    tags its metrics with it, and a non-ASCII tag fails its controller (ray_metrics.ascii_tag)."""
    names = [labels["experiment"]] + ([labels["trial"]] if labels["trial"] != labels["experiment"] else [])
    return ascii_tag(".".join(names + [part]))
