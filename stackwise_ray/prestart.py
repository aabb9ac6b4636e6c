"""Start phase k+1's worker group while phase k trains, and the run's channel to its phases.

A Ray Train phase spends ~10 s on a small machine before its first step (controller and
worker processes, imports, process group). None of that depends on the previous phase,
so when the cluster has room for two phases, the next phase's `TorchTrainer` is started
as soon as the current one begins training; its workers load the data, then wait for
the previous checkpoint and cache, which the driver hands over through `PhaseLinks`.

`PhaseLinks` is also where a phase's workers leave the shards of the next phase's cache
(ray_cache.emit_next_cache): an actor of the run (its driver owns it) puts them in the
object store, so they outlive the workers that computed them.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import ray


@ray.remote(num_cpus=0)
class PhaseLinks:
    """Per phase id: the inputs the driver hands to a waiting worker group, and whether the
    phase has begun training (the moment to prestart the one after it). Per cache key: the
    shards a phase's workers computed for the next phase, owned here."""

    def __init__(self):
        self._inputs = collections.defaultdict(asyncio.Event)
        self._training = collections.defaultdict(asyncio.Event)
        self._values = {}
        self._shards = collections.defaultdict(dict)

    async def put_shard(self, key: str, i: int, arrays: dict) -> None:
        """Keep shard `i` of cache `key` (a worker's arrays, copied into an object of ours)."""
        self._shards[key][i] = ray.put(arrays)

    async def take_shards(self, key: str) -> list:
        """The object refs of cache `key`'s shards, in order (the caller holds them from here)."""
        shards = self._shards.pop(key, {})
        return [shards[i] for i in sorted(shards)]

    async def hand_over(self, phase_id: str, inputs: dict | None) -> None:
        self._values[phase_id] = inputs
        self._inputs[phase_id].set()

    async def inputs(self, phase_id: str) -> dict | None:
        await self._inputs[phase_id].wait()
        return self._values[phase_id]

    async def training(self, phase_id: str) -> None:
        self._training[phase_id].set()

    async def training_started(self, phase_id: str) -> None:
        await self._training[phase_id].wait()


@dataclass
class Prestart:
    phase_id: str
    after: str  # the phase whose training start launches this one
    future: Future
    lock: object  # the phase's claim, held from the prestart until the phase is recorded
    cancelled: threading.Event = field(default_factory=threading.Event)


class Prestarter:
    """Keeps at most one phase started ahead of the one training."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.links = PhaseLinks.remote()
        # two threads: a prestarted phase trains in one while the next waits in the other
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prestart") if enabled else None
        self._pending: dict[str, Prestart] = {}

    def start(self, phase_id: str, after: str, lock, fit) -> None:
        """Once phase `after` trains, run `fit()` (a TorchTrainer whose workers wait for
        their inputs under `phase_id`) in the background."""
        pre = Prestart(phase_id, after, None, lock)

        def run():
            ray.get(self.links.training_started.remote(after))
            return None if pre.cancelled.is_set() else fit()

        pre.future = self._pool.submit(run)
        self._pending[phase_id] = pre

    def prestarted(self, phase_id: str) -> Prestart | None:
        """The phase prestarted under `phase_id`, if any (it stays known to `close`)."""
        return self._pending.get(phase_id)

    def hand_over(self, phase_id: str, inputs: dict | None) -> None:
        ray.get(self.links.hand_over.remote(phase_id, inputs))

    def cancel(self, pre: Prestart) -> None:
        """Stop a prestarted phase: its workers get no inputs and return untrained (for a
        phase that already ran, nothing happens but the wait for its end)."""
        pre.cancelled.set()
        self.links.training.remote(pre.after)  # release the wait, should that phase never train
        self.hand_over(pre.phase_id, None)
        try:
            pre.future.result()
        except Exception:  # noqa: BLE001 - an abandoned phase's failure does not matter
            pass
        pre.lock.release()

    def close(self) -> None:
        """Cancel every prestarted phase that has not run (e.g. after a failure), and stop."""
        for pre in self._pending.values():
            self.cancel(pre)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        ray.kill(self.links)
