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
GRID = TINY + """\
tune:
  search_space:
    training.progressive.building_mode: {grid: [append, prepend]}
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


def test_dry_run_lists_the_trials(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("  search_space:\n", "  search_space:\n"
                                 "    training.progressive.trunk_strategy: {grid: [frozen, qlora]}\n"))
    out = subprocess.run([sys.executable, "-m", "stackwise_ray.tune", str(path), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("5 trials")
    assert len(grid_variants(StackWiseConfig.from_yaml(path).validate())) == 5


def run_sweep(path, storage, env, resume=False):
    args = [sys.executable, "-m", "stackwise_ray.tune", str(path), "--storage", str(storage), "--name", "grid"]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_grid_sweep_shares_stack_zero_and_resumes_after_a_kill(ray_session, tmp_path):
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
    assert len(results) == 3 and set(results["status"]) == {"TERMINATED"}
    progressive = results[results["kind"] == "progressive"]
    assert set(progressive["training.progressive.building_mode"]) == {"append", "prepend"}
    phases = pd.read_csv(tmp_path / "grid" / "phases.csv")
    stack0 = phases[(phases["kind"] == "progressive") & (phases["stack"] == 0)]
    # stack 0 is the same phase whatever the building mode: trained once, reused by the other trial
    assert stack0["phase_id"].nunique() == 1 and (stack0["status"] == "reused").sum() >= 1
    # one finished phase per unique identity: 1 shared stack 0, 2 distinct stack 1, 1 baseline
    assert len(list(store.glob("*/done.json"))) == phases["phase_id"].nunique() == 4
    baseline = results[results["kind"] == "baseline"].iloc[0]
    assert abs(baseline["flops"] / progressive["flops"].max() - 1) < 0.5  # the same budget, in whole steps
    assert (tmp_path / "grid" / "best_config.yaml").exists() and (tmp_path / "grid" / "results.parquet").exists()


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
            "training.lr": {"loguniform": [1e-3, 1e-2]}}}}).validate(check_files=False)
    trials = [spec["config"] for _, spec in generate_variants({"config": param_space(config)})]
    # Tune's table shows the parameters by these names: short, one column each
    assert all(set(t) == {"variant", "trunk_strategy", "building_mode", "lr", "kind"} for t in trials)
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
