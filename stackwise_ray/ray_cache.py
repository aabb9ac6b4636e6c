"""Caches on Ray: where shards live, who computes them, and how a worker reads them.

A cache's shards live in one of two backends (`ray.cache_backend`), one interface:
`ObjectStoreShards` (Ray objects owned by the run: by its driver when tasks build them,
by its PhaseLinks actor when a phase's workers do) and `ArrowShards` (Parquet files with
a checksum each and a manifest written last, under the phase store: they outlive the run,
and a crash keeps the intact ones).

Two builders compute the same shards, bit for bit (the same rack, rows, corruption,
batch size and dtype):
- `emit_next_cache` runs in the workers of the phase that trains stack k-1, once they have
  trained: they hold that stack, and their own cache's shards pair with the next one's,
  so each rank computes a share of the shards phase k reads, with no task to start and no
  rack to load again.
- `build` runs on the driver (or the Tune trial) for a phase whose predecessor this run did
  not train (reused from another trial, or recovered): it splits the shards over a few
  streaming-generator tasks that each load the rack once and yield one shard at a time.
  Ray retries a task killed for memory without end unless the task sets
  `max_retries=0`; these tasks do, and `build` retries the missing shards once itself,
  then raises CacheMemoryError (the run recomputes the trunk instead and says so).

Which cache a phase reads, and which builder makes it, is cache_policy.py's.
`open_reader` runs in a phase worker: a ShardReader over the shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import storage
from .cache import (ActivationCache, CacheLayout, ShardReader, cache_complete, compute_shard, plan_layout,
                    read_shard, shard_intact, shard_path, write_manifest, write_shard)
from .checkpoint import load_rack
from .config import StackWiseConfig
from .data.dataset import load_data
from .flops import forward_flops_per_token
from .masking import TimeStepMasking
from .errors import first_line

ATTEMPTS = 2  # a build killed for memory is tried once more (only its missing shards), then given up


class CacheMemoryError(RuntimeError):
    pass


# ---------------------------------------------------------------- where shards live

@dataclass(frozen=True)
class ObjectStoreShards:
    """Shards as Ray objects. A task yields a shard's arrays (the driver owns the object);
    a worker hands them to the run's PhaseLinks actor (`sink`), which owns them under
    `key`: an object a Train worker puts itself dies with it."""
    sink: object = None
    key: str = ""
    name = "object_store"

    def budget(self, root: str) -> float:
        return ray.available_resources().get("object_store_memory", 0) / 2

    def reader_bytes(self, layout: CacheLayout) -> int:
        return 0  # mapped zero-copy from the node's object store

    def complete(self, layout: CacheLayout) -> bool:
        return False

    def intact(self, layout: CacheLayout) -> dict[int, object]:
        return {}

    def task_output(self, shard: ActivationCache, i: int):
        return shard.arrays()

    def located(self, i: int, ref):
        return ref

    def worker_output(self, shard: ActivationCache, i: int) -> None:
        ray.get(self.sink.put_shard.remote(self.key, i, shard.arrays()))

    def emitted(self, layout: CacheLayout) -> list:
        return ray.get(self.sink.take_shards.remote(self.key))

    def finish(self, layout: CacheLayout) -> None:
        pass


@dataclass(frozen=True)
class ArrowShards:
    """Parquet shards under `directory` (in the phase store): each written under a
    temporary name and moved into place, its checksum after it, the manifest last."""
    directory: str
    name = "arrow"

    def budget(self, root: str) -> float:
        return storage.free_bytes(root) / 2

    def reader_bytes(self, layout: CacheLayout) -> int:
        """Decoded shards a reader holds: the one read, the next and one in flight; all of
        them where the phase rereads its examples."""
        return layout.nbytes if layout.rereads else 3 * layout.shard_bytes

    def complete(self, layout: CacheLayout) -> bool:
        return cache_complete(self.directory, layout)

    def intact(self, layout: CacheLayout) -> dict[int, str]:
        """Shards written whole before a crash: kept, not built again."""
        paths = {i: shard_path(self.directory, i) for i in range(layout.shards)}
        return {i: path for i, path in paths.items() if shard_intact(path)}

    def task_output(self, shard: ActivationCache, i: int) -> dict:
        write_shard(shard, shard_path(self.directory, i))
        return {"rows": len(shard), "bytes": shard.nbytes}

    def located(self, i: int, ref) -> str:
        return shard_path(self.directory, i)

    def worker_output(self, shard: ActivationCache, i: int) -> None:
        write_shard(shard, shard_path(self.directory, i))

    def emitted(self, layout: CacheLayout) -> list[str]:
        return [shard_path(self.directory, i) for i in range(layout.shards)]

    def finish(self, layout: CacheLayout) -> None:
        write_manifest(self.directory, layout)


def shards_for(config: StackWiseConfig, directory: str, sink=None, key: str = ""):
    """The backend `ray.cache_backend` names, for a cache in `directory` (arrow) or under
    `key` in the run's PhaseLinks `sink` (object store, when a phase's workers build it)."""
    return ArrowShards(directory) if config.ray.cache_backend == "arrow" else ObjectStoreShards(sink, key)


def load_shard(source) -> ActivationCache:
    """A shard from its Ray object (zero-copy from the local object store) or Parquet file."""
    return read_shard(source) if isinstance(source, str) else ActivationCache(**ray.get(source))


# ---------------------------------------------------------------- a built cache

@dataclass
class CacheHandle:
    """A built cache: the stream entering rack `position`, its layout, where its shards
    live (`backend`) and the shards themselves (Ray object refs, or Parquet paths)."""
    position: int
    layout: CacheLayout
    backend: ObjectStoreShards | ArrowShards
    shards: list
    info: dict = field(default_factory=dict)

    def spec(self, kind: str, steps: int) -> dict:
        """What a phase worker needs to read it (it rebuilds the layout from `steps`)."""
        return {"backend": self.backend.name, "position": self.position, "kind": kind, "steps": steps,
                "dtype": self.layout.dtype, "key": self.layout.key, "shards": self.shards}


def cost(layout: CacheLayout, *, built: bool, incremental: bool, stacks_run: int, build_s: float, tasks: int,
         attempts: int, reused_shards: int, flops: float, node_id: str, **more) -> dict:
    """A cache's record in its phase's metrics."""
    return {"rows": layout.rows, "bytes": layout.nbytes, "shards": layout.shards, "dtype": layout.dtype,
            "built": built, "incremental": incremental, "stacks_run": stacks_run, "build_s": build_s, "tasks": tasks,
            "attempts": attempts, "reused_shards": reused_shards, "flops": flops, "node_id": node_id, **more}


# ---------------------------------------------------------------- built by the phase's workers

@dataclass(frozen=True)
class NextCache:
    """The cache of the next phase, for the workers of this one to compute once trained:
    the stream entering rack position `position` for the `steps` steps of phase
    `stack_id` (its layout and corruption), stored in `dtype`; positions [start, position)
    run over this phase's own cache (start = its position), or from tokens (start 0)."""
    position: int
    start: int
    steps: int
    dtype: str
    stack_id: int
    backend: ObjectStoreShards | ArrowShards

    def handle(self, layout: CacheLayout, spent: dict) -> CacheHandle:
        """The cache once the workers are done (`spent`: emit_next_cache's report)."""
        shards = self.backend.emitted(layout)
        if len(shards) != layout.shards:
            raise RuntimeError(f"the next phase's cache has {len(shards)} of its {layout.shards} shards")
        self.backend.finish(layout)
        return CacheHandle(self.position, layout, self.backend, shards, cost(
            layout, built=True, incremental=self.start > 0, stacks_run=self.position - self.start, tasks=0,
            attempts=1, reused_shards=0, emitted=True, for_stack=self.stack_id, **spent))


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
        next_cache.backend.worker_output(shard, i)
        del shard
    row_flops = T * sum(forward_flops_per_token(s, T, config.model.d_model) for s in rack.stacks[start:end])
    return {"build_s": time.perf_counter() - t0, "flops": row_flops * layout.rows,
            "node_id": ray.get_runtime_context().get_node_id()}


# ---------------------------------------------------------------- built by tasks

@dataclass(frozen=True)
class CacheJob:
    """What a task build computes: the stream entering rack position `end` for phase
    `stack_id`'s `layout`, from the rack in `checkpoint`, running positions [start, end)
    (over the previous cache when start > 0), into `backend`."""
    config: StackWiseConfig
    checkpoint: str
    stack_id: int
    start: int
    end: int
    layout: CacheLayout
    backend: ObjectStoreShards | ArrowShards
    data_ref: object
    use_gpu: bool


@ray.remote(num_returns="streaming", max_retries=0)
def build_shards(job: CacheJob, shard_ids: list[int], prev: list | None):
    """Ray task: shards `shard_ids` of `job`, one at a time (first yields its node and the
    FLOPs of building one row, then what the backend keeps of each shard: its arrays, or
    its size once its Parquet file is written)."""
    import torch

    device = "cuda" if job.use_gpu and torch.cuda.is_available() else "cpu"
    config = job.config
    rack = load_rack(job.checkpoint, config=config).rack.to(device)  # this run's corruption, not the checkpoint's run's
    train_ds, _, tokenizer = load_data(config, job.data_ref)
    masking = TimeStepMasking(config, tokenizer)
    T = config.data.seq_len
    yield {"node_id": ray.get_runtime_context().get_node_id(),  # and what one row costs to build
           "row_flops": T * sum(forward_flops_per_token(s, T, config.model.d_model)
                                for s in rack.stacks[job.start:job.end])}
    for i in shard_ids:
        before = None if prev is None else load_shard(prev[i])
        shard = compute_shard(rack, train_ds, masking, job.stack_id, job.start, job.end,
                              job.layout.positions[job.layout.shard(i)], job.layout.dtype, before, device=device)
        del before
        yield job.backend.task_output(shard, i)
        del shard


def build(job: CacheJob, prev: CacheHandle | None = None, tasks: int = 1, board=None) -> CacheHandle:
    """`job`'s cache, over `prev` (the cache entering job.start) where job.start > 0. Shards
    the backend kept whole (written before a crash) stay; up to `tasks` tasks run at once."""
    t0, layout, backend = time.perf_counter(), job.layout, job.backend
    if backend.complete(layout):
        return CacheHandle(job.end, layout, backend, backend.emitted(layout), cost(
            layout, built=False, incremental=False, stacks_run=0, build_s=0.0, tasks=0, attempts=0,
            reused_shards=layout.shards, flops=0.0, node_id=""))
    shards: list = [None] * layout.shards
    for i, kept in backend.intact(layout).items():
        shards[i] = kept
    reused = sum(s is not None for s in shards)
    outside = PlacementGroupSchedulingStrategy(placement_group=None)  # a Tune trial's group holds only its slot
    attempts, failure, started, groups = 0, None, [], []
    while any(s is None for s in shards) and attempts < ATTEMPTS:
        attempts += 1
        todo = [i for i, s in enumerate(shards) if s is None]
        n = max(1, min(tasks, len(todo)))
        groups = [todo[k::n] for k in range(n)]
        runs = [(ids, build_shards.options(scheduling_strategy=outside, num_gpus=1 if job.use_gpu else 0).remote(
            job, ids, prev.shards if prev else None)) for ids in groups]
        try:
            for ids, generator in runs:
                started.append(ray.get(next(generator)))
                for i, ref in zip(ids, generator):
                    ray.get(ref)  # raises the task's error; an object-store shard is only mapped
                    shards[i] = backend.located(i, ref)
                    _post(board, job.stack_id, layout, sum(s is not None for s in shards))
        except ray.exceptions.OutOfMemoryError as e:  # the other tasks' finished shards stay
            failure = e
            for _, generator in runs:  # the others stop (their finished shards stay); a retry starts afresh
                ray.cancel(generator)
    if any(s is None for s in shards):
        raise CacheMemoryError(f"the cache for rack position {job.end} was killed for memory {attempts} times "
                               f"({layout.shards} shards of {layout.shard_bytes / 2**20:.0f} MiB; lower "
                               f"ray.cache_shard_mb or give the node more memory): {first_line(failure)}")
    backend.finish(layout)
    built = layout.rows * (layout.shards - reused) / layout.shards
    return CacheHandle(job.end, layout, backend, shards, cost(
        layout, built=True, incremental=prev is not None, stacks_run=job.end - job.start,
        build_s=time.perf_counter() - t0, tasks=len(groups) if attempts else 0, attempts=attempts,
        reused_shards=reused, flops=started[-1]["row_flops"] * built if started else 0.0,
        node_id=started[-1]["node_id"] if started else ""))


def _post(board, stack_id: int, layout: CacheLayout, done: int) -> None:
    if board is not None:
        rows = min(done * layout.shard_rows, layout.rows)
        board.post.remote(f"cache-{stack_id}", {"stack": stack_id, "step": rows, "steps": layout.rows,
                                                "what": "cache", "tokens": rows * layout.seq_len})


# ---------------------------------------------------------------- read by a phase worker

def open_reader(spec: dict, layout: CacheLayout) -> ShardReader:
    """A phase worker's reader: two shards resident (the one being read and the next),
    every shard where the phase rereads its examples in a new order."""
    if layout.key != spec["key"]:
        raise RuntimeError("this worker's cache layout differs from the driver's: data or config differ")
    shards = spec["shards"]
    return ShardReader(layout, lambda i: load_shard(shards[i]), resident=layout.shards if layout.rereads else 2)
