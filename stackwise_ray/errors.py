"""ConfigError, and how a bad value is shown in its one-line message.

Shared by the checks that reject input before a run starts: the config schema
(config.py), storage paths (storage.py), custom time mappings (time_mapping.py) and the
command lines (cli.py). It imports nothing from the package, so none of them import
each other to raise an error.
"""

from __future__ import annotations

import reprlib


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key path."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def show(value) -> str:
    """repr(value), bounded: a value may be an alias bomb or a 10 MB string, and an error
    message prints it."""
    try:
        return clip(_REPR.repr(value))
    except ValueError:  # an int past Python's 4300-digit limit
        return f"an integer of {value.bit_length():,} bits"


def clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def first_line(e: BaseException) -> str:
    return clip((str(e).strip().splitlines() or [""])[0], 200)


def fail(path: str, msg: str):
    raise ConfigError(f"{clip(path, 200)}: {msg}")  # a key path holds the file's keys
