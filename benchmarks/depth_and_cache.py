"""P1, P2 and P4 (memory by depth): an 8-stack append run with a frozen trunk, with and
without the activation cache, back to back.

P1: the time of a training step in phase 7 / phase 1 (flat with the cache, growing
    with depth without it).
P2: the whole run's wall time with the cache / without, at 3 epochs per stack, with
    phases run one after another and with each phase prestarted while the one before
    it trains.
P4: peak worker memory (RSS) of phase 7 / phase 1 in append + cached mode.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, table, write_section  # noqa: E402

SIZES = {"model": {"d_model": 128, "n_heads": 4, "blocks_per_stack": 1, "max_seq_len": 64},
         "data": {"seq_len": 64, "batch_size": 16, "max_examples": 1200},
         "training": {"epochs_per_stack": 3, "eval_batches": 8, "checkpoint_every": 0,
                      "progressive": {"target_stacks": 8, "max_stacks": 8, "building_mode": "append",
                                      "trunk_strategy": "frozen"}}}


def run(cache: bool, prestart: bool = False) -> tuple[float, list[dict]]:
    from stackwise_ray.trainer import ProgressiveTrainer

    sizes = {**SIZES, "training": {**SIZES["training"],
                                   "progressive": {**SIZES["training"]["progressive"], "cache_activations": cache}}}
    t0 = time.perf_counter()
    history = ProgressiveTrainer(config(sizes), storage_path=tempfile.mkdtemp(prefix="bench-depth-"),
                                 name="cache" if cache else "no-cache",
                                 # False: no phase overlaps another, so step times measure the phase alone
                                 prestart=prestart).train_progressively()
    return time.perf_counter() - t0, history


def main() -> None:
    runs = {cache: run(cache) for cache in (True, False)}
    prestarted = {cache: run(cache, prestart=True)[0] for cache in (True, False)}
    rows = []
    for k in range(8):
        c, n = runs[True][1][k], runs[False][1][k]
        rows.append([k, 1000 * c["train_s"] / c["steps"], 1000 * n["train_s"] / n["steps"], c["trunk_forwards"],
                     n["trunk_forwards"], c["cache_s"], c["peak_memory_mb"], n["peak_memory_mb"]])

    def step(cache, k):
        m = runs[cache][1][k]
        return m["train_s"] / m["steps"]

    wall_c, wall_n = runs[True][0], runs[False][0]
    compute = {cache: sum(m["train_s"] + m["cache_s"] for m in runs[cache][1]) for cache in runs}
    c7, c1 = runs[True][1][7], runs[True][1][1]
    steps = runs[True][1][0]["steps"]
    summary = [
        ["P1 cached: step time phase 7 / phase 1", step(True, 7) / step(True, 1), "≤ 1.10"],
        ["P1 uncached: step time phase 7 / phase 1", step(False, 7) / step(False, 1), "(grows)"],
        ["P2 wall time, cache / no cache", wall_c / wall_n, "≤ 0.50"],
        ["P2 training + cache building only, cache / no cache", compute[True] / compute[False], ""],
        ["P2 wall time, cache / no cache, phases prestarted", prestarted[True] / prestarted[False], "≤ 0.50"],
        ["P4 peak worker RSS phase 7 / phase 1 (cached)", c7["peak_memory_mb"] / c1["peak_memory_mb"], "≤ 1.10"],
    ]
    body = (f"8 stacks of 1 block, d_model 128, seq_len 64, batch 16, {steps} steps per stack "
            f"(3 epochs of {runs[True][1][0]['steps'] // 3} batches: `data.max_examples: 1200`), append, frozen "
            f"trunk, object-store cache, 1 worker, phases not prestarted (so no phase's steps share the CPUs with "
            f"the next phase's start-up). Wall time: {wall_c:.0f} s with the cache, {wall_n:.0f} s "
            f"without; then the same two runs with phases prestarted: {prestarted[True]:.0f} s and "
            f"{prestarted[False]:.0f} s.\n\n"
            + table(["measure", "value", "target"], summary) + "\n\nPer phase:\n\n"
            + table(["stack", "step ms (cache)", "step ms (no cache)", "trunk forwards (cache)",
                     "trunk forwards (no cache)", "cache build s", "peak RSS MB (cache)", "peak RSS MB (no cache)"],
                    rows)
            + "\n\nThe peak RSS is the phase worker's `ru_maxrss`: it includes the ~0.5 GB that the "
              "imports of torch and Ray take in every worker, and the cache the worker holds.")
    write_section("p1p2", "P1, P2: cost by depth, with and without the cache", body)


if __name__ == "__main__":
    main()
