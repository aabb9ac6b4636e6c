"""Tracking: MLflow, TensorBoard and W&B runs read back with their own readers."""

import json
import struct
import time

import pytest

from stackwise_ray.config import StackWiseConfig
from stackwise_ray.tracking import Tracker, flat


def phase(stack, steps, losses, val_loss, status="trained"):
    curve = [{"step": s, "loss": l, "lr": 1e-3} for s, l in losses]
    return {"stack": stack, "steps": steps, "loss_curve": curve, "val_loss": val_loss, "val_ppl": 2.0 ** val_loss,
            "val_accuracy": 0.5, "train_s": 1.0, "peak_memory_mb": 100.0, "trainable_params": 10, "flops": 1e9,
            "cache": {"kind": "trunk_outputs", "bytes": 4096}, "status": status}


PHASES = [phase(0, 20, [(0, 5.0), (10, 4.0), (19, 3.5)], 3.4), phase(1, 20, [(0, 3.3), (10, 3.0), (19, 2.9)], 2.8, "reused")]


def tracked(tmp_path, **tracking):
    config = StackWiseConfig.from_dict({"tracking": tracking})
    tracker = Tracker(config.tracking, str(tmp_path), "exp", "run-a", flat(config.to_dict()))
    assert not list(tmp_path.iterdir())  # nothing is opened before the first phase
    for m in PHASES:
        tracker.log_phase(m)
    tracker.close()
    return tracker


def test_mlflow_run_holds_the_whole_growth_on_one_step_axis(tmp_path):
    from mlflow import MlflowClient

    tracker = tracked(tmp_path, mlflow="local")
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    run = client.get_run(tracker.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["model.d_model"] == "128" and run.data.params["training.progressive.trunk_strategy"] == "frozen"
    loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert loss == [(0, 5.0), (10, 4.0), (19, 3.5), (20, 3.3), (30, 3.0), (39, 2.9)]  # phase 1 starts at step 20
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == [(20, 3.4), (40, 2.8)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "phase_reused")] == [0.0, 1.0]


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = tracked(tmp_path, tensorboard=True)
    events = EventAccumulator(tracker.tensorboard_dir).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(20, pytest.approx(3.4)), (40, pytest.approx(2.8))]
    assert [e.step for e in events.Scalars("train/loss")] == [0, 10, 19, 20, 30, 39]
    assert [e.step for e in events.Scalars("stack_1/train_loss")] == [20, 30, 39]
    assert [e.value for e in events.Scalars("phase/stack")] == [0.0, 1.0]


def wandb_history(path) -> tuple[list[dict], bool]:
    """(history rows, whether the run's exit record is there) of an offline W&B run file.
    wandb >= 0.19 reads these only in its Go core, so this follows the file format: a 7-byte
    header, then LevelDB-log records (7-byte record headers, 32 KiB blocks) each holding a
    protobuf Record. A record the core has not finished writing ends the reading, unfinished."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows, finished = path.read_bytes(), 7, b"", [], False
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # W&B's core is still writing this record
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            finished |= record.WhichOneof("record_type") == "exit"
    return rows, finished


def test_wandb_offline_run_holds_the_same_points(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracked(tmp_path, wandb="offline")
    path, deadline = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")), time.time() + 30
    rows, finished = wandb_history(path)
    while not finished and time.time() < deadline:  # finish() can return before W&B's core has written it all
        time.sleep(0.2)
        rows, finished = wandb_history(path)
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == [
        (0, 5.0), (10, 4.0), (19, 3.5), (20, 3.3), (30, 3.0), (39, 2.9)]
    assert [(r["_step"], r["val/loss"]) for r in rows if "val/loss" in r] == [(20, 3.4), (40, 2.8)]


def test_unknown_mlflow_store_is_a_config_error():
    from stackwise_ray.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.mlflow: must be local or a tracking URI"):
        StackWiseConfig.from_dict({"tracking": {"mlflow": "somewhere"}}).validate()


def test_grafana_dashboard_is_valid_json_over_metrics_that_exist():
    import pathlib
    import re

    from stackwise_ray.ray_metrics import NAMES

    path = pathlib.Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "stackwise_ray_dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"ray_(stackwise_\w+)", e)}
    assert used and used <= set(NAMES), used - set(NAMES)
    assert {"train_loss", "tokens_per_s", "cache_bytes", "val_loss"} <= {n[len("stackwise_"):] for n in used}
    assert any("phases_reused_total" in e for e in exprs) and any("phases_trained_total" in e for e in exprs)
