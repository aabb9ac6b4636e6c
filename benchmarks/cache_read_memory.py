"""Issue 27 item 6: where a phase worker's memory goes when it reads an `arrow` cache.

The P8 run's cache (3,200 rows of seq_len 128 x d_model 128 float32, 211 MB in 4 shards of
800 rows) is written as the `arrow` backend writes it (`cache.write_shard`), then read in
a fresh process the way a phase worker's `ShardReader` reads it (two shards resident, the
next prefetched on its thread; every lookup a batch of 32 rows in row order), under
variants of the read. Each variant's peak RSS (ru_maxrss) is reported above the RSS
after imports, against the same reads from numpy arrays in shared memory (what a Ray
object store shard is: a zero-copy map of /dev/shm).

    python benchmarks/cache_read_memory.py
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS, SHARD_ROWS, T, C, BATCH = 3200, 800, 128, 128, 32
VARIANTS = ("shm", "parquet", "parquet_decay0", "parquet_system_pool", "parquet_no_prefetch")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def write(tmp: str) -> None:
    import numpy as np

    from stackwise_ray.cache import ActivationCache, shard_path, write_shard

    rng = np.random.default_rng(0)
    for i in range(ROWS // SHARD_ROWS):
        ids = np.arange(i * SHARD_ROWS, (i + 1) * SHARD_ROWS)
        cache = ActivationCache(ids, rng.integers(0, 260, (SHARD_ROWS, T)).astype(np.int64),
                                rng.standard_normal((SHARD_ROWS, T, C), dtype=np.float32))
        write_shard(cache, shard_path(tmp, i))
        np.save(os.path.join(tmp, f"hidden_{i}.npy"), cache.hidden)
        np.save(os.path.join(tmp, f"ids_{i}.npy"), cache.input_ids)


def child(tmp: str, variant: str) -> None:
    import numpy as np
    import pyarrow as pa
    import torch

    from stackwise_ray.cache import (
        ActivationCache,
        CacheLayout,
        ShardReader,
        read_shard,
        shard_path,
    )

    if variant == "parquet_decay0":
        pa.jemalloc_set_decay_ms(0) if pa.default_memory_pool().backend_name == "jemalloc" else None
    if variant == "parquet_system_pool":
        pa.set_memory_pool(pa.system_memory_pool())
    shm = "/dev/shm/cache-read-memory"
    if variant == "shm":
        os.makedirs(shm, exist_ok=True)
        for i in range(ROWS // SHARD_ROWS):
            shutil.copy(os.path.join(tmp, f"hidden_{i}.npy"), shm)

    def load(i: int) -> ActivationCache:
        if variant == "shm":
            hidden = np.load(os.path.join(shm, f"hidden_{i}.npy"), mmap_mode="r")
            ids = np.load(os.path.join(tmp, f"ids_{i}.npy"))
            return ActivationCache(np.arange(i * SHARD_ROWS, (i + 1) * SHARD_ROWS), ids, hidden)
        return read_shard(shard_path(tmp, i))

    base = rss_mb()
    example_ids = np.arange(ROWS)
    if variant == "parquet_no_prefetch":
        caches = {}
        for start in range(0, ROWS, BATCH):
            i = start // SHARD_ROWS
            if i not in caches:
                caches = {i: load(i)}
            caches[i].lookup(torch.arange(start, start + BATCH))
    else:
        layout = CacheLayout(example_ids, example_ids, SHARD_ROWS, T, C, "float32", False)
        reader = ShardReader(layout, load, resident=2)
        for start in range(0, ROWS, BATCH):
            reader.lookup(torch.arange(start, start + BATCH))
        reader.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool = pa.default_memory_pool()
    print(json.dumps({"variant": variant, "base_mb": base, "peak_above_mb": peak - base, "pool": pool.backend_name,
                      "pool_peak_mb": pool.max_memory() / 2**20}))
    if variant == "shm":
        shutil.rmtree(shm, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 3:
        return child(sys.argv[1], sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="bench-cache-mem-")
    try:
        write(tmp)
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, tmp, variant], capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
