"""The token store: a corpus tokenized once, on disk, memory-mapped by every reader.

Its whole lifecycle is here: its identity (what determines its ids) and key, its build
from a source's Batches (sources.py) with a tokenizer (tokenizer.py), and opening it.

A store is a directory `<ray.storage_path>/tokens/<key>/`:
    tokens.bin               language modelling: all documents' ids, eos between documents
    inputs.bin, targets.bin  custom objective: (N, seq_len) input ids, int32 targets
    meta.json                written last: its presence means the store is complete
Ids are uint16 where the largest id fits, else uint32 (nanoGPT's `.bin` files). The key
hashes everything that determines the ids (`store_identity`: the source's bytes, the
tokenizer file's bytes, format and fields, seq_len for the custom objective), so every
run, trial and phase with the same data opens the same store, and changed data gets a new
one. A build writes into a temporary directory that is renamed (or, on an object store,
uploaded) into place; a build that fails or is killed leaves nothing taken as finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .. import storage
from .sources import Batch, open_source, read_unit
from .tokenizer import IGNORE_INDEX, ByteTokenizer

if TYPE_CHECKING:
    from ..config import DataConfig

VERSION = 1  # part of every key: a change of layout builds new stores
META = "meta.json"
PROGRESS_AFTER_S = 3.0  # builds shorter than this print nothing
PROGRESS_EVERY_S = 10.0  # plain progress lines where stderr is not a terminal


class StoreWriteError(ValueError):
    """A store that could not be written (the message names it and says what was kept)."""


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, read in blocks; hashed once per process while the file's
    size and modification time stay the same."""
    st = os.stat(path)
    return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def store_key(identity: dict) -> str:
    blob = json.dumps({"version": VERSION, **identity}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def is_complete(location: str) -> bool:
    return storage.exists(storage.join(location, META))


def ensure(location: str, write, check=None) -> str:
    """The store at `location`, built first by `write(directory) -> meta` if it is not
    complete there. `check(meta)` may refuse the data (raise): a new store's before
    anything is published.

    Locally the build runs in a hidden directory beside the store (a rename puts it in
    place); on an object store it runs in the system temp directory and is uploaded, meta
    last. On failure every directory the build created is removed again."""
    if is_complete(location):
        if check is not None:
            check(storage.read_json(storage.join(location, META)))
        return location
    remote = storage.is_remote(location)
    root = os.path.dirname(location) if not remote else None
    created = [] if remote else storage.missing_dirs(root)  # deepest first
    if not remote:
        os.makedirs(root, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(location)}.part-", dir=root)
    try:
        t0 = time.perf_counter()
        meta = {**write(stage), "build_s": round(time.perf_counter() - t0, 3)}
        if check is not None:
            check(meta)
        _publish(stage, location, meta)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        storage.remove_made_dirs(created)
        if isinstance(e, OSError):  # a full disk, a quota, a read-only mount: one line, not a traceback
            raise StoreWriteError(f"{location}: cannot build the token store: {e.strerror or e}; nothing was kept "
                                  "(the partial build is removed)") from None
        raise
    return location


def _publish(stage: str, location: str, meta: dict) -> None:
    if storage.is_remote(location):
        for name in sorted(os.listdir(stage)):
            storage.upload(os.path.join(stage, name), storage.join(location, name))
        storage.write_json(storage.join(location, META), meta)  # last: the store is complete
        shutil.rmtree(stage, ignore_errors=True)
        return
    with open(os.path.join(stage, META), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.chmod(stage, 0o755)  # mkdtemp's 0700 would keep the store from other users of a shared path
    if os.path.exists(location) and not is_complete(location):  # not ours: a rename never leaves one
        shutil.rmtree(location)
    try:
        os.rename(stage, location)
    except OSError:  # another process published the same store first
        if not is_complete(location):
            raise
        shutil.rmtree(stage, ignore_errors=True)


class TokenStore:
    """A complete store, opened: its `meta`, and its arrays as `Mapped` views.

    Pickles as its location, so a dataset that holds it travels without its data; a remote
    store is read from a local copy made once per node (storage.local_path)."""

    def __init__(self, location: str):
        self.location = location
        self.dir = storage.local_path(location)
        with open(os.path.join(self.dir, META)) as f:
            self.meta = json.load(f)

    def __reduce__(self):
        return TokenStore, (self.location,)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def windows(self, seq_len: int) -> Mapped:
        """Language modelling: (N, seq_len) non-overlapping windows of the token stream
        (window i is tokens[i*seq_len:(i+1)*seq_len]; the tail shorter than seq_len is dropped)."""
        return Mapped(self, "tokens.bin", self.meta["dtype"], (self.meta["tokens"] // seq_len, seq_len))

    def pairs(self) -> tuple[Mapped, Mapped]:
        """Custom objective: (N, seq_len) inputs and targets."""
        shape = (self.meta["examples"], self.meta["seq_len"])
        return Mapped(self, "inputs.bin", self.meta["dtype"], shape), Mapped(self, "targets.bin", "int32", shape)


class Mapped:
    """Rows of a store file: `m[rows]` (an index, slice or array of indices) reads them into
    a new array. The file is memory-mapped afresh for every read, as nanoGPT does, so no
    pages of the corpus stay mapped between reads and a reader's RSS does not grow with
    what it has read (the page cache keeps hot pages either way)."""

    def __init__(self, store: TokenStore, name: str, dtype: str, shape: tuple[int, int]):
        self.store, self.name, self.dtype, self.shape = store, name, np.dtype(dtype), shape
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        m = np.memmap(os.path.join(self.store.dir, self.name), dtype=self.dtype, mode="r", shape=self.shape)
        return np.array(m[rows])  # a copy, so the map is dropped here


class BuildProgress:
    """One progress line on stderr for builds that take more than a few seconds: rewritten
    in place on a terminal, a plain line every PROGRESS_EVERY_S otherwise."""

    def __init__(self, label: str, total: float, unit: str):
        self.label, self.total = label, total
        self.unit, self.scale = ("MB", 1e6) if unit == "bytes" else (unit, 1)
        self.t0 = self.last = time.perf_counter()
        self.shown = None  # the amount last shown
        self.tty = sys.stderr.isatty()

    def update(self, done: float, final: bool = False) -> None:
        now = time.perf_counter()
        if now - self.t0 < PROGRESS_AFTER_S or (not final and not self.tty and now - self.last < PROGRESS_EVERY_S):
            return
        self.last, self.shown = now, done
        d, t = done / self.scale, self.total / self.scale
        rate = d / max(now - self.t0, 1e-9)
        line = f"tokenizing {self.label}: {d:,.0f}/{t:,.0f} {self.unit} ({rate:,.1f} {self.unit}/s)"
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)

    def close(self, done: float) -> None:
        """The last line: ends the terminal's line, or says where a long build ended."""
        if (self.tty and self.shown is not None) or (not self.tty and self.shown != done):
            self.update(done, final=True)


# ---------------------------------------------------------------- identity and build

def store_identity(data_cfg: DataConfig, tokenizer) -> dict:
    """What determines a store's ids: the source's bytes (streamed through sha256), the
    tokenizer file's bytes, format and fields, and seq_len for the custom objective."""
    d = data_cfg
    identity = {**open_source(d).identity(),
                "tokenizer": "byte" if isinstance(tokenizer, ByteTokenizer) else file_digest(tokenizer.path)}
    if d.target_field is not None:
        identity.update(target_field=d.target_field, seq_len=d.seq_len)
    return identity


def location(data_cfg: DataConfig, tokenizer, storage_path: str) -> str:
    """Where the store of `data_cfg` lives: `<storage_path>/tokens/<key>`."""
    root = storage.join(storage.storage_dir(storage_path), storage.TOKENS_DIR)
    return storage.join(root, store_key(store_identity(data_cfg, tokenizer)))


def ensure_store(data_cfg: DataConfig, tokenizer, storage_path: str, check=None, parallel: bool = False) -> str:
    """The location of data_cfg's complete store, built first where it is missing (by Ray
    tasks with `parallel`: write_store); `check(meta)` may refuse it (ensure)."""
    where = location(data_cfg, tokenizer, storage_path)

    def checked(meta: dict):
        check_id_width(meta, tokenizer, where)
        if check is not None:
            check(meta)

    return ensure(where, lambda stage: write_store(stage, data_cfg, tokenizer, parallel), check=checked)


def check_id_width(meta: dict, tokenizer, location: str) -> None:
    """A store whose ids are narrower than the tokenizer's largest id (built before sparse
    ids were counted) holds wrapped ids: refused, never trained on."""
    if np.dtype(meta["dtype"]).itemsize < id_dtype(tokenizer.vocab_size).itemsize:
        raise ValueError(f"{location}: holds ids as {meta['dtype']}, too narrow for the tokenizer's ids up to "
                         f"{tokenizer.vocab_size - 1:,}; remove that directory to rebuild it")


class Part(NamedTuple):
    """What a unit (or one batch of it) adds to the store: `ids` (language modelling: the
    stream, eos between its documents) or `inputs`/`targets` (custom objective), its
    `documents` or examples, and `done`: how much of the unit is read."""
    ids: np.ndarray | None
    inputs: np.ndarray | None
    targets: np.ndarray | None
    documents: int
    done: int


def unit_parts(unit, d: DataConfig, tokenizer, dtype: np.dtype):
    """The Parts of one unit, a batch at a time (eos between its documents; the eos before
    its first document, if another unit's came first, is the writer's)."""
    name = unit if isinstance(unit, str) else unit.shard.path
    if not isinstance(unit, str) and unit.start:
        name = f"{name} (after byte {unit.start:,})" if unit.shard.format in ("text", "jsonl") else name
    documents = 0
    for batch in read_unit(unit):
        if d.target_field is None:
            ids = _encode(tokenizer.encode_joined, batch.texts, name)
            if documents and not batch.continues:
                ids = np.concatenate([[tokenizer.eos_id], ids])  # between documents
            n = len(batch.texts) - batch.continues
            documents += n
            yield Part(_stored_ids(ids, dtype, name), None, None, n, batch.done)
        else:
            inputs, targets = _paired_examples(tokenizer, batch, d.seq_len, name, documents)
            documents += len(inputs)
            yield Part(None, _stored_ids(inputs, dtype, name), targets, len(inputs), batch.done)


def _local_parts(units, d: DataConfig, tokenizer, dtype):
    """(unit index, Part) for every batch of every unit, tokenized here."""
    for i, unit in enumerate(units):
        for part in unit_parts(unit, d, tokenizer, dtype):
            yield i, part


@functools.lru_cache(maxsize=4)
def _task_tokenizer(spec: str):
    from .tokenizer import load_tokenizer

    return load_tokenizer(spec)


def tokenize_unit(unit, d: DataConfig, dtype_name: str) -> Part:
    """One unit's Parts joined into one (what a Ray task of a parallel build returns)."""
    # a task holds one CPU: the tokenizers library's own threads would contend with the other tasks
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parts = list(unit_parts(unit, d, _task_tokenizer(d.tokenizer), np.dtype(dtype_name)))
    if not parts:
        return Part(np.zeros(0, dtype_name) if d.target_field is None else None, None, None, 0, 0)
    if d.target_field is None:
        return Part(np.concatenate([p.ids for p in parts]), None, None, sum(p.documents for p in parts), parts[-1].done)
    return Part(None, np.concatenate([p.inputs for p in parts]), np.concatenate([p.targets for p in parts]),
                sum(p.documents for p in parts), parts[-1].done)


def _parallel_parts(units, d: DataConfig, dtype):
    """(unit index, Part) for every unit, tokenized by Ray tasks (one CPU each, at most
    two per CPU of the cluster in flight) and yielded in order. A task's data error is
    raised here as the same one line; the tasks still running are cancelled."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(tokenize_unit)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    d_ref = ray.put(d)
    pending, submitted = [], 0
    try:
        for i in range(len(units)):
            while submitted < len(units) and submitted < i + window:
                pending.append(task.remote(units[submitted], d_ref, dtype.name))
                submitted += 1
            ref = pending.pop(0)
            try:
                part = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, ValueError):
                    raise ValueError(str(cause)) from None
                raise
            yield i, part
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def write_store(stage: str, d: DataConfig, tokenizer, parallel: bool = False) -> dict:
    """Tokenize data.source into the directory `stage`, unit by unit; returns the meta.

    `parallel`: the units are tokenized by Ray tasks of the Ray this process is connected
    to (where the source has more than one unit), else here, a batch at a time. Both
    write the same bytes: the units' Parts in order, eos between documents."""
    dtype, source = id_dtype(tokenizer.vocab_size), open_source(d)
    units = source.units()
    parallel = parallel and len(units) > 1
    sizes = [1 if isinstance(u, str) else u.size for u in units]
    progress = BuildProgress(source.label, sum(sizes), "topics" if source.format == "pydoc" else "bytes")
    parts = _parallel_parts(units, d, dtype) if parallel else _local_parts(units, d, tokenizer, dtype)
    before = np.concatenate([[0], np.cumsum(sizes)]).tolist()  # bytes of the units before each one
    done, current = 0, -1
    try:
        if d.target_field is None:
            meta = {"kind": "stream", "tokens": 0, "documents": 0}
            with open(os.path.join(stage, "tokens.bin"), "wb") as f:
                for i, part in parts:
                    if i != current:  # a unit's first part: an eos if documents came before
                        current = i
                        if meta["documents"] and part.documents:
                            f.write(np.array([tokenizer.eos_id], dtype=dtype).data)
                            meta["tokens"] += 1
                    f.write(part.ids.data)
                    meta["tokens"] += len(part.ids)
                    meta["documents"] += part.documents
                    progress.update(done := before[i] + part.done)
        else:
            meta = {"kind": "pairs", "examples": 0, "seq_len": d.seq_len}
            with open(os.path.join(stage, "inputs.bin"), "wb") as fi, open(os.path.join(stage, "targets.bin"), "wb") as ft:
                for i, part in parts:
                    fi.write(part.inputs.data)
                    ft.write(part.targets.data)
                    meta["examples"] += len(part.inputs)
                    progress.update(done := before[i] + part.done)
    finally:
        progress.close(done)
    return {**meta, "dtype": dtype.name, "source": d.source, "tokenizer": d.tokenizer, "vocab_size": tokenizer.vocab_size,
            "source_bytes": sum(sizes), "units": len(units)}


def _stored_ids(ids, dtype: np.dtype, source: str) -> np.ndarray:
    """`ids` as the store's dtype; an id that does not fit is refused (numpy would wrap it:
    70,000 stored as 4,464 in uint16)."""
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) > np.iinfo(dtype).max:
        raise ValueError(f"{source}: the tokenizer gave id {int(ids.max()):,}, more than the token store's {dtype.name} "
                         "holds (the tokenizer's vocabulary does not list it)")
    return np.ascontiguousarray(ids, dtype=dtype)


def _encode(fn, texts: list[str], source: str):
    try:
        return fn(texts)
    except UnicodeEncodeError:  # a JSON "\ud800" escape decodes to a lone surrogate
        raise ValueError(f"{source}: a text holds an unpaired surrogate (\\ud800-\\udfff): not valid Unicode") from None


def _paired_examples(tokenizer, batch: Batch, T: int, source: str, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (B, T) of a batch of records, truncated or padded to T."""
    xs = _encode(tokenizer.encode_batch, batch.texts, source)
    strings = [t for t in batch.targets if isinstance(t, str)]
    encoded = iter(_encode(tokenizer.encode_batch, strings, source)) if strings else iter(())
    inputs = np.full((len(xs), T), tokenizer.pad_id, dtype=np.int64)
    targets = np.full((len(xs), T), IGNORE_INDEX, dtype=np.int32)
    for i, (x, y) in enumerate(zip(xs, batch.targets)):
        y = (next(encoded) if isinstance(y, str) else y)[:T]
        bad = [t for t in y if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ValueError(f"{source}: record {first + i}: target id {bad[0]} outside the vocabulary [0, {tokenizer.vocab_size})")
        x = x[:T]
        inputs[i, : len(x)] = x
        targets[i, : len(y)] = y
    return inputs, targets
