"""Loaders: batches of a dataset in an order that depends only on a seed, the global
batches every worker and the cache builder agree on, and the ProgressiveDataLoader that
corrupts them for a phase (masks, targets, time step, cached trunk activations)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .dataset import TokenDataset


def collate(items: list[dict]) -> dict:
    """Stack TokenDataset items: input_ids (B, T), example_ids (B,), targets (B, T) if present."""
    batch = {
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "example_ids": torch.tensor([it["example_id"] for it in items], dtype=torch.long),
    }
    if "targets" in items[0]:
        batch["targets"] = torch.stack([it["targets"] for it in items])
    return batch


def make_dataloader(ds: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> DataLoader:
    """A single-process DataLoader whose order depends only on `seed`.

    Two loaders built with the same seed yield the same batches; successive passes
    over one loader continue the generator, so epochs differ from each other.
    """
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      num_workers=0, generator=torch.Generator().manual_seed(seed))


class GlobalBatches:
    """Deterministic global batches of `batch_size` rows, reshuffled each epoch from
    (seed, epoch); worker `rank` of `world` takes rows rank::world of every batch, so any
    number of workers sees the same global batches (a partial last batch is dropped)."""

    def __init__(self, ds: TokenDataset, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        if len(ds) < batch_size:
            raise ValueError(f"data.batch_size {batch_size} is larger than the {len(ds)} examples available")
        self.ds, self.batch_size, self.seed, self.shuffle = ds, batch_size, seed, shuffle
        self.rank, self.world, self.epoch = rank, world, 0

    def __len__(self) -> int:
        return len(self.ds) // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """The positions of epoch `epoch`, in the order its batches read them."""
        n = len(self.ds)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def first_reads(self, steps: int) -> np.ndarray:
        """The positions the first `steps` global batches read, each once, in the order of
        its first read (what a cache for those steps holds, in its row order)."""
        B, per_epoch = self.batch_size, len(self)
        epochs = [self.order(e)[:per_epoch * B] for e in range(-(-steps // per_epoch))]
        reads = torch.cat(epochs)[:steps * B].numpy() if epochs else np.zeros(0, dtype=np.int64)
        _, first = np.unique(reads, return_index=True)
        return reads[np.sort(first)]

    def __iter__(self):
        n, B = len(self.ds), self.batch_size
        order = self.order(self.epoch)
        self.epoch += 1
        for i in range(n // B):
            rows = order[i * B:(i + 1) * B][self.rank::self.world]
            batch = {"input_ids": self.ds.input_ids[rows], "example_ids": self.ds.example_ids[rows]}
            if self.ds.targets is not None:
                batch["targets"] = self.ds.targets[rows]
            yield batch


class ProgressiveDataLoader:
    """Batches for the phase that trains stack `stack_idx`: corrupted inputs, targets,
    masks and time step from the masking strategy, and, when a trunk cache is given and
    `cache_activations` is on, the cached trunk activations of each example.

    Args:
        base_dataloader: yields dicts with `input_ids` (B, T) and `example_ids` (B,).
        masking_strategy: a TimeStepMasking.
        stack_idx: the stack this phase trains.
        trunk_activations: any object with `lookup(example_ids) -> (B, T, C)` tensor.
        cache_activations: attach the cached activations (False: the trunk is recomputed).
    """

    def __init__(self, base_dataloader, masking_strategy, stack_idx: int, trunk_activations=None,
                 cache_activations: bool = False):
        self.base_dataloader = base_dataloader
        self.masking_strategy = masking_strategy
        self.stack_idx = stack_idx
        self.trunk_activations = trunk_activations
        self.cache_activations = cache_activations

    def __len__(self) -> int:
        return len(self.base_dataloader)

    def __iter__(self):
        for batch in self.base_dataloader:
            out = self.masking_strategy.generate_masks_for_stack(batch, self.stack_idx)
            if self.cache_activations and self.trunk_activations is not None:
                out["trunk_activations"] = self.trunk_activations.lookup(out["example_ids"], out["input_ids"])
            yield out
