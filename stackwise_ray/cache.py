"""Activation caches between phases: what they hold, how shards are computed, stored and read.

A cache holds, per training example, the corrupted input ids and the residual stream
entering one rack position. In append mode with a frozen trunk it is the trunk's output
(built incrementally: only the newest trunk stack runs over the previous cache); with a
QLoRA trunk it is the trunk's input (the embedding output), and the adapted trunk is
streamed. Corruption is keyed by example id (masking.py), so a cache stays valid from
phase to phase; `lookup` checks that.

A cache follows the work, not the corpus: it holds the examples a phase reads (its first
`steps` global batches, each example once, in the order of its first read: a
CacheLayout), split into shards of about `ray.cache_shard_mb`. Shards are built one at a
time (ray_cache.py), stored as Ray objects or Parquet files, and read by a ShardReader
that keeps a few of them and loads the next one in the background.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .checkpoint import sha256_file
from .config import StackWiseConfig
from .data.dataset import TokenDataset
from .data.loader import GlobalBatches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORED = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}  # bfloat16: its bits


class StaleCacheError(RuntimeError):
    pass


def encode(h: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations as stored: float32, float16, or the bits of bfloat16 (numpy has no bfloat16)."""
    if dtype == "bfloat16":
        return h.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return h.detach().to(DTYPES[dtype]).cpu().numpy()


def decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored activations as a float32 tensor (the residual stream's dtype)."""
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


class ActivationCache:
    """Rows in layout order: `example_ids` (N,), `input_ids` (N, T) as corrupted,
    `hidden` (N, T, C) stored in `dtype`. One shard, or a whole small cache."""

    def __init__(self, example_ids: np.ndarray, input_ids: np.ndarray, hidden: np.ndarray, dtype: str = "float32"):
        self.example_ids, self.input_ids, self.hidden, self.dtype = example_ids, input_ids, hidden, dtype
        self._order = np.argsort(example_ids, kind="stable")
        self._sorted = example_ids[self._order]

    @property
    def nbytes(self) -> int:
        return self.example_ids.nbytes + self.input_ids.nbytes + self.hidden.nbytes

    def __len__(self) -> int:
        return len(self.example_ids)

    def rows(self, example_ids: np.ndarray) -> np.ndarray:
        k = np.minimum(np.searchsorted(self._sorted, example_ids), max(len(self) - 1, 0))
        if len(self) == 0 or (self._sorted[k] != example_ids).any():
            raise StaleCacheError("activation cache has no row for some example ids of this batch")
        return self._order[k]

    def lookup(self, example_ids: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.rows(example_ids.numpy())
        if input_ids is not None and not np.array_equal(self.input_ids[rows], input_ids.numpy()):
            raise StaleCacheError("activation cache was built from other corrupted inputs than this phase uses")
        return decode(self.hidden[rows], self.dtype)

    def arrays(self) -> dict:
        return {"example_ids": self.example_ids, "input_ids": self.input_ids, "hidden": self.hidden,
                "dtype": self.dtype}


@dataclass(frozen=True)
class CacheLayout:
    """The rows of a cache: training-split `positions` (and their `example_ids`) in the order
    a phase first reads them, in shards of `shard_rows` rows (a multiple of the global
    batch, so a batch of the first epoch lies in one shard). `rereads`: the phase reads
    the examples again in later epochs, in another order (a reader then keeps every shard)."""
    positions: np.ndarray
    example_ids: np.ndarray
    shard_rows: int
    seq_len: int
    d_model: int
    dtype: str
    rereads: bool

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard(self, i: int) -> slice:
        return slice(i * self.shard_rows, min((i + 1) * self.shard_rows, self.rows))

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.rows, self.seq_len, self.d_model, self.dtype)

    @property
    def shard_bytes(self) -> int:
        return cache_bytes(min(self.shard_rows, self.rows), self.seq_len, self.d_model, self.dtype)

    @property
    def key(self) -> str:
        """Which rows, in which shards (not the dtype: an incremental build may change it)."""
        h = hashlib.sha256(self.example_ids.astype(np.int64).tobytes())
        h.update(f"{self.shard_rows}:{self.seq_len}:{self.d_model}".encode())
        return h.hexdigest()[:12]


def cache_bytes(rows: int, seq_len: int, d_model: int, dtype: str = "float32") -> int:
    """Size of a cache of `rows` examples (ids, corrupted inputs, activations in `dtype`)."""
    return rows * (8 + 4 * seq_len + np.dtype(STORED[dtype]).itemsize * seq_len * d_model)


def plan_layout(config: StackWiseConfig, train_ds: TokenDataset, steps: int, dtype: str) -> CacheLayout:
    """The layout of a cache for phases of `steps` steps over `train_ds` (global batches as
    GlobalBatches draws them from the training seed)."""
    B, T, C = config.data.batch_size, config.data.seq_len, config.model.d_model
    batches = GlobalBatches(train_ds, B, config.training.seed)
    positions = batches.first_reads(steps)
    per_row = cache_bytes(1, T, C, "float32")  # the same shards whatever the dtype: incremental builds pair them
    shard_rows = max(B, config.ray.cache_shard_mb * 2**20 // per_row // B * B)
    return CacheLayout(positions, train_ds.example_ids.numpy()[positions], shard_rows, T, C, dtype,
                       rereads=steps > len(batches))


@torch.no_grad()
def compute_shard(rack, ds: TokenDataset, masking, stack_id: int, start: int, end: int, positions: np.ndarray,
                  dtype: str = "float32", prev: ActivationCache | None = None, batch_size: int = 64,
                  device: torch.device | str = "cpu", on_rows: Callable[[int], None] | None = None) -> ActivationCache:
    """The stream entering rack position `end` for the examples at `positions` of `ds`.

    With `prev` (holding the stream entering `start` for those examples), only positions
    [start, end) run; without it, the embedding and positions [0, end) run. Memory: the
    result plus one batch."""
    if prev is None and start != 0:
        raise ValueError("a cache built from scratch starts at rack position 0")
    rack.eval()
    n, T, C = len(positions), ds.input_ids.shape[1], rack.embed.embedding_dim
    example_ids = ds.example_ids.numpy()[positions]
    inputs, hidden = np.empty((n, T), np.int32), np.empty((n, T, C), STORED[dtype])
    for i in range(0, n, batch_size):
        rows = positions[i:i + batch_size]
        batch = {"input_ids": ds.input_ids[rows], "example_ids": ds.example_ids[torch.tensor(rows)]}
        if ds.targets is not None:
            batch["targets"] = ds.targets[rows]
        batch = masking.generate_masks_for_stack(batch, stack_id)
        x = batch["input_ids"]
        h = prev.lookup(batch["example_ids"], x).to(device) if prev is not None else rack.embed_tokens(x.to(device))
        h = rack.run_stacks(h, x.to(device), batch["time_step"].to(device), start=start, end=end)
        inputs[i:i + len(rows)] = x.numpy()
        hidden[i:i + len(rows)] = encode(h, dtype)
        if on_rows is not None:
            on_rows(i + len(rows))
    return ActivationCache(example_ids, inputs, hidden, dtype)


def compute_cache(rack, ds: TokenDataset, masking, stack_id: int, start: int, end: int,
                  prev: ActivationCache | None = None, positions: np.ndarray | None = None,
                  dtype: str = "float32") -> ActivationCache:
    """One in-memory cache over `positions` of `ds` (default: all of it), for runs without Ray."""
    positions = np.arange(len(ds)) if positions is None else positions
    return compute_shard(rack, ds, masking, stack_id, start, end, positions, dtype, prev)


# ---------------------------------------------------------------- reading shards

class ShardReader:
    """`lookup` over a sharded cache, holding at most `resident` shards: the ones a batch
    needs, loaded on demand, and the next shard in row order, loaded in the background.

    Args:
        layout: the cache's layout (its example ids check every shard on load).
        load: shard index -> ActivationCache (a Ray object or a Parquet file).
        resident: shards kept; the layout's shard count when the phase rereads its
            examples in a new order each epoch.
    """

    def __init__(self, layout: CacheLayout, load: Callable[[int], ActivationCache], resident: int = 2):
        self.layout, self._load, self.resident = layout, load, max(1, resident)
        self._order = np.argsort(layout.example_ids, kind="stable")
        self._sorted = layout.example_ids[self._order]
        self._shards: OrderedDict[int, ActivationCache] = OrderedDict()
        self._pending: dict = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cache-prefetch")
        self._lock = threading.Lock()
        self.loads = 0  # shards loaded (a sequential reader loads each once)

    def _checked(self, i: int) -> ActivationCache:
        shard = self._load(i)
        if not np.array_equal(shard.example_ids, self.layout.example_ids[self.layout.shard(i)]):
            raise StaleCacheError(f"activation cache shard {i} holds other examples than this phase reads")
        with self._lock:
            self.loads += 1
        return shard

    def _shard(self, i: int) -> ActivationCache:
        if i in self._shards:
            self._shards.move_to_end(i)
            return self._shards[i]
        pending = self._pending.pop(i, None)
        shard = pending.result() if pending is not None else self._checked(i)
        self._shards[i] = shard
        while len(self._shards) > self.resident:
            self._shards.popitem(last=False)
        return shard

    def _prefetch(self, i: int) -> None:
        if i < self.layout.shards and i not in self._shards and i not in self._pending:
            self._pending[i] = self._pool.submit(self._checked, i)

    def lookup(self, example_ids: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = example_ids.numpy()
        k = np.minimum(np.searchsorted(self._sorted, ids), self.layout.rows - 1)
        if (self._sorted[k] != ids).any():
            raise StaleCacheError("activation cache has no row for some example ids of this batch")
        which = self._order[k] // self.layout.shard_rows
        out = None
        for s in np.unique(which):
            pick = which == s
            part = self._shard(int(s)).lookup(torch.from_numpy(ids[pick]),
                                              None if input_ids is None else input_ids[torch.from_numpy(pick)])
            if out is None:
                out = torch.empty((len(ids), *part.shape[1:]), dtype=part.dtype)
            out[torch.from_numpy(pick)] = part
        self._prefetch(int(which.max()) + 1)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._shards.clear()
        self._pending.clear()


# ---------------------------------------------------------------- Parquet shards

def shard_path(directory: str, i: int) -> str:
    return storage.join(directory, f"shard_{i:05d}.parquet")


def write_shard(cache: ActivationCache, location: str) -> None:
    """One Parquet shard at `location` (a path or a storage URI), written locally under a
    temporary name, then renamed or uploaded into place; its checksum file comes last."""
    n, T, C = cache.hidden.shape
    table = pa.table({
        "example_id": pa.array(cache.example_ids.astype(np.int64)),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(cache.input_ids.reshape(-1)), T),
        "hidden": pa.FixedSizeListArray.from_arrays(pa.array(cache.hidden.reshape(-1)), T * C),
    }).replace_schema_metadata({"dtype": cache.dtype, "d_model": str(C)})
    remote = storage.is_remote(location)
    tmp = os.path.join(tempfile.gettempdir(), f"cache-{os.getpid()}.parquet") if remote else f"{location}.tmp{os.getpid()}"
    if not remote:
        os.makedirs(os.path.dirname(location), exist_ok=True)
    pq.write_table(table, tmp, use_dictionary=False, compression="none")  # dictionary-encoded floats read ~3x slower
    checksum = sha256_file(tmp)
    if remote:
        storage.upload(tmp, location)
        os.remove(tmp)
    else:
        os.replace(tmp, location)
    storage.write_bytes(storage.suffixed(location, ".sha256"), checksum.encode())  # written last: its presence means complete


def read_shard(location: str) -> ActivationCache:
    """A Parquet shard (from its local copy where `location` is remote)."""
    return from_arrow(pq.read_table(storage.local_path(location), memory_map=True))


def shard_intact(location: str) -> bool:
    """The shard exists, was completely written, and is unaltered."""
    try:
        return sha256_file(storage.local_path(location)) == storage.read_text(storage.suffixed(location, ".sha256")).strip()
    except OSError:  # FileNotFoundError included
        return False


def from_arrow(table: pa.Table) -> ActivationCache:
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    dtype, d_model, n = meta.get("dtype", "float32"), int(meta["d_model"]), table.num_rows
    input_ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(n, -1)
    hidden = table.column("hidden").combine_chunks().flatten().to_numpy().reshape(n, input_ids.shape[1], d_model)
    return ActivationCache(table.column("example_id").to_numpy(), input_ids, hidden, dtype)


def write_manifest(directory: str, layout: CacheLayout) -> None:
    """Written after every shard: its presence means the cache in `directory` is complete."""
    storage.write_json(storage.join(directory, "manifest.json"),
                       {"key": layout.key, "dtype": layout.dtype, "rows": layout.rows, "shards": layout.shards,
                        "bytes": layout.nbytes})


def cache_complete(directory: str, layout: CacheLayout) -> bool:
    """A complete cache of this layout and dtype is in `directory` (every shard intact)."""
    try:
        manifest = json.loads(storage.read_text(storage.join(directory, "manifest.json")))
    except (OSError, ValueError):
        return False
    return (manifest.get("key"), manifest.get("dtype")) == (layout.key, layout.dtype) and all(
        shard_intact(shard_path(directory, i)) for i in range(layout.shards))
