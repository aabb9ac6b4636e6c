"""P5: a 4-trial sweep whose trials share stacks 0..2 and differ in stack 3's precision,
with phase reuse (`tune.share_phases: true`) and without, back to back."""

from __future__ import annotations

import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, run_sweep, table, write_section  # noqa: E402

OVERRIDES = {
    "model": {"d_model": 64, "n_heads": 2, "blocks_per_stack": 1, "max_seq_len": 64},
    "data": {"seq_len": 64, "max_examples": 400},
    "training": {"steps_per_stack": 100, "eval_batches": 4, "checkpoint_every": 0,
                 "progressive": {"target_stacks": 4, "max_stacks": 4, "qlora_enabled": True}},
    "tune": {"search_space": {"training.progressive.stack_precisions": {
        "grid": [{3: "full"}, {3: "bfloat16"}, {3: "nvfp4"}, {3: "qlora"}]}},
        "max_concurrent_trials": 2},
}


def main() -> None:
    rows, walls = [], {}
    for share in (True, False):
        cfg = config({**OVERRIDES, "tune": {**OVERRIDES["tune"], "share_phases": share}})
        wall, experiment = run_sweep(cfg, "reuse" if share else "no-reuse")
        results = pd.read_csv(os.path.join(experiment, "results.csv"))
        phases = pd.read_csv(os.path.join(experiment, "phases.csv"))
        walls[share] = wall
        rows.append(["with reuse" if share else "without", len(results), wall, int(results["phases_trained"].sum()),
                     int(results["phases_reused"].sum()), phases["phase_id"].nunique(),
                     " / ".join(f"{v:.3f}" for v in results["val_loss"])])
    body = ("4 trials × 4 stacks (d_model 64, seq_len 64, 100 steps per stack, 2 concurrent trials); the trials "
            "differ only in stack 3's precision (full, bfloat16, nvfp4, qlora; every stack has a LoRA adapter), "
            "so stacks 0..2 are the same "
            f"phases. **P5: wall time with reuse / without = {walls[True] / walls[False]:.2f}** (target ≤ 0.8).\n\n"
            + table(["sweep", "trials", "wall s", "phases trained", "phases reused", "unique phase ids",
                     "val_loss per trial"], rows))
    write_section("p5", "P5: phase reuse across trials", body)


if __name__ == "__main__":
    main()
