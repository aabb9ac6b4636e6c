"""P3: Ray's orchestration overhead per phase, and a whole quickstart run on Ray against a
plain single-process PyTorch loop doing the same phases, steps and caches.

Each variant runs in its own fresh Python process, timed from process start to exit
(imports, Ray start-up and shutdown included):
  plain     benchmarks/plain_loop.py, torch threads = ray.cpus_per_worker (as a Ray worker)
  ray       python -m stackwise_ray.train semantics (ProgressiveTrainer), prestarting on
  ray-serial the same with prestart=False (every phase pays Ray Train's start-up)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, config, table, write_section  # noqa: E402

CONFIG = "experiments/quickstart.yaml"


def child(kind: str, out: str) -> None:
    cfg = config({})
    if kind == "plain":
        from plain_loop import run_plain

        history = run_plain(cfg, threads=int(cfg.ray.cpus_per_worker))
    else:
        from stackwise_ray.trainer import ProgressiveTrainer

        storage = tempfile.mkdtemp(prefix="bench-overhead-")
        history = ProgressiveTrainer(cfg, storage_path=storage, name=kind,
                                     prestart=kind == "ray").train_progressively()
    keys = ("stack", "val_loss", "train_s", "cache_s", "cold_start_s", "startup_s", "orchestration_s",
            "phase_wall_s", "phase_s", "prestarted", "torch_threads")
    with open(out, "w") as f:
        json.dump([{k: m[k] for k in keys if k in m} for m in history], f)


def run(kind: str) -> tuple[float, list[dict]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", kind, "--out", out.name], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        return wall, json.load(open(out.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.out)
    results = {kind: run(kind) for kind in ("plain", "ray", "ray-serial")}
    plain_wall = results["plain"][0]
    rows = []
    for kind, (wall, history) in results.items():
        train = sum(m["train_s"] for m in history)
        rows.append([kind, wall, wall / plain_wall, train, sum(m["cache_s"] for m in history),
                     " / ".join(f"{m['val_loss']:.3f}" for m in history)])
    body = [f"The quickstart (`{CONFIG}`: 3 stacks, d_model 128, 300 steps per stack, object-store cache, "
            "1 worker) run three ways, each in a fresh process, back to back.\n",
            table(["variant", "wall s", "× plain", "training s", "cache build s", "val_loss per stack"], rows), ""]
    phase_rows = []
    for kind in ("ray", "ray-serial"):
        for m in results[kind][1]:
            teardown = m["orchestration_s"] - m["startup_s"]
            phase_rows.append([kind, m["stack"], m["prestarted"], m["cold_start_s"], m["startup_s"], teardown,
                               m["startup_s"] + teardown, m["train_s"], m["torch_threads"]])
    body += ["Per phase on Ray. *cold start*: `TorchTrainer.fit()` to the loop's first line; *start-up*: "
             "from the moment the phase's inputs (previous checkpoint, cache) are ready to its first "
             "step; *teardown*: the rest of the phase outside training (evaluation, checkpoint, report, "
             "worker shutdown). A prestarted phase's cold start overlaps the previous phase's training.\n",
             table(["variant", "stack", "prestarted", "cold start s", "start-up s", "teardown s",
                    "overhead s", "training s", "torch threads"], phase_rows)]
    write_section("p3", "P3: Ray overhead", "\n".join(body))


if __name__ == "__main__":
    main()
