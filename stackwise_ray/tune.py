"""python -m stackwise_ray.tune experiments/x.yaml [KEY=VALUE ...] [--address ADDR] [--resume] [--storage PATH] [--name NAME] [--dry-run]

A Ray Tune sweep of progressive runs: the search space is the YAML's `tune:` section.
Trials are arms (grid points, and the end-to-end baseline) x tune.lrs x tune.seeds.
Each trial is a function trainable that runs one TorchTrainer per stack and reports after
every stack (`stacks_done` is the schedulers' time axis). Trials share finished phases
through the experiment's phase store. Results land in EXPERIMENT_DIR (storage/name):
results.csv/.parquet (one row per trial), phases.csv (one row per trial and stack),
curves.csv (validation curves against FLOPs), comparison.csv (report.comparison),
best_config.yaml, phases/ (shared phases), trials/<trial id>/final (each trial's rack).

From Python: `trainable(config, experiment_dir)` and `build_tuner(config, ...)`.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

from . import storage
from .cli import (BAD_INPUT, OneLineParser, add_overrides_argument, disk_full, disk_full_line, error_line,
                  load_for_command, refuse)
from .config import ConfigError, StackWiseConfig, apply_overrides
from .storage import storage_dir
from .ray_runtime import run_in_thread, stop_on_signals

TRIAL_RESOURCE = "trial_slot"  # trials hold this instead of CPUs: a trial holding a CPU its phases need can deadlock


PROTOCOL_KEYS = {"lrs": "training.lr", "seeds": "training.seed"}  # tune key: the config key its values set


def arms(config: StackWiseConfig) -> list[dict]:
    """The things compared: every combination of the grid keys, plus the baseline when
    asked for."""
    grid = {k: v["grid"] for k, v in config.tune.search_space.items() if "grid" in v}
    variants = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if config.tune.baseline == "end_to_end":
        variants.append({"kind": "baseline"})
    return variants


def protocol(config: StackWiseConfig) -> list[dict]:
    """The learning rates and seeds every arm runs: [{}] when the sweep sets neither."""
    points = [{}]
    for key, path in PROTOCOL_KEYS.items():
        values = getattr(config.tune, key)
        if values:
            points = [{**p, path: v} for p in points for v in values]
    return points


def grid_variants(config: StackWiseConfig) -> list[dict]:
    """Every (arm, learning rate, seed): the sweep's grid points, arm by arm."""
    return [{**arm, **p} for arm in arms(config) for p in protocol(config)]


def swept_paths(config: StackWiseConfig) -> list[str]:
    """The search space's keys, then training.lr / training.seed where tune.lrs / seeds set them."""
    return [str(p) for p in config.tune.search_space] + [path for key, path in PROTOCOL_KEYS.items()
                                                        if getattr(config.tune, key)]


def column_names(config: StackWiseConfig) -> dict[str, str]:
    """{swept key path: its short name}: the path's last part, or as many trailing parts as
    make it unique. Trials carry their values under these names, so Tune's trial table
    shows one short column per swept key."""
    paths = swept_paths(config)
    names = {}
    for path in paths:
        parts, n = path.split("."), 1
        while n < len(parts) and sum(q.split(".")[-n:] == parts[-n:] for q in paths) > 1:
            n += 1
        names[path] = ".".join(parts[-n:]) if ".".join(parts[-n:]) not in ("variant", "kind") else path
    return names


def param_space(config: StackWiseConfig) -> dict:
    """Sampled keys under their short names; grid points as an index into grid_variants,
    whose values Tune resolves into one short column per grid key (and `kind`)."""
    from ray import tune

    from .grid_value import GridValue

    sampled = {"choice": lambda v: tune.choice(v), "uniform": lambda v: tune.uniform(*v),
               "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    names = column_names(config)
    space = {names[str(path)]: sampled[kind](values) for path, spec in config.tune.search_space.items()
             for kind, values in spec.items() if kind != "grid"}
    variants = grid_variants(config)
    if variants != [{}]:
        space["variant"] = tune.grid_search(list(range(len(variants))))
        grids = [str(path) for path, spec in config.tune.search_space.items() if "grid" in spec]
        for path in grids + swept_paths(config)[len(config.tune.search_space):]:
            space[names[path]] = GridValue(variants, path, "-")
        if config.tune.baseline == "end_to_end":
            space["kind"] = GridValue(variants, "kind", "progressive")
    return space


def trial_values(base: StackWiseConfig, params: dict) -> tuple[str, dict]:
    """(kind, {key path: value}) of one trial from its Tune config; the baseline takes only
    the learning rate and seed of its grid point."""
    variant = dict(grid_variants(base)[params["variant"]]) if "variant" in params else {}
    if variant.pop("kind", "progressive") == "baseline":
        return "baseline", variant
    names = column_names(base)
    sampled = {path: params[name] for path, name in names.items() if path not in variant and name in params}
    return "progressive", {**variant, **sampled}


def trial_config(base: StackWiseConfig, params: dict, baseline: dict | None = None) -> tuple[str, StackWiseConfig]:
    """(kind, config) of one trial: the base with the trial's values applied. An LR from
    tune.lrs keeps the base's min_lr/lr ratio (the cosine ends at the same fraction of its
    peak); the baseline gets the batch size of `baseline` (baseline_plan)."""
    kind, values = trial_values(base, params)
    if base.tune.lrs and "training.lr" in values:
        values["training.min_lr"] = base.training.min_lr * values["training.lr"] / base.training.lr
    if kind == "baseline" and baseline is not None:
        values["data.batch_size"] = baseline["batch_size"]
    return kind, apply_overrides(base, values).validate()


def arm_label(config: StackWiseConfig, kind: str, values: dict) -> str:
    """What a trial compares, without its LR and seed: `trunk_strategy=qlora`, `baseline`."""
    if kind == "baseline":
        return "baseline"
    names, protocol_paths = column_names(config), set(PROTOCOL_KEYS.values())
    parts = [f"{names[p]}={values[p]}" for p in swept_paths(config) if p in values and p not in protocol_paths]
    return ", ".join(parts) or "progressive"


def baseline_plan(config: StackWiseConfig, n_train: int) -> dict:
    """The end-to-end baseline's {batch_size, steps} and the FLOP `budget` it matches: what
    a progressive run of the base config spends (flops.progressive_budget), cache builds
    included. Neither rule spends more than the budget (but for a budget below one step).

    tune.baseline_match flops: batch = data.batch_size; steps = floor(budget / FLOPs of
    one step), at least 1.
    flops_and_steps: steps = the progressive run's optimizer steps (the sum of its phases'
    steps); batch = the largest multiple of ray.num_workers that keeps those
    steps within the budget: floor(budget / (steps x FLOPs per example) / num_workers) x
    num_workers. Raises ConfigError where that is 0 (a budget too small for one example
    per worker per step)."""
    from .flops import budget_and_final_rack, end_to_end_flops
    from .phase import run_steps

    match = config.tune.baseline_match
    config = apply_overrides(config, {})  # the base config as a run sees it (its tune section apart)
    budget, rack = budget_and_final_rack(config, n_train)
    B, T, W = config.data.batch_size, config.data.seq_len, config.ray.num_workers
    per_example = end_to_end_flops(rack, T, T)  # one example (T tokens) through one step
    if match == "flops":
        return {"batch_size": B, "steps": max(1, int(budget // (B * per_example))), "budget": budget}
    steps = sum(run_steps(config.training, n_train // B, config.target_stacks))
    batch = int(budget // (steps * per_example)) // W * W
    if batch < W:
        raise ConfigError(f"tune.baseline_match: flops_and_steps: {steps} end-to-end steps within the budget of "
                          f"{budget:.3g} FLOPs leave a batch of {budget / (steps * per_example):.2f} examples, fewer "
                          f"than ray.num_workers={W}; use baseline_match: flops")
    return {"batch_size": batch, "steps": steps, "budget": budget}


def run_trial(params: dict, base: dict, experiment_dir: str, baseline: dict | None = None) -> None:
    """The function trainable: one progressive run (or the baseline), reported per stack."""
    import ray.tune

    from .data.dataset import build_datasets
    from .tracking import Tracker, flat
    from .trainer import ProgressiveTrainer

    base_config = StackWiseConfig.from_dict(base)
    sweep = base_config.tune  # a trial's config has no tune section
    kind, config = trial_config(base_config, params, baseline)
    t0, counts = time.time(), {"trained": 0, "reused": 0, "recovered": 0}
    spent = {"flops": 0.0, "steps": 0, "examples": 0}
    B, n_train = config.data.batch_size, []  # the trial's own training split, counted once its data has loaded

    def report(m: dict) -> None:
        n_train[:] = n_train or [len(build_datasets(config)[0])]
        counts[m["status"]] += 1
        spent.update(flops=spent["flops"] + m["flops"], steps=spent["steps"] + m["steps"],
                     examples=spent["examples"] + m["steps"] * B)
        ray.tune.report({
            # Tune's trial table shows the first four numbers: what a user watches
            "stacks_done": m["stack"] + 1, "val_loss": m["val_loss"],
            "phases_trained": counts["trained"] + counts["recovered"], "phases_reused": counts["reused"],
            "kind": kind, "stack": m["stack"], "val_ppl": m["val_ppl"], "val_accuracy": m["val_accuracy"],
            "val_bpb": m.get("val_bpb", float("nan")),
            "phase_flops": m["flops"], "flops": spent["flops"], "phase_status": m["status"], "phase_id": m["phase_id"],
            "phase_wall_s": m["phase_wall_s"] if m["status"] != "reused" else 0.0, "train_s": m["train_s"],
            "peak_memory_mb": m["peak_memory_mb"], "wall_s": time.time() - t0,
            # what the comparison table counts: steps, tokens and passes over the training split
            "batch_size": B, "steps": spent["steps"], "tokens": spent["examples"] * config.data.seq_len,
            "epochs": spent["examples"] / n_train[0], **({"budget": baseline["budget"]} if baseline else {}),
            # where things ran: the trial, the phase's rank-0 worker, the task that built its cache
            "trial_node": ray.get_runtime_context().get_node_id(), "phase_node": m.get("node_id", ""),
            "cache_node": m.get("cache", {}).get("node_id", "")})

    trial_id = ray.tune.get_context().get_trial_id()
    # one tracked run per trial, in one experiment (and one local store) for the sweep
    tracker = Tracker(config.tracking, experiment_dir, storage.basename(experiment_dir), trial_id,
                      {**flat(config.to_dict()), "kind": kind})
    trainer = ProgressiveTrainer(config, storage_path=storage.join(experiment_dir, "trials"), name=trial_id,
                                 resume=True,
                                 phase_store=storage.join(experiment_dir, "phases") if sweep.share_phases else None,
                                 on_phase=report, concurrent_runs=sweep.max_concurrent_trials, tracker=tracker,
                                 labels={"experiment": storage.basename(experiment_dir),
                                         "trial": ray.tune.get_context().get_trial_name()})
    if kind == "baseline":
        trainer.train_end_to_end(baseline["steps"])
    else:
        trainer.train_progressively()


def trainable(config: StackWiseConfig, experiment_dir: str):
    """The Tune trainable for sweeps of `config` (resources included): trials get their
    values under short names (column_names) and a grid point index `variant`. Raises
    ConfigError where the baseline cannot be matched (baseline_plan)."""
    from ray import tune

    baseline = planned_baseline(config)
    fn = tune.with_parameters(run_trial, base=config.to_dict(), experiment_dir=experiment_dir, baseline=baseline)
    return tune.with_resources(fn, {TRIAL_RESOURCE: 1})


def build_tuner(config: StackWiseConfig, storage_path: str | None = None, name: str | None = None,
                callbacks=None, **tune_config_overrides):
    """A ray.tune.Tuner for the sweep `config` describes; keyword arguments override
    ray.tune.TuneConfig fields (e.g. search_alg=..., scheduler=...)."""
    from ray import tune

    root = storage_dir(storage_path or config.ray.storage_path)
    name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    experiment_dir = storage.join(root, name)
    t = config.tune
    tune_config = dict(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                       max_concurrent_trials=t.max_concurrent_trials, scheduler=scheduler(config),
                       search_alg=searcher(config), trial_name_creator=trial_name)
    tune_config.update(tune_config_overrides)
    return tune.Tuner(trainable(config, experiment_dir), param_space=param_space(config),
                      tune_config=tune.TuneConfig(**tune_config),
                      run_config=tune.RunConfig(name=name, storage_path=root, callbacks=callbacks,
                                                failure_config=tune.FailureConfig(max_failures=0)))


def trial_name(trial) -> str:
    """`t003`: the trial's index in the sweep (its id ends with it). Tune's table, the
    trial's phases' Ray Train runs (`sweep.t003.s02`) and its metrics' tags use it."""
    index = trial.trial_id.rsplit("_", 1)[-1]
    return f"t{int(index):03d}" if index.isdigit() else trial.trial_id


def scheduler(config: StackWiseConfig):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    t = config.tune
    if t.scheduler == "asha":
        return ASHAScheduler(time_attr="stacks_done", max_t=config.target_stacks, grace_period=t.grace_period,
                             reduction_factor=t.reduction_factor)
    if t.scheduler == "median":
        return MedianStoppingRule(time_attr="stacks_done", grace_period=t.grace_period)
    return None


def searcher(config: StackWiseConfig):
    if config.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # needs the optuna extra

        return OptunaSearch()
    return None


def start_ray(config: StackWiseConfig, address: str | None) -> str:
    """Join or start Ray for a sweep (ray_runtime.start); returns the dashboard's line."""
    import ray

    from .ray_runtime import dashboard_line, start

    ctx = start(config, address, resources={TRIAL_RESOURCE: config.tune.max_concurrent_trials},
                dashboard_host="127.0.0.1")
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) < 1:  # a cluster this command joined
        raise ConfigError(f"the cluster at {ctx.address_info['gcs_address']} has no '{TRIAL_RESOURCE}' resource: start its nodes with "
                          f"--resources='{{\"{TRIAL_RESOURCE}\": N}}' (N = trials a node may drive)")
    need = config.ray.num_workers * config.ray.cpus_per_worker
    if need > ray.cluster_resources().get("CPU", 0):
        raise ConfigError(f"ray.num_workers x ray.cpus_per_worker = {need} CPUs per phase, more than the cluster's "
                          f"{ray.cluster_resources().get('CPU', 0):g}")
    return dashboard_line(ctx)


# ---------------------------------------------------------------- results

def write_results(grid, config: StackWiseConfig, experiment_dir: str) -> list[dict]:
    """results.csv/.parquet (one row per trial), phases.csv (per trial and stack),
    curves.csv (per trial and validation point: report.py's loss-vs-FLOPs curves) and
    best_config.yaml from a ResultGrid."""
    import pandas as pd

    from .report import best_trial

    swept = swept_paths(config)
    rows, phases, curves = [], [], []
    for result in grid:
        params = result.config or {}
        m = result.metrics or {}
        kind, given = trial_values(config, params)
        _, trial_cfg = trial_config(config, params, {"batch_size": m["batch_size"]} if "batch_size" in m else None)
        values = {k: given.get(k) for k in swept}
        frame = result.metrics_dataframe
        trial_id = m.get("trial_id") or os.path.basename(result.path)  # a path on the storage filesystem
        done = m.get("stacks_done", 0)
        status = "ERROR" if result.error else ("TERMINATED" if done >= config.target_stacks or kind == "baseline"
                                                 else "STOPPED")
        arm = arm_label(config, kind, given)
        rows.append({"trial_id": trial_id, "kind": kind, "arm": arm, "status": status, **values,
                     "val_loss": m.get("val_loss"), "val_ppl": m.get("val_ppl"), "val_accuracy": m.get("val_accuracy"),
                     "val_bpb": m.get("val_bpb"),
                     "stacks_done": done, "flops": m.get("flops"), "budget": m.get("budget"),
                     "batch_size": m.get("batch_size"), "steps": m.get("steps"), "tokens": m.get("tokens"),
                     "epochs": m.get("epochs"), "wall_s": m.get("wall_s"),
                     "phases_trained": m.get("phases_trained", 0), "phases_reused": m.get("phases_reused", 0),
                     "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:300],
                     "_config": trial_cfg})
        if frame is not None and len(frame):
            # a trial restored after a kill reports its stacks again: its last report of each is what it ran
            for _, r in frame.drop_duplicates("stack", keep="last").iterrows():
                phases.append({"trial_id": trial_id, "kind": kind, "stack": r["stack"], "val_loss": r["val_loss"],
                               "val_bpb": r.get("val_bpb"),
                               "flops": r["phase_flops"], "cum_flops": r["flops"], "wall_s": r["phase_wall_s"],
                               "train_s": r["train_s"], "peak_memory_mb": r["peak_memory_mb"],
                               "status": r["phase_status"], "phase_id": r["phase_id"],
                               **{k: r.get(k, "") for k in ("trial_node", "phase_node", "cache_node")}})
        summary = storage.join(experiment_dir, "trials", trial_id, "summary.json")
        if storage.exists(summary):
            curves += [{"trial_id": trial_id, "kind": kind, "arm": arm, **{k: given.get(k) for k in PROTOCOL_KEYS.values()},
                        **point} for point in trial_curve(storage.read_json(summary)["history"])]
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "_config"} for r in rows])
    storage.write_frame_csv(storage.join(experiment_dir, "results.csv"), table)
    storage.write_frame_parquet(storage.join(experiment_dir, "results.parquet"), table.astype({c: str for c in swept}))
    storage.write_frame_csv(storage.join(experiment_dir, "phases.csv"), pd.DataFrame(phases))
    storage.write_frame_csv(storage.join(experiment_dir, "curves.csv"), pd.DataFrame(curves, columns=CURVE_FIELDS))
    write_comparison_csv(experiment_dir, compare(experiment_dir))
    best = best_trial(table, config.tune.metric, config.tune.mode)  # the report's rule too
    if best is not None:
        chosen = next(r for r in rows if r["trial_id"] == best["trial_id"])
        storage.write_bytes(storage.join(experiment_dir, "best_config.yaml"), chosen["_config"].to_yaml().encode())
    return rows


CURVE_FIELDS = ["trial_id", "kind", "arm", *PROTOCOL_KEYS.values(), "stack", "global_step", "flops", "val_loss",
                "val_bpb"]


def write_comparison_csv(experiment_dir: str, compared: list[dict]) -> None:
    """comparison.csv: the table, then what makes its evidence weak as `#` lines under it
    (pandas reads the table alone with comment="#")."""
    import pandas as pd

    from .report import weak_evidence

    path = storage.join(experiment_dir, "comparison.csv")
    storage.write_frame_csv(path, pd.DataFrame(compared))
    lines = weak_evidence(compared)
    if lines:
        text = storage.read_bytes(path).decode().rstrip("\n") + "\n" + "".join(f"# {line}\n" for line in lines)
        storage.write_bytes(path, text.encode())


def compare(experiment_dir: str) -> list[dict]:
    """report.comparison of the results.csv and curves.csv just written (read back as the
    report reads them)."""
    from .report import CURVE_COLUMNS, RESULT_COLUMNS, comparison, read_table

    return comparison(read_table(storage.join(experiment_dir, "results.csv"), RESULT_COLUMNS),
                      read_table(storage.join(experiment_dir, "curves.csv"), CURVE_COLUMNS))


def trial_curve(history: list[dict]) -> list[dict]:
    """A run's validation curve over its phases: {stack, global_step, flops, val_loss, val_bpb} per
    point, FLOPs counted from the run's start (cache builds included, before the steps of
    the phase they feed). Phases without eval_every give one point, at their end."""
    points, spent, steps = [], 0.0, 0
    for phase in history:
        build = phase["flops"] - phase["train_flops"]
        curve = phase.get("val_curve") or [{"step": phase["steps"], "global_step": steps + phase["steps"],
                                            "phase_flops": phase["train_flops"], "val_loss": phase["val_loss"],
                                            "val_bpb": phase.get("val_bpb")}]
        points += [{"stack": phase["stack"], "global_step": p["global_step"], "flops": spent + build + p["phase_flops"],
                    "val_loss": p["val_loss"], "val_bpb": p.get("val_bpb")} for p in curve]
        spent, steps = spent + phase["flops"], steps + phase["steps"]
    return points


def planned_baseline(config: StackWiseConfig) -> dict | None:
    """baseline_plan over the config's training split (its token store is built where missing)."""
    if config.tune.baseline != "end_to_end":
        return None
    from .data.dataset import build_datasets

    return baseline_plan(config, len(build_datasets(config)[0]))


def dry_run_text(config: StackWiseConfig, baseline: dict | None) -> str:
    """The trials a sweep will run: arms x LRs x seeds (x num_samples), one line per grid point."""
    t, variants = config.tune, grid_variants(config)
    sampled = [k for k, s in t.search_space.items() if "grid" not in s]
    factors = [f"{len(arms(config))} arms"] + [f"{len(getattr(t, key))} {key}" for key in PROTOCOL_KEYS
                                                if getattr(t, key)]
    lines = [f"{len(variants) * t.num_samples} trials ({len(variants)} grid points: {' x '.join(factors)}; "
             f"x num_samples {t.num_samples}); sampled per trial: {', '.join(sampled) or 'nothing'}"]
    if baseline is not None:
        lines.append(f"baseline (end to end, baseline_match {t.baseline_match}): batch {baseline['batch_size']}, "
                     f"{baseline['steps']} steps, budget {baseline['budget']:.4g} FLOPs")
    lines += [f"  {i}: {v or '(the base config)'}" for i, v in enumerate(variants)]
    return "\n".join(lines)


def comparison_text(compared: list[dict]) -> str:
    """The report's comparison table, as console text."""
    from .report import COMPARE_HEADER, comparison_rows, weak_evidence

    return "\n".join([aligned([COMPARE_HEADER, *comparison_rows(compared)]), *weak_evidence(compared)])


def results_table(rows: list[dict], swept: list[str]) -> str:
    cols = ["trial_id", "kind", *swept, "val_loss", "val_bpb", "flops", "wall_s", "phases_trained", "phases_reused",
            "status"]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.3f}"
        return "-" if v is None else str(v)

    return aligned([[c.split(".")[-1] for c in cols]] + [[fmt(r.get(c)) for c in cols] for r in rows])


def aligned(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


@stop_on_signals()
def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.tune", description="A Ray Tune sweep of progressive runs.")
    parser.add_argument("config", help="experiment YAML with a tune: section")
    parser.add_argument("--address", help="Ray cluster address (default: ray.address, RAY_ADDRESS, or a local Ray)")
    parser.add_argument("--storage", help="root of experiment directories (default: ray.storage_path)")
    parser.add_argument("--name", help="experiment name (default: the YAML file's name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--dry-run", action="store_true", help="print the trials without running them")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' output here, not in the log")
    add_overrides_argument(parser)
    args = parser.parse_intermixed_args(argv)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    config = load_for_command(args.config, args.storage, check_data=not args.dry_run, address=args.address,
                              name=name, overrides=args.overrides)  # a default name is checked too
    if config is None:
        return BAD_INPUT
    try:  # a baseline that cannot be matched is refused before Ray starts
        baseline = planned_baseline(config)
    except ConfigError as e:
        return refuse(args.config, e)
    if args.dry_run:
        print(dry_run_text(config, baseline))
        return 0
    root = config.ray.storage_path  # load_for_command applied --storage and normalised it
    experiment_dir = storage.join(root, name)
    from ray import tune

    if storage.exists(experiment_dir) and not args.resume and tune.Tuner.can_restore(experiment_dir):
        return refuse(experiment_dir, "a sweep is already there; pass --resume or another --name")
    from .console import Console, LogFileError, log_path

    console = Console(log_path(experiment_dir, "tune.log"), verbose=args.verbose)
    try:
        console.start()
        console.line(start_ray(config, args.address))
        console.capture_ray_worker_logs()
        # the sweep as it runs, command-line overrides included: the report reads its metric and mode
        storage.write_bytes(storage.join(experiment_dir, "config.yaml"), config.to_yaml().encode())
        if args.resume and tune.Tuner.can_restore(experiment_dir):
            tuner = tune.Tuner.restore(experiment_dir, trainable=trainable(config, experiment_dir), resume_errored=True)
        else:
            tuner = build_tuner(config, root, name)
        grid = run_in_thread(tuner.fit)
        rows = write_results(grid, config, experiment_dir)
        console.line(results_table(rows, swept_paths(config)))
        compared = compare(experiment_dir)
        if compared:
            console.line("\n" + comparison_text(compared))
        console.line(f"\nresults: {storage.join(experiment_dir, 'results.csv')}  "
                     f"best config: {storage.join(experiment_dir, 'best_config.yaml')}")
    except (ConfigError, LogFileError) as e:
        console.error(error_line(None if isinstance(e, LogFileError) else args.config, e))
        return BAD_INPUT
    except Exception as e:  # noqa: BLE001 - a full disk is one line; anything else stays a traceback
        if (full := disk_full(e)) is None:
            raise
        from .phase_store import PhaseStore

        console.error(disk_full_line(full, experiment_dir, PhaseStore(storage.join(experiment_dir, "phases"))))
        return BAD_INPUT
    finally:
        console.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
