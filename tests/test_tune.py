"""Sweeps: search space validation, dry run, a real grid with phase reuse, kill and
resume, ASHA on the stack axis, and the programmatic Tuner with a user callback."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from ray import tune

from stackwise_ray.config import ConfigError, StackWiseConfig
from stackwise_ray.tune import build_tuner, grid_variants

TINY = """\
model: {d_model: 32, n_heads: 2, blocks_per_stack: 1, max_seq_len: 32}
data: {seq_len: 32, batch_size: 8, max_examples: 120}
training:
  steps_per_stack: 8
  eval_batches: 2
  warmup_steps: 2
  progressive: {time_embedding_dim: 16, max_stacks: 2, qlora_enabled: true, qlora_rank: 4}
"""
GRID = TINY.replace("  eval_batches: 2\n", "  eval_batches: 2\n  eval_every: 4\n") + """\
tune:
  search_space:
    training.progressive.building_mode: {grid: [append, prepend]}
    ray.cache_dtype: {grid: [float32, bfloat16]}
  max_concurrent_trials: 2
  baseline: end_to_end
"""


def error_of(raw):
    with pytest.raises(ConfigError) as e:
        StackWiseConfig.from_dict(raw).validate()
    return str(e.value)


def test_search_space_is_validated_key_by_key():
    assert error_of({"tune": {"search_space": {"training.lrr": {"grid": [1e-3]}}}}).startswith(
        "tune.search_space.training.lrr: no such config key (did you mean 'lr'?)")
    assert "value 'sideways'" in error_of({"tune": {"search_space": {"training.progressive.building_mode": {"grid": ["append", "sideways"]}}}})
    assert error_of({"tune": {"search_space": {"training.lr": {"uniform": [1, 0]}}}}).startswith("tune.search_space.training.lr.uniform:")
    assert error_of({"tune": {"search_space": {"training": {"grid": [1]}}}}).startswith("tune.search_space.training: is a whole section")
    assert error_of({"tune": {"searcher": "optuna", "search_space": {"training.lr": {"grid": [1e-3]}}}}).startswith("tune.searcher:")


@pytest.mark.slow
def test_dry_run_lists_the_trials(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("  search_space:\n", "  search_space:\n"
                                 "    training.progressive.trunk_strategy: {grid: [frozen, qlora]}\n"))
    out = subprocess.run([sys.executable, "-m", "stackwise_ray.tune", str(path), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("9 trials")  # 2 x 2 x 2 arms + the baseline
    assert len(grid_variants(StackWiseConfig.from_yaml(path).validate())) == 9


def run_sweep(path, storage, env, resume=False):
    args = [sys.executable, "-m", "stackwise_ray.tune", str(path), "--storage", str(storage), "--name", "grid"]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_grid_sweep_trains_each_distinct_phase_once_and_resumes_after_a_kill(ray_session, tmp_path):
    """building_mode x ray.cache_dtype, killed after two phases and resumed. Stack 0 is one
    phase for all four trials. Phase 1 appended reads its trunk's outputs from a cache, and
    bfloat16 rounds a float32 trunk's outputs, so its two cache dtypes are two phases;
    prepended there is no cache, so the cache dtype changes nothing and its two trials
    share one phase."""
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    store = tmp_path / "grid" / "phases"
    proc = run_sweep(path, tmp_path, env)
    deadline = time.time() + 400
    while len(list(store.glob("*/done.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in store.glob("*/done.json")}
    assert len(finished) >= 2
    [tokens] = tmp_path.glob("**/tokens/*/meta.json")  # one token store, built before any trial
    tokens_built = tokens.stat().st_mtime_ns
    assert tokens_built < min(finished.values())

    proc = run_sweep(path, tmp_path, env, resume=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    for marker, mtime in finished.items():  # nothing finished before the kill was trained again
        assert marker.stat().st_mtime_ns == mtime
    assert list(tmp_path.glob("**/tokens/*/meta.json")) == [tokens] and tokens.stat().st_mtime_ns == tokens_built
    results = pd.read_csv(tmp_path / "grid" / "results.csv")
    assert len(results) == 5 and set(results["status"]) == {"TERMINATED"}
    progressive = results[results["kind"] == "progressive"]
    assert set(progressive["training.progressive.building_mode"]) == {"append", "prepend"}
    phases = pd.read_csv(tmp_path / "grid" / "phases.csv")
    stack0 = phases[(phases["kind"] == "progressive") & (phases["stack"] == 0)]
    # one row per trial and stack, though the trials cut by the kill reported their first stacks twice;
    # stack 0 is the same phase whatever the building mode and cache dtype: trained once, reused by the others
    assert len(stack0) == 4 and stack0["phase_id"].nunique() == 1 and (stack0["status"] == "reused").sum() >= 3
    stack1 = phases[(phases["kind"] == "progressive") & (phases["stack"] == 1)].merge(
        results[["trial_id", "training.progressive.building_mode"]], on="trial_id")
    ids = stack1.groupby("training.progressive.building_mode")["phase_id"].nunique()
    assert len(stack1) == 4 and ids.to_dict() == {"append": 2, "prepend": 1}
    # one finished phase per unique identity: 1 shared stack 0, 3 distinct stack 1, 1 baseline
    assert len(list(store.glob("*/done.json"))) == phases["phase_id"].nunique() == 5
    baseline = results[results["kind"] == "baseline"].iloc[0]
    assert abs(baseline["flops"] / progressive["flops"].max() - 1) < 0.5  # the same budget, in whole steps
    assert (tmp_path / "grid" / "best_config.yaml").exists() and (tmp_path / "grid" / "results.parquet").exists()
    # eval_every 4 in 8-step phases: 2 whole-split points a phase, the last one the phase's result
    curves = pd.read_csv(tmp_path / "grid" / "curves.csv")
    for trial_id, row in results.set_index("trial_id").iterrows():
        curve = curves[curves["trial_id"] == trial_id].sort_values("global_step")
        assert len(curve) == (2 * 2 if row["kind"] == "progressive" else baseline["steps"] // 4 + (baseline["steps"] % 4 > 0))
        assert curve["flops"].is_monotonic_increasing and curve["flops"].iloc[-1] == pytest.approx(row["flops"])
        assert curve["val_loss"].iloc[-1] == pytest.approx(row["val_loss"])
    arms = set(pd.read_csv(tmp_path / "grid" / "comparison.csv", comment="#")["arm"])
    assert len(arms) == 5 and "baseline" in arms and any("building_mode=prepend" in arm for arm in arms)


class Recorder(tune.Callback):
    def __init__(self):
        self.results = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.append((trial.trial_id, result["stacks_done"], result["val_loss"]))


def test_asha_stops_a_clearly_worse_trial_after_its_first_stack(ray_session, tmp_path):
    raw = yaml.safe_load(TINY)
    raw["training"]["min_lr"] = 0.0
    config = StackWiseConfig.from_dict({
        **raw,
        "tune": {"search_space": {"training.lr": {"grid": [3e-3, 1e-7]}}, "scheduler": "asha",
                 "grace_period": 1, "max_concurrent_trials": 1}}).validate()
    recorder = Recorder()
    grid = build_tuner(config, storage_path=str(tmp_path), name="asha", callbacks=[recorder]).fit()
    done = {r.config["lr"]: r.metrics["stacks_done"] for r in grid}
    assert done == {3e-3: 2, 1e-7: 1}
    assert len(recorder.results) == 3 and {s for _, s, _ in recorder.results} == {1, 2}


def test_optuna_searcher_is_wired_through_ray_tune(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from stackwise_ray.tune import param_space, searcher

    config = StackWiseConfig.from_dict({"tune": {"searcher": "optuna", "search_space": {
        "training.lr": {"loguniform": [1e-3, 1e-2]}, "training.progressive.building_mode": {"choice": ["append", "prepend"]}}}}).validate()
    assert isinstance(searcher(config), OptunaSearch)
    space = param_space(config)
    assert set(space) == {"lr", "building_mode"}  # short names; no grid variant with a searcher


def test_a_failing_trial_is_an_error_row_and_the_sweep_goes_on(ray_session, tmp_path):
    raw = yaml.safe_load(TINY)
    raw["training"]["progressive"]["max_stacks"] = 1
    # one example is too few for a train/validation split: that trial raises when it loads its data
    raw["tune"] = {"search_space": {"data.max_examples": {"grid": [120, 1]}}}
    config = StackWiseConfig.from_dict(raw).validate()
    from stackwise_ray.tune import write_results

    grid = build_tuner(config, storage_path=str(tmp_path), name="faulty").fit()
    rows = {r["data.max_examples"]: r for r in write_results(grid, config, str(tmp_path / "faulty"))}
    assert rows[120]["status"] == "TERMINATED" and rows[120]["val_loss"] is not None
    assert rows[1]["status"] == "ERROR" and "too small" in rows[1]["error"]
    assert len(pd.read_csv(tmp_path / "faulty" / "results.csv")) == 2


def test_trials_carry_one_short_column_per_swept_key():
    from ray.tune.search.variant_generator import generate_variants

    from stackwise_ray.tune import param_space, trial_values

    config = StackWiseConfig.from_dict({"training": {"progressive": {"qlora_enabled": True}}, "tune": {
        "baseline": "end_to_end", "search_space": {
            "training.progressive.trunk_strategy": {"grid": ["frozen", "qlora"]},
            "training.progressive.building_mode": {"grid": ["append", "prepend"]},
            "training.lr": {"loguniform": [1e-3, 1e-2]}}}}).validate()
    trials = [spec["config"] for _, spec in generate_variants({"config": param_space(config)})]
    assert all(set(t) == {"variant", "trunk_strategy", "building_mode", "lr", "kind"} for t in trials)
    # the columns of Tune's trial table, as Tune infers them from the space it is given (it
    # hides sample_from functions): every swept key by its short name
    import collections
    import copy

    from ray.tune.experimental.output import _infer_params
    from ray.tune.impl.placeholder import inject_placeholders

    shown = _infer_params(inject_placeholders(copy.deepcopy(param_space(config)), collections.defaultdict(list)))
    assert set(shown) == {"variant", "trunk_strategy", "building_mode", "lr", "kind"}
    assert sorted((t["trunk_strategy"], t["building_mode"], t["kind"]) for t in trials) == [
        ("-", "-", "baseline"), ("frozen", "append", "progressive"), ("frozen", "prepend", "progressive"),
        ("qlora", "append", "progressive"), ("qlora", "prepend", "progressive")]
    for t in trials:
        kind, values = trial_values(config, t)
        if kind == "baseline":
            assert values == {}
        else:
            assert values == {"training.progressive.trunk_strategy": t["trunk_strategy"],
                              "training.progressive.building_mode": t["building_mode"], "training.lr": t["lr"]}
            assert 1e-3 <= t["lr"] <= 1e-2


COMPARE = TINY.replace("qlora_enabled: true, qlora_rank: 4", "qlora_enabled: false") + """\
tune:
  search_space:
    training.progressive.building_mode: {grid: [append, prepend]}
  baseline: end_to_end
  baseline_match: MATCH
  lrs: [1.0e-3, 3.0e-3]
  seeds: [0, 1, 2]
"""


def compare_config(tmp_path, match="flops", **sections):
    raw = yaml.safe_load(COMPARE.replace("MATCH", match))
    raw["ray"] = {"storage_path": str(tmp_path / "runs")}
    for path, value in sections.items():
        section, key = path.split("__")
        raw.setdefault(section, {})[key] = value
    path = tmp_path / f"compare_{match}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# The base run, by hand (flops.py's rules; d=32, T=32, V=260, one block per stack, d_ff 96,
# a 16->32 time projection per stack; 120 examples: 108 train, 12 validation; batch 8, 8 steps a phase):
#   a stack's forward per token: 2 x (4*32*32 + 3*32*96 + 16*32) + 4*T*d = 27648 + 4096 = 31744
#   the head's forward: 2*32*260 = 16640
#   phase 0 (stack and head train): (3*16640 + 3*31744) * 2048 tokens       = 297,271,296
#   phase 1 (trunk cached, tied head frozen): (2*16640 + 3*31744) * 2048     = 263,192,576
#   its cache: one trunk forward over the 8*8 examples phase 1 reads, 31744 * 64 * 32 = 65,011,712
#   budget                                                                 = 625,475,584
#   end to end, per token: 3*16640 + 2 * 3*31744 = 240,384
BUDGET = 625_475_584


def test_dry_run_expands_arms_lrs_and_seeds_and_matches_the_baseline(tmp_path, capsys):
    from stackwise_ray.tune import baseline_plan, main

    assert main([str(compare_config(tmp_path, "flops")), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    # 3 arms (append, prepend, baseline) x 2 LRs x 3 seeds
    assert out[0].startswith("18 trials (18 grid points: 3 arms x 2 lrs x 3 seeds")
    # flops: batch 8, floor(625,475,584 / (240,384 * 8 * 32)) = floor(10.16) = 10 steps
    assert out[1] == "baseline (end to end, baseline_match flops): batch 8, 10 steps, budget 6.255e+08 FLOPs"
    trials = [line.split(": ", 1)[1] for line in out[2:]]
    assert len(trials) == 18 and len(set(trials)) == 18
    assert trials[0] == "{'training.progressive.building_mode': 'append', 'training.lr': 0.001, 'training.seed': 0}"
    assert trials[17] == "{'kind': 'baseline', 'training.lr': 0.003, 'training.seed': 2}"
    assert not (tmp_path / "runs" / "compare_flops").exists()  # nothing of a sweep written, no Ray

    assert main([str(compare_config(tmp_path, "flops_and_steps")), "--dry-run"]) == 0
    # flops_and_steps: 2 phases x 8 steps = 16 steps; batch floor(625,475,584 / (16 * 240,384 * 32)) = floor(5.08) = 5
    assert capsys.readouterr().out.splitlines()[1] == (
        "baseline (end to end, baseline_match flops_and_steps): batch 5, 16 steps, budget 6.255e+08 FLOPs")
    config = StackWiseConfig.from_yaml(compare_config(tmp_path, "flops_and_steps")).validate()
    assert baseline_plan(config, 108) == {"batch_size": 5, "steps": 16, "budget": BUDGET}
    config.tune.baseline_match = "flops"
    assert baseline_plan(config, 108) == {"batch_size": 8, "steps": 10, "budget": BUDGET}


def test_a_step_matched_baseline_without_a_batch_per_worker_is_refused_before_ray(tmp_path):
    # 8 workers: the batch must be a multiple of 8, and the budget pays for 5.08 examples a step
    path = compare_config(tmp_path, "flops_and_steps", ray__num_workers=8)
    out = subprocess.run([sys.executable, "-m", "stackwise_ray.tune", str(path), "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: {path}: tune.baseline_match: flops_and_steps: 16 end-to-end steps within the budget of 6.25e+08 "
        "FLOPs leave a batch of 5.08 examples, fewer than ray.num_workers=8; use baseline_match: flops")
    assert not (tmp_path / "runs" / path.stem).exists()


def test_trials_get_their_lr_seed_and_batch_and_share_only_coinciding_phases(tmp_path):
    from stackwise_ray.phase_store import phase_identity
    from stackwise_ray.plan import plan_phases
    from stackwise_ray.tune import arm_label, grid_variants, trial_config

    config = StackWiseConfig.from_yaml(compare_config(tmp_path, "flops_and_steps")).validate()
    variants = grid_variants(config)
    trials = {}
    for i, v in enumerate(variants):
        kind, trial = trial_config(config, {"variant": i}, {"batch_size": 5, "steps": 16, "budget": BUDGET})
        assert trial.training.lr == v["training.lr"] and trial.training.seed == v["training.seed"]
        # the cosine keeps the base's floor ratio, min_lr / lr = 3e-4 / 3e-3
        assert trial.training.min_lr == pytest.approx(0.1 * v["training.lr"])
        assert trial.data.batch_size == (5 if kind == "baseline" else 8)
        trials[(v.get("training.progressive.building_mode", "baseline"), v["training.lr"], v["training.seed"])] = trial
    assert arm_label(config, "progressive", variants[0]) == "building_mode=append"

    def ids(trial):
        return [phase_identity(trial, plan_phases(trial, 2), k) for k in range(2)]

    append, prepend = ids(trials[("append", 1e-3, 0)]), ids(trials[("prepend", 1e-3, 0)])
    assert append[0] == prepend[0] and append[1] != prepend[1]  # stack 0 is shared by the two arms
    others = [ids(trials[("append", 3e-3, 0)])[0], ids(trials[("append", 1e-3, 1)])[0]]
    assert len({append[0], *others}) == 3  # another LR or seed is another phase


def test_a_trial_curve_counts_flops_from_the_run_start():
    from stackwise_ray.tune import trial_curve

    history = [  # phase 0: 4 steps, eval_every 2; phase 1: a cache build of 50 FLOPs, then 4 steps
        {"stack": 0, "steps": 4, "flops": 400.0, "train_flops": 400.0, "val_loss": 3.0,
         "val_curve": [{"step": 2, "global_step": 2, "phase_flops": 200.0, "val_loss": 4.0},
                       {"step": 4, "global_step": 4, "phase_flops": 400.0, "val_loss": 3.0}]},
        {"stack": 1, "steps": 4, "flops": 350.0, "train_flops": 300.0, "val_loss": 2.5,
         "val_curve": [{"step": 2, "global_step": 6, "phase_flops": 150.0, "val_loss": 2.8},
                       {"step": 4, "global_step": 8, "phase_flops": 300.0, "val_loss": 2.5}]}]
    assert [(p["global_step"], p["flops"], p["val_loss"]) for p in trial_curve(history)] == [
        (2, 200.0, 4.0), (4, 400.0, 3.0), (6, 600.0, 2.8), (8, 750.0, 2.5)]
    for phase in history:  # a run without eval_every: one point per phase end
        del phase["val_curve"]
    assert [(p["global_step"], p["flops"]) for p in trial_curve(history)] == [(4, 400.0), (8, 750.0)]
