"""Shared by the benchmarks: the machine, small configs, and docs/benchmarks.md sections.

Each benchmark replaces its own section of docs/benchmarks.md (between markers), so they
can be rerun one at a time; every section states the command that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from stackwise_ray.config import StackWiseConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


def machine() -> str:
    import psutil
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")


def config(overrides: dict, base: str = "experiments/quickstart.yaml") -> StackWiseConfig:
    """The quickstart config with `overrides` ({section: {key: value}}, progressive under
    training.progressive) applied."""
    cfg = load_config(os.path.join(ROOT, base)).to_dict()
    for section, values in overrides.items():
        for key, value in values.items():
            target = cfg[section]
            if section == "training" and key == "progressive":
                target["progressive"].update(value)
            else:
                target[key] = value
    return StackWiseConfig.from_dict(cfg).validate()


def median(values) -> float:
    return statistics.median(values)


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or add) section `name` of docs/benchmarks.md."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = (f"<!-- {name}:start -->\n## {title}\n\n`{command}` on {stamp}; {machine()}.\n\n"
             f"{body.strip()}\n<!-- {name}:end -->")
    text = open(DOC).read() if os.path.exists(DOC) else HEADER
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)
    print(block)


HEADER = """# Benchmarks

Measured by the scripts in `benchmarks/` (not tests: each takes minutes). Every section
names the command that produced it and the machine it ran on; `python benchmarks/run_all.py`
runs them all. Ratios compare runs made back to back in one script, because these
machines are noisy.
"""


def run_sweep(cfg: StackWiseConfig, name: str, storage: str | None = None) -> tuple[float, str]:
    """Run `python -m stackwise_ray.tune` on `cfg` in a fresh process, in `storage` (a new
    temporary directory by default); (wall s, experiment dir)."""
    import tempfile

    import yaml

    storage = storage or tempfile.mkdtemp(prefix=f"bench-{name}-")
    path = os.path.join(storage, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stackwise_ray.tune", path, "--storage", storage, "--name", name],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, os.path.join(storage, name)


def keep(out: str, results, curves, facts: dict) -> None:
    """A comparison sweep's tables and facts, kept under `out` (a report can be made again from them)."""
    os.makedirs(out, exist_ok=True)
    results.to_csv(os.path.join(out, "results.csv"), index=False)
    curves.to_csv(os.path.join(out, "curves.csv"), index=False)
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)


def kept(source: str):
    """(results, curves, facts) written by `keep`."""
    import pandas as pd

    with open(os.path.join(source, "facts.json")) as f:
        facts = json.load(f)
    return pd.read_csv(os.path.join(source, "results.csv")), pd.read_csv(os.path.join(source, "curves.csv")), facts
