"""Progressive runs on Ray Train: phases, caches, checkpoints, resume, workers."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from stackwise_ray.cache import ActivationCache, read_shard
from stackwise_ray.checkpoint import load_rack, read_json
from stackwise_ray.data import GlobalBatches, build_datasets
from stackwise_ray.inference import evaluate_rack
from stackwise_ray.trainer import ProgressiveTrainer

pytestmark = pytest.mark.usefixtures("ray_session")


def test_three_stacks_are_three_phases_with_three_checkpoints(arrow_run):
    trainer, history = arrow_run
    assert [m["stack"] for m in history] == [0, 1, 2]
    assert [m["status"] for m in history] == ["trained"] * 3
    assert len({m["phase_id"] for m in history}) == 3
    for k in range(3):
        raw = read_json(os.path.join(trainer.run_dir, "phases", history[k]["phase_id"], "done.json"))
        assert not os.path.isabs(raw["checkpoint"])  # stored relative: a store can move
        record = trainer.store.record(history[k]["phase_id"])
        assert record["checkpoint"] == history[k]["checkpoint"]
        assert os.path.isfile(os.path.join(record["checkpoint"], "model.safetensors"))
        assert load_rack(record["checkpoint"]).num_stacks == k + 1
    assert history[2]["rack"]["num_stacks"] == 3 and history[2]["steps"] == 8
    assert history[2]["trainable_params"] < history[2]["total_params"]


def test_reloaded_final_rack_reproduces_the_reported_validation_loss(arrow_run):
    trainer, history = arrow_run
    numbers = evaluate_rack(load_rack(os.path.join(trainer.run_dir, "final")))
    assert numbers["val_loss"] == history[-1]["val_loss"]
    assert numbers["val_accuracy"] == history[-1]["val_accuracy"]


def test_cached_phases_run_no_trunk_forward_and_cache_equals_a_fresh_trunk_forward(arrow_run):
    trainer, history = arrow_run
    assert [m["cache"]["kind"] for m in history] == ["none", "trunk_outputs", "trunk_outputs"]
    assert [m["trunk_forwards"] for m in history] == [0, 0, 0]
    assert history[2]["cache"]["incremental"] is True and history[2]["cache"]["stacks_run"] == 1
    rack = load_rack(os.path.join(trainer.run_dir, "final")).build_rack().eval()
    cache = cache_shards(trainer.run_dir, history[1]["phase_id"], 2)
    # the cache holds exactly the examples phase 2 reads (8 steps of 8: part of one epoch)
    train_ds, _, _ = build_datasets(trainer.config)
    batches = iter(GlobalBatches(train_ds, 8, trainer.config.training.seed))
    read = torch.cat([next(batches)["example_ids"] for _ in range(history[2]["steps"])])
    assert sorted(cache.example_ids.tolist()) == sorted(read.tolist()) and len(cache) == 64 < len(train_ds)
    assert history[2]["cache"]["rows"] == 64 and history[2]["cache"]["bytes"] == cache.nbytes
    ids = torch.from_numpy(cache.input_ids[:16]).long()
    with torch.no_grad():
        fresh = rack.run_stacks(rack.embed_tokens(ids), ids, end=2)
    torch.testing.assert_close(torch.from_numpy(cache.hidden[:16]), fresh, rtol=1e-5, atol=1e-5)


def cache_shards(run_dir, phase_id, position):
    """The Arrow cache entering `position` built from phase `phase_id`'s rack, its shards joined."""
    directory = glob.glob(os.path.join(run_dir, "phases", phase_id, f"cache_position_{position:03d}_*"))[0]
    shards = [read_shard(p) for p in sorted(glob.glob(os.path.join(directory, "shard_*.parquet")))]
    return ActivationCache(*(np.concatenate([getattr(s, k) for s in shards]) for k in ("example_ids", "input_ids", "hidden")))


def test_killed_run_resumes_at_the_first_unfinished_phase(ray_session, tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        "model: {d_model: 32, n_heads: 2, blocks_per_stack: 1, max_seq_len: 32}\n"
        "data: {seq_len: 32, batch_size: 8, max_examples: 120}\n"
        "training: {steps_per_stack: 8, eval_batches: 2, warmup_steps: 2,\n"
        "           progressive: {time_embedding_dim: 16, max_stacks: 2}}\n")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", str(config_path), "--storage", str(tmp_path),
                             "--name", "killed"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = tmp_path / "killed" / "phases"
    deadline = time.time() + 240
    while not list(store.glob("*/done.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.parent.name[:3] for p in store.glob("*/done.json")] == ["s00"]
    from stackwise_ray.config import load_config

    trainer = ProgressiveTrainer(load_config(config_path), storage_path=str(tmp_path), name="killed", resume=True)
    history = trainer.train_progressively()
    assert history[0]["status"] == "reused"
    assert history[1]["status"] in ("trained", "recovered")  # recovered: its checkpoint was written, not its record
    assert load_rack(os.path.join(trainer.run_dir, "final")).num_stacks == 2
    with pytest.raises(ValueError, match="already there"):
        ProgressiveTrainer(load_config(config_path), storage_path=str(tmp_path), name="killed").train_progressively()


def test_corrupt_checkpoint_and_cache_are_detected_and_rebuilt(arrow_run, tmp_path):
    import shutil

    from stackwise_ray.checkpoint import CorruptCheckpointError

    trainer, history = arrow_run
    shutil.copytree(trainer.run_dir, tmp_path / "arrow")
    store = tmp_path / "arrow" / "phases"
    model = next((store / history[2]["phase_id"]).glob("*/checkpoint_*/model.safetensors"))
    model.write_bytes(model.read_bytes()[:100])  # truncated
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_rack(str(model.parent))
    cache = next((store / history[1]["phase_id"]).glob("cache_position_002_*/shard_00000.parquet"))
    cache.write_bytes(cache.read_bytes()[:-10])
    again = ProgressiveTrainer(trainer.config, storage_path=str(tmp_path), name="arrow", resume=True)
    with pytest.warns(UserWarning, match="trained again"):
        rerun = again.train_progressively()
    assert [m["status"] for m in rerun] == ["reused", "reused", "trained"]
    assert rerun[2]["cache"]["built"] is True
    numbers = evaluate_rack(load_rack(os.path.join(again.run_dir, "final")))
    assert numbers["val_loss"] == rerun[2]["val_loss"]


def test_the_run_is_tracked_in_mlflow_and_tensorboard(arrow_run):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, history = arrow_run
    client = MlflowClient(tracking_uri=f"file://{trainer.run_dir}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("arrow").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["ray.cache_backend"] == "arrow"
    val = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert val == [(8, history[0]["val_loss"]), (16, history[1]["val_loss"]), (24, history[2]["val_loss"])]
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [0, 4, 7, 8, 12, 15, 16, 20, 23]  # log_every 4, 8 steps per stack
    events = EventAccumulator(os.path.join(trainer.run_dir, "tensorboard", "arrow")).Reload()
    assert [e.value for e in events.Scalars("phase/stack")] == [0.0, 1.0, 2.0]


def test_phases_show_as_ray_metrics_on_the_nodes_endpoint(arrow_run, ray_session):
    import urllib.request

    trainer, history = arrow_run
    port = ray_session.nodes()[0]["MetricsExportPort"]
    deadline, samples = time.time() + 60, {}
    while time.time() < deadline and len(samples.get("ray_stackwise_val_loss", {})) < 3:  # exported every few seconds
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = {}
        for line in body.splitlines():
            if line.startswith("ray_stackwise_") and 'trial="arrow"' in line:
                name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
                phase = line.split('phase="')[1].split('"')[0]
                samples.setdefault(name, {})[phase] = value
        time.sleep(0.5)
    assert sum(samples["ray_stackwise_phases_trained_total"].values()) == 3
    for m in history:
        assert samples["ray_stackwise_val_loss"][m["phase_id"]] == pytest.approx(m["val_loss"])
    assert samples["ray_stackwise_cache_bytes"][history[1]["phase_id"]] > 0  # phase 1 read a cache
