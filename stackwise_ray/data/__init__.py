"""Text in, fixed-length token windows out, by floors that data.source goes down in order:

- `formats.py`: the source formats, named once (config.py's `data.format` choices too);
- `tokenizer.py`: the byte tokenizer and `tokenizers` JSON files;
- `sources.py`: one reader per format behind one dispatch (`open_source`), records
  streamed as Batches, never held whole;
- `token_store.py`: the corpus tokenized once into a content-addressed store on disk: its
  identity and key, its build, opening it as memory maps;
- `dataset.py`: the store's examples with global ids (`TokenDataset`), the seeded
  train/validation split, `token_store_location(config)`;
- `loader.py`: seeded loaders, `GlobalBatches`, `ProgressiveDataLoader`.

Two example shapes:
- language modelling (no data.target_field): every record is tokenized, the token
  streams are joined with eos between documents, and the stream is cut into
  non-overlapping windows of seq_len tokens.
- custom objective (data.target_field set): one example per record, input and
  target each truncated or padded to seq_len (targets pad with IGNORE_INDEX).

The public names below are imported on first use, so config.py can read `formats.py`
before torch loads.
"""

_EXPORTS = {
    "IGNORE_INDEX": "tokenizer", "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "Batch": "sources", "iter_batches": "sources", "load_records": "sources", "open_source": "sources",
    "source_format": "sources",
    "TokenStore": "token_store", "store_identity": "token_store",
    "TokenDataset": "dataset", "build_datasets": "dataset", "open_datasets": "dataset", "load_data": "dataset",
    "token_store_location": "dataset", "split_dataset": "dataset", "split_positions": "dataset",
    "validation_size": "dataset", "dataset_from_user": "dataset",
    "collate": "loader", "make_dataloader": "loader", "GlobalBatches": "loader", "ProgressiveDataLoader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stackwise_ray.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
