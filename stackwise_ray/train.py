"""python -m stackwise_ray.train experiments/x.yaml [--storage PATH] [--name NAME] [--resume]

One progressive run (no sweep): one Ray Train phase per stack, then a per-stack table.
The trained rack lands in RUN_DIR/final.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import load_for_command
from .ray_runtime import RayAddressError, ensure_ray, run_in_thread, stop_on_signals


def stack_table(history: list[dict]) -> str:
    cols = [("stack", "stack", "{}"), ("precision", "precision", "{}"), ("t", "time_step", "{}"),
            ("steps", "steps", "{}"), ("train", "train_loss", "{:.3f}"), ("val", "val_loss", "{:.3f}"),
            ("ppl", "val_ppl", "{:.1f}"), ("acc", "val_accuracy", "{:.3f}"),
            ("trainable", "trainable_params", "{:,}"), ("total", "total_params", "{:,}"),
            ("trunk fwd", "trunk_forwards", "{}"), ("peak MB", "peak_memory_mb", "{:.0f}"),
            ("start s", "startup_s", "{:.1f}"), ("cache s", "cache_s", "{:.1f}"), ("train s", "train_s", "{:.1f}"),
            ("status", "status", "{}")]
    rows = [[h for h, _, _ in cols + [("cache", None, None)]]]
    for m in history:
        cache = m.get("cache", {})
        what = cache.get("kind", "none")
        if cache.get("bytes"):
            what += f" {cache['bytes'] / 2**20:.1f}MB"
        rows.append([fmt.format(m[key]) if key in m else "-" for _, key, fmt in cols] + [what])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


@stop_on_signals()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stackwise_ray.train", description=__doc__.splitlines()[2])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--storage", help="root of run directories (default: ray.storage_path)")
    parser.add_argument("--name", help="run directory name (default: the YAML file's name)")
    parser.add_argument("--resume", action="store_true", help="continue the run, skipping finished phases")
    args = parser.parse_args(argv)
    config = load_for_command(args.config, args.storage, name=args.name)
    if config is None:
        return 2
    from . import storage
    from .trainer import ProgressiveTrainer, RunDirError

    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    trainer = ProgressiveTrainer(config, storage_path=args.storage, name=name, resume=args.resume)
    try:
        trainer.check_run_dir()
        ensure_ray(config)  # here: ray.init in another thread than the main one warns about its SIGTERM handler
        history = run_in_thread(trainer.train_progressively)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RayAddressError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    print(stack_table(history))
    print(f"\ntrained rack: {storage.join(trainer.run_dir, 'final')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
