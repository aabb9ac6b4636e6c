"""The source formats, named once: the config's `data.format` choices, each file
extension's format and compression come from here (sources.py holds the reader of each).
Imports nothing from the package, so config.py can use it before torch, pyarrow or Ray load."""

from __future__ import annotations

import os

FORMATS = ("text", "jsonl", "parquet", "datasets")  # a reader for each in sources.READERS
EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}  # streamed; text and JSONL only
WITH_FIELDS = ("jsonl", "parquet", "datasets")  # formats whose records have named fields (text_field, target_field)
GLOB_CHARS = "*?["


def compression_of(path: str) -> tuple[str, str | None]:
    """(the path without a compression suffix, "gz" | "zst" | None)."""
    base, ext = os.path.splitext(path)
    return (base, COMPRESSIONS[ext.lower()]) if ext.lower() in COMPRESSIONS else (path, None)


def known(path: str) -> bool:
    """Whether `path`'s extension names a format (after a compression suffix)."""
    return os.path.splitext(compression_of(path)[0])[1].lower() in EXTENSIONS


def format_of(path: str, forced: str = "auto") -> str:
    """The format of the file at `path`: `forced` unless it is "auto", else its extension's
    (a .gz or .zst suffix is looked through).

    Raises:
        ValueError: an unknown extension, one line naming the file.
    """
    if forced != "auto":
        return forced
    ext = os.path.splitext(compression_of(path)[0])[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unknown extension {ext or '(none)'!r}; expected .txt, .jsonl or .parquet, "
                         "optionally .gz or .zst (or set data.format)")
    return EXTENSIONS[ext]
