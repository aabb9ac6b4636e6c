"""One phase's numbers as a typed record: made by its workers (the loop's numbers and
theirs), finished by the driver (cache, wall times), written to `done.json`, the
checkpoint's `rack.json` and `summary.json` as a plain dict (`to_dict`; a field that does
not apply is left out), read back with `from_dict`. docs/results.md lists every field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _doc(text: str, default=dataclasses.MISSING):
    return field(default=default, metadata={"doc": text})


@dataclass
class PhaseMetrics:
    # the training loop (phase.train_stack)
    steps: int = _doc("optimizer steps the phase trained")
    loss_curve: list = _doc("`{step, loss, lr}` every `log_every` steps and at the last")
    train_loss: float = _doc("the last logged training loss")
    train_time_s: float = _doc("the loop's own time over its steps")
    trainable_params: int = _doc("parameters the phase trained")
    total_params: int = _doc("parameters of the rack")
    val_loss: float = _doc("validation loss of the full rack from tokens, no cache: on `eval_batches` "
                           "batches, the whole split with `eval_every`")
    val_ppl: float = _doc("exp(val_loss)")
    val_accuracy: float = _doc("share of scored positions predicted right (masked tokens for mlm)")
    val_tokens: int = _doc("positions scored")
    val_bpb: float = _doc("bits per byte of the scored validation text: the summed loss in bits over the bytes "
                          "the scored targets stand for (compares tokenizers)")
    val_bytes: int = _doc("bytes of text the scored targets stand for")
    # the phase's workers (worker.py)
    stack: int = _doc("the stack the phase added: its id and phase index")
    precision: str = _doc("the stack's precision")
    time_step: object = _doc("the stack's depth time step (`per example` with time as input)")
    resumed_from_step: int = _doc("the in-phase checkpoint's step a restarted worker group continued at (0: none)")
    first_global_step: int = _doc("the run's global step at the phase's first step (its place in a run-wide lr_schedule)")
    train_flops: float = _doc("FLOPs of the training steps (flops.py)")
    trunk_forwards: int = _doc("forward calls of trunk stacks during the training steps")
    cache_shards_loaded: int = _doc("cache shards the rank-0 worker loaded")
    cold_start_s: float = _doc("TorchTrainer start to the loop's first line (a prestarted phase's overlaps the phase before)")
    startup_s: float = _doc("inputs ready (previous checkpoint and cache) to the first step")
    train_s: float = _doc("the training steps, in the worker")
    checkpoint_s: float = _doc("in-phase checkpoints written between steps")
    peak_memory_mb: float = _doc("peak RSS of the rank-0 worker process (CUDA: peak allocated)")
    num_workers: int = _doc("workers of the phase's Ray Train run")
    torch_threads: int = _doc("torch threads per worker")
    node_id: str = _doc("the Ray node of the rank-0 worker")
    rack: dict = _doc("`get_rack_info()`: per-stack precision, weight and adapter bytes, adapters")
    val_curve: list | None = _doc("with `eval_every`: `{step, global_step, phase_flops, val_loss}` on the whole "
                                  "validation split, every `eval_every` steps and at the end (`phase_flops`: the phase's "
                                  "training FLOPs so far)", None)
    next_cache: dict | None = _doc("this rank's share of the next phase's cache (taken by the driver, not kept)", None)
    # the driver (trainer.py)
    next_cache_s: float | None = _doc("time the workers spent computing the next phase's cache", None)
    cache: dict | None = _doc("what the phase read: kind (`trunk_outputs`/`trunk_inputs`/`none` and why), backend, "
                              "rows, bytes, shards, dtype, build seconds, attempts, incremental", None)
    cache_s: float | None = _doc("the phase's cache: found or built, before its training", None)
    flops: float | None = _doc("train_flops plus the cache build's FLOPs where this phase built it", None)
    prestarted: bool | None = _doc("its workers started while the phase before trained", None)
    phase_wall_s: float | None = _doc("the phase's whole wall time on the driver", None)
    orchestration_s: float | None = _doc("the phase's wall time outside its training steps and cache", None)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "PhaseMetrics":
        return cls(**d)

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}
