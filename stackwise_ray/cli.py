"""What the commands (train, tune, sample, export, report) share: bad input is one line
`error: <file>: <key path or flag>: <problem>` on stderr and exit status 2, and the
checks a run makes before Ray starts or anything is written."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from . import storage
from .config import ConfigError, StackWiseConfig, apply_cli_overrides
from .errors import fail

BAD_INPUT = 2  # the exit status of a command refused by its input


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block would make a bad flag several lines
        self.exit(BAD_INPUT, f"error: {message.removeprefix('argument ')}\n")


def error_line(where: str | None, e: BaseException | str) -> str:
    """`error: <where>: <problem>`, naming `where` once whether or not the message starts
    with it (None: the message names its own file)."""
    msg = str(e)
    return f"error: {msg}" if where is None or msg.startswith(where) else f"error: {where}: {msg}"


def refuse(where: str | None, e: BaseException | str) -> int:
    """Print the one error line and return the status the command exits with."""
    print(error_line(where, e), file=sys.stderr)
    return BAD_INPUT


def load_for_command(path: str, storage_path: str | None, check_data: bool = True,
                     address: str | None = None, name: str | None = None,
                     overrides: list[str] = ()) -> StackWiseConfig | None:
    """What train and tune do first: check --name, load the YAML, apply the command line's
    `key=value` overrides and --storage (or normalise ray.storage_path), validate the
    schema, then `preflight`. On bad input, print one line naming the file and return None
    (the command exits with status 2)."""
    try:
        if name is not None:
            storage.check_name(name)
        config = apply_cli_overrides(StackWiseConfig.from_yaml(path), list(overrides))
        # the one place a command's storage path is normalised, before the config is validated
        config.ray.storage_path = storage.storage_dir(storage_path or config.ray.storage_path)
        config = config.validate()
        preflight(config, address, build_data=check_data)
        return config
    except (ConfigError, ValueError) as e:
        refuse(path, e)
        return None


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException) -> OSError | None:
    """The full-disk OSError behind `error`, or None: it may be `error` itself or one of its
    causes, or come wrapped by Ray from a worker (Ray Train's WorkerGroupError holds each
    worker's error; a RayTaskError names its cause, and its text keeps the original's)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        todo += list(failures.values()) if isinstance(failures, dict) else []
    if os.strerror(errno.ENOSPC) in str(error):  # a remote error that kept only its text
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def disk_full_line(full: OSError, where: str, store) -> str:
    """The one line a command that ran out of disk ends with: the path, and what is kept
    (`store`: the run's or sweep's phase_store.PhaseStore; its finished phases are reused by
    --resume)."""
    try:
        kept = store.finished_count()
    except (OSError, ValueError):  # the store itself is unreadable
        kept = None
    what = f"{kept} finished phase(s) kept in {store.root}" if kept is not None else f"finished phases in {store.root}"
    return error_line(full.filename or where, f"{full.strerror or 'no space left on device'} ({what}; free some "
                                              "space, then rerun with --resume)")


def preflight(config: StackWiseConfig, address: str | None = None, build_data: bool = True) -> None:
    """Everything a validated config needs from this machine and the outside world, checked
    before Ray starts or anything is written: the Ray address answers, a GPU run has a GPU,
    the storage path is writable, the data and tokenizer files, tracking packages and a
    custom time mapping (preflight.py, for every value a sweep may give), the tokenizer's
    vocabulary against model.vocab_size, the rack against this machine's memory, and, with
    `build_data`, the token store (built where missing) against the batch size."""
    from . import preflight as checks
    from .ray_runtime import probe, resolve_address

    ray_address, source = resolve_address(config, address)
    if ray_address is not None and build_data:  # a run, not a dry run
        probe(ray_address, source)
    if config.ray.use_gpu and not (address or config.ray.address or os.environ.get("RAY_ADDRESS")):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("ray.use_gpu: true, but this machine has no CUDA GPU (set it to false, or give "
                              "the address of a cluster with GPU workers: ray.address, RAY_ADDRESS or --address)")
    storage.check_storage(config.ray.storage_path)
    checks.check_files(config)
    vocab_size = None
    if config.data.tokenizer != "byte":
        from .data.tokenizer import load_tokenizer

        vocab_size = load_tokenizer(config.data.tokenizer).vocab_size
        if config.model.vocab_size is not None and config.model.vocab_size < vocab_size:
            fail("model.vocab_size", f"must be >= the tokenizer's {vocab_size:,} ids, got {config.model.vocab_size:,}")
    checks.check(config, vocab_size)
    if build_data:  # builds the token store where it is missing; checks the example counts, batch size included
        from .data.dataset import token_store_location

        token_store_location(config, for_training=True)


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides typed by the schema, e.g. training.lr=1e-3 ray.num_workers=2")
