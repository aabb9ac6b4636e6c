"""P6: compute-matched quality on the bundled corpus. Progressive variants (append with a
frozen, cached trunk; append with a qlora trunk; prepend; prepend with a qlora trunk)
against the end-to-end baseline: the same final architecture trained at once for the
FLOPs of the base progressive run (`tune.baseline: end_to_end`)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, run_sweep, table, write_section  # noqa: E402

EXPERIMENT = "experiments/sweep_trunk_mode.yaml"  # trunk_strategy x building_mode grid + the baseline
OVERRIDES = {"training": {"steps_per_stack": 300}}


def flops_to_reach(curve: pd.DataFrame, target: float) -> float | None:
    """FLOPs at which a trial's per-stack validation loss first reaches `target`
    (linear between stack ends), or None."""
    flops, losses = [0.0, *curve["cum_flops"]], [np.inf, *curve["val_loss"]]
    for i in range(1, len(flops)):
        if losses[i] <= target:
            if not np.isfinite(losses[i - 1]):
                return flops[i]
            frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return flops[i - 1] + frac * (flops[i] - flops[i - 1])
    return None


def main() -> None:
    wall, experiment = run_sweep(config(OVERRIDES, base=EXPERIMENT), "quality")
    results = pd.read_csv(os.path.join(experiment, "results.csv"))
    phases = pd.read_csv(os.path.join(experiment, "phases.csv")).sort_values(["trial_id", "stack"])
    base = results[results["kind"] == "baseline"].iloc[0]
    rows = []
    for _, r in results.iterrows():
        name = "end-to-end baseline" if r["kind"] == "baseline" else \
            f"{r['training.progressive.building_mode']}, {r['training.progressive.trunk_strategy']} trunk"
        reach = flops_to_reach(phases[phases["trial_id"] == r["trial_id"]], base["val_loss"])
        rows.append([name, r["val_loss"], r["flops"], r["flops"] / base["flops"],
                     (r["val_loss"] - base["val_loss"]) / base["val_loss"],
                     "not reached" if reach is None else f"{reach / base['flops']:.2f}"])
    body = (f"`{EXPERIMENT}` with 300 steps per stack (d_model 128, 3 stacks of 1 block, seq_len 64, 2000 "
            f"windows of the bundled pydoc corpus, clm, a rank-8 LoRA on every stack); one sweep of {len(results)} "
            f"trials, {wall:.0f} s. FLOPs are counted from the "
            "rack's matmuls (3× forward for what trains, 1× for frozen forwards, cache building included). "
            "*To reach baseline* is the fraction of the baseline's FLOPs at which a run's validation loss, "
            "read at each stack's end, first reaches the baseline's final loss.\n\n"
            + table(["run", "val_loss", "FLOPs", "× baseline FLOPs", "loss vs baseline", "FLOPs to reach baseline"],
                    rows))
    write_section("p6", "P6: compute-matched quality", body)


if __name__ == "__main__":
    main()
