"""The GPU run: one prepared script for a machine with a CUDA GPU (exits 2 without one).

1. The 3-stack quickstart on CUDA workers with stack 0 in bfloat16, stack 1 in qlora
   (bitsandbytes NF4, trained through its LoRA adapter) and stack 2 in bfloat16; append,
   frozen trunk, cached. Per phase: time, step time, peak CUDA memory, validation loss
   (P1 on a GPU: the cached phases' step time against phase 0's).
2. The trained rack reloaded on the GPU: its NF4 layers live on CUDA, and a forward pass
   runs bitsandbytes' CUDA kernels (listed from the profiler).
3. bf16 MFU at d_model 1024: one bfloat16 phase (seq_len 512), model FLOPs per second
   against the GPU's dense bf16 peak.

Writes the "gpu" section of docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, table, write_section  # noqa: E402

# dense bf16 tensor-core peak, FLOP/s (datasheet numbers, without sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def quickstart_rows(use_gpu: bool = True, steps: int = 300) -> tuple[list[list], str]:
    from stackwise_ray.trainer import ProgressiveTrainer

    cfg = config({"training": {"steps_per_stack": steps, "checkpoint_every": 0,
                               "progressive": {"qlora_enabled": True, "qlora_rank": 8,
                                               "stack_precisions": {0: "bfloat16", 1: "qlora", 2: "bfloat16"}}},
                  "ray": {"use_gpu": use_gpu}})
    trainer = ProgressiveTrainer(cfg, storage_path=tempfile.mkdtemp(prefix="bench-gpu-"), name="quickstart")
    history = trainer.train_progressively()
    step0 = history[0]["train_s"] / history[0]["steps"]
    rows = [[m["stack"], m["precision"], m["cache"]["kind"], m["phase_wall_s"], m["train_s"],
             1000 * m["train_s"] / m["steps"], m["train_s"] / m["steps"] / step0, m["peak_memory_mb"], m["val_loss"]]
            for m in history]
    return rows, os.path.join(trainer.run_dir, "final")


def kernels_of(final: str, device: str = "cuda") -> tuple[int, int, list[str]]:
    """(NF4 layers, of them on `device`, bitsandbytes kernels a forward pass ran)."""
    from torch.profiler import ProfilerActivity, profile

    from stackwise_ray.checkpoint import load_rack

    rack = load_rack(final, device=device).build_rack().eval()
    nf4 = [m for m in rack.modules() if type(m).__name__ == "Linear4bit"]
    on_device = sum(m.weight.device.type == torch.device(device).type for m in nf4)
    ids = torch.randint(0, rack.embed.num_embeddings, (4, 64), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        rack(ids)
    names = sorted({e.key for e in prof.key_averages()
                    if any(s in e.key.lower() for s in ("4bit", "nf4", "dequant", "gemv", "bitsandbytes"))})
    return len(nf4), on_device, names


def mfu_row(use_gpu: bool = True, d_model: int = 1024, steps: int = 50) -> list:
    from stackwise_ray.trainer import ProgressiveTrainer

    cfg = config({"model": {"d_model": d_model, "n_heads": d_model // 64, "blocks_per_stack": 4, "max_seq_len": 512},
                  "data": {"seq_len": 512, "batch_size": 16},
                  "training": {"steps_per_stack": steps, "warmup_steps": 5, "eval_batches": 2, "checkpoint_every": 0,
                               "progressive": {"target_stacks": 1, "new_stack_precision": "bfloat16"}},
                  "ray": {"use_gpu": use_gpu}})
    m = ProgressiveTrainer(cfg, storage_path=tempfile.mkdtemp(prefix="bench-gpu-"), name="mfu").train_progressively()[0]
    achieved = m["train_flops"] / m["train_s"]
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return [d_model, 4, 512, m["steps"], m["train_s"], achieved / 1e12,
            f"{achieved / peak:.1%}" if peak else "peak unknown", m["peak_memory_mb"]]


def main() -> int:
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows, final = quickstart_rows()
    n, on_gpu, kernels = kernels_of(final)
    mfu = mfu_row()
    body = ("The 3-stack quickstart (d_model 128, seq_len 128, batch 16, 300 steps per stack) on one CUDA "
            "worker per phase: stack 0 bfloat16, stack 1 qlora (NF4 base, LoRA rank 8), stack 2 bfloat16; "
            "append, frozen trunk, trunk outputs cached in the object store. Step time is the training loop's "
            "(phase 0: embedding + stack 0; cached phases: the new stack only).\n\n"
            + table(["stack", "precision", "cache", "phase wall s", "train s", "step ms", "step / phase 0 step",
                     "peak CUDA MB", "val_loss"], rows)
            + f"\n\nReloaded on the GPU: {on_gpu} of {n} NF4 layers on CUDA; bitsandbytes kernels in a forward "
              f"pass: {', '.join(kernels) or 'none found'}.\n\n"
            + "bf16 MFU: one phase, a 4-block bfloat16 stack, seq_len 512, batch 16 (model FLOPs counted as in "
              "`flops.py`: 3x the forward's 2 x matmul parameters + attention per token for what trains).\n\n"
            + table(["d_model", "blocks", "seq_len", "steps", "train s", "TFLOP/s", "MFU (dense bf16 peak)",
                     "peak CUDA MB"], [mfu]))
    write_section("gpu", "GPU: qlora/bf16 quickstart, NF4 kernels, bf16 MFU", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
