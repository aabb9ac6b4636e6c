"""ProgressiveTrainer: one Ray Train phase per stack, caches between phases, resume.

Run directory (`storage_path/name/`):
    phase_000/checkpoint_*/   Ray Train's checkpoint of phase 0 (rack.json, model.safetensors)
    phases/phase_000.json     completion marker, written atomically after the phase
    cache/position_001.parquet  Arrow cache (cache_backend: arrow)
    final/                    the trained rack (a copy of the last phase's checkpoint)
    summary.json              per-stack history
A phase counts as finished only once its marker exists; `resume=True` skips those.
"""

from __future__ import annotations

import copy
import os
import shutil
import time

import ray

from .builder import ProgressiveRackBuilder
from .cache import plan_cache
from .checkpoint import load_metadata, load_rack, read_json, write_json
from .config import StackWiseConfig
from .data import dataset_from_user
from .ray_phase import build_cache, finished_checkpoint, fit_phase, phase_name

RAY_ENV_DEFAULTS = {
    # Train V2 polls workers every 2 s by default; a phase's teardown waits for one poll
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # fail a phase whose workers cannot be placed instead of waiting forever
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
}


class RunDirError(ValueError):
    pass


def ensure_ray(config: StackWiseConfig, **init_kwargs) -> None:
    """Connect to config.ray.address / RAY_ADDRESS, or start a local Ray."""
    if ray.is_initialized():
        return
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    ray.init(address=config.ray.address, **init_kwargs)


class ProgressiveTrainer:
    """Trains a rack stack by stack, each phase a Ray Train TorchTrainer run.

    Args:
        config: the experiment.
        storage_path: root of run directories (default config.ray.storage_path).
        name: run directory name (default: a timestamp).
        resume: continue the run in that directory, skipping finished phases.
        callbacks: Ray Train callbacks for every phase (e.g. Tune's report callback).
    """

    def __init__(self, config: StackWiseConfig, storage_path: str | None = None, name: str | None = None,
                 resume: bool = False, callbacks=None):
        self.config = config.validate()
        self.run_dir = os.path.join(os.path.abspath(storage_path or config.ray.storage_path),
                                    name or time.strftime("run-%Y%m%d-%H%M%S"))
        self.resume, self.callbacks = resume, callbacks

    def train_progressively(self, rack_builder: ProgressiveRackBuilder | None = None, dataloader=None,
                            target_stacks: int | None = None) -> list[dict]:
        """Train phases 0..target_stacks-1; returns one metrics dict per stack.

        Args:
            rack_builder: stacks already added to it are the plan (their blocks, precision
                and side); more are added up to target_stacks. After training it holds
                the trained rack.
            dataloader: a Dataset or DataLoader of items with `input_ids`; None uses
                config.data.
            target_stacks: default training.progressive.target_stacks (or max_stacks).
        """
        config = self._config_for(rack_builder)
        plan = self._plan(config, rack_builder, target_stacks)
        self._check_run_dir()
        ensure_ray(config)
        data_ref = ray.put(dataset_from_user(dataloader, config)) if dataloader is not None else None
        history, prev, cache = [], None, None
        for stack_id, step in enumerate(plan):
            marker = self._marker_path(stack_id)
            if os.path.exists(marker):
                done = read_json(marker)
                history.append({**done["metrics"], "status": "reused"})
                prev = done["checkpoint"]
                continue
            t0 = time.time()
            cache_spec, cache, cache_info = self._cache_for(config, stack_id, prev, cache, data_ref)
            t1 = time.time()
            checkpoint = finished_checkpoint(self.run_dir, stack_id)
            if checkpoint is not None:  # trained before a crash that came before its marker
                metrics, status = load_metadata(checkpoint)["metrics"], "recovered"
            else:
                shutil.rmtree(os.path.join(self.run_dir, phase_name(stack_id)), ignore_errors=True)
                metrics, checkpoint = fit_phase(config, stack_id, step, prev, cache_spec, self.run_dir, data_ref,
                                                self.callbacks)
                status = "trained"
            metrics.update({"cache": cache_info, "cache_s": t1 - t0, "phase_wall_s": time.time() - t0,
                            "orchestration_s": time.time() - t1 - metrics["train_s"]})
            write_json(marker, {"stack": stack_id, "checkpoint": checkpoint, "metrics": metrics})
            history.append({**metrics, "status": status})
            prev = checkpoint
        final = self._publish_final(prev, history)
        if rack_builder is not None:
            rack_builder.__dict__.update(load_rack(final).__dict__)
        return history

    train_rack = train_progressively  # the source document uses both names

    # ------------------------------------------------------------------ pieces
    def _config_for(self, builder) -> StackWiseConfig:
        if builder is None or builder.building_mode == self.config.training.progressive.building_mode:
            return self.config
        config = copy.deepcopy(self.config)  # the builder's mode wins: masking and caches must agree
        config.training.progressive.building_mode = builder.building_mode
        return config

    def _plan(self, config, builder, target_stacks) -> list[dict]:
        steps = list(builder.plan) if builder is not None else []
        target = target_stacks or max(config.target_stacks, len(steps))
        if target > config.training.progressive.max_stacks:
            raise ValueError(f"target_stacks {target} exceeds training.progressive.max_stacks={config.training.progressive.max_stacks}")
        if len(steps) > target:
            raise ValueError(f"the rack builder already holds {len(steps)} stacks, more than target_stacks={target}")
        default = builder.default_precision if builder is not None else None
        for k in range(len(steps), target):
            steps.append({"n_blocks": config.blocks_per_stack,
                          "precision": default if default and k not in config.training.progressive.stack_precisions
                          else config.stack_precision(k),
                          "at_input_side": config.training.progressive.building_mode == "prepend"})
        return steps

    def _check_run_dir(self) -> None:
        markers = os.path.join(self.run_dir, "phases")
        if not self.resume and os.path.isdir(markers) and os.listdir(markers):
            raise RunDirError(f"{self.run_dir}: a run with finished phases is already there; resume it or choose another name")
        os.makedirs(markers, exist_ok=True)

    def _marker_path(self, stack_id: int) -> str:
        return os.path.join(self.run_dir, "phases", f"{phase_name(stack_id)}.json")

    def _cache_for(self, config, stack_id, prev_checkpoint, cache, data_ref):
        """(spec for the phase's workers, the cache kept for later phases, info for metrics)."""
        plan = plan_cache(config, stack_id)
        info = {"kind": plan.kind, "reason": plan.reason}
        if plan.kind == "none":
            return None, cache, info
        backend = config.ray.cache_backend
        path = os.path.join(self.run_dir, "cache", f"position_{plan.position:03d}.parquet")
        if cache is not None and cache["position"] == plan.position:
            info.update(cache["info"], built=False)
        elif backend == "arrow" and os.path.exists(path) and cache is None:  # written before a restart
            cache = {"position": plan.position, "path": path, "ref": None,
                     "info": {"rows": None, "bytes": os.path.getsize(path), "build_s": 0.0, "incremental": False}}
            info.update(cache["info"], built=False)
        else:
            incremental = cache is not None and cache["position"] == plan.position - 1
            prev = (cache["ref"] if backend == "object_store" else cache["path"]) if incremental else None
            ref, info_ref = build_cache.remote(prev_checkpoint, stack_id, plan.position - 1 if incremental else 0,
                                               plan.position, prev, backend, path, data_ref)
            cache = {"position": plan.position, "path": path, "ref": ref, "info": ray.get(info_ref)}
            info.update(cache["info"], built=True)
        spec = {"backend": backend, "position": plan.position, "kind": plan.kind,
                "ref": cache["ref"], "path": cache["path"]}
        return spec, cache, {**info, "backend": backend, "position": plan.position}

    def _publish_final(self, checkpoint: str, history: list[dict]) -> str:
        final = os.path.join(self.run_dir, "final")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json(os.path.join(self.run_dir, "summary.json"), {"run_dir": self.run_dir, "history": history})
        return final
