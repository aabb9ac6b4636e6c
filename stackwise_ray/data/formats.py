"""The source formats, named once: the config's `data.format` choices and each file
extension's format come from here (sources.py holds the reader of each). Imports nothing,
so config.py can use it before torch, pyarrow or Ray load."""

from __future__ import annotations

import os

FORMATS = ("text", "jsonl", "parquet")  # a reader for each in sources.SOURCES
EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
WITH_FIELDS = ("jsonl", "parquet")  # formats whose records have named fields (text_field, target_field)


def format_of(path: str, forced: str = "auto") -> str:
    """The format of the file at `path`: `forced` unless it is "auto", else its extension's.

    Raises:
        ValueError: an unknown extension, one line naming the file.
    """
    if forced != "auto":
        return forced
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unknown extension {ext or '(none)'!r}; expected .txt, .jsonl or .parquet (or set data.format)")
    return EXTENSIONS[ext]
