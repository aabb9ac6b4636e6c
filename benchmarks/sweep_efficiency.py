"""P9: how much of a sweep's time trains.

Runs, each as a whole process (`python -m stackwise_ray.tune`, imports and Ray's start and
stop included), back to back:
  trunk_mode  experiments/sweep_trunk_mode.yaml as shipped (5 trials, 2 at a time)
  growth      a 6-trial slice of experiments/compare_growth.yaml (trunk_strategy frozen |
              full x 3 learning rates, seed 0, no baseline), on the bundled corpus
and, in the same run, the quickstart against the plain PyTorch loop (P3's two processes).

Reported per sweep: wall; the training share, the trained phases' `train_s` over
(wall x concurrent trials); per trained phase its orchestration (the phase's wall outside
its training steps: cold start, cache, evaluation, checkpoint, teardown), the first phase
of each trial apart (it may pay Ray's cold start once); each cache build against the
forward compute it does, timed in this process with plain PyTorch on the same shapes; and
how busy the CPUs were (sampled from /proc/stat), so idle time and contention show apart.

--cpus N runs the sweeps against a local `ray start --head --num-cpus N` (N trial slots
of 1 CPU each, max_concurrent_trials N) instead of the command's own Ray.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, table, write_section  # noqa: E402

SWEEPS = {
    "trunk_mode": ("experiments/sweep_trunk_mode.yaml", []),
    "growth": ("experiments/compare_growth.yaml",
               ["tune.lrs=[6.0e-4, 1.0e-3, 2.0e-3]", "tune.seeds=[0]", "tune.baseline=none",
                "tune.baseline_match=flops",
                "tune.search_space={training.progressive.trunk_strategy: {grid: [frozen, full]}}"]),
}


class CpuSampler:
    """How busy the CPUs were over a command (/proc/stat), and the CPU seconds of each kind
    of process it started (`ray::TrainController`, `ray::RayTrainWorker`, ...), sampled
    every 0.5 s: a process's last sample counts, so one that lives under 0.5 s is missed."""

    def __init__(self):
        self.samples, self._stop, self._seen = [], threading.Event(), {}

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def _kind(cmdline: list[str]) -> str | None:
        text = " ".join(cmdline)
        if text.startswith("ray::"):
            return text.split()[0].split(".")[0]
        for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "stackwise_ray.tune", "stackwise_ray.train"):
            if name in text:
                return name
        return None

    def _sample_processes(self) -> None:
        import psutil

        for proc in psutil.process_iter(["cmdline", "create_time"]):
            try:
                if proc.info["create_time"] < self._t0:
                    continue  # not this command's
                kind = self._kind(proc.info["cmdline"] or [])
                if kind is None or (kind == "ray::IDLE" and proc.pid in self._seen):
                    kind = self._seen.get(proc.pid, (kind, 0))[0]
                if kind is not None:
                    times = proc.cpu_times()
                    self._seen[proc.pid] = (kind, times.user + times.system)
            except psutil.Error:
                pass

    def __enter__(self):
        self._t0 = time.time()

        def run():
            last = self._read()
            while not self._stop.wait(0.5):
                now = self._read()
                if now[1] > last[1]:
                    self.samples.append((now[0] - last[0]) / (now[1] - last[1]))
                last = now
                self._sample_processes()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def busy(self) -> float:
        return statistics.mean(self.samples) if self.samples else float("nan")

    def by_kind(self) -> dict[str, tuple[float, int]]:
        """{process kind: (CPU seconds, processes)}, most first."""
        out: dict[str, list] = {}
        for kind, seconds in self._seen.values():
            out.setdefault(kind, [0.0, 0])
            out[kind][0] += seconds
            out[kind][1] += 1
        return dict(sorted(((k, tuple(v)) for k, v in out.items()), key=lambda kv: -kv[1][0]))


def run_sweep(name: str, address: str | None, cpus: int | None) -> dict:
    path, overrides = SWEEPS[name]
    storage = tempfile.mkdtemp(prefix=f"bench-p9-{name}-")
    if cpus:
        overrides = overrides + [f"tune.max_concurrent_trials={cpus}"]
    command = [sys.executable, "-m", "stackwise_ray.tune", path, *overrides, "--storage", storage, "--name", name]
    if address:
        command += ["--address", address]
    with CpuSampler() as cpu:
        t0 = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    experiment = os.path.join(storage, name)
    import yaml

    concurrent = yaml.safe_load(open(os.path.join(experiment, "config.yaml")))["tune"]["max_concurrent_trials"]
    phases = []
    for summary in sorted(glob.glob(os.path.join(experiment, "trials", "*", "summary.json"))):
        history = json.load(open(summary))["history"]
        for i, m in enumerate(history):
            if m["status"] in ("trained", "recovered"):
                phases.append({**m, "first": i == 0 or all(h["status"] == "reused" for h in history[:i])})
    return {"name": name, "wall": wall, "concurrent": concurrent, "busy": cpu.busy, "phases": phases,
            "cpu_by_kind": cpu.by_kind(),
            "trials": len(glob.glob(os.path.join(experiment, "trials", "*", "summary.json"))), "storage": storage}


def forward_seconds(m: dict, config_path: str, overrides: list[str]) -> float | None:
    """Seconds this process takes, with plain PyTorch on one thread, for the forward a
    phase's cache build does: the newest trunk stack over the cache's rows (the
    embedding and the stack for a first cache)."""
    cache = m.get("cache", {})
    if not cache.get("built"):
        return None
    import torch

    from stackwise_ray.builder import ProgressiveRackBuilder
    from stackwise_ray.config import StackWiseConfig, apply_cli_overrides

    torch.set_num_threads(1)
    config = apply_cli_overrides(StackWiseConfig.from_yaml(os.path.join(ROOT, config_path)), overrides).validate()
    builder = ProgressiveRackBuilder(config)
    for _ in range(m["stack"]):
        builder.add_stack()
    rack = builder.build_rack().eval()
    T, rows = config.data.seq_len, cache["rows"]
    x = torch.randint(0, 256, (64, T))
    h = rack.embed_tokens(x)
    start = m["stack"] - 1 if cache.get("incremental") else 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(-(-rows // 64)):
            rack.run_stacks(h, x, None, start=start, end=m["stack"])
    return time.perf_counter() - t0


def quickstart_against_plain() -> tuple[float, float]:
    from ray_overhead import run

    plain, _ = run("plain")
    ray_wall, history = run("ray")
    return plain, ray_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, help="run against `ray start --num-cpus N` with N concurrent trials")
    parser.add_argument("--only", choices=sorted(SWEEPS), action="append", help="run only these sweeps")
    parser.add_argument("--no-quickstart", action="store_true", help="skip the quickstart against the plain loop")
    args = parser.parse_args()
    address = None
    if args.cpus:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
        subprocess.run(["ray", "start", "--head", f"--num-cpus={args.cpus}", "--include-dashboard=false",
                        f"--resources={{\"trial_slot\": {args.cpus}}}"], check=True, capture_output=True)
        address = "auto"
    try:
        results = [run_sweep(name, address, args.cpus) for name in (args.only or SWEEPS)]
    finally:
        if args.cpus:
            subprocess.run(["ray", "stop", "--force"], capture_output=True)
    rows, cache_rows = [], []
    for r in results:
        train = sum(m["train_s"] for m in r["phases"])
        orchestration = [m["phase_wall_s"] - m["train_s"] for m in r["phases"]]
        steady = [m["phase_wall_s"] - m["train_s"] for m in r["phases"] if not m["first"]]
        first = [m["phase_wall_s"] - m["train_s"] for m in r["phases"] if m["first"]]
        rows.append([r["name"], r["trials"], len(r["phases"]), r["concurrent"], r["wall"], train,
                     train / (r["wall"] * r["concurrent"]), statistics.median(steady) if steady else float("nan"),
                     max(orchestration), statistics.median(first) if first else float("nan"), r["busy"]])
        path, overrides = SWEEPS[r["name"]]
        for m in r["phases"]:
            compute = forward_seconds(m, path, overrides)
            if compute:
                cache = m["cache"]
                cache_rows.append([r["name"], m["stack"], cache["rows"], cache["build_s"], compute,
                                   cache["build_s"] / compute])
    body = [f"Sweeps as whole processes{f' against ray start --num-cpus {args.cpus}' if args.cpus else ''}. "
            "*share*: trained phases' training seconds / (wall x concurrent trials); *orchestration*: a trained "
            "phase's wall outside its training steps; *first*: a trial's first trained phase; *CPU busy*: the "
            "mean share of all CPUs in use during the sweep.\n",
            table(["sweep", "trials", "phases trained", "concurrent", "wall s", "training s", "share",
                   "orchestration median s (steady)", "orchestration max s", "first phase s", "CPU busy"], rows),
            "", "Cache builds against the forward they compute (plain PyTorch, 1 thread, same shapes):\n",
            table(["sweep", "stack", "rows", "build s", "forward s", "build / forward"], cache_rows)]
    for r in results:
        phases = len(r["phases"])
        body += ["", f"Where the CPU went in `{r['name']}` ({phases} phases trained; CPU seconds by process, "
                 f"{2 * r['wall']:.0f} available on {os.cpu_count()} CPUs):\n",
                 table(["process", "processes", "CPU s", "CPU s per trained phase"],
                       [[kind, n, seconds, seconds / phases] for kind, (seconds, n) in r["cpu_by_kind"].items()
                        if seconds >= 1.0])]
    if not args.no_quickstart and not args.cpus:
        plain, ray_wall = quickstart_against_plain()
        body += ["", table(["quickstart", "wall s"], [["plain PyTorch loop", plain], ["on Ray", ray_wall],
                                                       ["ratio", ray_wall / plain]])]
    for r in results:
        print(r["name"], "kept in", r["storage"])
    write_section("p9" + (f"-cpus{args.cpus}" if args.cpus else ""), "P9: sweep efficiency"
                  + (f" (ray start --num-cpus {args.cpus})" if args.cpus else ""), "\n".join(body))


if __name__ == "__main__":
    main()
