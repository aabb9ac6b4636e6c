"""Activation caches between phases: the Ray object store or Arrow/Parquet files.

A cache holds, per training example (keyed by example id), the corrupted input ids and
the residual stream entering one rack position. In append mode with a frozen trunk it is
the trunk's output (built once per phase, incrementally: only the newest trunk stack
runs over the previous cache); with a QLoRA trunk it is the trunk's input (the
embedding output), and the adapted trunk is streamed. Corruption is keyed by example id
(masking.py), so a cache stays valid from phase to phase; `lookup` checks that.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .checkpoint import sha256_file
from .config import StackWiseConfig
from .data import ProgressiveDataLoader, TokenDataset


class StaleCacheError(RuntimeError):
    pass


class ActivationCache:
    """Rows sorted by example id: `input_ids` (N, T) as corrupted, `hidden` (N, T, C) float32."""

    def __init__(self, example_ids: np.ndarray, input_ids: np.ndarray, hidden: np.ndarray):
        if len(example_ids) > 1 and not (np.diff(example_ids) > 0).all():  # else keep the (zero-copy) arrays
            order = np.argsort(example_ids, kind="stable")
            example_ids, input_ids, hidden = example_ids[order], input_ids[order], hidden[order]
        self.example_ids, self.input_ids, self.hidden = example_ids, input_ids, hidden

    @property
    def nbytes(self) -> int:
        return self.example_ids.nbytes + self.input_ids.nbytes + self.hidden.nbytes

    def __len__(self) -> int:
        return len(self.example_ids)

    def lookup(self, example_ids: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = example_ids.numpy()
        rows = np.searchsorted(self.example_ids, ids)
        if (rows >= len(self)).any() or (self.example_ids[np.minimum(rows, len(self) - 1)] != ids).any():
            raise StaleCacheError("activation cache has no row for some example ids of this batch")
        if input_ids is not None and not np.array_equal(self.input_ids[rows], input_ids.numpy()):
            raise StaleCacheError("activation cache was built from other corrupted inputs than this phase uses")
        return torch.from_numpy(self.hidden[rows])

    def arrays(self) -> dict:
        return {"example_ids": self.example_ids, "input_ids": self.input_ids, "hidden": self.hidden}


@torch.no_grad()
def compute_cache(rack, ds: TokenDataset, masking, stack_id: int, start: int, end: int,
                  prev: ActivationCache | None = None, batch_size: int = 64, on_rows=None) -> ActivationCache:
    """The residual stream entering rack position `end` for every example of `ds`.

    With `prev` (the stream entering `start`), only positions [start, end) run; without
    it, the embedding and positions [0, end) run. `on_rows(done, total)` is called after
    every batch (progress).
    """
    if prev is None and start != 0:
        raise ValueError("a cache built from scratch starts at rack position 0")
    rack.eval()
    ids, inputs, hidden = [], [], []
    for batch in ProgressiveDataLoader(in_order(ds, batch_size), masking, stack_id, prev, prev is not None):
        x = batch["input_ids"]
        h = batch["trunk_activations"] if prev is not None else rack.embed_tokens(x)
        h = rack.run_stacks(h, x, batch["time_step"], start=start, end=end)
        ids.append(batch["example_ids"].numpy())
        inputs.append(x.numpy().astype(np.int32))
        hidden.append(h.float().numpy())
        if on_rows is not None:
            on_rows(sum(len(i) for i in ids), len(ds))
    return ActivationCache(np.concatenate(ids), np.concatenate(inputs), np.concatenate(hidden))


def in_order(ds: TokenDataset, batch_size: int):
    for i in range(0, len(ds), batch_size):
        batch = {"input_ids": ds.input_ids[i:i + batch_size], "example_ids": ds.example_ids[i:i + batch_size]}
        if ds.targets is not None:
            batch["targets"] = ds.targets[i:i + batch_size]
        yield batch


# ---------------------------------------------------------------- Arrow / Parquet backend

def write_parquet(cache: ActivationCache, location: str) -> None:
    """One Parquet file at `location` (a path or a storage URI), written locally under a
    temporary name, then renamed or uploaded into place; its checksum file comes last."""
    n, T, C = cache.hidden.shape
    table = pa.table({
        "example_id": pa.array(cache.example_ids.astype(np.int64)),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(cache.input_ids.reshape(-1)), T),
        "hidden": pa.FixedSizeListArray.from_arrays(pa.array(cache.hidden.reshape(-1)), T * C),
    })
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


def read_parquet(location: str, d_model: int) -> ActivationCache:
    """A cache file, memory-mapped (from its local copy where `location` is remote)."""
    return from_arrow(pq.read_table(storage.local_path(location), memory_map=True), d_model)


def parquet_intact(location: str) -> bool:
    """The cache file exists, was completely written, and is unaltered."""
    try:
        return sha256_file(storage.local_path(location)) == storage.read_text(storage.suffixed(location, ".sha256")).strip()
    except OSError:  # FileNotFoundError included
        return False


def from_arrow(table: pa.Table, d_model: int) -> ActivationCache:
    n = table.num_rows
    input_ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(n, -1)
    T = input_ids.shape[1]
    hidden = table.column("hidden").combine_chunks().flatten().to_numpy().reshape(n, T, d_model)
    return ActivationCache(table.column("example_id").to_numpy(), input_ids, hidden)


# ---------------------------------------------------------------- which cache a phase uses

@dataclass
class CachePlan:
    """What phase `stack_id` reads from a cache: the stream entering rack position `position`."""
    kind: str  # "trunk_outputs" | "trunk_inputs" | "none"
    position: int
    reason: str


def cache_bytes(rows: int, seq_len: int, d_model: int) -> int:
    """Size of a cache of `rows` examples (ids, corrupted inputs, float32 activations)."""
    return rows * (8 + 4 * seq_len + 4 * seq_len * d_model)


def plan_cache(config: StackWiseConfig, stack_id: int) -> CachePlan:
    p = config.training.progressive
    if stack_id == 0:
        return CachePlan("none", 0, "no trunk yet")
    if not p.cache_activations:
        return CachePlan("none", 0, "cache_activations is false: the trunk is recomputed every step")
    if p.building_mode == "prepend":
        return CachePlan("none", 0, "prepend: the trunk runs after the new stack, so nothing before it can be cached")
    if p.trunk_strategy == "qlora":
        return CachePlan("trunk_inputs", 0, "qlora trunk: its inputs are cached and streamed through the adapted trunk")
    return CachePlan("trunk_outputs", stack_id, "frozen trunk: its outputs are cached; the phase runs no trunk forward")
