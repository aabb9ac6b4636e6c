"""Caches on Ray: build a phase's cache shard by shard in tasks, and read it in workers.

`build` runs on the driver (or the Tune trial): it splits the shards over a few
streaming-generator tasks that each load the rack once and yield one shard at a time,
so a builder holds the model, one shard and (incremental builds) one shard of the
previous cache. Shards are Ray objects owned by the caller (spilled by Ray as usual) or
Parquet files under the phase store. Ray retries a task killed for memory without end
unless the task sets `max_retries=0`; these tasks do, and `build` retries the missing
shards once itself, then raises CacheMemoryError (the trainer recomputes the trunk
instead and says so in the phase's metrics).

`emit_next_cache` runs in the workers of the phase that trains stack k-1, once they have
trained: they hold that stack, and the previous cache's shards pair with the next cache's,
so they compute the cache phase k reads themselves (each rank a share of its shards),
with no task to start and no rack to load again. Object-store shards go to the run's
PhaseLinks actor, which owns them; Parquet shards are written where `build` would write
them. `build` remains for a phase whose predecessor was not trained in this run (reused
from another trial, or recovered).

`open_reader` runs in a phase worker: a ShardReader over the same shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .cache import (ActivationCache, CacheLayout, ShardReader, cache_complete, compute_shard, plan_layout,
                    read_shard, shard_intact, shard_path, write_manifest, write_shard)
from .checkpoint import load_rack
from .config import StackWiseConfig
from .data import load_data
from .flops import forward_flops_per_token
from .masking import TimeStepMasking

ATTEMPTS = 2  # a build killed for memory is tried once more (only its missing shards), then given up


class CacheMemoryError(RuntimeError):
    pass


@dataclass
class CacheHandle:
    """A built cache: the stream entering rack `position`, its layout, and its shards (Ray
    object refs, or Parquet paths under `directory`)."""
    position: int
    layout: CacheLayout
    backend: str
    directory: str
    shards: list
    info: dict = field(default_factory=dict)

    @classmethod
    def emitted(cls, next_cache: "NextCache", layout: CacheLayout, info: dict) -> "CacheHandle":
        """The cache a phase's workers computed for the next phase (emit_next_cache), once
        they are done: its shards taken from the run's PhaseLinks, or its Parquet files
        completed by their manifest."""
        if next_cache.backend == "arrow":
            write_manifest(next_cache.directory, layout)
            shards = [shard_path(next_cache.directory, i) for i in range(layout.shards)]
        else:
            shards = ray.get(next_cache.sink.take_shards.remote(next_cache.key))
        if len(shards) != layout.shards:
            raise RuntimeError(f"the next phase's cache has {len(shards)} of its {layout.shards} shards")
        return cls(next_cache.position, layout, next_cache.backend, next_cache.directory, shards,
                   {"rows": layout.rows, "bytes": layout.nbytes, "shards": layout.shards, "dtype": layout.dtype,
                    "built": True, "emitted": True, "incremental": next_cache.start > 0,
                    "stacks_run": next_cache.position - next_cache.start, "attempts": 1, "tasks": 0,
                    "reused_shards": 0, "for_stack": next_cache.stack_id, **info})

    def spec(self, kind: str, steps: int) -> dict:
        """What a phase worker needs to read it (it rebuilds the layout from `steps`)."""
        return {"backend": self.backend, "position": self.position, "kind": kind, "steps": steps,
                "dtype": self.layout.dtype, "key": self.layout.key, "shards": self.shards}


@ray.remote(num_returns="streaming", max_retries=0)
def build_shards(config: StackWiseConfig, checkpoint: str, stack_id: int, start: int, end: int, layout: CacheLayout,
                 shard_ids: list[int], prev: list | None, backend: str, directory: str, data_ref, use_gpu: bool):
    """Ray task: shards `shard_ids` of the stream entering rack position `end`, one at a time
    (first yields its node and the FLOPs of building one row, then each shard's arrays, or
    for the arrow backend writes each shard and yields its size)."""
    import torch

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    rack = load_rack(checkpoint, config=config).rack.to(device)  # this run's corruption, not the checkpoint's run's
    train_ds, _, tokenizer = load_data(config, data_ref)
    masking = TimeStepMasking(config, tokenizer)
    T = config.data.seq_len
    yield {"node_id": ray.get_runtime_context().get_node_id(),  # and what one row costs to build
           "row_flops": T * sum(forward_flops_per_token(s, T, config.model.d_model) for s in rack.stacks[start:end])}
    for i in shard_ids:
        before = None if prev is None else load_shard(prev[i])
        shard = compute_shard(rack, train_ds, masking, stack_id, start, end, layout.positions[layout.shard(i)],
                              layout.dtype, before, device=device)
        del before
        if backend == "arrow":
            write_shard(shard, shard_path(directory, i))
            yield {"rows": len(shard), "bytes": shard.nbytes}
        else:
            yield shard.arrays()
        del shard


def load_shard(source) -> ActivationCache:
    """A shard from its Ray object (zero-copy from the local object store) or Parquet file."""
    return read_shard(source) if isinstance(source, str) else ActivationCache(**ray.get(source))


def build(config: StackWiseConfig, checkpoint: str, stack_id: int, start: int, end: int, layout: CacheLayout,
          prev: CacheHandle | None, directory: str, data_ref, tasks: int = 1, board=None) -> CacheHandle:
    """The cache of `layout` entering rack position `end`, from the rack in `checkpoint`
    (only positions [start, end) run over `prev` when given). Arrow shards already intact
    under `directory` (written before a crash) are kept; up to `tasks` tasks run at once."""
    t0, backend = time.perf_counter(), config.ray.cache_backend
    shards: list = [None] * layout.shards
    if backend == "arrow":
        if cache_complete(directory, layout):
            return CacheHandle(end, layout, backend, directory, [shard_path(directory, i) for i in range(layout.shards)],
                               {"rows": layout.rows, "bytes": layout.nbytes, "shards": layout.shards, "dtype": layout.dtype,
                                "built": False, "incremental": False, "build_s": 0.0, "attempts": 0, "tasks": 0,
                                "reused_shards": layout.shards, "stacks_run": 0, "flops": 0.0, "node_id": ""})
        for i in range(layout.shards):
            if shard_intact(shard_path(directory, i)):
                shards[i] = shard_path(directory, i)
    reused = sum(s is not None for s in shards)
    outside = PlacementGroupSchedulingStrategy(placement_group=None)  # a Tune trial's group holds only its slot
    use_gpu = config.ray.use_gpu and ray.available_resources().get("GPU", 0) >= 1
    attempts, failure, started = 0, None, []
    while any(s is None for s in shards) and attempts < ATTEMPTS:
        attempts += 1
        todo = [i for i, s in enumerate(shards) if s is None]
        n = max(1, min(tasks, len(todo)))
        groups = [todo[k::n] for k in range(n)]
        runs = [(ids, build_shards.options(scheduling_strategy=outside, num_gpus=1 if use_gpu else 0).remote(
            config.validate(), checkpoint, stack_id, start, end, layout, ids, prev.shards if prev else None, backend,
            directory, data_ref, use_gpu)) for ids in groups]
        try:
            for ids, generator in runs:
                started.append(ray.get(next(generator)))
                for i, ref in zip(ids, generator):
                    ray.get(ref)  # raises the task's error; an object-store shard is only mapped
                    shards[i] = shard_path(directory, i) if backend == "arrow" else ref
                    _post(board, stack_id, layout, sum(s is not None for s in shards))
        except ray.exceptions.OutOfMemoryError as e:  # the other tasks' finished shards stay
            failure = e
            for _, generator in runs:  # the others stop (their finished shards stay); a retry starts afresh
                ray.cancel(generator)
    if any(s is None for s in shards):
        raise CacheMemoryError(f"the cache for rack position {end} was killed for memory {attempts} times "
                               f"({layout.shards} shards of {layout.shard_bytes / 2**20:.0f} MiB; lower "
                               f"ray.cache_shard_mb or give the node more memory): {str(failure).splitlines()[0]}")
    if backend == "arrow":
        write_manifest(directory, layout)
    built = layout.rows * (layout.shards - reused) / layout.shards
    return CacheHandle(end, layout, backend, directory, shards, {
        "rows": layout.rows, "bytes": layout.nbytes, "shards": layout.shards, "dtype": layout.dtype, "built": True,
        "incremental": prev is not None, "stacks_run": end - start, "build_s": time.perf_counter() - t0,
        "attempts": attempts, "tasks": len(groups) if attempts else 0, "reused_shards": reused,
        "flops": started[-1]["row_flops"] * built if started else 0.0,
        "node_id": started[-1]["node_id"] if started else ""})


def _post(board, stack_id: int, layout: CacheLayout, done: int) -> None:
    if board is not None:
        rows = min(done * layout.shard_rows, layout.rows)
        board.post.remote(f"cache-{stack_id}", {"stack": stack_id, "step": rows, "steps": layout.rows,
                                                "what": "cache", "tokens": rows * layout.seq_len})


@dataclass(frozen=True)
class NextCache:
    """The cache of the next phase, for the workers of this one to compute once trained:
    the stream entering rack position `position` for the `steps` steps of phase
    `stack_id` (its layout and corruption), stored in `dtype`; positions [start, position)
    run over this phase's own cache (start = its position), or from tokens (start 0).
    Shards go to `directory` (arrow) or the run's PhaseLinks `sink` under `key`."""
    position: int
    start: int
    steps: int
    dtype: str
    stack_id: int
    backend: str
    directory: str
    sink: object
    key: str


def emit_next_cache(next_cache: NextCache, config: StackWiseConfig, rack, train_ds, masking, own: dict | None,
                    rank: int, world: int, device) -> dict:
    """In a phase worker after training: compute this rank's share (shards rank::world) of
    the next phase's cache with the trained `rack`, over `own` (this phase's cache spec)
    where it starts at this phase's position. Returns what it cost ({build_s, flops, node_id}:
    FLOPs of the whole cache, one forward of the stacks run per row)."""
    t0 = time.perf_counter()
    layout = plan_layout(config, train_ds, next_cache.steps, next_cache.dtype)
    T, start, end = config.data.seq_len, next_cache.start, next_cache.position
    for i in range(rank, layout.shards, world):
        before = load_shard(own["shards"][i]) if start > 0 else None
        shard = compute_shard(rack, train_ds, masking, next_cache.stack_id, start, end,
                              layout.positions[layout.shard(i)], layout.dtype, before, device=device)
        del before
        if next_cache.backend == "arrow":
            write_shard(shard, shard_path(next_cache.directory, i))
        else:
            ray.get(next_cache.sink.put_shard.remote(next_cache.key, i, shard.arrays()))
        del shard
    row_flops = T * sum(forward_flops_per_token(s, T, config.model.d_model) for s in rack.stacks[start:end])
    return {"build_s": time.perf_counter() - t0, "flops": row_flops * layout.rows,
            "node_id": ray.get_runtime_context().get_node_id()}


def open_reader(spec: dict, layout: CacheLayout) -> ShardReader:
    """A phase worker's reader: two shards resident (the one being read and the next),
    every shard where the phase rereads its examples in a new order."""
    if layout.key != spec["key"]:
        raise RuntimeError("this worker's cache layout differs from the driver's: data or config differ")
    shards = spec["shards"]
    return ShardReader(layout, lambda i: load_shard(shards[i]), resident=layout.shards if layout.rereads else 2)
