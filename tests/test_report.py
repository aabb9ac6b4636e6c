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
