"""Run-wide learning-rate schedules (training.lr_schedule): the LR a phase's steps use is
the formula at the run's global step, across phase boundaries and after a resume."""

import math

import pytest

from stackwise_ray.cache_policy import CachePlanner
from stackwise_ray.phase import schedule_lr, train_stack
from stackwise_ray.plan import plan_phases
from stackwise_ray.trainer import ProgressiveTrainer, RunContext

from .conftest import tiny_config
from .test_phase import setup

LR, MIN_LR, WARMUP = 1e-2, 1e-3, 4


def cosine(g, total):  # written out again: the formula, not the code under test
    if g < WARMUP:
        return LR * (g + 1) / WARMUP
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (g - WARMUP) / (total - WARMUP)))


def wsd(g, total, fraction):
    decay = round(fraction * total)
    if g < WARMUP:
        return LR * (g + 1) / WARMUP
    if g < total - decay:
        return LR
    return LR - (LR - MIN_LR) * (g - (total - decay) + 1) / decay


def config_for(schedule, steps=(6, 10, 14), **training):
    return tiny_config(data={"max_examples": 80}, training={
        "steps_per_stack": list(steps), "lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "lr_schedule": schedule,
        "log_every": 1, **training}, target_stacks=len(steps))


def train_phases(config, resume_at=None):
    """Every phase of `config` in one process, as the trainer places them in the run: the
    LR of each step, by global step. `resume_at`: (phase, step) where phase `phase` stops and
    continues from its in-phase state, as a restarted worker group does."""
    builder, masking, train_loader, _ = setup(config)
    from stackwise_ray.data import ProgressiveDataLoader

    steps, lrs = config.training.steps_per_stack, {}
    for k, n in enumerate(steps):
        builder.add_stack()
        builder.prepare_phase()
        window = (sum(steps[:k]), sum(steps))
        batches = ProgressiveDataLoader(train_loader, masking, k)
        if resume_at is not None and resume_at[0] == k:
            saved = {}

            def stop(done, opt, curve, val_curve, saved=saved):
                if done == resume_at[1]:
                    saved.update(step=done, optimizer=opt.state_dict(), loss_curve=list(curve), val_curve=[])
                    raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                train_stack(builder.rack, batches, config.training, n, on_step_end=stop, window=window)
            metrics = train_stack(builder.rack, batches, config.training, n, resume=saved, window=window)
        else:
            metrics = train_stack(builder.rack, batches, config.training, n, window=window)
        for point in metrics["loss_curve"]:
            lrs[window[0] + point["step"]] = point["lr"]
    return lrs


@pytest.mark.parametrize("schedule", ["run_cosine", "wsd"])
def test_the_lr_at_each_global_step_is_the_formula_across_phase_boundaries(schedule):
    config = config_for(schedule, decay_fraction=0.25)
    lrs = train_phases(config)
    total = 30
    expected = {g: cosine(g, total) if schedule == "run_cosine" else wsd(g, total, 0.25) for g in range(total)}
    assert sorted(lrs) == list(range(total))
    for g in (0, 3, 4, 5, 6, 7, 15, 16, 22, 23, 29):  # 6 and 16 start phases 1 and 2
        assert lrs[g] == pytest.approx(expected[g], rel=1e-12), g
    if schedule == "wsd":
        assert lrs[29] == pytest.approx(MIN_LR)  # decayed at the run's last step
        assert lrs[5] == lrs[6] == lrs[21] == LR  # stable across the boundary, decay from step 30 - 8


def test_per_phase_restarts_warmup_in_every_phase():
    lrs = train_phases(config_for("per_phase"))
    assert lrs[0] == lrs[6] == lrs[16] == pytest.approx(LR / WARMUP)


@pytest.mark.parametrize("schedule", ["run_cosine"])
def test_a_resumed_phase_continues_on_the_same_schedule(schedule):
    config = config_for(schedule)
    assert train_phases(config, resume_at=(1, 4)) == train_phases(config)


def test_the_trainer_places_each_phase_in_the_run_and_the_baseline_in_its_own():
    config = config_for("wsd")
    run = RunContext(config, plan_phases(config), [], None, CachePlanner(config, None, range(80), None), None)
    windows = [ProgressiveTrainer._lr_window(run, (plan,), None) for plan in run.plans]
    assert windows == [(0, 30), (6, 30), (16, 30)]  # a resumed run computes them from the config alone
    assert ProgressiveTrainer._lr_window(run, tuple(run.plans), 45) == (0, 45)
    # the baseline's shape over its own 45 steps
    assert schedule_lr(config.training, 44, 45) == pytest.approx(MIN_LR)
    assert schedule_lr(config.training, 10, 45) == LR


def test_a_run_wide_schedule_enters_the_ids_with_the_run_length():
    from stackwise_ray.phase_store import phase_identity

    def first_id(schedule, stacks):
        config = config_for(schedule, steps=[6] * 4)
        return phase_identity(config, plan_phases(config, stacks), 0)

    assert first_id("per_phase", 2) == first_id("per_phase", 3)  # target_stacks stays out of per_phase ids
    assert first_id("run_cosine", 2) != first_id("run_cosine", 3)


def test_settings_added_later_leave_existing_ids_alone_at_their_defaults():
    from stackwise_ray.config import HASHED
    from stackwise_ray.phase_store import declared_settings

    config = tiny_config()
    hashed = declared_settings(config, (HASHED,), hashing=True)
    assert "training.lr_schedule" not in hashed and "training.decay_fraction" not in hashed
    config.training.lr_schedule = "wsd"
    assert declared_settings(config, (HASHED,), hashing=True)["training.lr_schedule"] == "wsd"


def test_a_ray_run_places_each_phase_on_the_run_wide_schedule(ray_session, tmp_path):
    """Through Ray Train workers: per-stack steps, the LR at every global step (wsd) with
    phase 1's worker killed at its step 4 and the phase resumed from its last checkpoint,
    the curve's global steps, and val_bpb in every phase's metrics."""
    from stackwise_ray.trainer import ProgressiveTrainer

    from .conftest import ray_config

    config = ray_config(training={"steps_per_stack": [3, 5], "lr": LR, "min_lr": MIN_LR, "warmup_steps": 2,
                                  "lr_schedule": "wsd", "decay_fraction": 0.5, "log_every": 1, "eval_every": 2,
                                  "checkpoint_every": 2},
                        ray={"inject_worker_failure": "1:4", "max_failures": 2}, target_stacks=2)
    history = ProgressiveTrainer(config, storage_path=str(tmp_path), name="wsd").train_progressively()
    assert [m["steps"] for m in history] == [3, 5] and [m["first_global_step"] for m in history] == [0, 3]
    assert history[1]["resumed_from_step"] in (2, 4)  # the worker did die, and the phase went on from a checkpoint
    lrs = {m["first_global_step"] + p["step"]: p["lr"] for m in history for p in m["loss_curve"]}
    assert lrs == {g: pytest.approx(schedule_lr(config.training, g, 8)) for g in range(8)}
    assert lrs[2] == LR and lrs[7] == pytest.approx(MIN_LR)  # stable across the boundary, decayed at the end
    assert [p["global_step"] for p in history[1]["val_curve"]] == [5, 7, 8]
    assert all(m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2)) for m in history)  # byte tokenizer
