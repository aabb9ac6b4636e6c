"""python -m stackwise_ray.sample RUN_DIR [--prompt TEXT] [--length N] [--evaluate [--data PATH] [--storage PATH]]

Load a trained rack (RUN_DIR/final, or any phase checkpoint directory; a path or a storage
URI) and print text sampled from it: left to right for clm, iterative unmasking for mlm.

A rack may come from elsewhere, and its config names paths (data.source,
ray.storage_path): none of them is used. --evaluate reads the data you name (--data; the
bundled corpus only where the rack was trained on it) and writes its token store under
--storage, or in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile

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


def evaluation_split(builder, data: str | None, storage_path: str):
    """The validation split to evaluate `builder`'s rack on: `data` (None: the bundled
    corpus, only where the rack was trained on it) tokenized into a token store under
    `storage_path`. The rack's own data.source and ray.storage_path are never read or
    written: a received rack does not choose where this machine reads or writes."""
    from .data.dataset import build_datasets
    from .errors import show

    config = copy.deepcopy(builder.config)
    if data is None and config.data.source != "pydoc":
        raise ValueError(f"--evaluate: the rack was trained on {show(config.data.source)}, which is not read on the "
                         "rack's say-so: pass --data PATH (your copy of that data)")
    config.data.source, config.ray.storage_path = data or "pydoc", storage_path
    return build_datasets(config)[1]


def check_evaluation_flags(args) -> str | None:
    """The first bad --data or --storage as `flag: problem`, or None (before the rack loads)."""
    from . import storage
    from .local_files import source_problem

    if (args.data or args.storage) and not args.evaluate:
        return f"{'--data' if args.data else '--storage'}: only used with --evaluate"
    if args.data is not None and (problem := source_problem(args.data)):
        return f"--data {args.data}: {problem}"
    if args.storage is not None:
        try:
            args.storage = storage.storage_dir(args.storage)
            storage.check_storage(args.storage)
        except ValueError as e:
            return f"--storage {args.storage}: {str(e).split(': ', 2)[-1]}"
    return None


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.sample", description=__doc__.splitlines()[2])
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--length", type=int_in(1, MAX_LENGTH), default=80, help="tokens to generate")
    parser.add_argument("--temperature", type=temperature, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int_in(1), default=40, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    parser.add_argument("--evaluate", action="store_true", help="also print the validation numbers, on --data")
    parser.add_argument("--data", help="the data file --evaluate reads (default: the bundled corpus, where the rack "
                        "was trained on it)")
    parser.add_argument("--storage", help="where --evaluate keeps its token store (default: a temporary directory, "
                        "removed at the end)")
    args = parser.parse_args(argv)
    from . import storage
    from .checkpoint import WEIGHTS, CorruptCheckpointError, finite_weights_problem, load_rack
    from .errors import first_line
    from .inference import evaluate_rack, sample

    if problem := check_evaluation_flags(args):
        return refuse(None, problem)
    if storage.is_remote(args.run_dir) and (problem := storage.remote_problem(args.run_dir)):
        return refuse(args.run_dir, f"cannot be reached: {problem}")
    try:
        path = resolve(args.run_dir)
        builder = load_rack(path)
    except (FileNotFoundError, CorruptCheckpointError) as e:
        return refuse(None, e)
    except OSError as e:  # a storage URI whose reads fail
        return refuse(args.run_dir, f"cannot read: {first_line(e)}")
    if problem := finite_weights_problem(builder.rack):  # every logit would be NaN
        return refuse(storage.join(path, WEIGHTS), problem)
    if args.evaluate:
        try:
            with tempfile.TemporaryDirectory(prefix="stackwise_ray-evaluate-") as scratch:
                print(evaluate_rack(builder, evaluation_split(builder, args.data, args.storage or scratch)))
        except ValueError as e:  # the data file: one line naming it
            return refuse(None, e)
    print(sample(builder, args.prompt, args.length, args.temperature, args.top_k, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
