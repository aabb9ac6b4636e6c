"""What the commands (train, tune, sample, export, report) share: bad input is one line
`error: <file>: <key path or flag>: <problem>` on stderr and exit status 2, and the
checks a run makes before Ray starts or anything is written."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from . import storage
from .config import ConfigError, StackWiseConfig, check_fits
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
                     address: str | None = None, name: str | None = None) -> StackWiseConfig | None:
    """What train and tune do first: check --name, load the YAML, apply --storage (or
    normalise ray.storage_path), validate, check that a GPU run has a GPU, that the storage path is writable, and the
    config against its tokenizer and data (a bad data file fails here, before Ray starts).
    On bad input, print one line naming the file and return None (the command exits with
    status 2)."""
    try:
        if name is not None:
            storage.check_name(name)
        config = StackWiseConfig.from_yaml(path)
        # the one place a command's storage path is normalised, before the config is validated
        config.ray.storage_path = storage.storage_dir(storage_path or config.ray.storage_path)
        config = config.validate()
        from .ray_runtime import probe, resolve_address

        ray_address, source = resolve_address(config, address)
        if ray_address is not None and check_data:  # a run, not a dry run: before anything is written
            probe(ray_address, source)
        if config.ray.use_gpu and not (address or config.ray.address or os.environ.get("RAY_ADDRESS")):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("ray.use_gpu: true, but this machine has no CUDA GPU (set it to false, or give "
                                  "the address of a cluster with GPU workers: ray.address, RAY_ADDRESS or --address)")
        storage.check_storage(config.ray.storage_path)
        if check_data or config.data.tokenizer != "byte":
            check_against_data(config, check_data)
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


def check_against_data(config: StackWiseConfig, load_data: bool) -> None:
    """What validate cannot know: the tokenizer's vocabulary and the number of examples."""
    from .data import load_tokenizer, token_store_location

    tokenizer, m = load_tokenizer(config.data.tokenizer), config.model
    if m.vocab_size is not None and m.vocab_size < tokenizer.vocab_size:
        fail("model.vocab_size", f"must be >= the tokenizer's {tokenizer.vocab_size:,} ids, got {m.vocab_size:,}")
    check_fits(config, m.vocab_size or tokenizer.vocab_size)
    if load_data:  # builds the token store where it is missing; checks the example counts, batch size included
        token_store_location(config, tokenizer, for_training=True)
