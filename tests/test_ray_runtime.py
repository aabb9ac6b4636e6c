"""Starting Ray (ray_runtime.py): settings and the run's own address in every process of
its job, two runs on one machine, addresses nothing answers at, and signals."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from stackwise_ray.config import StackWiseConfig
from stackwise_ray.ray_runtime import RayAddressError, start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """\
model: {d_model: 32, n_heads: 2, blocks_per_stack: 1, max_seq_len: 32}
data: {seq_len: 32, batch_size: 8, max_examples: 120}
training: {steps_per_stack: 8, eval_batches: 2, warmup_steps: 2,
           progressive: {time_embedding_dim: 16, max_stacks: 1}}
"""
JOINED_JOB = """
import json, os, sys, ray
from stackwise_ray.config import StackWiseConfig
from stackwise_ray.ray_runtime import start
start(StackWiseConfig.from_dict({}), sys.argv[1])

@ray.remote(num_cpus=0)
class Probe:
    def env(self):
        return {k: os.environ.get(k) for k in ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_ADDRESS")}

print(json.dumps(ray.get(Probe.remote().env.remote())))
"""


def env_without_ray_address(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_process_of_a_job_gets_its_ray_address_and_the_train_settings(ray_session):
    @ray_session.remote(num_cpus=0)
    def env():
        return os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")

    # the session's local Ray was started by start_local: its job names that Ray, not "the" Ray of the machine
    address, timeout = ray_session.get(env.remote())
    assert address.rsplit(":", 1)[1] == ray_session.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    assert timeout is not None
    # a driver joining a running Ray: its raylet does not have the driver's environment,
    # the job's processes still get the driver's (here the user's own) value
    joined = subprocess.run([sys.executable, "-c", JOINED_JOB, ray_session.get_runtime_context().gcs_address],
                            env=env_without_ray_address(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="77"), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert joined.returncode == 0, joined.stderr[-2000:]
    seen = json.loads(joined.stdout.strip().splitlines()[-1])
    assert seen["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "77"
    assert seen["RAY_ADDRESS"] is None  # a cluster's nodes find it through `ray start`'s record


@pytest.mark.timeout(400)
def test_two_train_runs_started_together_on_one_machine(ray_session, tmp_path):
    """With the test session's Ray up, these two make three local Rays on this machine. The
    second run's name is not ASCII: Ray Train tags its controller's metrics with the run's
    name, Ray's tags are ASCII, and a `café` run once failed its first phase."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    names = {"a": "run", "b": "café-ü"}
    runs = [subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", str(config), "--storage",
                              str(tmp_path / d), "--name", name], env=env_without_ray_address(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d, name in names.items()]
    outputs = [run.communicate(timeout=360)[0] for run in runs]
    for (d, name), run, out in zip(names.items(), runs, outputs):
        assert run.returncode == 0, out[-3000:]
        out += (tmp_path / d / name / "train.log").read_text()  # Ray's own lines, the cleaner's included
        assert "multiple active Ray instances" not in out, out[-3000:]
        # Ray Train logs this warning with a traceback when its autoscaling coordinator actor
        # answers in more than 5 s, as it can on an overloaded 2-core machine; nothing else
        assert out.count("Traceback") == out.count("Failed to send resource request"), out[-3000:]
    summaries = [json.loads((tmp_path / d / name / "summary.json").read_text()) for d, name in names.items()]
    assert summaries[0]["history"][-1]["val_loss"] == summaries[1]["history"][-1]["val_loss"]
    run = tmp_path / "b" / "café-ü"
    assert summaries[1]["history"][0]["status"] == "trained" and (run / "final" / "rack.json").is_file()
    [phase] = [p for p in (run / "phases").iterdir() if p.is_dir()]
    assert [p.name for p in phase.iterdir() if p.is_dir()] == ["caf-u00e9--u00fc.s00"]  # the Ray Train run


def test_an_address_nothing_answers_at_is_refused_naming_where_it_came_from(monkeypatch):
    port = free_port()  # closed again: nothing listens there
    config = StackWiseConfig.from_dict({"ray": {"address": f"127.0.0.1:{port}"}})
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(RayAddressError, match=rf"^--address: cannot reach 127.0.0.1:{port} \(Connection refused\)"):
        start(config, f"127.0.0.1:{port}")
    with pytest.raises(RayAddressError, match=rf"^ray.address: cannot reach 127.0.0.1:{port} "):
        start(config)
    with pytest.raises(RayAddressError, match=rf"^RAY_ADDRESS: cannot reach 127.0.0.1:{port} "):
        start(StackWiseConfig.from_dict({}))
    with pytest.raises(RayAddressError, match="is not host:port"):
        start(config, "no-port")


def test_tune_with_an_unreachable_address_is_one_line_within_seconds(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "stackwise_ray.tune", str(config), "--address", "127.0.0.1:1",
                             "--storage", str(tmp_path / "runs")], env=env_without_ray_address(), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == f"error: {config}: --address: cannot reach 127.0.0.1:1 (Connection refused)\n"
    assert time.time() - t0 < 60 and not (tmp_path / "runs").exists()


def wait_for(condition, timeout_s: float, proc) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert proc.poll() is None and time.time() < deadline, "the command ended or never got there"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_stops_a_command_stuck_connecting(tmp_path):
    """A listener that is not Ray: ray.init sits in C++ (40 s and more), where Python runs no
    signal handler; the command still ends within seconds."""
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: [server.accept() for _ in range(20)], daemon=True).start()
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", str(config), "--storage", str(tmp_path / "runs")],
                            env=env_without_ray_address(RAY_ADDRESS=f"127.0.0.1:{server.getsockname()[1]}"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "tiny" / "train.log"  # Ray's own lines go to the run's log
    wait_for(lambda: log.exists() and "Connecting to existing Ray cluster" in log.read_text(), 120, proc)
    time.sleep(1)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 130
    assert time.time() - t0 < 10 and "interrupted" in proc.stderr.read()
    assert [p.name for p in log.parent.iterdir()] == ["train.log"]  # the log only: no phase started
    server.close()


@pytest.mark.slow
def test_ctrl_c_stops_a_training_run_and_its_local_ray(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", str(config), "--storage", str(tmp_path)],
                            env=env_without_ray_address(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    phases = tmp_path / "tiny" / "phases"
    wait_for(lambda: list(phases.glob("*.lock")), 180, proc)  # phase 0 is starting
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    assert any("gcs_server" in p.name() for p in ray_processes)
    time.sleep(3)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.time() - t0 < 10, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(ray_processes, timeout=20)
    assert not alive  # the run's local Ray went with it


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_while_phase_1_trains_ends_with_130_within_the_promised_seconds(tmp_path):
    from stackwise_ray.ray_runtime import PROMISED_EXIT_S

    config = tmp_path / "two.yaml"  # phase 1 trains long enough to be interrupted in its steps
    config.write_text(TINY.replace("max_stacks: 1", "max_stacks: 2").replace("steps_per_stack: 8", "steps_per_stack: [8, 600]"))
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", str(config), "--storage", str(tmp_path)],
                            env=env_without_ray_address(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    phases = tmp_path / "two" / "phases"
    wait_for(lambda: list(phases.glob("s00-*/done.json")), 300, proc)  # phase 0 finished: phase 1 is under way
    time.sleep(4)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group, Ray's processes too
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < PROMISED_EXIT_S, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
