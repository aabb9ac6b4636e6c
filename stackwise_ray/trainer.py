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
by a resumed run or by another trial of a sweep sharing the store, never retrained. The
end-to-end baseline is one phase holding every stack, through the same path.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import ray

from . import ray_metrics, storage
from .builder import ProgressiveRackBuilder
from .cache_policy import CachePlanner
from .checkpoint import load_metadata, load_rack
from .config import StackWiseConfig
from .data.dataset import dataset_from_user, open_datasets, token_store_location
from .phase_metrics import PhaseMetrics
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


@dataclass
class RunContext:
    """What every phase of one run shares, made once when the run starts."""
    config: StackWiseConfig  # the run's (the rack builder's building mode wins over the trainer's config)
    plans: list[PhasePlan]
    ids: list[str]  # phase ids, one per plan
    data_ref: object  # where phases read the data: the token store's location, or a Ray object
    caches: CachePlanner
    prestarter: Prestarter


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
        self._store_location = None  # config.data's token store, found or built on first need

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
        data = ray.put(dataset_from_user(dataloader, config)) if dataloader is not None else None
        run = self._start(config, self.phase_plans(rack_builder, target_stacks), data)
        history, prev = [], None
        try:
            for plan in run.plans:
                record, status = self._phase(run, (plan,), prev)
                history.append({**record["metrics"], "status": status, "phase_id": record["phase_id"],
                                "checkpoint": record["checkpoint"]})
                prev = record["checkpoint"]
                self._notify(history[-1])
        except BaseException:
            self.tracker.close(failed=True)
            raise
        finally:
            self._stop(run)
        self.tracker.close()
        final = self._publish_final(prev, history)
        if rack_builder is not None:
            rack_builder.hold(load_rack(final, config=config))  # the run's own config: trusted
        return history

    train_rack = train_progressively  # the source document uses both names

    def train_end_to_end(self, train_steps: int, target_stacks: int | None = None) -> dict:
        """The compute-matched baseline: the final architecture built at once and trained
        for `train_steps` steps as one phase (all parameters train). Returns its metrics."""
        run = self._start(self.config, self.phase_plans(None, target_stacks), None, prestart=False)
        try:
            record, status = self._phase(run, tuple(run.plans), None, train_steps)
        except BaseException:
            self.tracker.close(failed=True)
            raise
        finally:
            self._stop(run)
        history = [{**record["metrics"], "status": status, "phase_id": record["phase_id"],
                    "checkpoint": record["checkpoint"]}]
        self._publish_final(record["checkpoint"], history)
        self._notify(history[0])
        self.tracker.close()
        return history[0]

    # ------------------------------------------------------------------ a run's phases
    def _start(self, config: StackWiseConfig, plans: list[PhasePlan], data, prestart: bool | None = None) -> RunContext:
        """Ray, the run directory, the phase ids, the caches' planner and the prestarter:
        what the run's phases share. `data`: a user's datasets in the object store, or None
        (config.data's token store)."""
        self.check_run_dir()
        ensure_ray(config)
        storage.makedirs(self.run_dir)
        write_config(self.run_dir, config)
        self._watch()
        data_ref = data if data is not None else self.token_store_location()
        data_key = storage.basename(data_ref) if isinstance(data_ref, str) else None
        ids = [phase_identity(config, plans, k, data_key) for k in range(len(plans))]
        self.store.check_version()
        train_ds = ray.get(data_ref)[0] if not isinstance(data_ref, str) else open_datasets(config, data_ref)[0]
        prestart = self.prestart if prestart is None else prestart
        return RunContext(config, plans, ids, data_ref, CachePlanner(config, self.store, train_ds, data_ref, self._board),
                          Prestarter(self._room_for_two_phases(config) if prestart is None else prestart))

    def _stop(self, run: RunContext) -> None:
        run.prestarter.close()
        if self.console is not None:
            self.console.stop_watching()

    def _phase(self, run: RunContext, plans: tuple[PhasePlan, ...], prev: str | None,
               train_steps: int | None = None) -> tuple[dict, str]:
        """(record, status) of the phase that adds `plans` (one stack, or every stack for
        the end-to-end baseline, which trains `train_steps` steps), trained at most once
        across runs: "reused", "recovered" or "trained"."""
        if len(plans) == 1:
            phase_id = run.ids[plans[0].stack_id]
        else:
            phase_id = f"e2e-{run.ids[-1][4:]}-{train_steps}"
        pre = run.prestarter.prestarted(phase_id)  # holds the phase's lock already
        record, status = self.store.train_once(
            phase_id, lambda recovered: self._train_phase(run, plans, phase_id, prev, pre, recovered, train_steps),
            claim=pre.lock if pre is not None else None, plans=list(run.plans[:plans[-1].stack_id + 1]))
        if pre is not None and status != "trained":
            run.prestarter.cancel(pre)  # reused or recovered: the prestarted workers are not needed
        return record, status

    def _train_phase(self, run: RunContext, plans: tuple[PhasePlan, ...], phase_id: str, prev: str | None, pre,
                     recovered: str | None, train_steps: int | None) -> tuple[dict, str]:
        """(record, status) of a phase whose claim is held: its cache (later phases build
        theirs from it), then its training, or a checkpoint it left is `recovered`."""
        t0, baseline = time.time(), len(plans) > 1
        if baseline:
            cache_spec, cache_info = None, {"kind": "none", "reason": "end-to-end baseline"}
        else:
            cache_spec, cache_info = run.caches.for_phase(plans[0], prev, run.ids)
            if cache_spec is None and plans[0].cache.kind != "none":
                plans = (plans[0].recomputed(cache_info["reason"]),)
        t1, next_cache = time.time(), None
        if recovered is not None:  # trained before a crash that came before its record
            found, checkpoint, status = load_metadata(recovered)["metrics"], recovered, "recovered"
        else:
            next_cache = None if baseline else run.caches.next_cache(run.plans, plans[0], cache_spec, run.ids,
                                                                      run.prestarter.links)
            inputs = PhaseInputs(plans, prev, cache_spec, time.time(), next_cache,
                                 self._lr_window(run, plans, train_steps))
            if pre is not None:
                run.prestarter.hand_over(phase_id, inputs)
            if not baseline:
                self._prestart_next(run, plans[0].stack_id)
            if pre is not None:
                found, checkpoint = pre.future.result()
            else:
                self.store.clear(phase_id)
                found, checkpoint = fit_phase(run.config, self._part(plans), inputs, self.store.root, phase_id,
                                                run.data_ref, self.callbacks, train_steps, links=run.prestarter.links,
                                                board=self._board, labels=self.labels)
            status = "trained"
        metrics = PhaseMetrics.from_dict(found)
        if next_cache is not None:  # these workers computed the next phase's cache: it is kept for it
            run.caches.keep_emitted(next_cache, metrics.next_cache)
            metrics.next_cache_s = metrics.next_cache["build_s"]
        metrics.next_cache = None  # (a recovered phase's workers are gone, and so is what they emitted)
        built = cache_info.get("flops", 0.0) if cache_info.get("built") else 0.0
        metrics.cache, metrics.cache_s, metrics.phase_wall_s = cache_info, t1 - t0, time.time() - t0
        metrics.flops, metrics.prestarted = metrics.train_flops + built, status == "trained" and pre is not None
        metrics.orchestration_s = time.time() - t1 - metrics.train_s
        return {"stack": plans[-1].stack_id, "phase_id": phase_id, "checkpoint": checkpoint,
                "metrics": metrics.to_dict()}, status

    @staticmethod
    def _lr_window(run: RunContext, plans: tuple[PhasePlan, ...], train_steps: int | None) -> tuple[int, int]:
        """(the run's global step at the phase's first step, the run's steps in all): the
        phase's place in a run-wide lr_schedule. The end-to-end baseline is a run of its own."""
        if len(plans) > 1:
            return 0, train_steps
        steps = [run.caches.steps(p) for p in run.plans]
        return sum(steps[:plans[0].stack_id]), sum(steps)

    @staticmethod
    def _part(plans: tuple[PhasePlan, ...]) -> str:
        """The phase's part of its Ray Train run's name: `s02`, or `e2e` for the baseline."""
        return "e2e" if len(plans) > 1 else f"s{plans[0].stack_id:02d}"

    def _prestart_next(self, run: RunContext, stack_id: int) -> None:
        """Start phase stack_id+1's worker group, to wait for its inputs while this one trains."""
        k, ids, prestarter = stack_id + 1, run.ids, run.prestarter
        # a record is verified when the loop reaches it; here its presence is enough to skip
        if not prestarter.enabled or k >= len(run.plans) or self.store.has_record(ids[k]):
            return
        claim = self.store.try_claim(ids[k])
        if claim is None:  # another run is training it
            return
        if self.store.finished_checkpoint(ids[k]) is not None:
            claim.release()
            return
        self.store.clear(ids[k])
        prestarter.start(ids[k], after=ids[stack_id], lock=claim,
                         fit=lambda: fit_phase(run.config, f"s{k:02d}", None, self.store.root, ids[k], run.data_ref,
                                               self.callbacks, links=prestarter.links, board=self._board,
                                               labels=self.labels))

    def _room_for_two_phases(self, config) -> bool:
        """Prestart only where the next phase's workers fit beside the training ones (for
        every run sharing the cluster: `concurrent_runs`)."""
        r, total = config.ray, ray.cluster_resources()
        cpus = 2 * r.num_workers * r.cpus_per_worker * self.concurrent_runs
        gpus = 2 * r.num_workers * self.concurrent_runs if r.use_gpu else 0
        return total.get("CPU", 0) >= cpus and total.get("GPU", 0) >= gpus

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

    def token_store_location(self) -> str:
        """The location of config.data's token store, built first if missing; phase workers
        and cache tasks open it there instead of reading the source again."""
        if self._store_location is None:
            self._store_location = token_store_location(self.config)
        return self._store_location

    def _publish_final(self, checkpoint: str, history: list[dict]) -> str:
        final = storage.join(self.run_dir, "final")
        storage.copy_tree(checkpoint, final)
        storage.write_json(storage.join(self.run_dir, "summary.json"), {"run_dir": self.run_dir, "history": history})
        return final
