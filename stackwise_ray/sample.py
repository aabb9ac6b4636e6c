"""python -m stackwise_ray.sample RUN_DIR [--prompt TEXT] [--length N] [--evaluate]

Load a trained rack (RUN_DIR/final, or any phase checkpoint directory; a path or a storage
URI) and print text sampled from it: left to right for clm, iterative unmasking for mlm.
"""

from __future__ import annotations

import argparse
import math
import sys

from .cli import OneLineParser, refuse

MAX_LENGTH = 10_000  # tokens; each one is a forward pass of the whole rack


def int_in(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value
    return parse


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: always the likeliest token), got {text}")
    return value


def resolve(path: str) -> str:
    from . import storage
    from .checkpoint import METADATA

    for candidate in (path, storage.join(path, "final")):
        if storage.exists(storage.join(candidate, METADATA)):
            return candidate
    raise FileNotFoundError(f"{path}: no trained rack here (expected {METADATA} in it or in its final/ folder)")


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.sample", description=__doc__.splitlines()[2])
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--length", type=int_in(1, MAX_LENGTH), default=80, help="tokens to generate")
    parser.add_argument("--temperature", type=temperature, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int_in(1), default=40, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    parser.add_argument("--evaluate", action="store_true", help="also print the validation numbers (reads the "
                        "data the rack's config names)")
    args = parser.parse_args(argv)
    from .checkpoint import CorruptCheckpointError, load_rack
    from .inference import evaluate_rack, sample

    try:
        builder = load_rack(resolve(args.run_dir))
    except (FileNotFoundError, CorruptCheckpointError) as e:
        return refuse(None, e)
    if args.evaluate:
        try:
            print(evaluate_rack(builder))
        except ValueError as e:  # the data file the rack's config names: one line naming it
            return refuse(None, e)
    print(sample(builder, args.prompt, args.length, args.temperature, args.top_k, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
