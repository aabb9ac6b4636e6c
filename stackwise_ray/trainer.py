"""ProgressiveTrainer: one Ray Train phase per stack, caches between them, resume.

Run directory (`storage_path/name/`, a local path or a storage URI: storage.py):
    phases/<phase id>/<run>/checkpoint_*/  Ray Train's checkpoint of a phase (rack.json,
                                     model.safetensors); <run> is e.g. sweep.t003.s02
    phases/<phase id>/done.json      completion record, written atomically after the phase
    phases/<phase id>/cache_position_*/  Arrow caches built from that phase's rack: Parquet
                                     shards, manifest.json written last
    final/                           the trained rack (a copy of the last phase's checkpoint)
    config.yaml                      the config the run ran (command-line overrides included)
    summary.json                     per-stack history
Phases are content-addressed (phase_store.py): a phase with a completion record is reused,
by a resumed run or by another trial of a sweep sharing the store, never retrained.
"""

from __future__ import annotations

import copy
import time
import warnings

import ray

from . import ray_cache, ray_metrics, storage
from .builder import ProgressiveRackBuilder
from .cache import plan_layout
from .checkpoint import load_metadata, load_rack
from .config import StackWiseConfig
from .data import dataset_from_user, open_datasets, token_store_location
from .phase import phase_steps
from .phase_store import PhaseStore, phase_identity
from .plan import PhasePlan, plan_phases
from .prestart import Prestarter
from .ray_phase import fit_phase
from .ray_runtime import ensure_ray
from .storage import storage_dir
from .tracking import Tracker, flat
from .worker import PhaseInputs

class RunDirError(ValueError):
    pass


def write_config(directory: str, config: StackWiseConfig) -> None:
    """`directory/config.yaml`: the config a run (or a sweep) ran, command-line overrides
    included; `python -m stackwise_ray.train directory/config.yaml` reruns a run's."""
    storage.write_bytes(storage.join(directory, "config.yaml"), config.to_yaml().encode())


class ProgressiveTrainer:
    """Trains a rack stack by stack, each phase a Ray Train TorchTrainer run.

    Args:
        config: the experiment.
        storage_path: root of run directories (default config.ray.storage_path).
        name: run directory name (default: a timestamp).
        resume: continue the run in that directory, skipping finished phases.
        callbacks: Ray Train callbacks for every phase.
        phase_store: a directory of phases shared with other runs (a sweep's); default
            RUN_DIR/phases.
        on_phase: called with each phase's metrics as soon as the phase is done or reused.
        tracker: where phase metrics are tracked (tracking.py); default: the config's
            tracking section, one tracked run named after this run.
        console: a console.Console that shows the phases' live progress (the train command).
        labels: {"experiment", "trial"} naming this run in its Ray metrics' tags
            (ray_metrics.py) and its phases' Ray Train runs (a sweep's name and the trial's
            name); default: the run's name for both.
        prestart: start each phase's worker group while the phase before it trains
            (prestart.py); default: where the cluster has room for two phases.
        concurrent_runs: runs sharing the cluster (a sweep's concurrent trials), for that rule.
    """

    def __init__(self, config: StackWiseConfig, storage_path: str | None = None, name: str | None = None,
                 resume: bool = False, callbacks=None, phase_store: str | None = None, on_phase=None,
                 prestart: bool | None = None, concurrent_runs: int = 1, tracker=None, console=None,
                 labels: dict | None = None):
        self.config = config.validate()
        self.run_dir = storage.join(storage_dir(storage_path or config.ray.storage_path),
                                    name or time.strftime("run-%Y%m%d-%H%M%S"))
        self.store = PhaseStore(phase_store or storage.join(self.run_dir, "phases"))
        self.resume, self.callbacks, self.on_phase = resume, callbacks, on_phase
        self.console, self._board = console, None
        run_name = storage.basename(self.run_dir)
        self.labels = labels or {"experiment": run_name, "trial": run_name}
        self.tracker = tracker or Tracker(self.config.tracking, self.run_dir, storage.basename(self.run_dir),
                                          storage.basename(self.run_dir), flat(self.config.to_dict()))
        self.prestart, self.concurrent_runs = prestart, concurrent_runs
        self._train_ds = None  # config.data's training split, opened on first need
        self._store_location = None  # config.data's token store, found or built on first need
        self._kept_cache = None  # the last cache built (ray_cache.CacheHandle): a later phase may extend it

    def train_progressively(self, rack_builder: ProgressiveRackBuilder | None = None, dataloader=None,
                            target_stacks: int | None = None) -> list[dict]:
        """Train phases 0..target_stacks-1; returns one metrics dict per stack.

        Args:
            rack_builder: stacks already added to it are kept (their blocks, precision
                and side); more are added up to target_stacks. After training it holds
                the trained rack.
            dataloader: a Dataset or DataLoader of items with `input_ids`; None uses
                config.data.
            target_stacks: default training.progressive.target_stacks (or max_stacks).
        """
        config = self._config_for(rack_builder)
        plans = self.phase_plans(rack_builder, target_stacks)
        self.check_run_dir()
        ensure_ray(config)
        storage.makedirs(self.run_dir)
        write_config(self.run_dir, config)
        self._watch()
        data_ref = ray.put(dataset_from_user(dataloader, config)) if dataloader is not None else self._token_store()
        data_key = storage.basename(data_ref) if isinstance(data_ref, str) else None
        ids = [phase_identity(config, plans, k, data_key) for k in range(len(plans))]
        self.store.check_version()
        prestarter = Prestarter(self._room_for_two_phases(config) if self.prestart is None else self.prestart)
        history, prev, self._kept_cache = [], None, None  # a run starts without a cache
        try:
            for plan in plans:
                pre = prestarter.prestarted(ids[plan.stack_id])  # holds the phase's lock already
                record, status = self.store.train_once(
                    ids[plan.stack_id],
                    lambda recovered: self._run_phase(config, plans, plan, prev, ids, data_ref, prestarter, pre,
                                                      recovered),
                    claim=pre.lock if pre is not None else None, plans=plans[:plan.stack_id + 1])
                if pre is not None and status != "trained":
                    prestarter.cancel(pre)  # reused or recovered: the prestarted workers are not needed
                history.append({**record["metrics"], "status": status, "phase_id": ids[plan.stack_id],
                                "checkpoint": record["checkpoint"]})
                prev = record["checkpoint"]
                self._notify(history[-1])
        except BaseException:
            self.tracker.close(failed=True)
            raise
        finally:
            prestarter.close()
            if self.console is not None:
                self.console.stop_watching()
        self.tracker.close()
        final = self._publish_final(prev, history)
        if rack_builder is not None:
            rack_builder.hold(load_rack(final, config=config))  # the run's own config: trusted
        return history

    def _run_phase(self, config, plans, plan, prev, ids, data_ref, prestarter, pre, recovered):
        """(record, status) of phase `plan`, its claim held: its cache is built (later
        phases build theirs from it), then it trains, or a checkpoint it left is `recovered`."""
        t0 = time.time()
        cache_spec, self._kept_cache, cache_info = self._cache_for(config, plans, plan, prev, self._kept_cache, ids,
                                                                   data_ref)
        if cache_spec is None and plan.cache.kind != "none":
            plan = plan.recomputed(cache_info["reason"])
        t1 = time.time()
        if recovered is not None:  # trained before a crash that came before its record
            metrics, checkpoint, status = load_metadata(recovered)["metrics"], recovered, "recovered"
        else:
            next_cache = self._next_cache(config, plans, plan, cache_spec, ids, data_ref, prestarter.links)
            inputs = PhaseInputs((plan,), prev, cache_spec, time.time(), next_cache)
            if pre is not None:
                prestarter.hand_over(ids[plan.stack_id], inputs)
            self._prestart_next(config, plans, plan.stack_id, ids, data_ref, prestarter)
            if pre is not None:
                metrics, checkpoint = pre.future.result()
            else:
                self.store.clear(ids[plan.stack_id])
                metrics, checkpoint = fit_phase(config, f"s{plan.stack_id:02d}", inputs, self.store.root,
                                                ids[plan.stack_id], data_ref, self.callbacks, links=prestarter.links,
                                                board=self._board, labels=self.labels)
            status = "trained"
            if next_cache is not None:  # these workers computed the next phase's cache: it is kept for it
                emitted = metrics.pop("next_cache")
                self._kept_cache = ray_cache.CacheHandle.emitted(
                    next_cache, plan_layout(config, self._train_split(data_ref), next_cache.steps, next_cache.dtype),
                    emitted)
                metrics["next_cache_s"] = emitted["build_s"]
        built = cache_info.get("flops", 0.0) if cache_info.get("built") else 0.0
        metrics.update({"cache": cache_info, "cache_s": t1 - t0, "phase_wall_s": time.time() - t0,
                        "flops": metrics["train_flops"] + built, "prestarted": status == "trained" and pre is not None,
                        "orchestration_s": time.time() - t1 - metrics["train_s"]})
        return {"stack": plan.stack_id, "phase_id": ids[plan.stack_id], "checkpoint": checkpoint,
                "metrics": metrics}, status

    def _prestart_next(self, config, plans, stack_id, ids, data_ref, prestarter) -> None:
        """Start phase stack_id+1's worker group, to wait for its inputs while this one trains."""
        k = stack_id + 1
        # a record is verified when the loop reaches it; here its presence is enough to skip
        if not prestarter.enabled or k >= len(plans) or self.store.has_record(ids[k]):
            return
        claim = self.store.try_claim(ids[k])
        if claim is None:  # another run is training it
            return
        if self.store.finished_checkpoint(ids[k]) is not None:
            claim.release()
            return
        self.store.clear(ids[k])
        prestarter.start(ids[k], after=ids[stack_id], lock=claim,
                         fit=lambda: fit_phase(config, f"s{k:02d}", None, self.store.root, ids[k], data_ref,
                                               self.callbacks, links=prestarter.links, board=self._board,
                                               labels=self.labels))

    def _room_for_two_phases(self, config) -> bool:
        """Prestart only where the next phase's workers fit beside the training ones (for
        every run sharing the cluster: `concurrent_runs`)."""
        r, total = config.ray, ray.cluster_resources()
        cpus = 2 * r.num_workers * r.cpus_per_worker * self.concurrent_runs
        gpus = 2 * r.num_workers * self.concurrent_runs if r.use_gpu else 0
        return total.get("CPU", 0) >= cpus and total.get("GPU", 0) >= gpus

    train_rack = train_progressively  # the source document uses both names

    def train_end_to_end(self, train_steps: int, target_stacks: int | None = None) -> dict:
        """The compute-matched baseline: the final architecture built at once and trained
        for `train_steps` steps as one phase (all parameters train). Returns its metrics."""
        config = self.config
        plans = self.phase_plans(None, target_stacks)
        self.check_run_dir()
        ensure_ray(config)
        storage.makedirs(self.run_dir)
        write_config(self.run_dir, config)
        data_key = storage.basename(self._token_store())
        self.store.check_version()
        phase_id = f"e2e-{phase_identity(config, plans, len(plans) - 1, data_key)[4:]}-{train_steps}"

        def train(recovered: str | None) -> tuple[dict, str]:
            t0 = time.time()
            if recovered is not None:  # trained before a crash that came before its record
                metrics, checkpoint, status = load_metadata(recovered)["metrics"], recovered, "recovered"
            else:
                self.store.clear(phase_id)
                inputs = PhaseInputs(tuple(plans), None, None, time.time())
                metrics, checkpoint = fit_phase(config, "e2e", inputs, self.store.root, phase_id, self._token_store(),
                                                self.callbacks, train_steps, labels=self.labels)
                status = "trained"
            metrics.update({"cache": {"kind": "none", "reason": "end-to-end baseline"}, "cache_s": 0.0,
                            "flops": metrics["train_flops"], "phase_wall_s": time.time() - t0,
                            "orchestration_s": time.time() - t0 - metrics["train_s"]})
            return {"stack": len(plans) - 1, "phase_id": phase_id, "checkpoint": checkpoint, "metrics": metrics}, status

        record, status = self.store.train_once(phase_id, train, plans=plans)
        history = [{**record["metrics"], "status": status, "phase_id": phase_id, "checkpoint": record["checkpoint"]}]
        self._publish_final(record["checkpoint"], history)
        self._notify(history[0])
        self.tracker.close()
        return history[0]

    # ------------------------------------------------------------------ pieces
    def _watch(self) -> None:
        """Once Ray is up: a progress board the phases post to, shown by the console."""
        if self.console is None or self._board is not None:
            return
        from .console import ProgressBoard

        self.console.capture_ray_worker_logs()
        self._board = ProgressBoard.remote()
        self.console.watch(self._board)

    def _notify(self, metrics: dict) -> None:
        ray_metrics.phase_finished(ray_metrics.tags(self.labels, metrics["phase_id"], metrics["stack"]), metrics)
        if self.on_phase is not None:
            self.on_phase(metrics)
        self.tracker.log_phase(metrics)

    def _config_for(self, builder) -> StackWiseConfig:
        if builder is None or builder.building_mode == self.config.training.progressive.building_mode:
            return self.config
        config = copy.deepcopy(self.config)  # the builder's mode wins: masking and caches must agree
        config.training.progressive.building_mode = builder.building_mode
        return config

    def phase_plans(self, builder: ProgressiveRackBuilder | None = None,
                    target_stacks: int | None = None) -> list[PhasePlan]:
        """The plans of the phases train_progressively(builder, target_stacks=...) runs
        (train_end_to_end builds the last one's rack at once)."""
        added, default = (builder.plan, builder.default_precision) if builder is not None else ([], None)
        return plan_phases(self._config_for(builder), target_stacks, added, default)

    def check_run_dir(self) -> None:
        """Raise RunDirError where a finished run would be overwritten (writes nothing:
        the run directory is made once Ray is up)."""
        own_store = self.store.root == storage.join(self.run_dir, "phases")
        if not self.resume and own_store and self.store.finished_count():
            raise RunDirError(f"{self.run_dir}: a run with finished phases is already there; resume it or choose another name")

    def _cache_for(self, config, plans, plan, prev_checkpoint, cache, ids, data_ref):
        """(spec for the phase's workers, the cache kept for later phases, info for metrics)."""
        use, stack_id = plan.cache, plan.stack_id
        info = {"kind": use.kind, "reason": use.reason}
        if use.kind == "none":
            return None, cache, info
        train_ds = self._train_split(data_ref)
        steps = phase_steps(config.training, len(train_ds) // config.data.batch_size)
        layout = plan_layout(config, train_ds, steps, use.dtype)
        incremental = cache is not None and cache.position == use.position - 1 and cache.layout.key == layout.key
        reused = cache is not None and cache.position == use.position and cache.layout.key == layout.key \
            and cache.layout.dtype == layout.dtype
        emitted = reused and cache.info.get("emitted") and cache.info.pop("for_stack", None) == stack_id
        refusal = None if reused else self._memory_refusal(
            config, layout, storage.size(storage.join(prev_checkpoint, "model.safetensors")), incremental)
        if refusal is None and not reused:
            # the cache is determined by the phases before the position it feeds
            source = ids[use.position - 1] if use.position > 0 else ids[0]
            directory = storage.join(self.store.root, source,
                                     f"cache_position_{use.position:03d}_{layout.key}_{layout.dtype}")
            try:
                cache = ray_cache.build(config, prev_checkpoint, stack_id, use.position - 1 if incremental else 0,
                                        use.position, layout, cache if incremental else None, directory, data_ref,
                                        tasks=max(1, min(4, int(ray.available_resources().get("CPU", 1)))),
                                        board=self._board)
            except ray_cache.CacheMemoryError as e:
                refusal = f"{e}: the trunk is recomputed instead"
        if refusal is not None:  # said before the phase trains, and kept in its metrics
            warnings.warn(f"phase {stack_id}: {refusal}")
            return None, None, {"kind": "none", "reason": refusal, "over_budget": True}
        info.update(cache.info, built=cache.info["built"] and (emitted or not reused))
        return cache.spec(use.kind, steps), cache, {**info, "backend": cache.backend, "position": use.position}

    def _memory_refusal(self, config, layout, weights: int, incremental: bool) -> str | None:
        """Why a cache of `layout` cannot be built and read here, or None: its bytes against
        the object store or disk budget, and the memory of a builder (the rack's `weights`,
        one shard, one shard of the previous cache, a batch of activations) and of every
        reader (arrow shards are decoded: the one read, the next and one in flight; all of
        them where the phase rereads its examples) against half of Ray's memory."""
        mib = 2**20
        budget = self._budget(config)
        if layout.nbytes > budget:
            return (f"a {layout.nbytes / mib:.0f} MiB cache ({layout.rows} examples) exceeds the {budget / mib:.0f} MiB "
                    "budget (ray.cache_max_bytes): the trunk is recomputed instead")
        batch = 64 * layout.seq_len * layout.d_model * 4 * 4 * max(1, config.blocks_per_stack)
        builder = weights + layout.shard_bytes * (2 if incremental else 1) + batch
        reader = (layout.nbytes if layout.rereads else 3 * layout.shard_bytes) if config.ray.cache_backend == "arrow" else 0
        need, memory = builder + config.ray.num_workers * reader, ray.available_resources().get("memory", 0) / 2
        if need > memory:
            return (f"building and reading a {layout.nbytes / mib:.0f} MiB cache needs about {need / mib:.0f} MiB of "
                    f"memory, more than half of the {2 * memory / mib:.0f} MiB Ray has free: the trunk is recomputed instead")
        return None

    def _next_cache(self, config, plans, plan, own: dict | None, ids, data_ref, sink) -> ray_cache.NextCache | None:
        """The cache of the phase after `plan`, for `plan`'s workers to compute once they
        have trained (they hold the stack it runs), or None: the next phase reads no trunk
        output cache, is finished already, or its cache would be refused (its builder is
        then `_cache_for`'s, which says why). It runs over `own` (this phase's cache spec)
        where that holds the same examples, else from tokens."""
        k = plan.stack_id + 1
        if k >= len(plans) or plans[k].cache.kind != "trunk_outputs" or self.store.has_record(ids[k]):
            return None
        use, train_ds = plans[k].cache, self._train_split(data_ref)
        steps = phase_steps(config.training, len(train_ds) // config.data.batch_size)
        layout = plan_layout(config, train_ds, steps, use.dtype)
        incremental = own is not None and own["kind"] == "trunk_outputs" and own["position"] == use.position - 1 \
            and own["key"] == layout.key
        if self._memory_refusal(config, layout, 0, incremental) is not None:  # the builder is a worker holding the rack
            return None
        directory = storage.join(self.store.root, ids[plan.stack_id],
                                 f"cache_position_{use.position:03d}_{layout.key}_{layout.dtype}")
        if config.ray.cache_backend == "arrow" and ray_cache.cache_complete(directory, layout):
            return None  # built before a crash: _cache_for finds it
        return ray_cache.NextCache(position=use.position, start=use.position - 1 if incremental else 0, steps=steps,
                                   dtype=use.dtype, stack_id=k, backend=config.ray.cache_backend, directory=directory,
                                   sink=sink, key=f"{ids[k]}/{layout.key}_{layout.dtype}")

    def _token_store(self) -> str:
        """The location of config.data's token store, built first if missing; phase workers
        and cache tasks open it there (`data_ref`) instead of reading the source again."""
        if self._store_location is None:
            self._store_location = token_store_location(self.config)
        return self._store_location

    def _train_split(self, data_ref):
        """The training split (opened once per trainer, over the token store: ids only)."""
        if not isinstance(data_ref, str):
            return ray.get(data_ref)[0]
        if self._train_ds is None:
            self._train_ds = open_datasets(self.config, data_ref)[0]
        return self._train_ds

    def _budget(self, config) -> float:
        if config.ray.cache_max_bytes is not None:
            return config.ray.cache_max_bytes
        if config.ray.cache_backend == "arrow":
            return storage.free_bytes(self.store.root) / 2
        return ray.available_resources().get("object_store_memory", 0) / 2

    def _publish_final(self, checkpoint: str, history: list[dict]) -> str:
        final = storage.join(self.run_dir, "final")
        storage.copy_tree(checkpoint, final)
        storage.write_json(storage.join(self.run_dir, "summary.json"), {"run_dir": self.run_dir, "history": history})
        return final
