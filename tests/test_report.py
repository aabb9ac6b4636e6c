import os
import subprocess
import sys

import pandas as pd
import pytest

from stackwise_ray.report import main, write_report

STRATEGY = "training.progressive.trunk_strategy"
MODE = "training.progressive.building_mode"
GFLOP = 1e9


def write_sweep(directory) -> None:
    """3 progressive trials x 3 stacks (one errored at stack 2, one reusing stack 0) and a baseline."""
    results = [
        {"trial_id": "t_frozen", "kind": "progressive", "status": "TERMINATED", STRATEGY: "frozen", MODE: "append",
         "val_loss": 3.10, "flops": 3 * GFLOP, "wall_s": 30.0, "phases_trained": 3, "phases_reused": 0, "error": ""},
        {"trial_id": "t_lora", "kind": "progressive", "status": "TERMINATED", STRATEGY: "lora", MODE: "append",
         "val_loss": 2.90, "flops": 3 * GFLOP, "wall_s": 25.0, "phases_trained": 2, "phases_reused": 1, "error": ""},
        {"trial_id": "t_broken", "kind": "progressive", "status": "ERROR", STRATEGY: "full", MODE: "prepend",
         "val_loss": None, "flops": 2 * GFLOP, "wall_s": 12.0, "phases_trained": 2, "phases_reused": 0,
         "error": "RuntimeError: CUDA out of memory | stack 2"},
        {"trial_id": "t_base", "kind": "baseline", "status": "TERMINATED", STRATEGY: None, MODE: None,
         "val_loss": 3.00, "flops": 6 * GFLOP, "wall_s": 50.0, "phases_trained": 1, "phases_reused": 0, "error": ""},
    ]
    for r in results:
        r.update(val_ppl=None, val_accuracy=None, stacks_done=3)
    pd.DataFrame(results).to_csv(os.path.join(directory, "results.csv"), index=False)
    phases = []
    for trial_id, losses in [("t_frozen", [4.0, 3.5, 3.1]), ("t_lora", [4.0, 3.3, 2.9]), ("t_broken", [4.1, 3.6])]:
        for stack, loss in enumerate(losses):
            reused = trial_id == "t_lora" and stack == 0
            phases.append({"trial_id": trial_id, "kind": "progressive", "stack": stack, "val_loss": loss,
                           "flops": GFLOP, "cum_flops": (stack + 1) * GFLOP, "wall_s": 0.1 if reused else 10.0,
                           "train_s": 8.0, "peak_memory_mb": 100.0 + 50 * stack,
                           "status": "reused" if reused else "trained", "phase_id": f"{trial_id}-{stack}"})
    phases.append({"trial_id": "t_base", "kind": "baseline", "stack": 2, "val_loss": 3.0, "flops": 6 * GFLOP,
                   "cum_flops": 6 * GFLOP, "wall_s": 50.0, "train_s": 45.0, "peak_memory_mb": 300.0,
                   "status": "trained", "phase_id": "base"})
    pd.DataFrame(phases).to_csv(os.path.join(directory, "phases.csv"), index=False)


def test_write_report(tmp_path):
    write_sweep(tmp_path)
    paths = write_report(str(tmp_path))
    for name in ("val_loss_per_stack", "phase_time_memory", "loss_vs_flops"):
        with open(paths[name], "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    assert os.path.dirname(paths["summary_md"]) == str(tmp_path / "report")
    md = open(paths["summary_md"]).read()
    for trial_id in ("t_frozen", "t_lora", "t_broken", "t_base"):
        assert trial_id in md
    assert "Best trial: t_lora" in md
    comparison = next(line for line in md.splitlines() if line.startswith("Against the baseline t_base"))
    assert "FLOP ratio 0.50x" in comparison and "-0.1000" in comparison
    assert "CUDA out of memory \\| stack 2" in md  # a pipe in an error must not break the table
    for file in ("val_loss_per_stack.png", "phase_time_memory.png", "loss_vs_flops.png"):
        assert f"({file})" in md
    page = open(paths["summary_html"]).read()
    assert '<img src="loss_vs_flops.png"' in page and "t_broken" in page


def test_out_dir_and_missing_phases(tmp_path):
    write_sweep(tmp_path)
    os.remove(tmp_path / "phases.csv")
    assert main([str(tmp_path), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "summary.html").is_file()


def test_cli_without_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stackwise_ray.report", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: no results.csv here"]


@pytest.mark.parametrize("table, content, expected", [
    ("results.csv", bytes(range(256)) * 8, "results.csv: a binary file, not CSV"),
    ("results.csv", "trial_id,val_loss\nt1,3.0\nt2,lots\n".encode(), "results.csv: val_loss: row 2: not a number: 'lots'"),
    ("results.csv", b"\xff\xfe" + "trial_id\nt1\n".encode("utf-16-le"), "results.csv: a binary file, not CSV"),
    ("results.csv", "caf\xe9,ol\xe9\n".encode("latin-1"), "results.csv: not a CSV table"),
    ("results.csv", b"just some text\n", "results.csv: no trial_id column"),
    ("phases.csv", b"trial_id,stack\nt_frozen,first\n", "phases.csv: stack: row 1: not a number: 'first'"),
], ids=["binary", "not-a-number", "utf-16", "latin-1", "no-columns", "phases-not-a-number"])
def test_a_table_that_is_not_a_sweeps_is_one_line(tmp_path, capsys, table, content, expected):
    write_sweep(tmp_path)
    (tmp_path / table).write_bytes(content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/") and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "report").exists()


def write_comparison(directory) -> None:
    """Two progressive arms and the baseline, 2 LRs x 3 seeds (prepend: one trial, one errored)."""
    finals = {("building_mode=append", 1e-3): [1.70, 1.74, 1.72], ("building_mode=append", 3e-3): [1.56, 1.64, 1.60],
              ("baseline", 1e-3): [1.60, 1.75, 1.70], ("baseline", 3e-3): [2.58, 2.90, 2.70]}
    curves = {("building_mode=append", 3e-3): [[3.0, 2.1, 1.60, 1.56], [3.0, 2.3, 1.70, 1.64], [3.0, 2.2, 1.65, 1.60]],
              ("building_mode=append", 1e-3): [[3.2, 2.5, 1.9, f] for f in finals[("building_mode=append", 1e-3)]],
              ("baseline", 1e-3): [[2.5, 1.9, f] for f in finals[("baseline", 1e-3)]],
              ("baseline", 3e-3): [[2.9, 2.7, f] for f in finals[("baseline", 3e-3)]]}
    results, points = [], []
    for (arm, lr), losses in finals.items():
        base = arm == "baseline"
        for seed, loss in enumerate(losses):
            trial_id = f"{arm[:4]}-{lr:g}-{seed}"
            results.append({"trial_id": trial_id, "kind": "baseline" if base else "progressive", "arm": arm,
                            "status": "TERMINATED", "training.lr": lr, "training.seed": seed, "val_loss": loss,
                            "flops": 0.99e9 if base else 1e9, "budget": 1e9, "steps": 30 if base else 40,
                            "tokens": 30 * 5 * 32 if base else 40 * 8 * 32, "epochs": 2.5 if base else 4.0})
            step_flops = 0.33e9 if base else 0.25e9
            for i, value in enumerate(curves[(arm, lr)][seed]):
                points.append({"trial_id": trial_id, "kind": results[-1]["kind"], "arm": arm,
                               "global_step": 10 * (i + 1), "flops": step_flops * (i + 1), "val_loss": value})
    results += [{"trial_id": "prep-0", "kind": "progressive", "arm": "building_mode=prepend", "status": "TERMINATED",
                 "training.lr": 1e-3, "training.seed": 0, "val_loss": 1.95, "flops": 1.49e9, "budget": 1e9,
                 "steps": 40, "tokens": 40 * 8 * 32, "epochs": 4.0},
                {"trial_id": "prep-1", "kind": "progressive", "arm": "building_mode=prepend", "status": "ERROR",
                 "training.lr": 1e-3, "training.seed": 1, "val_loss": None, "flops": None, "budget": 1e9,
                 "error": "RuntimeError: boom"}]
    points += [{"trial_id": "prep-0", "kind": "progressive", "arm": "building_mode=prepend", "global_step": 40,
                "flops": 1.49e9, "val_loss": 1.95}]
    pd.DataFrame(results).to_csv(os.path.join(directory, "results.csv"), index=False)
    pd.DataFrame(points).to_csv(os.path.join(directory, "curves.csv"), index=False)


def test_comparison_table_at_each_arms_best_lr_with_welch_intervals(tmp_path):
    from stackwise_ray.report import CURVE_COLUMNS, RESULT_COLUMNS, comparison, read_table

    write_comparison(tmp_path)
    rows = {r["arm"]: r for r in comparison(read_table(str(tmp_path / "results.csv"), RESULT_COLUMNS),
                                            read_table(str(tmp_path / "curves.csv"), CURVE_COLUMNS))}
    append, base, prepend = rows["building_mode=append"], rows["baseline"], rows["building_mode=prepend"]
    # best LR by mean final loss over seeds: 3e-3 (1.60 against 1.72); the baseline's 1e-3 (1.6833 against 2.7267)
    assert (append["lr"], base["lr"], append["seeds"], prepend["seeds"]) == (3e-3, 1e-3, 3, 1)
    assert append["val_loss_mean"] == pytest.approx(1.60) and append["val_loss_std"] == pytest.approx(0.04)
    assert base["val_loss_mean"] == pytest.approx(1.683333, abs=1e-6)
    assert base["val_loss_std"] == pytest.approx(0.0763763, abs=1e-6)
    # Welch: se = sqrt(0.04^2/3 + 0.0763763^2/3) = 0.0497773, df = 3.0204, t(0.975, 3.0204) = 3.1698
    assert append["diff"] == pytest.approx(-0.083333, abs=1e-6)
    assert (append["ci_low"], append["ci_high"]) == (pytest.approx(-0.241144, abs=1e-5), pytest.approx(0.074477, abs=1e-5))
    # the mean curve crosses the baseline's 1.68333 between (0.5e9, 2.2) and (0.75e9, 1.65):
    # 0.5e9 + 0.25e9 * (2.2 - 1.68333) / (2.2 - 1.65) = 0.734848e9, 0.7423x the baseline's 0.99e9
    assert append["flops_to_reach"] == pytest.approx(0.734848e9, rel=1e-5)
    assert append["reach_ratio"] == pytest.approx(0.742271, rel=1e-5)
    assert base["flops_to_reach"] == pytest.approx(0.99e9)  # its own final loss, at its end
    assert prepend["flops_to_reach"] is None and prepend["over_budget"] and not append["over_budget"]
    assert (append["steps"], append["tokens"], append["epochs"]) == (40, 40 * 8 * 32, 4.0)

    md = open(write_report(str(tmp_path))["summary_md"]).read()
    assert "| building_mode=append | 0.003 | 3 | 1.6000 ± 0.0400 | -0.0833 [-0.2411, +0.0745] | 1e+09 | 40 | " \
           "1.02e+04 | 4.00 | 7.35e+08 (0.74x) | yes |" in md
    assert "| baseline | 0.001 | 3 | 1.6833 ± 0.0764 | - | 9.9e+08 | 30 |" in md
    assert "| building_mode=prepend | 0.001 | 1 | 1.9500 ± - | +0.2667 [-, -] | 1.49e+09 | 40 | 1.02e+04 | 4.00 | " \
           "not reached | NO (1.49x budget) |" in md
    assert "Welch's t-test" in md
    with open(tmp_path / "report" / "compare_loss_vs_flops.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_one_rule_names_the_best_trial_for_tune_and_the_report(tmp_path):
    """best_trial is what tune's best_config.yaml and the report's summary both use: a
    finished progressive trial, by the sweep's own metric and mode (its config.yaml)."""
    from stackwise_ray.config import StackWiseConfig
    from stackwise_ray.report import best_trial

    write_sweep(tmp_path)
    results = pd.read_csv(tmp_path / "results.csv")
    stopped = {**results.iloc[0].to_dict(), "trial_id": "t_stopped", "status": "STOPPED", "val_loss": 1.0}
    results = pd.concat([results, pd.DataFrame([stopped])], ignore_index=True)
    results.loc[results["trial_id"] == "t_base", "val_loss"] = 0.5  # a better baseline is compared, not chosen
    results["val_accuracy"] = [0.6, 0.4, None, 0.9, 0.95]  # by accuracy, t_frozen is the best finished trial
    results.to_csv(tmp_path / "results.csv", index=False)
    assert best_trial(results)["trial_id"] == "t_lora"  # lowest val_loss among finished progressive trials
    assert best_trial(results, "val_accuracy", "max")["trial_id"] == "t_frozen"
    config = StackWiseConfig.from_dict({"tune": {"metric": "val_accuracy", "mode": "max"}}).validate()
    (tmp_path / "config.yaml").write_text(config.to_yaml())  # what the tune command writes
    md = open(write_report(str(tmp_path))["summary_md"]).read()
    assert "Best trial: t_frozen" in md and "val_accuracy 0.6000" in md


def test_trials_repeating_a_seed_are_one_measurement_and_give_no_interval(tmp_path):
    from stackwise_ray.report import comparison

    # num_samples 2 of a deterministic trial: each arm's one measurement appears twice
    results = pd.DataFrame([{"trial_id": f"{arm}-{i}", "kind": "baseline" if arm == "baseline" else "progressive",
                             "arm": arm, "status": "TERMINATED", "training.seed": 0, "val_loss": loss, "flops": 1e9,
                             "budget": 1e9} for arm, loss in (("frozen", 1.5), ("baseline", 1.4278)) for i in range(2)])
    rows = {r["arm"]: r for r in comparison(results, pd.DataFrame(columns=["trial_id", "flops", "val_loss",
                                                                          "global_step"]))}
    assert rows["frozen"]["seeds"] == 1 and pd.isna(rows["frozen"]["val_loss_std"])
    assert rows["frozen"]["diff"] == pytest.approx(0.0722) and pd.isna(rows["frozen"]["ci_low"])
    # two distinct seeds: an interval
    results.loc[results.index % 2 == 1, "training.seed"] = 1
    results.loc[results.index % 2 == 1, "val_loss"] += 0.01
    rows = {r["arm"]: r for r in comparison(results, pd.DataFrame(columns=["trial_id", "flops", "val_loss",
                                                                          "global_step"]))}
    assert rows["frozen"]["seeds"] == 2 and rows["frozen"]["ci_low"] < rows["frozen"]["diff"] < rows["frozen"]["ci_high"]


@pytest.mark.timeout(60)
def test_results_that_are_no_file_or_an_out_that_is_a_file_are_one_line(tmp_path, capsys):
    write_sweep(tmp_path)
    (tmp_path / "afile").write_text("mine")
    assert main([str(tmp_path), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path / 'afile'}: not a directory (a report is a directory of files)\n"
    assert (tmp_path / "afile").read_text() == "mine"
    for name, make in (("dir", os.mkdir), ("fifo", os.mkfifo)):  # a FIFO nothing writes to would block a reader
        sweep = tmp_path / name
        sweep.mkdir()
        write_sweep(sweep)
        (sweep / "results.csv").unlink()
        make(sweep / "results.csv")
        assert main([str(sweep)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {sweep / 'results.csv'}: cannot read: not a regular file") and err.count("\n") == 1
        assert not (sweep / "report").exists()


def test_a_link_in_the_report_directory_is_replaced_not_written_through(tmp_path):
    write_sweep(tmp_path)
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("not the report's")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.md").symlink_to(elsewhere)
    paths = write_report(str(tmp_path))
    assert elsewhere.read_text() == "not the report's"
    assert not os.path.islink(paths["summary_md"]) and "# Sweep report" in open(paths["summary_md"]).read()
    assert sorted(os.listdir(tmp_path / "report")) == sorted(os.path.basename(p) for p in paths.values())


def test_the_comparison_says_under_it_what_makes_its_evidence_weak(tmp_path):
    from stackwise_ray.report import CURVE_COLUMNS, RESULT_COLUMNS, comparison, read_table, weak_evidence
    from stackwise_ray.tune import comparison_text, write_comparison_csv

    write_comparison(tmp_path)  # 2 LRs; prepend: 1 seed and over the budget; the baseline: 30 steps, the arms 40
    compared = comparison(read_table(str(tmp_path / "results.csv"), RESULT_COLUMNS),
                          read_table(str(tmp_path / "curves.csv"), CURVE_COLUMNS))
    lines = weak_evidence(compared)
    assert len(lines) == 5 and all(line.startswith("Weak evidence: ") for line in lines)
    # of 1e-3 and 3e-3, append is best at 3e-3 and the baseline at 1e-3; prepend ran one LR: no grid, no edge
    assert lines[0].startswith("Weak evidence: building_mode=append's best LR (0.003) is the largest it tried")
    assert lines[1].startswith("Weak evidence: baseline's best LR (0.001) is the smallest it tried")
    assert "1 seed for some arm (fewer than 3)" in lines[2]
    assert "matched in FLOPs only and trained 30 steps against the arms' 40+" in lines[3]
    assert lines[4].startswith("Weak evidence: building_mode=prepend spent more FLOPs than the budget")
    # one LR, three seeds, steps matched, within the budget: nothing to say
    good = [{**r, "lrs_tried": 1, "lr_edge": None} for r in compared if r["arm"] != "building_mode=prepend"]
    assert weak_evidence(good)[0].startswith("Weak evidence: a single learning rate for every arm")
    # an interior best LR, three seeds, steps matched, within the budget: nothing to say
    assert weak_evidence([{**r, "steps": 40, "lr_edge": None} for r in compared
                          if r["arm"] != "building_mode=prepend"]) == []

    # a third, larger LR that does worse puts append's best (3e-3) inside its grid
    results = read_table(str(tmp_path / "results.csv"), RESULT_COLUMNS)
    worse = results[(results["arm"] == "building_mode=append") & (results["training.lr"] == 3e-3)].assign(
        **{"training.lr": 1e-2, "val_loss": 2.5, "trial_id": lambda f: f["trial_id"] + "-wide"})
    wider = comparison(pd.concat([results, worse]), read_table(str(tmp_path / "curves.csv"), CURVE_COLUMNS))
    assert [r["lr_edge"] for r in wider] == [None, "smallest", None]  # append, baseline, prepend (one LR)
    assert not any("building_mode=append's best LR" in line for line in weak_evidence(wider))

    assert comparison_text(compared).splitlines()[-5:] == lines  # printed under the table
    write_comparison_csv(str(tmp_path), compared)
    text = (tmp_path / "comparison.csv").read_text()
    assert text.splitlines()[-5:] == [f"# {line}" for line in lines]
    assert len(pd.read_csv(tmp_path / "comparison.csv", comment="#")) == 3
    md = open(write_report(str(tmp_path))["summary_md"]).read()
    assert all(line in md for line in lines)


def test_growth_benchmark_puts_each_seed_on_flops_and_on_tokens():
    """P6b's per-seed reach (benchmarks/quality_growth.py), against a hand count: the arm
    trains 20 tokens a step and crosses the baseline's final loss (2.0) halfway between its
    evaluations at steps 50 and 100 (FLOPs 10 and 20): step 75, so 15 FLOPs and 1500 tokens,
    1.5x the baseline's 1000 tokens."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)
    try:
        import quality_growth as q
    finally:
        sys.path.remove(bench)
    results = pd.DataFrame({"trial_id": ["a", "b"], "arm": ["arm", "baseline"], "training.lr": [1e-3, 1e-3],
                            "val_loss": [1.5, 2.0], "tokens": [2000, 1000], "steps": [100, 100]})
    curves = pd.DataFrame({"trial_id": ["a", "a", "b", "b"], "global_step": [50, 100, 50, 100],
                           "flops": [10.0, 20.0, 30.0, 60.0], "val_loss": [2.5, 1.5, 2.4, 2.0]})
    rows = [{"arm": "arm", "lr": 1e-3, "tokens": 2000}, {"arm": "baseline", "lr": 1e-3, "val_loss_mean": 2.0, "tokens": 1000}]
    reach = q.per_seed_reach(results, curves, rows)
    assert reach["arm"]["flops"][:3] == (15.0, pytest.approx(float("nan"), nan_ok=True), 1)
    assert reach["arm"]["tokens"][0] == 1500.0 and reach["baseline"]["tokens"][0] == 1000.0
    assert reach["arm"]["tokens_x"] == 1.5 and q.tokens_to_reach_ratios(reach) == [1.5]
    assert "after 1.50-1.50x the tokens" in q.equal_tokens([1.5]) and "no faster" in q.equal_tokens([1.5])
