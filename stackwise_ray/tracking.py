"""Send a run's metrics to the tracking tools the `tracking:` section names: MLflow,
TensorBoard, Weights & Biases, through their own clients.

One tracked run per progressive run (per trial in a sweep). The x axis is the global step:
phase k's steps follow phase k-1's, so one plot of `train/loss` shows the whole growth,
and `stack` is logged beside it (and tagged per point in TensorBoard's `stack_<k>/` charts).
Per phase: the training loss every `log_every` steps and the learning rate; at its end the
validation numbers, cache size, time and memory. Reused phases are logged like trained
ones (their metrics come from their record), so a resumed run's plot is complete.
"""

from __future__ import annotations

import os
import time

from . import storage


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config key paths as parameter names."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def phase_points(m: dict, offset: int) -> tuple[list[tuple[int, str, float]], int]:
    """((global step, name, value) points of one phase's metrics, the phase's last global step)."""
    points = [(offset + p["step"], name, float(p[key])) for p in m.get("loss_curve", [])
              for name, key in (("train/loss", "loss"), ("train/lr", "lr"))]
    end = offset + m.get("steps", 0)
    cache = m.get("cache", {})
    scalars = {"val/loss": m.get("val_loss"), "val/ppl": m.get("val_ppl"), "val/accuracy": m.get("val_accuracy"),
               "val/bpb": m.get("val_bpb"),
               "phase/stack": m.get("stack"), "phase/train_s": m.get("train_s"),
               "phase/peak_memory_mb": m.get("peak_memory_mb"), "phase/trainable_params": m.get("trainable_params"),
               "phase/flops": m.get("flops"), "phase/cache_bytes": cache.get("bytes") or 0,
               "phase/reused": 1.0 if m.get("status") == "reused" else 0.0}
    points += [(end, name, float(v)) for name, v in scalars.items() if isinstance(v, (int, float))]
    return points, end


class Tracker:
    """The tracked run of one progressive run.

    Args:
        tracking: the config's tracking section.
        root: where local stores go (the run or sweep directory: a path or a storage URI).
        experiment: MLflow experiment / W&B project name.
        run_name: the run's name (its directory name, or the trial id).
        params: what to record as the run's parameters (a flattened config).
    """

    def __init__(self, tracking, root: str, experiment: str, run_name: str, params: dict):
        self.tracking, self.root, self.run_name, self.params = tracking, root, run_name, params
        self.experiment = tracking.experiment or experiment
        self.offset, self.started, self.closed = 0, False, False
        self._mlflow = self._tensorboard = self._wandb = None

    def _start(self) -> None:
        """Open the tracked runs: at the first phase, so a run refused before it trains
        leaves none behind."""
        self.started = True
        t = self.tracking
        if t.mlflow:
            self._start_mlflow(t.mlflow, self.root, self.experiment, self.run_name, self.params)
        if t.tensorboard:
            self._start_tensorboard(self.root, self.run_name)
        if t.wandb != "off":
            import wandb

            self._wandb = wandb.init(project=self.experiment, name=self.run_name, config=self.params, mode=t.wandb,
                                     dir=None if storage.is_remote(self.root) else self.root, reinit="create_new")

    def _start_mlflow(self, uri: str, root: str, experiment: str, run_name: str, params: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        if uri == "local":
            if storage.is_remote(root):
                raise ValueError("tracking.mlflow: local needs a local storage_path; give a tracking URI instead")
            # MLflow 3 keeps its file store only on request; it needs no database or server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file://" + os.path.join(os.path.abspath(root), "mlruns")
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name)
        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        self._mlflow, self.mlflow_uri, self.mlflow_run_id = client, uri, run.info.run_id

    def _start_tensorboard(self, root: str, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb_remote = storage.join(root, "tensorboard", run_name) if storage.is_remote(root) else None
        local = (os.path.join(storage.local_path(root), "tensorboard", run_name) if self._tb_remote is None else
                 os.path.join(os.environ.get("TMPDIR", "/tmp"), f"stackwise_ray-{os.getuid()}", "tensorboard", run_name))
        # purge_step=0: a resumed run logs its reused phases again; older points would double them
        self._tensorboard = SummaryWriter(log_dir=local, purge_step=0)
        self.tensorboard_dir = self._tb_remote or local

    def log_phase(self, m: dict) -> None:
        """One finished (or reused) phase's metrics, after the phases logged before it."""
        if not self.started:
            self._start()
        points, end = phase_points(m, self.offset)
        stack = m.get("stack", 0)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(name.replace("/", "_"), value, now, step) for step, name, value in points]
            for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                self._mlflow.log_batch(self.mlflow_run_id, metrics=metrics[i:i + 1000])
        if self._tensorboard is not None:
            for step, name, value in points:
                self._tensorboard.add_scalar(name, value, step)
                if name.startswith("train/loss"):
                    self._tensorboard.add_scalar(f"stack_{stack}/train_loss", value, step)
            self._tensorboard.flush()
            if self._tb_remote is not None:
                storage.upload(self._tensorboard.log_dir, self._tb_remote)
        if self._wandb is not None:
            for step, name, value in sorted(points):
                self._wandb.log({name: value, "stack": stack}, step=step)
        self.offset = end

    def close(self, failed: bool = False) -> None:
        if self.closed or not self.started:
            return
        self.closed = True
        if self._mlflow is not None:
            self._mlflow.set_terminated(self.mlflow_run_id, status="FAILED" if failed else "FINISHED")
        if self._tensorboard is not None:
            self._tensorboard.close()
            if self._tb_remote is not None:
                storage.upload(self._tensorboard.log_dir, self._tb_remote)
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
