"""Cache builds on Ray: shards from tasks, and the bounded retry of a build killed for memory."""

import os

import numpy as np
import pytest
import ray
import torch

from stackwise_ray import ray_cache
from stackwise_ray.cache import ActivationCache, CacheLayout

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")

LAYOUT = CacheLayout(np.arange(40), np.arange(100, 140), shard_rows=8, seq_len=4, d_model=2, dtype="float32",
                     rereads=False)


@ray.remote(num_returns="streaming", max_retries=0)
def fake_shards(job, shard_ids, prev):
    """Shards of zeros; a shard named in the job's `checkpoint` fail list is killed for
    memory (once each where it says "once", else every time). Each try leaves a file in
    the directory the job names as its data."""
    yield {"node_id": ray.get_runtime_context().get_node_id(), "row_flops": 0.0}
    mode, fail = job.checkpoint.split(":")
    directory, layout = job.data_ref, job.layout
    for i in shard_ids:
        tries = len([f for f in os.listdir(directory) if f.startswith(f"{i}.")])
        open(os.path.join(directory, f"{i}.{tries}"), "w").close()
        if str(i) in fail.split(",") and (mode == "always" or tries == 0):
            raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
        rows = layout.shard(i)
        yield ActivationCache(layout.example_ids[rows], np.zeros((rows.stop - rows.start, 4), np.int32),
                              np.zeros((rows.stop - rows.start, 4, 2), np.float32)).arrays()


def tries(directory):
    return sorted(os.listdir(directory))


def job(failures: str, directory) -> ray_cache.CacheJob:
    return ray_cache.CacheJob(tiny_config(), failures, 1, 0, 0, LAYOUT, ray_cache.ObjectStoreShards(), str(directory),
                              use_gpu=False)


def test_a_build_killed_for_memory_retries_only_its_missing_shards_once(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_cache, "build_shards", fake_shards)
    handle = ray_cache.build(job("once:3", tmp_path), tasks=2)
    assert handle.info["attempts"] == 2 and len(handle.shards) == 5
    assert tries(tmp_path) == ["0.0", "1.0", "2.0", "3.0", "3.1", "4.0"]  # the finished shards were kept
    reader = ray_cache.open_reader(handle.spec("trunk_inputs", 5), LAYOUT)
    # rows 24-33: shards 3 and 4 (the last one: nothing to load ahead of them)
    assert torch.equal(reader.lookup(torch.arange(124, 134)), torch.zeros(10, 4, 2))
    assert reader.loads == 2


def test_a_build_killed_for_memory_again_gives_up_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_cache, "build_shards", fake_shards)
    with pytest.raises(ray_cache.CacheMemoryError) as error:
        ray_cache.build(job("always:2", tmp_path), tasks=1)
    message = str(error.value)
    assert "\n" not in message and "killed for memory 2 times" in message and "ray.cache_shard_mb" in message
    assert [t for t in tries(tmp_path) if t.startswith("2.")] == ["2.0", "2.1"]  # twice, not forever


def test_a_cache_computed_by_the_trained_workers_equals_one_built_from_the_checkpoint(arrow_run, tmp_path):
    """arrow_run's phase 0 workers computed phase 1's cache themselves (emit_next_cache);
    the Ray tasks that build a cache for a phase reused from elsewhere compute the same
    shards, bit for bit, from phase 0's checkpoint."""
    from stackwise_ray.cache import plan_layout, read_shard, shard_path
    from stackwise_ray.data import open_datasets
    from stackwise_ray.phase import phase_steps

    trainer, history = arrow_run
    assert history[1]["cache"]["emitted"] and history[1]["cache"]["built"] and history[1]["cache"]["tasks"] == 0
    assert history[0]["next_cache_s"] > 0  # phase 0's workers spent it
    config, data_ref = trainer.config, trainer.token_store_location()
    train_ds, _ = open_datasets(config, data_ref)
    layout = plan_layout(config, train_ds, phase_steps(config.training, len(train_ds) // config.data.batch_size),
                         history[1]["cache"]["dtype"])
    [emitted] = [os.path.join(trainer.store.root, history[0]["phase_id"], d)
                 for d in os.listdir(os.path.join(trainer.store.root, history[0]["phase_id"])) if d.startswith("cache_position_001")]
    built = ray_cache.build(ray_cache.CacheJob(config, history[0]["checkpoint"], 1, 0, 1, layout,
                                               ray_cache.ArrowShards(str(tmp_path / "built")), data_ref, use_gpu=False))
    assert built.info["tasks"] >= 1 and layout.shards == history[1]["cache"]["shards"]
    for i in range(layout.shards):
        a, b = read_shard(shard_path(emitted, i)), read_shard(built.shards[i])
        assert np.array_equal(a.example_ids, b.example_ids) and np.array_equal(a.input_ids, b.input_ids)
        assert np.array_equal(a.hidden, b.hidden)
