"""Cache I/O: write and read throughput of the two cache backends (Parquet file, Ray
object store) for a quickstart-sized cache, against what a training step consumes.

The object store is read from another process (a Ray task), as a phase worker does.
The data wait is the time a training step spends getting its batch (masking + cache
lookup), measured by iterating the phase's loader alone, over the step's total time.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import ray
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, median, table, write_section  # noqa: E402

from stackwise_ray.builder import ProgressiveRackBuilder  # noqa: E402
from stackwise_ray.cache import ActivationCache, compute_cache, read_shard, write_shard  # noqa: E402
from stackwise_ray.data import GlobalBatches, ProgressiveDataLoader, build_datasets  # noqa: E402
from stackwise_ray.masking import TimeStepMasking  # noqa: E402
from stackwise_ray.phase import train_stack  # noqa: E402

REPEATS = 3


@ray.remote(num_cpus=1)
def read_in_worker(arrays) -> float:
    """Seconds to materialize the cache in a worker process (zero-copy numpy from the store)."""
    t0 = time.perf_counter()
    cache = ActivationCache(**arrays)
    float(cache.hidden[-1, -1, -1])  # touch it
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    cfg = config({})  # quickstart sizes
    train_ds, _, tokenizer = build_datasets(cfg)
    masking = TimeStepMasking(cfg, tokenizer)
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(cfg)
    builder.append_stack(n_blocks=1)
    cache = compute_cache(builder.build_rack(), train_ds, masking, 1, 0, 1)
    gb = cache.nbytes / 1e9

    ray.init(num_cpus=2, include_dashboard=False)
    put, get, write, read = [], [], [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        ref = ray.put(cache.arrays())
        put.append(time.perf_counter() - t0)
        get.append(ray.get(read_in_worker.remote(ref)))
        del ref
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "cache.parquet")
            t0 = time.perf_counter()
            write_shard(cache, path)
            write.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = read_shard(path)
            read.append(time.perf_counter() - t0)
            assert np.array_equal(back.hidden, cache.hidden)
    ray.shutdown()

    # what a step consumes, and how long it waits for its batch
    builder.append_stack(n_blocks=1)
    builder.prepare_phase()
    rack = builder.build_rack()
    B = cfg.data.batch_size
    loader = ProgressiveDataLoader(GlobalBatches(train_ds, B, 0, True), masking, 1, cache, True)
    steps = 40
    t0 = time.perf_counter()
    for i, _ in zip(range(steps), loader):
        pass
    wait = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    train_stack(rack, loader, cfg.training, steps, start=1)
    step = (time.perf_counter() - t0) / steps
    consumed = B * cfg.data.seq_len * cfg.model.d_model * 4 / step / 1e9

    rows = [["object store: put (driver)", median(put), gb / median(put)],
            ["object store: get in a worker (zero-copy)", median(get), gb / median(get)],
            ["Parquet: write (+ sha256)", median(write), gb / median(write)],
            ["Parquet: read (memory-mapped) + decode", median(read), gb / median(read)]]
    body = (f"A quickstart cache: {len(cache)} examples × {cfg.data.seq_len} tokens × d_model {cfg.model.d_model}, "
            f"{cache.nbytes / 2**20:.0f} MiB; medians of {REPEATS}.\n\n"
            + table(["operation", "s", "GB/s"], rows)
            + f"\n\nA training step (batch {B}, 1 thread) takes {1000 * step:.0f} ms and consumes "
              f"{consumed * 1000:.1f} MB/s of cached activations; getting its batch (masking + cache lookup) takes "
              f"{1000 * wait:.1f} ms, **{100 * wait / step:.1f}% of the step** (target < 10%). Both backends "
              "load the whole cache once per phase, so their throughput is paid once, not per step.")
    write_section("cacheio", "Cache I/O", body)


if __name__ == "__main__":
    main()
