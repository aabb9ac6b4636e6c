"""Datasets and splits: a token store's examples as fixed-length rows with global ids,
and the seeded train/validation split.

Language modelling: example i is window i of the store's token stream; custom objective:
example i is record i. Every example keeps its global id, unique across the train and
validation sets, so cached activations can be keyed by it. A dataset over a store reads
rows from its memory map on demand and holds only its example ids.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from . import token_store
from .tokenizer import load_tokenizer

if TYPE_CHECKING:
    from ..config import DataConfig, StackWiseConfig


def token_store_location(config: StackWiseConfig, tokenizer=None, for_training: bool = False,
                         parallel: bool = False) -> str:
    """The token store of config.data (`<ray.storage_path>/tokens/<key>`), built first
    where it is missing (by Ray tasks on every CPU with `parallel`, this process being
    connected to Ray; the same bytes as a build here). A data error (one line naming the file) leaves nothing there;
    `for_training` also refuses a batch larger than the training split before a new store
    is published (a refused run writes nothing)."""
    d = config.data
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(d.tokenizer)

    def check(meta: dict) -> int:
        n = _example_count(meta, d)
        n_train = n - validation_size(n, d.val_fraction)
        if for_training and d.batch_size > n_train:
            raise ValueError(f"data.batch_size: must be <= the {n_train:,} training examples, got {d.batch_size:,}")
        return n

    return token_store.ensure_store(d, tokenizer, config.ray.storage_path, check=check, parallel=parallel)


def _example_count(meta: dict, d: DataConfig) -> int:
    n = meta["tokens"] // d.seq_len if meta["kind"] == "stream" else meta["examples"]
    if d.max_examples is not None:
        n = min(n, d.max_examples)
    if n < 2:
        raise ValueError(f"data.source {d.source}: too small for seq_len {d.seq_len}: {n} example(s), need at least 2")
    return n



class _Rows:
    """Rows of an (M, T) array seen through positions: `view[i]`, `view[a:b]` and
    `view[positions]` read just those rows (of a memory map too) as a LongTensor."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.array.shape[1]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        return torch.from_numpy(np.asarray(self.array[self.rows[key]], dtype=np.int64))


class TokenDataset(Dataset):
    """Fixed-length examples with global ids.

    Args:
        input_ids: (M, T) token ids: a tensor, a numpy array or a token store's
            token_store.Mapped rows (read on demand).
        example_ids: LongTensor (N,), unique across train and validation.
        targets: optional (M, T), like input_ids; IGNORE_INDEX marks positions without a target.
        rows: (N,) positions of the examples in input_ids/targets; default 0..N-1.

    `input_ids[positions]` and `targets[positions]` read the examples at those positions
    (LongTensor (B, T)). A dataset over a token store (`from_store`) holds only its example
    ids in memory, and pickles without the store's data.
    """

    def __init__(self, input_ids, example_ids, targets=None, rows=None):
        self.example_ids = torch.as_tensor(example_ids, dtype=torch.long)
        self._inputs, self._targets = _as_array(input_ids), _as_array(targets)
        self._rows = np.arange(len(self.example_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
        assert self._inputs.ndim == 2 and self.example_ids.dim() == 1 and len(self._rows) == len(self.example_ids)
        assert self._targets is None or self._targets.shape == self._inputs.shape

    @classmethod
    def from_store(cls, store: token_store.TokenStore, seq_len: int, example_ids: torch.Tensor) -> "TokenDataset":
        """The examples `example_ids` of a token store (an example's id is its window or record index)."""
        inputs, targets = (store.windows(seq_len), None) if store.kind == "stream" else store.pairs()
        ds = cls(inputs, example_ids, targets)
        ds._rows = None  # the rows are the example ids: not kept twice
        return ds

    @property
    def input_ids(self) -> _Rows:
        return _Rows(self._inputs, self._positions())

    @property
    def targets(self) -> _Rows | None:
        return None if self._targets is None else _Rows(self._targets, self._positions())

    def _positions(self) -> np.ndarray:
        return self.example_ids.numpy() if self._rows is None else self._rows

    def subset(self, positions: torch.Tensor) -> "TokenDataset":
        """The examples at `positions` of this dataset, sharing its arrays."""
        out = copy.copy(self)
        out.example_ids = self.example_ids[positions]
        out._rows = None if self._rows is None else self._rows[positions.numpy()]
        return out

    def __len__(self) -> int:
        return len(self.example_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "example_id": int(self.example_ids[i])}
        if self._targets is not None:
            item["targets"] = self.targets[i]
        return item


def _as_array(x):
    if x is None or isinstance(x, (np.ndarray, token_store.Mapped)):
        return x
    return torch.as_tensor(x).numpy()


def build_datasets(config: StackWiseConfig, tokenizer=None):
    """Tokenize data.source into its token store (once: later calls open it) and split it.

    Args:
        config: uses config.data, and ray.storage_path (where the store lives); seq_len is
            the window length T.
        tokenizer: None loads config.data.tokenizer.

    Returns:
        (train_ds, val_ds, tokenizer), datasets over the store's memory map. The split is a
        permutation seeded by data.split_seed (not the training seed): its first
        max(1, round(N*val_fraction)) ids, at most N-1, are validation. Each set is ordered
        by example id.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.data.tokenizer)
    return (*open_datasets(config, token_store_location(config, tokenizer)), tokenizer)


def load_data(config: StackWiseConfig, data_ref):
    """(train, val, tokenizer) in a Ray worker or task: the user's data passed through the
    object store (an object ref), config.data's token store opened at its location (a
    string), or config.data."""
    if data_ref is None:
        return build_datasets(config)
    if isinstance(data_ref, str):
        train_ds, val_ds = open_datasets(config, data_ref)
    else:
        import ray

        train_ds, val_ds = ray.get(data_ref)
    return train_ds, val_ds, load_tokenizer(config.data.tokenizer)


def open_datasets(config: StackWiseConfig, location: str) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) over the complete token store at `location`, split as build_datasets does.

    Language modelling: example i is window i of the token stream, stream[i*T:(i+1)*T]
    (the tail shorter than T is dropped); custom objective: example i is record i. At most
    data.max_examples examples, the first ones."""
    d = config.data
    store = token_store.TokenStore(location)
    train, val = split_positions(_example_count(store.meta, d), d.val_fraction, d.split_seed)
    return TokenDataset.from_store(store, d.seq_len, train), TokenDataset.from_store(store, d.seq_len, val)


def validation_size(n: int, val_fraction: float) -> int:
    return min(max(1, round(n * val_fraction)), n - 1)


def split_dataset(ds: TokenDataset, val_fraction: float, split_seed: int) -> tuple[TokenDataset, TokenDataset]:
    """Seeded permutation split: the first max(1, round(N*val_fraction)) rows, at most
    N-1, are validation. Each part keeps the global example ids, ordered by id."""
    train, val = split_positions(len(ds), val_fraction, split_seed)
    return ds.subset(train), ds.subset(val)


def split_positions(n: int, val_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) positions of `n` examples, each ascending: the first
    max(1, round(n*val_fraction)) of a permutation seeded by `split_seed`, at most n-1, are
    validation. Memory: the permutation, one byte and the training positions per example."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val = perm[:validation_size(n, val_fraction)].sort().values
    del perm
    keep = np.ones(n, dtype=bool)
    keep[val.numpy()] = False
    return torch.from_numpy(np.flatnonzero(keep)), val


def dataset_from_user(data, config: StackWiseConfig) -> tuple[TokenDataset, TokenDataset]:
    """A user's Dataset or DataLoader (items with `input_ids`, optional `example_id` and
    `targets`) as train/validation TokenDatasets, split like the configured data."""
    ds = getattr(data, "dataset", data)
    if isinstance(ds, TokenDataset):
        return split_dataset(ds, config.data.val_fraction, config.data.split_seed)
    items = [ds[i] for i in range(len(ds))]
    if len(items) < 2 or not all(isinstance(it, dict) and "input_ids" in it for it in items):
        raise ValueError("dataloader: expected at least 2 items, each a dict with 'input_ids'")
    ids = torch.tensor([int(it.get("example_id", i)) for i, it in enumerate(items)])
    targets = torch.stack([torch.as_tensor(it["targets"]) for it in items]) if "targets" in items[0] else None
    inputs = torch.stack([torch.as_tensor(it["input_ids"]) for it in items]).long()
    return split_dataset(TokenDataset(inputs, ids, targets), config.data.val_fraction, config.data.split_seed)

