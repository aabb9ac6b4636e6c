"""One phase: train the newest stack for a number of steps. Ordinary PyTorch, no globals.

This body runs in one process here, and inside Ray Train workers for the Ray phases.
Which parameters train is decided before the call (ProgressiveRackBuilder.prepare_phase).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import torch

from .config import TrainingConfig
from .model import Rack


def get_lr(it: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def wsd_lr(it: int, steps: int, lr: float, min_lr: float, warmup: int, decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warmup, lr held, then a linear decay over the last
    round(decay_fraction x steps) steps (at least 1) that reaches min_lr at the last step."""
    if it < warmup:
        return lr * (it + 1) / warmup
    decay = max(1, round(decay_fraction * steps))
    start = steps - decay
    if it < start:
        return lr
    return lr - (lr - min_lr) * min(1.0, (it - start + 1) / decay)


def schedule_lr(tcfg: TrainingConfig, it: int, steps: int, offset: int = 0, total: int | None = None) -> float:
    """The learning rate at step `it` of a phase of `steps` steps whose first step is the
    run's global step `offset`, in a run of `total` steps (None: the phase is the run, as
    the end-to-end baseline is). per_phase ignores the run: every phase warms up and
    decays on its own; run_cosine and wsd follow the global step."""
    if tcfg.lr_schedule == "per_phase":
        return get_lr(it, steps, tcfg.lr, tcfg.min_lr, tcfg.warmup_steps)
    step, total = offset + it, total if total is not None else steps
    if tcfg.lr_schedule == "run_cosine":
        return get_lr(step, total, tcfg.lr, tcfg.min_lr, tcfg.warmup_steps)
    return wsd_lr(step, total, tcfg.lr, tcfg.min_lr, tcfg.warmup_steps, tcfg.decay_fraction)


def phase_steps(tcfg: TrainingConfig, batches_per_epoch: int, stack_id: int = 0) -> int:
    """Optimizer steps of phase `stack_id`: epochs_per_stack epochs, else its entry of
    steps_per_stack (one number for every phase, or a list with one per stack)."""
    if tcfg.epochs_per_stack is not None:
        return tcfg.epochs_per_stack * batches_per_epoch
    steps = tcfg.steps_per_stack
    return steps[stack_id] if isinstance(steps, list) else steps


def run_steps(tcfg: TrainingConfig, batches_per_epoch: int, n_phases: int) -> list[int]:
    """The steps of phases 0..n_phases-1 (their sum is a run-wide schedule's length)."""
    return [phase_steps(tcfg, batches_per_epoch, k) for k in range(n_phases)]


def forever(loader: Iterable) -> Iterator:
    """Iterate a loader epoch after epoch (a DataLoader reshuffles on each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data yields no batch")


def rack_loss(rack: Rack, batch: dict, start: int = 0, device: torch.device | str = "cpu"):
    """Forward one prepared batch; a batch carrying `trunk_activations` enters at rack
    position `start` and runs only the stacks from there on."""
    b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return rack(b["input_ids"], b["time_step"], b["targets"], b["combined_masks"],
                hidden=b.get("trunk_activations"), start=start if "trunk_activations" in b else 0)


def rounding_hook(rack: Rack, position: int, dtype: str):
    """Round the residual stream entering rack `position` to `dtype` in training forwards, as
    a cache in that dtype stores it: a phase whose rounding cache was refused trains on what
    its identity says (plan.CachePlan.rounds). Evaluations (no grad) see the stream as it is,
    as they do in a cached phase. Returns the hook's handle."""
    target = getattr(torch, dtype)
    module = rack.embed if position == 0 else rack.stacks[position - 1]

    def round_output(_module, _args, output):
        return output.to(target).to(output.dtype) if torch.is_grad_enabled() else output

    return module.register_forward_hook(round_output)


def train_stack(rack: Rack, batches: Iterable[dict], tcfg: TrainingConfig, steps: int,
                val_batches: Iterable[dict] | None = None, start: int = 0,
                device: torch.device | str = "cpu",
                on_step_end: Callable[[int, torch.optim.Optimizer, list, list], None] | None = None,
                resume: dict | None = None, window: tuple[int, int] | None = None,
                token_bytes: torch.Tensor | None = None) -> dict:
    """Train every parameter of `rack` with requires_grad on `steps` prepared batches.

    Args:
        rack: the model; requires_grad already set for this phase.
        batches: prepared batches (a ProgressiveDataLoader), iterated epoch after epoch.
        tcfg: learning rate schedule, clipping, logging and evaluation settings.
        steps: optimizer steps in this phase.
        val_batches: prepared validation batches, evaluated at the end on tcfg.eval_batches of
            them; with tcfg.eval_every, on all of them every eval_every steps and at the end
            (the validation curve, whose last point is the final result).
        start: rack position where cached trunk activations enter (see rack_loss).
        device: where the batches go.
        on_step_end: called with (steps done, optimizer, loss curve, validation curve) after
            every step (in-phase checkpoints).
        resume: {"step", "optimizer", "loss_curve", "val_curve"} of an in-phase checkpoint to
            continue from.
        window: (the run's global step at this phase's first step, the run's steps in
            all) for a run-wide lr_schedule; None: (0, steps).
        token_bytes: bytes of text per token id (tokenizer.token_bytes()): the evaluations
            report val_bpb too.
    Returns:
        metrics: loss curve, validation curve (with eval_every), final validation numbers,
            parameter counts, wall time.
    """
    params = [p for p in rack.parameters() if p.requires_grad]
    if not params:
        raise ValueError("this phase has no trainable parameter")
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    data = forever(batches)
    curve, val_curve, first = [], [], 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        curve, first = list(resume["loss_curve"]), resume["step"]
        val_curve = list(resume.get("val_curve", []))
        for _ in range(first):  # the same batches as an uninterrupted phase from here on
            next(data)
    rack.train()
    t0 = time.perf_counter()
    for it in range(first, steps):
        lr = schedule_lr(tcfg, it, steps, *(window or (0, steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(data)
        _, loss = rack_loss(rack, batch, start, device)
        opt.zero_grad(set_to_none=True)
        (loss * token_share(batch["combined_masks"], device)).backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        if it % tcfg.log_every == 0 or it == steps - 1:
            curve.append({"step": it, "loss": loss.item(), "lr": lr})
        if val_batches is not None and tcfg.eval_every and (it + 1) % tcfg.eval_every == 0 and it + 1 < steps:
            point = curve_point(rack, val_batches, start, device, token_bytes)
            val_curve.append({"step": it + 1, **{k: point[k] for k in ("val_loss", "val_bpb") if k in point}})
        if on_step_end is not None:
            on_step_end(it + 1, opt, curve, val_curve)
    opt.zero_grad(set_to_none=True)  # frees gradient memory before the rack is evaluated or saved
    metrics = {
        "steps": steps,
        "loss_curve": curve,
        "train_loss": curve[-1]["loss"] if curve else float("nan"),
        "train_time_s": time.perf_counter() - t0,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in rack.parameters()),
    }
    if val_batches is not None and tcfg.eval_every:
        metrics.update(curve_point(rack, val_batches, start, device, token_bytes))
        metrics["val_curve"] = val_curve + [{"step": steps, **{k: metrics[k] for k in ("val_loss", "val_bpb")
                                                                if k in metrics}}]
    elif val_batches is not None:
        metrics.update(evaluate(rack, val_batches, tcfg.eval_batches, start, device, token_bytes))
    return metrics


def curve_point(rack, val_batches, start, device, token_bytes=None) -> dict:
    """Validation loss on the whole split, mid-phase, leaving training exactly as it was:
    the RNG state is restored (the next step draws what it would have drawn) and a DDP
    rack is evaluated through its module (DDP's forward on one rank alone would wait for
    the others)."""
    model = getattr(rack, "module", rack)
    cuda = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return evaluate(model, val_batches, None, start, device, token_bytes)


def token_share(mask: torch.Tensor, device) -> float:
    """Scale for a worker's mean loss so that DDP's gradient average equals the gradient of
    the mean over the global batch's loss positions (workers hold different counts)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1.0
    world = torch.distributed.get_world_size()
    if world == 1:
        return 1.0
    local = mask.sum().to(device=device, dtype=torch.float64)
    total = local.clone()
    torch.distributed.all_reduce(total)  # a sync point per step, one scalar
    return (local * world / total).item()


@torch.no_grad()
def evaluate(rack: Rack, batches: Iterable[dict], max_batches: int | None = None, start: int = 0,
             device: torch.device | str = "cpu", token_bytes: torch.Tensor | None = None) -> dict:
    """Token-weighted loss, perplexity and accuracy over the loss positions; with
    `token_bytes` (bytes of text per id) also val_bpb: the summed loss in bits over the
    bytes of the scored target tokens, a number that compares runs across tokenizers."""
    was_training = rack.training
    rack.eval()
    total_loss, correct, count, n_bytes = 0.0, 0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits, _ = rack_loss(rack, batch, start, device)
        mask = batch["combined_masks"].to(logits.device)
        targets = batch["targets"].to(logits.device)[mask]
        chosen = logits[mask].float()
        total_loss += torch.nn.functional.cross_entropy(chosen, targets, reduction="sum").item()
        correct += (chosen.argmax(-1) == targets).sum().item()
        count += targets.numel()
        if token_bytes is not None:
            n_bytes += token_bytes.to(targets.device)[targets].sum().item()
    rack.train(was_training)
    if count == 0:
        raise ValueError("validation data has no position to score")
    val_loss = total_loss / count
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
           "val_accuracy": correct / count, "val_tokens": count}
    if token_bytes is not None:
        out.update(val_bpb=total_loss / math.log(2) / n_bytes if n_bytes else float("nan"), val_bytes=n_bytes)
    return out
