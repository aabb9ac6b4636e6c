"""P4: weight bytes per precision, and the peak memory of a phase per precision.

Weight bytes: one stack (d_model 256, 2 blocks) after `apply_precision`, against fp32.
Peak memory: a 2-stack run per precision (every stack in that precision, append, frozen
trunk, cached), each phase a Ray Train worker whose `ru_maxrss` is reported.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, table, write_section  # noqa: E402

PRECISIONS = ("full", "bfloat16", "half", "nvfp4", "qlora")


def weight_rows() -> list[list]:
    from stackwise_ray.builder import create_stack_from_config
    from stackwise_ray.precision import weight_bytes

    cfg = config({"model": {"d_model": 256, "n_heads": 4, "blocks_per_stack": 2}})
    sizes = {p: weight_bytes(create_stack_from_config(0, 2, cfg, precision=p)) for p in PRECISIONS}
    return [[p, sizes[p] / 2**20, sizes[p] / sizes["full"]] for p in PRECISIONS]


def phase_rows() -> list[list]:
    from stackwise_ray.trainer import ProgressiveTrainer

    rows = []
    for p in PRECISIONS:
        cfg = config({"model": {"d_model": 256, "n_heads": 4, "blocks_per_stack": 1, "max_seq_len": 64},
                      "data": {"seq_len": 64, "max_examples": 400},
                      "training": {"steps_per_stack": 20, "eval_batches": 2, "checkpoint_every": 0,
                                   "progressive": {"target_stacks": 2, "new_stack_precision": p,
                                                   # 4-bit stacks train through their LoRA adapter
                                                   "qlora_enabled": p in ("nvfp4", "qlora")}}})
        history = ProgressiveTrainer(cfg, storage_path=tempfile.mkdtemp(prefix="bench-mem-"),
                                     name=p).train_progressively()
        rows.append([p, *(m["peak_memory_mb"] for m in history), *(1000 * m["train_s"] / m["steps"] for m in history)])
    return rows


def main() -> None:
    weights = weight_rows()
    phases = phase_rows()
    qlora = next(r for r in weights if r[0] == "qlora")[2]
    body = ("Weight bytes of one stack (d_model 256, 2 blocks: parameters, buffers and bitsandbytes quant "
            f"states). **P4: a qlora (NF4) trunk stack holds {qlora:.3f}× the bytes of fp32** (target ≤ 0.15).\n\n"
            + table(["precision", "MiB", "× fp32"], weights)
            + "\n\nPeak RSS of each phase's worker, 2 stacks (d_model 256, seq_len 64, 20 steps), every stack in "
              "that precision. On this CPU the quantized and half-precision paths dequantize or emulate, so "
              "they are slower, and the RSS is dominated by the ~0.5 GB of imports.\n\n"
            + table(["precision", "phase 0 peak MB", "phase 1 peak MB", "phase 0 step ms", "phase 1 step ms"], phases))
    write_section("p4", "P4: memory by precision", body)


if __name__ == "__main__":
    main()
