"""Which cache each phase of a run reads, and who builds it (ray_cache.py is how).

A run keeps the last cache it built. Phase k reads the cache its plan names (plan.py),
and, in order of preference, gets it
- kept from the phase before (a QLoRA trunk's inputs stay the same; or phase k-1's
  workers computed phase k's cache once trained: `next_cache`),
- built by Ray tasks from phase k-1's checkpoint (phase k-1 was reused or recovered),
  over the kept cache where that holds the same examples one position earlier,
- or refused, with its reason in the phase's metrics and one warning line: the trunk is
  recomputed (and rounded where the cache's dtype would have rounded it).

A cache is refused when its bytes pass the budget (`ray.cache_max_bytes`, else half the
object store or, for Arrow files, half the free disk), or its builders and readers would
need more than half the memory Ray has free, or its build is killed for memory twice.
"""

from __future__ import annotations

import warnings

import ray

from . import ray_cache, storage
from .cache import CacheLayout, plan_layout
from .config import StackWiseConfig
from .phase import phase_steps
from .phase_store import PhaseStore
from .plan import PhasePlan

MIB = 2**20


class CachePlanner:
    """The caches of one run's phases.

    Args:
        config: the run's config.
        store: its phase store (Arrow caches live in their source phase's directory).
        train_ds: its training split (a cache's rows are examples of it).
        data_ref: where tasks and workers read the data (the token store's location).
        board: console.ProgressBoard that task builds post progress to, or None.
    """

    def __init__(self, config: StackWiseConfig, store: PhaseStore, train_ds, data_ref, board=None):
        self.config, self.store, self.train_ds, self.data_ref, self.board = config, store, train_ds, data_ref, board
        self.kept: ray_cache.CacheHandle | None = None  # the last cache built: a later phase may read or extend it

    def steps(self, plan: PhasePlan) -> int:
        """The steps of `plan`'s phase, which its cache's rows follow."""
        return phase_steps(self.config.training, len(self.train_ds) // self.config.data.batch_size, plan.stack_id)

    def layout(self, plan: PhasePlan) -> CacheLayout:
        """The rows of `plan`'s cache: the examples its steps read."""
        return plan_layout(self.config, self.train_ds, self.steps(plan), plan.cache.dtype)

    def directory(self, source_id: str, layout: CacheLayout, position: int) -> str:
        """Where an Arrow cache lives: in the directory of the phase whose rack made it."""
        return storage.join(self.store.root, source_id, f"cache_position_{position:03d}_{layout.key}_{layout.dtype}")

    def for_phase(self, plan: PhasePlan, prev_checkpoint: str | None, ids: list[str]) -> tuple[dict | None, dict]:
        """(spec for the phase's workers, or None: it reads no cache; the cache's record for
        the phase's metrics)."""
        use, stack_id, kept = plan.cache, plan.stack_id, self.kept
        info = {"kind": use.kind, "reason": use.reason}
        if use.kind == "none":
            return None, info
        layout = self.layout(plan)
        incremental = kept is not None and kept.position == use.position - 1 and kept.layout.key == layout.key
        reused = kept is not None and kept.position == use.position and kept.layout.key == layout.key \
            and kept.layout.dtype == layout.dtype
        emitted = reused and kept.info.get("emitted") and kept.info.pop("for_stack", None) == stack_id
        refusal = None if reused else self.refusal(
            layout, storage.size(storage.join(prev_checkpoint, "model.safetensors")), incremental)
        if refusal is None and not reused:
            # a cache is determined by the phases before the position it feeds
            source = ids[use.position - 1] if use.position > 0 else ids[0]
            job = ray_cache.CacheJob(self.config, prev_checkpoint, stack_id, use.position - 1 if incremental else 0,
                                     use.position, layout,
                                     ray_cache.shards_for(self.config, self.directory(source, layout, use.position)),
                                     self.data_ref, self.config.ray.use_gpu and ray.available_resources().get("GPU", 0) >= 1)
            try:
                self.kept = ray_cache.build(job, kept if incremental else None,
                                            tasks=max(1, min(4, int(ray.available_resources().get("CPU", 1)))),
                                            board=self.board)
            except ray_cache.CacheMemoryError as e:
                refusal = f"{e}: the trunk is recomputed instead"
        if refusal is not None:  # said before the phase trains, and kept in its metrics
            warnings.warn(f"phase {stack_id}: {refusal}")
            self.kept = None
            return None, {"kind": "none", "reason": refusal, "over_budget": True}
        cache = self.kept
        info.update(cache.info, built=cache.info["built"] and (emitted or not reused))
        return cache.spec(use.kind, self.steps(plan)), {**info, "backend": cache.backend.name,
                                                                 "position": use.position}

    def next_cache(self, plans: list[PhasePlan], plan: PhasePlan, own: dict | None, ids: list[str],
                   sink) -> ray_cache.NextCache | None:
        """The cache of the phase after `plan`, for `plan`'s workers to compute once they
        have trained (they hold the stack it runs), or None: the next phase reads no trunk
        output cache, is finished already, or its cache would be refused (`for_phase` then
        says why). It runs over `own` (this phase's cache spec) where that holds the same
        examples one position earlier, else from tokens."""
        k = plan.stack_id + 1
        if k >= len(plans) or plans[k].cache.kind != "trunk_outputs" or self.store.has_record(ids[k]):
            return None
        use, layout = plans[k].cache, self.layout(plans[k])
        incremental = own is not None and own["kind"] == "trunk_outputs" and own["position"] == use.position - 1 \
            and own["key"] == layout.key
        if self.refusal(layout, 0, incremental) is not None:  # the builder is a worker holding the rack already
            return None
        backend = ray_cache.shards_for(self.config, self.directory(ids[plan.stack_id], layout, use.position), sink,
                                       key=f"{ids[k]}/{layout.key}_{layout.dtype}")
        if backend.complete(layout):
            return None  # built before a crash: for_phase finds it
        return ray_cache.NextCache(position=use.position, start=use.position - 1 if incremental else 0,
                                   steps=self.steps(plans[k]), dtype=use.dtype, stack_id=k, backend=backend)

    def keep_emitted(self, next_cache: ray_cache.NextCache, spent: dict) -> None:
        """The cache a phase's workers computed for the next phase, now complete."""
        self.kept = next_cache.handle(plan_layout(self.config, self.train_ds, next_cache.steps, next_cache.dtype), spent)

    def refusal(self, layout: CacheLayout, weights: int, incremental: bool) -> str | None:
        """Why a cache of `layout` cannot be built and read here, or None: its bytes against
        the budget, and the memory of a builder (the rack's `weights`, one shard, one shard
        of the previous cache, a batch of activations) and of every reader (the backend's
        resident shards) against half of Ray's free memory."""
        config = self.config
        backend = ray_cache.shards_for(config, "")
        budget = config.ray.cache_max_bytes if config.ray.cache_max_bytes is not None else backend.budget(self.store.root)
        if layout.nbytes > budget:
            return (f"a {layout.nbytes / MIB:.0f} MiB cache ({layout.rows} examples) exceeds the {budget / MIB:.0f} MiB "
                    "budget (ray.cache_max_bytes): the trunk is recomputed instead")
        batch = 64 * layout.seq_len * layout.d_model * 4 * 4 * max(config.stack_blocks(k) for k in range(config.target_stacks))
        builder = weights + layout.shard_bytes * (2 if incremental else 1) + batch
        need = builder + config.ray.num_workers * backend.reader_bytes(layout)
        memory = ray.available_resources().get("memory", 0) / 2
        if need > memory:
            return (f"building and reading a {layout.nbytes / MIB:.0f} MiB cache needs about {need / MIB:.0f} MiB of "
                    f"memory, more than half of the {2 * memory / MIB:.0f} MiB Ray has free: the trunk is recomputed instead")
        return None

