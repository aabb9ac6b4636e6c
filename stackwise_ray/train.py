"""python -m stackwise_ray.train experiments/x.yaml [KEY=VALUE ...] [--storage PATH] [--name NAME] [--resume]

One progressive run (no sweep): one Ray Train phase per stack, then a per-stack table.
The trained rack lands in RUN_DIR/final.
"""

from __future__ import annotations

import os
import sys

from .cli import BAD_INPUT, OneLineParser, add_overrides_argument, disk_full, disk_full_line, error_line, load_for_command
from .ray_runtime import RayAddressError, dashboard_line, run_in_thread, start, stop_on_signals


COLUMNS = [("stack", "stack", "{}"), ("precision", "precision", "{}"), ("t", "time_step", "{}"),
           ("steps", "steps", "{}"), ("train", "train_loss", "{:.3f}"), ("val", "val_loss", "{:.3f}"),
           ("ppl", "val_ppl", "{:.1f}"), ("bpb", "val_bpb", "{:.3f}"), ("acc", "val_accuracy", "{:.3f}"),
           ("trainable", "trainable_params", "{:,}"), ("total", "total_params", "{:,}"),
           ("trunk fwd", "trunk_forwards", "{}"), ("peak MB", "peak_memory_mb", "{:.0f}"),
           ("start s", "startup_s", "{:.1f}"), ("cache s", "cache_s", "{:.1f}"), ("train s", "train_s", "{:.1f}"),
           ("status", "status", "{}")]
WIDTHS = [5, 9, 11, 6, 6, 6, 7, 6, 6, 11, 11, 9, 7, 7, 7, 7, 9, 20]  # rows are printed one by one, as phases end


def stack_row(m: dict | None) -> str:
    """One row of the per-stack table (None: the header)."""
    if m is None:
        cells = [h for h, _, _ in COLUMNS] + ["cache"]
    else:
        cache = m.get("cache", {})
        what = cache.get("kind", "none") + (f" {cache['bytes'] / 2**20:.1f}MB" if cache.get("bytes") else "")
        cells = [fmt.format(m[key]) if key in m else "-" for _, key, fmt in COLUMNS] + [what]
    return "  ".join(c.rjust(w) for c, w in zip(cells, WIDTHS))


@stop_on_signals()
def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.train", description=__doc__.splitlines()[2])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--storage", help="root of run directories (default: ray.storage_path)")
    parser.add_argument("--name", help="run directory name (default: the YAML file's name)")
    parser.add_argument("--resume", action="store_true", help="continue the run, skipping finished phases")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' output here, not in the log")
    add_overrides_argument(parser)
    args = parser.parse_intermixed_args(argv)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    config = load_for_command(args.config, args.storage, name=name, overrides=args.overrides)  # a default name is checked too
    if config is None:
        return BAD_INPUT
    from . import storage
    from .console import Console, LogFileError, log_path
    from .trainer import ProgressiveTrainer, RunDirError

    rows = []

    def show_row(m: dict) -> None:
        if not rows:
            console.line(stack_row(None))
        rows.append(m)
        console.line(stack_row(m))

    trainer = ProgressiveTrainer(config, storage_path=args.storage, name=name, resume=args.resume, on_phase=show_row)
    console = trainer.console = Console(log_path(trainer.run_dir, "train.log"), verbose=args.verbose)
    try:
        trainer.check_run_dir()
        console.start()
        # Ray starts here: ray.init in another thread than the main one warns about its SIGTERM handler
        console.line(dashboard_line(start(config, dashboard_host="127.0.0.1")))
        run_in_thread(trainer.train_progressively)
        console.line(f"\ntrained rack: {storage.join(trainer.run_dir, 'final')}")
    except (RunDirError, RayAddressError, LogFileError) as e:
        console.error(error_line(args.config if isinstance(e, RayAddressError) else None, e))
        return BAD_INPUT
    except Exception as e:  # noqa: BLE001 - a full disk mid-run is one line; anything else stays a traceback
        if (full := disk_full(e)) is None:
            raise
        console.error(disk_full_line(full, trainer.run_dir, trainer.store))
        return BAD_INPUT
    finally:
        console.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
