"""Phases as Ray Train runs (ray_phase.py, worker.py): workers, DDP, in-phase restarts."""

import os

import pytest
import torch

from stackwise_ray.trainer import ProgressiveTrainer

from .conftest import rack_weights, ray_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_two_workers_match_one_worker(arrow_run, tmp_path):
    trainer, history = arrow_run
    two = ProgressiveTrainer(ray_config(target_stacks=1, ray={"num_workers": 2}), storage_path=str(tmp_path), name="ddp")
    h2 = two.train_progressively()
    assert h2[0]["num_workers"] == 2
    one = rack_weights(history[0]["checkpoint"])
    ddp = rack_weights(os.path.join(two.run_dir, "final"))
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-3, atol=1e-4)
    assert abs(h2[0]["val_loss"] - history[0]["val_loss"]) < 0.02


def test_worker_killed_mid_phase_resumes_in_phase_and_an_over_budget_cache_recomputes(arrow_run, tmp_path):
    config = ray_config(target_stacks=2, training={"checkpoint_every": 2, "eval_every": 3},
                        ray={"inject_worker_failure": "1:4", "max_failures": 2, "cache_max_bytes": 1000})
    trainer = ProgressiveTrainer(config, storage_path=str(tmp_path), name="fault")
    with pytest.warns(UserWarning, match="exceeds the 0 MiB budget"):
        history = trainer.train_progressively()
    assert [m["stack"] for m in history] == [0, 1]
    assert os.path.exists(os.path.join(trainer.store.root, f"{history[1]['phase_id']}.fault"))  # the worker did die
    # the latest in-phase checkpoint Ray Train registered before the worker died (2 or 4)
    assert history[1]["resumed_from_step"] in (2, 4) and history[0]["resumed_from_step"] == 0
    assert history[1]["cache"]["over_budget"] is True  # recomputed: one trunk forward per step of this attempt
    assert history[1]["trunk_forwards"] == 8 - history[1]["resumed_from_step"]
    # the validation curve survives the restart (its point at step 3 is in the step-4 checkpoint)
    assert [(p["step"], p["global_step"]) for p in history[1]["val_curve"]] == [(3, 11), (6, 14), (8, 16)]
    assert history[1]["val_curve"][-1]["val_loss"] == history[1]["val_loss"]
    # the interrupted, recomputing phase (evaluated every 3 steps) trains what the uninterrupted, cached one did
    uninterrupted = rack_weights(arrow_run[1][1]["checkpoint"])
    for name, tensor in rack_weights(history[1]["checkpoint"]).items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-4, atol=1e-5)
