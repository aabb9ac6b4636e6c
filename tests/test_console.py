import pytest
"""What the train command shows: our lines on the terminal, Ray's in the run's log file."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys

import yaml

from stackwise_ray.console import Console, progress_text

TINY = """model: {d_model: 32, n_heads: 2, blocks_per_stack: 1, max_seq_len: 32}
data: {seq_len: 32, batch_size: 8, max_examples: 120}
training: {steps_per_stack: 400, eval_batches: 2, warmup_steps: 2, log_every: 5,
           progressive: {time_embedding_dim: 16, max_stacks: 2}}
"""


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_rewritten_line_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    post = {"stack": 1, "step": 120, "steps": 200, "loss": 2.3456, "tokens": 120 * 4096, "at": 12.0,
            "first": {"time": 2.0, "tokens": 4096}}
    assert progress_text(post) == "stack 1  step 120/200  loss 2.346  48.7k tok/s  ETA 0:06"
    cache = {"stack": 2, "step": 4096, "steps": 20000, "what": "cache", "tokens": 4096 * 64, "at": 3.0,
             "first": {"time": 1.0, "tokens": 0}}
    assert progress_text(cache) == "stack 2  cache 4096/20000 examples  131.1k tok/s  ETA 0:07"
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    console = Console()
    console.progress("p", "stack 1  step 5/10")
    console.progress("p", "stack 1  step 6/10")
    console.line("a row")
    out = sys.stdout.getvalue()
    assert out.count("\r") >= 3 and out.endswith("a row\n") and "\n" not in out[:-len("a row\n")]
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # no terminal: plain lines, at most one per 10 s per phase
    console = Console()
    console.progress("p", "stack 1  step 5/10")
    console.progress("p", "stack 1  step 6/10")
    console.progress("q", "stack 2  step 1/10")
    assert sys.stdout.getvalue() == "stack 1  step 5/10\nstack 2  step 1/10\n"


def settled(runs: list) -> bool:
    """Two phases or more on the Train page, none of them still being scheduled (a
    prestarted phase shows as SCHEDULING until its workers are placed)."""
    return len(runs) >= 2 and all(run["status"] in ("RUNNING", "FINISHED") and run["attempts"] for run in runs)


def watch_train_page(proc) -> dict:
    """Read a train command's stdout to its end; from its dashboard line on, read the Train
    page's runs through the dashboard's HTTP API (with Ray's token) until two phases show,
    out of scheduling.
    Returns {"lines": stdout's lines, "runs": the runs last read}."""
    import json
    import urllib.request

    token = (pathlib.Path.home() / ".ray" / "auth_token").read_text().strip()
    lines, runs, url = [], [], None
    for line in proc.stdout:
        lines.append(line)
        match = re.match(r"Ray dashboard: (http://127\.0\.0\.1:\d+)", line)
        url = url or (match.group(1) if match else None)
        if url and not settled(runs) and line.startswith("stack "):  # a phase is on: read the page again
            request = urllib.request.Request(f"{url}/api/train/v2/runs/v1", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    runs = json.load(response)["train_runs"]
            except OSError:  # the dashboard still starting
                pass
    return {"lines": lines, "runs": runs}


@pytest.mark.slow
def test_train_shows_progress_and_rows_and_sends_ray_to_the_log(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # two command-line overrides, after a flag: the stored config shows them
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", str(config), "--storage", str(tmp_path / "runs"),
                             "training.lr=2e-3", "training.progressive.time_per_stack=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    train_page = watch_train_page(proc)  # the dashboard's Train page while the run goes on
    stderr = proc.stderr.read()
    result = subprocess.CompletedProcess(proc.args, proc.wait(timeout=400), "".join(train_page.pop("lines")), stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    # every phase is a run there, with its worker, its status and its logs
    runs = {run["name"]: run for run in train_page["runs"]}
    assert {"tiny.s00", "tiny.s01"} <= set(runs), sorted(runs)
    for run in runs.values():
        assert run["status"] in ("RUNNING", "FINISHED") and run["controller_log_file_path"]
        workers = run["attempts"][-1]["workers"]
        assert len(workers) == 1 and workers[0]["pid"] > 0 and workers[0]["log_file_path"]
    for stored in (yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text()),
                   json.loads((tmp_path / "runs" / "tiny" / "final" / "rack.json").read_text())["config"]):
        assert stored["training"]["lr"] == 2e-3 and stored["training"]["progressive"]["time_per_stack"] == 50
    out, log = result.stdout, (tmp_path / "runs" / "tiny" / "train.log").read_text()
    lines = out.splitlines()
    assert lines[0] == f"log: {tmp_path / 'runs' / 'tiny' / 'train.log'}  (Ray's and the libraries' output; --verbose shows it here)"
    assert re.match(r"Ray dashboard: http://127\.0\.0\.1:\d+ .*ray get-auth-token", lines[1])
    assert any(re.fullmatch(r"stack 0  step \d+/400  loss \d+\.\d{3}.*", line) for line in lines)  # live progress
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stack", "precision"])
    rows = [line.split()[0] for line in lines[header + 1:] if re.match(r"\s+\d+\s+full\s", line)]
    assert rows == ["0", "1"]  # one row per phase, each as its phase ends (stack 1's progress comes between)
    row1 = next(line for line in lines[header + 1:] if re.match(r"\s+1\s+full\s", line))
    assert row1.split()[2] == "50"  # stack 1's time step, from the override
    assert lines[-1].startswith("trained rack: ")
    for noise in ("RayTrainWorker", "TrainController", "Reporting training result", "Traceback", "kernels-community"):
        assert noise not in out + result.stderr, noise
    assert "\r" not in out and "\x1b" not in out and result.stderr == ""
    assert "RayTrainWorker" in log and "Reporting training result" in log  # Ray's lines are kept, in the log
