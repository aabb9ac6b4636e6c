"""python -m stackwise_ray.prepare experiments/x.yaml [KEY=VALUE ...] [--storage PATH] [--address A] [--num-cpus N] [--local]

Build (or find) the token store of a config's data before any run: the source's units
(shards, byte ranges of a large file, Parquet row groups) are tokenized by Ray tasks on
every CPU of the local Ray or of the cluster at --address, and joined in order, byte for
byte what a single-process build writes. Prints the store's key, size, token count, rate
and location; `train` and `tune` with the same data and storage path then open it.
"""

from __future__ import annotations

import os
import sys
import time

from .cli import (
    BAD_INPUT,
    OneLineParser,
    add_overrides_argument,
    error_line,
    load_for_command,
    refuse,
)
from .ray_runtime import RayAddressError, start, stop_on_signals


def store_lines(location: str, meta: dict, built: bool, elapsed_s: float) -> list[str]:
    """What prepare prints about a store: where, its key, size, tokens, how it came."""
    from . import storage

    names = [n for n in ("tokens.bin", "inputs.bin", "targets.bin") if storage.exists(storage.join(location, n))]
    size = sum(storage.size(storage.join(location, n)) for n in names)
    amount = f"{meta['tokens']:,} tokens" if meta["kind"] == "stream" else f"{meta['examples']:,} examples of {meta['seq_len']} tokens"
    source_mb = meta.get("source_bytes", 0) / 1e6
    if built:
        how = (f"built in {elapsed_s:.1f} s from {source_mb:,.1f} MB in {meta.get('units', 1)} unit(s): "
               f"{source_mb / max(meta.get('build_s', elapsed_s), 1e-9):,.2f} MB/s")
    else:
        how = f"found (built earlier in {meta.get('build_s', 0):.1f} s); nothing to do"
    return [f"token store {os.path.basename(location.rstrip('/'))}", f"  location: {location}",
            f"  size: {size / 1e6:,.1f} MB ({meta['dtype']}), {amount}", f"  {how}"]


@stop_on_signals()
def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.prepare", description="Build or find the token store of a config's data.")
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--storage", help="root of the token stores (default: ray.storage_path)")
    parser.add_argument("--address", help="Ray cluster address (default: ray.address, RAY_ADDRESS, or a local Ray)")
    parser.add_argument("--local", action="store_true", help="tokenize in this process, without Ray")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray it starts (default: all of this machine's)")
    add_overrides_argument(parser)
    args = parser.parse_intermixed_args(argv)
    config = load_for_command(args.config, args.storage, check_data=False, address=args.address, overrides=args.overrides)
    if config is None:
        return BAD_INPUT
    from . import storage
    from .data import token_store
    from .data.dataset import token_store_location
    from .data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
        location = token_store.location(config.data, tokenizer, config.ray.storage_path)
        built = not token_store.is_complete(location)
        if built and not args.local:
            local = {"num_cpus": args.num_cpus} if args.num_cpus else {}
            start(config, args.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR", **local)
        t0 = time.perf_counter()
        location = token_store_location(config, tokenizer, for_training=True, parallel=built and not args.local)
        elapsed = time.perf_counter() - t0
    except (ValueError, RayAddressError) as e:
        return refuse(args.config if isinstance(e, RayAddressError) else None, e)
    except OSError as e:
        print(error_line(None, f"{e.filename or config.ray.storage_path}: {e.strerror or e}"), file=sys.stderr)
        return BAD_INPUT
    meta = storage.read_json(storage.join(location, token_store.META))
    print("\n".join(store_lines(location, meta, built, elapsed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
