"""The reference for the Ray overhead benchmark: the same phases, steps and caches as a
progressive run, in one process with plain PyTorch (no Ray)."""

from __future__ import annotations

import time

import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.cache import compute_cache, plan_layout
from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import GlobalBatches, ProgressiveDataLoader, build_datasets
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import evaluate, phase_steps, train_stack
from stackwise_ray.plan import plan_phases


def run_plain(config: StackWiseConfig, threads: int) -> list[dict]:
    """Train config's stacks one after another as the Ray phases do (same seeds, same
    cache plan, `threads` torch threads like a Ray worker with that many CPUs)."""
    torch.set_num_threads(threads)
    train_ds, val_ds, tokenizer = build_datasets(config)
    masking = TimeStepMasking(config, tokenizer)
    torch.manual_seed(config.training.seed)
    builder = ProgressiveRackBuilder(config)
    B, seed, cache, history = config.data.batch_size, config.training.seed, None, []
    phases = plan_phases(config)
    for k, phase in enumerate(phases):
        t0 = time.perf_counter()
        plan = phase.cache
        if plan.kind != "none":
            start = cache[0] if cache is not None and cache[0] == plan.position - 1 else 0
            prev = cache[1] if start else None
            steps = phase_steps(config.training, len(train_ds) // B)
            dtype = plan.dtype
            rows = plan_layout(config, train_ds, steps, dtype).positions  # the examples the phase reads, as on Ray
            cache = (plan.position, compute_cache(builder.rack, train_ds, masking, k, start, plan.position,
                                                  prev, positions=rows, dtype=dtype))
        t1 = time.perf_counter()
        torch.manual_seed(seed * 1009 + k)
        builder.add_planned_stack(phase)
        builder.prepare_phase(phase)
        rack = builder.rack
        use_cache = cache is not None and plan.kind != "none"
        batches = ProgressiveDataLoader(GlobalBatches(train_ds, B, seed, True), masking, k,
                                        cache[1] if use_cache else None, use_cache)
        val = ProgressiveDataLoader(GlobalBatches(val_ds, min(B, len(val_ds)), seed, shuffle=False), masking, k)
        steps = phase_steps(config.training, len(batches.base_dataloader))
        t2 = time.perf_counter()
        metrics = train_stack(rack, batches, config.training, steps, start=plan.position if use_cache else 0)
        t3 = time.perf_counter()
        metrics.update(evaluate(rack, val, config.training.eval_batches))
        history.append({"stack": k, "cache_s": t1 - t0, "train_s": t3 - t2, "val_loss": metrics["val_loss"],
                        "phase_s": time.perf_counter() - t0})
    return history
