"""Two Ray nodes on one machine (`ray start --head` + a second raylet joined with
`ray start --address`), a 2-trial sweep run against them with `--address`, and the
shared storage path read across nodes."""

import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile

import pandas as pd
import psutil
import pytest

from .conftest import ray_config

pytestmark = pytest.mark.slow  # a second raylet and a sweep across two nodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_args(ports: list[int]) -> list[str]:
    """Ports of one raylet, all distinct from the other node's and the test session's Ray."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    lo = ports[-1]
    return [f"{n}={p}" for n, p in zip(names, ports)] + [f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]


def ray_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the Ray cluster rooted at temp_dir, with their descendants (agents
    and workers retitle themselves `ray::...`), and nothing else."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


VERIFY = """
import json, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
address, jobs = sys.argv[1], json.loads(sys.argv[2])
ray.init(address=address)

@ray.remote(num_cpus=0)
def read_back(checkpoint, cache):
    import pyarrow.parquet as pq
    from stackwise_ray.cache import shard_intact
    from stackwise_ray.checkpoint import load_rack
    from stackwise_ray.inference import evaluate_rack
    out = {"node": ray.get_runtime_context().get_node_id(), "val_loss": evaluate_rack(load_rack(checkpoint))["val_loss"]}
    if cache:
        out["cache_intact"] = shard_intact(cache)
        out["cache_rows"] = pq.read_table(cache).num_rows
    return out

print(json.dumps([ray.get(read_back.options(scheduling_strategy=NodeAffinitySchedulingStrategy(job["node"], soft=False))
                  .remote(job["checkpoint"], job["cache"])) for job in jobs]))
"""


@pytest.mark.timeout(600)
def test_sweep_on_two_nodes_uses_both_and_reads_shared_storage_across_nodes(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="swr-mn-", dir="/tmp")  # short: Ray's socket paths must stay short
    shared = tmp_path / "shared"
    config = ray_config(ray={"cache_backend": "arrow"}, data={"max_examples": 80}, target_stacks=2)
    config.tune.search_space = {"training.seed": {"grid": [0, 1]}}  # 2 trials, no shared phase
    config.tune.max_concurrent_trials = 2
    config_path = tmp_path / "sweep.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config.to_dict()))
    head_port, *ports = free_ports(15)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    # token auth as the README sets up a head: `ray start --head` needs a token with RAY_AUTH_MODE=token (it
    # creates none), and the joining node and drivers send the same one
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", secrets.token_hex(32)
    address = f"127.0.0.1:{head_port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        run = dict(env=env, capture_output=True, text=True, timeout=120)
        started = subprocess.run(["ray", "start", "--head", f"--port={head_port}", f"--temp-dir={temp_dir}",
                                  "--include-dashboard=false", "--resources={\"trial_slot\": 1}", *common,
                                  *node_args(ports[:7])], **run)
        assert started.returncode == 0, started.stderr[-2000:]
        joined = subprocess.run(["ray", "start", f"--address={address}",
                                 "--resources={\"trial_slot\": 1, \"second_node\": 1}", *common,
                                 *node_args(ports[7:])], **run)
        assert joined.returncode == 0, joined.stderr[-2000:]
        sweep = subprocess.run([sys.executable, "-m", "stackwise_ray.tune", str(config_path), "--address", address,
                                "--storage", str(shared), "--name", "mn"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=420)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        # the console: Tune's table with short columns and our lines; Ray's internals in the sweep's log
        assert "Ray dashboard:" in sweep.stdout and "Trial t000 config" in sweep.stdout  # t000: our trial names
        assert "seed" in sweep.stdout and "variant={" not in sweep.stdout  # one short column per swept key
        for noise in ("RayTrainWorker", "TrainController", "Reporting training result"):
            assert noise not in sweep.stdout + sweep.stderr, noise
        assert "RayTrainWorker" in (shared / "mn" / "tune.log").read_text()
        results = pd.read_csv(shared / "mn" / "results.csv")
        assert list(results["status"]) == ["TERMINATED", "TERMINATED"]
        phases = pd.read_csv(shared / "mn" / "phases.csv")
        assert len(phases) == 4 and (phases["status"] == "trained").all()
        nodes = set(phases["trial_node"])
        assert len(nodes) == 2  # one trial_slot per node: one trial driven from each node
        assert set(phases["phase_node"]) <= nodes and set(phases["cache_node"].dropna()) <= nodes

        # every trial's final rack and stack-1 cache, read on the node that did not write them
        jobs = []
        for trial_id, rows in phases.groupby("trial_id"):
            last = rows.sort_values("stack").iloc[-1]
            summary = json.loads((shared / "mn" / "trials" / trial_id / "summary.json").read_text())
            phase = summary["history"][-1]
            cache = glob.glob(os.path.join(shared, "mn", "phases", summary["history"][0]["phase_id"],
                                           "cache_position_001_*", "shard_00000.parquet"))[0]
            other = next(n for n in nodes if n != last["phase_node"])
            jobs.append({"node": other, "checkpoint": phase["checkpoint"], "cache": cache,
                         "val_loss": phase["val_loss"]})
        verify = subprocess.run([sys.executable, "-c", VERIFY, address, json.dumps(jobs)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert verify.returncode == 0, verify.stderr[-3000:]
        read = json.loads(verify.stdout.strip().splitlines()[-1])
        for job, got in zip(jobs, read):
            assert got["node"] == job["node"]
            assert got["val_loss"] == job["val_loss"]  # the checkpoint reproduces its phase's numbers there
            assert got["cache_intact"] and got["cache_rows"] > 0
    finally:
        for p in ray_processes(temp_dir):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(ray_processes(temp_dir), timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
