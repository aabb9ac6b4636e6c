"""The worker side of a phase: the loop every Ray Train worker of a phase runs.

Rebuild the rack from the previous phase's checkpoint, add the stacks the phase's plans
describe, train (DDP across workers), evaluate, and report a checkpoint (rank 0 writes
it). The driver side, which starts the workers, is ray_phase.py.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import dataclass

import ray
import ray.train
import torch
from ray.train import Checkpoint

from . import ray_metrics, storage
from .builder import ProgressiveRackBuilder
from .cache import plan_layout
from .checkpoint import load_metadata, load_rack, load_weights, save_rack
from .config import StackWiseConfig
from .data.dataset import load_data
from .data.loader import GlobalBatches, ProgressiveDataLoader
from .flops import end_to_end_flops, plan_flops
from .masking import TimeStepMasking
from .phase_metrics import PhaseMetrics
from .phase import evaluate, phase_steps, rounding_hook, train_stack
from .plan import PhasePlan
from .ray_cache import NextCache, emit_next_cache, open_reader


@dataclass(frozen=True)
class PhaseInputs:
    """What a phase's workers get once the phases before it are done."""
    plans: tuple[PhasePlan, ...]  # the stacks the phase adds: one, or all (the end-to-end baseline)
    prev_checkpoint: str | None
    cache: dict | None  # the cache the phase reads (ray_cache.CacheHandle.spec), None: it reads none
    handed_at: float  # when the driver had them ready
    next_cache: NextCache | None = None  # the next phase's cache, for these workers to compute once trained
    # (the run's global step at the phase's first step, the run's steps in all): where the
    # phase lies in a run-wide lr_schedule; None: the phase is the run (the baseline)
    lr_window: tuple[int, int] | None = None

    @property
    def end_to_end(self) -> bool:
        return len(self.plans) > 1


@dataclass(frozen=True)
class PhaseJob:
    """What a phase's workers are started with."""
    config: StackWiseConfig  # the run's config, validated on the driver (not again here)
    name: str  # the phase id
    inputs: PhaseInputs | None  # None: wait for `links` to hand them over (a prestarted phase)
    train_steps: int | None  # None: the configured steps of a phase
    labels: dict  # {"experiment", "trial"}: tags of its Ray metrics
    fault_marker: str  # where an injected worker failure records that it happened
    fit_started: float
    data_ref: object = None  # the token store's location, or a Ray object holding the datasets
    links: object = None  # prestart.PhaseLinks
    board: object = None  # console.ProgressBoard


def start_builder(config: StackWiseConfig, inputs: PhaseInputs) -> ProgressiveRackBuilder:
    """The phase's rack: the previous phase's rack plus new, seeded stacks, with
    requires_grad set for the phase."""
    torch.manual_seed(config.training.seed)  # the embedding of phase 0
    prev, first = inputs.prev_checkpoint, inputs.plans[0].stack_id
    # the trial's own config: the previous phase may have been trained by another trial
    builder = load_rack(prev, config=config) if prev else ProgressiveRackBuilder(config)
    if builder.num_stacks != first:
        raise RuntimeError(f"checkpoint {prev} holds {builder.num_stacks} stacks, expected {first}")
    for plan in inputs.plans:
        torch.manual_seed(config.training.seed * 1009 + plan.stack_id)  # same new stack on every worker and rerun
        builder.add_planned_stack(plan)
    if inputs.end_to_end:
        builder.prepare_end_to_end()
    else:
        builder.prepare_phase(inputs.plans[0])
    return builder


def train_loop_per_worker(loop_config: dict) -> PhaseMetrics | None:
    job: PhaseJob = loop_config["job"]
    t_enter = time.time()
    config = job.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_ds, val_ds, tokenizer = load_data(config, job.data_ref)
    masking = TimeStepMasking(config, tokenizer)
    inputs = job.inputs or wait_for_inputs(job)
    if inputs is None:
        return {}  # cancelled
    builder = start_builder(config, inputs)
    stack_id = builder.num_stacks - 1  # the newest stack: the one this phase trains
    spec = inputs.cache
    # read shard by shard: the layout comes from the same steps, batches and seed as the driver's
    cache = open_reader(spec, plan_layout(config, train_ds, spec["steps"], spec["dtype"])) if spec else None

    device = ray.train.torch.get_device()
    rack = builder.rack
    model = ray.train.torch.prepare_model(rack)  # DDP when world > 1
    B, T, seed = config.data.batch_size, config.data.seq_len, config.training.seed
    train_batches = ProgressiveDataLoader(GlobalBatches(train_ds, B, seed, True, rank, world), masking, stack_id,
                                          cache, cache is not None)
    val_batches = ProgressiveDataLoader(GlobalBatches(val_ds, min(B, len(val_ds)), seed, shuffle=False), masking,
                                        stack_id)
    trunk_forwards, hooks = count_trunk_forwards(rack, stack_id)
    plan = inputs.plans[0]
    if not inputs.end_to_end and cache is None and plan.cache.rounds:  # a refused cache that would have rounded
        hooks.append(rounding_hook(rack, plan.cache.position, plan.cache.dtype))
    steps = job.train_steps or phase_steps(config.training, len(train_batches.base_dataloader), stack_id)
    window = inputs.lr_window or (0, steps)
    resume = read_in_phase_checkpoint(rack)
    progress = PhaseProgress(job, stack_id, steps, B * T, config.training.log_every, rank)

    checkpointing = [0.0]  # seconds the in-phase checkpoints took (inside train_s)

    def on_step_end(done: int, opt, curve: list, val_curve: list) -> None:
        progress.step_end(done, curve)
        every = config.training.checkpoint_every
        if every and done % every == 0 and done < steps:
            t = time.perf_counter()
            report_in_phase_checkpoint(builder, stack_id, done, opt, curve, val_curve, rank)
            checkpointing[0] += time.perf_counter() - t
        inject_failure(config.ray.inject_worker_failure, stack_id, done, job.fault_marker)

    if job.links is not None and rank == 0:
        job.links.training.remote(job.name)  # time to prestart the next phase
    t_train = time.time()
    # the validation curve: rank 0 alone evaluates, between steps
    curve_batches = val_batches if rank == 0 and config.training.eval_every else None
    token_bytes = torch.from_numpy(tokenizer.token_bytes())
    loop = train_stack(model, train_batches, config.training, steps, curve_batches,
                          start=spec["position"] if spec else 0, device=device, on_step_end=on_step_end,
                          resume=resume, window=window, token_bytes=token_bytes)
    for h in hooks:
        h.remove()
    if cache is not None:
        cache.close()
    train_s = time.time() - t_train
    # the full rack from tokens, no cache: the numbers a reloaded checkpoint reproduces (with
    # eval_every, rank 0 has them already, from the whole split)
    if "val_curve" not in loop:
        loop.update(evaluate(rack, val_batches, config.training.eval_batches, device=device, token_bytes=token_bytes))
    next_cache = None
    if inputs.next_cache is not None:  # this rank's share of the next phase's cache, from the stack just trained
        next_cache = emit_next_cache(inputs.next_cache, config, rack.eval(), train_ds, masking, spec, rank,
                                                world, device)
    flops = train_flops(inputs, rack, steps * B * T, T)
    for point in loop.get("val_curve", []):
        point.update(global_step=window[0] + point["step"], phase_flops=flops * point["step"] / steps)
    depth_time = config.training.progressive.time_interpretation == "depth"
    metrics = PhaseMetrics(
        **loop,
        next_cache=next_cache,
        resumed_from_step=resume["step"] if resume else 0,
        first_global_step=window[0],
        train_flops=flops,
        stack=stack_id,
        precision=builder.stack(stack_id).precision,
        time_step=builder.stack(stack_id).time_step if depth_time else "per example",
        trunk_forwards=len(trunk_forwards),
        cache_shards_loaded=cache.loads if cache is not None else 0,
        cold_start_s=t_enter - job.fit_started,  # TorchTrainer start to the loop's first line
        startup_s=t_train - max(job.fit_started, inputs.handed_at),  # inputs ready to first step
        train_s=train_s,
        checkpoint_s=checkpointing[0],
        peak_memory_mb=peak_memory_mb(device),
        num_workers=world,
        torch_threads=torch.get_num_threads(),
        node_id=ray.get_runtime_context().get_node_id(),
        rack=builder.get_rack_info(),
    )
    report_final(builder, metrics.to_dict(), rank)
    return metrics


def wait_for_inputs(job: PhaseJob) -> PhaseInputs | None:
    """A prestarted phase's inputs, once the phase before it is done (None: cancelled)."""
    return ray.get(job.links.inputs.remote(job.name))


def count_trunk_forwards(rack, stack_id: int) -> tuple[list, list]:
    """(a list that gets one item per training forward of a trunk stack, the hooks to remove)."""
    calls = []

    def count(*_) -> None:
        if torch.is_grad_enabled():  # evaluations between steps (eval_every) run without grad: not steps
            calls.append(1)

    return calls, [s.register_forward_hook(count) for s in rack.stacks if s.stack_id != stack_id]


def train_flops(inputs: PhaseInputs, rack, tokens: int, seq_len: int) -> float:
    """FLOPs of the phase's training steps over `tokens` tokens."""
    if inputs.end_to_end:
        return end_to_end_flops(rack, tokens, seq_len)
    return plan_flops(inputs.plans[0], rack, tokens, seq_len)


def inject_failure(where: str | None, stack_id: int, done: int, marker: str) -> None:
    """A worker dying mid-phase, once (a testing aid: ray.inject_worker_failure "stack:step")."""
    if where == f"{stack_id}:{done}" and not storage.exists(marker):
        storage.write_bytes(marker, b"")
        os._exit(1)


class PhaseProgress:
    """Rank 0's progress: Ray metrics and the console's board, every log_every steps."""

    def __init__(self, job: PhaseJob, stack_id: int, steps: int, tokens_per_step: int, log_every: int, rank: int):
        self.job, self.stack_id, self.steps, self.rank = job, stack_id, steps, rank
        self.tokens_per_step, self.log_every = tokens_per_step, log_every
        self.tags = ray_metrics.tags(job.labels, job.name, stack_id)
        self.first = None  # (time, steps done) at the first step end: the speed is measured from there

    def step_end(self, done: int, curve: list) -> None:
        if self.rank != 0 or not curve or not (done % self.log_every == 0 or done == self.steps or self.first is None):
            return
        self.first = self.first or (time.time(), done)
        rate = (done - self.first[1]) * self.tokens_per_step / max(time.time() - self.first[0], 1e-9)
        ray_metrics.phase_progress(self.tags, done, self.steps, curve[-1]["loss"], rate)
        if self.job.board is not None:
            self.job.board.post.remote(self.job.name, {"stack": self.stack_id, "step": done, "steps": self.steps,
                                                       "loss": curve[-1]["loss"], "tokens": done * self.tokens_per_step})


def report_final(builder, metrics: dict, rank: int) -> None:
    """Every worker reports the phase's metrics; rank 0 attaches the trained rack."""
    if rank != 0:
        ray.train.report(summary(metrics))
        return
    with tempfile.TemporaryDirectory() as d:
        save_rack(builder, d, extra={"metrics": metrics})
        ray.train.report(summary(metrics), checkpoint=Checkpoint.from_directory(d))


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
