"""python -m stackwise_ray.sample RUN_DIR [--prompt TEXT] [--length N] [--evaluate]

Load a trained rack (RUN_DIR/final, or any phase checkpoint directory; a path or a storage
URI) and print text sampled from it: left to right for clm, iterative unmasking for mlm.
"""

from __future__ import annotations

import argparse
import sys

from . import storage
from .checkpoint import METADATA


def resolve(path: str) -> str:
    for candidate in (path, storage.join(path, "final")):
        if storage.exists(storage.join(candidate, METADATA)):
            return candidate
    raise FileNotFoundError(f"{path}: no trained rack here (expected {METADATA} in it or in its final/ folder)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stackwise_ray.sample", description=__doc__.splitlines()[2])
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--length", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="also print the validation numbers")
    args = parser.parse_args(argv)
    try:
        path = resolve(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .checkpoint import load_rack
    from .inference import evaluate_rack, sample

    builder = load_rack(path)
    if args.evaluate:
        print(evaluate_rack(builder))
    print(sample(builder, args.prompt, args.length, args.temperature, args.top_k, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
