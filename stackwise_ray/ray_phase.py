"""Phases on Ray Train: one `TorchTrainer.fit()` per stack, and the task that builds caches.

`train_loop_per_worker` is the worker side: rebuild the rack from the previous phase's
checkpoint, add the new stack, train it (DDP across workers), evaluate, and report a
checkpoint (rank 0 writes it). `fit_phase` is the driver side.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import ray_metrics, storage
from .builder import ProgressiveRackBuilder
from .cache import plan_layout
from .checkpoint import load_metadata, load_rack, load_weights, save_rack, verify_checkpoint
from .config import StackWiseConfig
from .data import GlobalBatches, ProgressiveDataLoader, load_data
from .flops import end_to_end_flops, progressive_phase_flops
from .masking import TimeStepMasking
from .phase import evaluate, phase_steps, train_stack
from .ray_cache import open_reader


def start_builder(config: StackWiseConfig, prev_checkpoint: str | None, stack_id: int, steps: list[dict]):
    """The rack of phase `stack_id`: the previous phase's rack plus new, seeded stacks (one
    for a progressive phase; all of them for the end-to-end baseline)."""
    torch.manual_seed(config.training.seed)  # the embedding of phase 0
    # the trial's own config: the previous phase may have been trained by another trial
    builder = load_rack(prev_checkpoint, config=config) if prev_checkpoint else ProgressiveRackBuilder(config)
    if builder.num_stacks != stack_id:
        raise RuntimeError(f"checkpoint {prev_checkpoint} holds {builder.num_stacks} stacks, expected {stack_id}")
    for k, step in enumerate(steps, start=stack_id):
        torch.manual_seed(config.training.seed * 1009 + k)  # same new stack on every worker and rerun
        add = builder.prepend_stack if step["at_input_side"] else builder.append_stack
        add(n_blocks=step["n_blocks"], precision=step["precision"])
    if len(steps) == 1:
        builder.prepare_phase()
    else:
        builder.prepare_end_to_end()
    return builder


def train_loop_per_worker(cfg: dict) -> dict:
    t_enter = time.time()
    config = StackWiseConfig.from_dict(cfg["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_ds, val_ds, tokenizer = load_data(config, cfg["data_ref"])
    masking = TimeStepMasking(config, tokenizer)
    inputs = cfg["inputs"]
    if inputs is None:  # a prestarted phase: wait for the phase before it to finish
        inputs = ray.get(cfg["links"].inputs.remote(cfg["name"]))
        if inputs is None:
            return {}  # cancelled
    cache_spec, steps_to_add = inputs["cache"], cfg["steps"]
    builder = start_builder(config, inputs["prev_checkpoint"], cfg["stack_id"], steps_to_add)
    stack_id = builder.num_stacks - 1  # the newest stack: the one this phase trains
    # read shard by shard: the layout comes from the same steps, batches and seed as the driver's
    cache = open_reader(cache_spec, plan_layout(config, train_ds, cache_spec["steps"], cache_spec["dtype"])) \
        if cache_spec else None
    position = cache_spec["position"] if cache_spec else 0

    device = ray.train.torch.get_device()
    rack = builder.build_rack()
    model = ray.train.torch.prepare_model(rack)  # DDP when world > 1
    B, seed = config.data.batch_size, config.training.seed
    train_batches = ProgressiveDataLoader(GlobalBatches(train_ds, B, seed, True, rank, world), masking, stack_id,
                                          cache, cache is not None)
    val_batches = ProgressiveDataLoader(GlobalBatches(val_ds, min(B, len(val_ds)), seed, shuffle=False), masking, stack_id)

    trunk_calls = []

    def count_trunk_call(*_) -> None:
        if torch.is_grad_enabled():  # evaluations between steps (eval_every) run without grad: not steps
            trunk_calls.append(1)

    hooks = [s.register_forward_hook(count_trunk_call) for s in rack.stacks if s.stack_id != stack_id]
    steps = cfg["train_steps"] or phase_steps(config.training, len(train_batches.base_dataloader))
    resume = read_in_phase_checkpoint(rack)

    first_step = []  # (time, steps done) at the first step end: the speed is measured from there
    metric_tags = ray_metrics.tags(cfg["labels"], cfg["name"], stack_id)

    def on_step_end(done: int, opt, curve: list, val_curve: list) -> None:
        if rank == 0 and curve and (done % config.training.log_every == 0 or done == steps or not first_step):
            first_step[:] = first_step or [(time.time(), done)]
            tokens = done * B * config.data.seq_len
            rate = (done - first_step[0][1]) * B * config.data.seq_len / max(time.time() - first_step[0][0], 1e-9)
            ray_metrics.phase_progress(metric_tags, done, steps, curve[-1]["loss"], rate)
            if cfg["board"] is not None:
                cfg["board"].post.remote(cfg["name"], {"stack": stack_id, "step": done, "steps": steps,
                                                       "loss": curve[-1]["loss"], "tokens": tokens})
        every = config.training.checkpoint_every
        if every and done % every == 0 and done < steps:
            report_in_phase_checkpoint(builder, stack_id, done, opt, curve, val_curve, rank)
        if config.ray.inject_worker_failure == f"{stack_id}:{done}" and not storage.exists(cfg["fault_marker"]):
            storage.write_bytes(cfg["fault_marker"], b"")
            os._exit(1)  # a worker dying mid-phase, once (testing aid)

    if cfg["links"] is not None and rank == 0:
        cfg["links"].training.remote(cfg["name"])  # time to prestart the next phase
    t_train = time.time()
    # the validation curve: rank 0 alone evaluates, between steps
    curve_batches = val_batches if rank == 0 and config.training.eval_every else None
    metrics = train_stack(model, train_batches, config.training, steps, curve_batches, start=position, device=device,
                          on_step_end=on_step_end, resume=resume)
    for h in hooks:
        h.remove()
    if cache is not None:
        cache.close()
    train_s = time.time() - t_train
    # the full rack from tokens, no cache: the numbers a reloaded checkpoint reproduces (with
    # eval_every, rank 0 has them already, from the whole split)
    if "val_curve" not in metrics:
        metrics.update(evaluate(rack, val_batches, config.training.eval_batches, device=device))
    p = config.training.progressive
    if len(steps_to_add) > 1:
        flops = end_to_end_flops(rack, steps * B * config.data.seq_len, config.data.seq_len)
    else:
        flops = progressive_phase_flops(config, rack, stack_id, cache_spec["kind"] if cache_spec else "none", steps)
    before = stack_id * steps if len(steps_to_add) == 1 else 0  # earlier phases ran as many steps (same config)
    for point in metrics.get("val_curve", []):
        point.update(global_step=before + point["step"], phase_flops=flops * point["step"] / steps)
    metrics.update({
        "resumed_from_step": resume["step"] if resume else 0,
        "train_flops": flops,
        "stack": stack_id,
        "precision": builder.stack(stack_id).precision,
        "time_step": builder.stack(stack_id).time_step if p.time_interpretation == "depth" else "per example",
        "trunk_forwards": len(trunk_calls),
        "cache_shards_loaded": cache.loads if cache is not None else 0,
        "cold_start_s": t_enter - cfg["fit_started"],  # TorchTrainer start to the loop's first line
        "startup_s": t_train - max(cfg["fit_started"], inputs["handed_at"]),  # inputs ready to first step
        "train_s": train_s,
        "peak_memory_mb": peak_memory_mb(device),
        "num_workers": world,
        "torch_threads": torch.get_num_threads(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "rack": builder.get_rack_info(),
    })
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_rack(builder, d, extra={"metrics": metrics})
            ray.train.report(summary(metrics), checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(summary(metrics))
    return metrics


def report_in_phase_checkpoint(builder, stack_id: int, done: int, opt, curve: list, val_curve: list,
                               rank: int) -> None:
    """Every worker reports; rank 0 attaches the rack, optimizer state and loss and
    validation curves so a restarted worker group continues at step `done`."""
    progress = {"stack": stack_id, "step": done, **({"loss": curve[-1]["loss"]} if curve else {})}
    if rank != 0:
        ray.train.report(progress)
        return
    with tempfile.TemporaryDirectory() as d:
        save_rack(builder, d, extra={"in_phase": {"stack": stack_id, "step": done, "loss_curve": curve,
                                                  "val_curve": val_curve}})
        torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
        ray.train.report(progress, checkpoint=Checkpoint.from_directory(d))


def read_in_phase_checkpoint(rack) -> dict | None:
    """The in-phase checkpoint this attempt restarts from (Ray Train hands it over after a
    worker failure), loaded into `rack`; None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        meta = load_metadata(d)
        if "in_phase" not in meta:
            return None
        load_weights(rack, os.path.join(d, "model.safetensors"))
        optimizer = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
    return {"step": meta["in_phase"]["step"], "optimizer": optimizer, "loss_curve": meta["in_phase"]["loss_curve"],
            "val_curve": meta["in_phase"].get("val_curve", [])}


def summary(metrics: dict) -> dict:
    """The flat scalars of a phase's metrics (what Ray Train and Tune show)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def peak_memory_mb(device) -> float:
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- driver side

def fit_phase(config: StackWiseConfig, stack_id: int, steps: list[dict], inputs: dict | None, store: str,
              name: str, data_ref=None, callbacks=None, train_steps: int | None = None,
              links=None, board=None, labels=None) -> tuple[dict, str] | None:
    """Train the stacks `steps` describes (one, or all for the end-to-end baseline), first
    id `stack_id`, as the phase `name` (its id) under `store` (a path or URI). The Ray Train
    run is named after the experiment, trial and stack (run_name), so the dashboard's
    views read like the experiment; it lives in the phase's directory, `store/name/`.

    `inputs` is {"prev_checkpoint", "cache", "handed_at"}; None makes the workers wait for
    `links` to hand them over (a prestarted phase). `train_steps` overrides the configured
    step count; `board` (console.ProgressBoard) receives rank 0's progress; `labels`
    ({"experiment", "trial"}) tag its Ray metrics. Returns
    (metrics, checkpoint path), or None for a cancelled phase."""
    r = config.ray
    labels = labels or {"experiment": name, "trial": name}
    run = run_name(labels, "e2e" if len(steps) > 1 else f"s{stack_id:02d}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "stack_id": stack_id, "steps": steps, "train_steps": train_steps,
                           "inputs": inputs, "links": links, "name": name, "data_ref": data_ref, "board": board,
                           "labels": labels,
                           "fault_marker": storage.join(store, f"{name}.fault"),
                           "fit_started": time.time()},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run, storage_path=storage.join(store, name), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        return None
    # Ray's path is on its filesystem (no scheme): name the checkpoint as the store does
    checkpoint = storage.join(store, name, run, os.path.basename(result.checkpoint.path))
    return load_metadata(checkpoint)["metrics"], checkpoint


def run_name(labels: dict, part: str) -> str:
    """`sweep_trunk_mode.t003.s02` (a run of its own: `quickstart.s02`)."""
    names = [labels["experiment"]] + ([labels["trial"]] if labels["trial"] != labels["experiment"] else [])
    return ".".join(names + [part])


def finished_checkpoint(store: str, name: str) -> str | None:
    """A checkpoint that a run of the phase `name` already wrote (e.g. before a crash)."""
    phase = storage.join(store, name)
    runs = [storage.join(phase, d) for d in storage.listdir(phase)]
    checkpoints = sorted((c, run) for run in runs for c in storage.listdir(run) if c.startswith("checkpoint_"))
    for path in [storage.join(run, c) for c, run in reversed(checkpoints)]:
        try:
            verify_checkpoint(path)
            if "metrics" in load_metadata(path):
                return path
        except (OSError, KeyError, ValueError):  # incomplete, corrupt or in-phase: not a finished phase
            continue
    return None
