"""Text in, fixed-length token windows out: tokenizers, record loading, datasets, loaders.

Two example shapes:
- language modelling (no data.target_field): every record is tokenized, the token
  streams are joined with eos between documents, and the stream is cut into
  non-overlapping windows of seq_len tokens.
- custom objective (data.target_field set): one example per record, input and
  target each truncated or padded to seq_len (targets pad with IGNORE_INDEX).

Every example keeps a global id (its window or record index), unique across the
train and validation sets, so cached activations can be keyed by it.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig, StackWiseConfig

IGNORE_INDEX = -100  # cross_entropy's default ignore_index


# ---------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, four special ids above them; needs no files."""

    pad_id = 256
    mask_id = 257
    bos_id = 258
    eos_id = 259
    vocab_size = 260
    special_ids = frozenset({256, 257, 258, 259})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# spellings tried in order; the first one in the vocabulary wins
_PAD = ("[PAD]", "<pad>", "<|pad|>", "<PAD>", "<|padding|>")
_MASK = ("[MASK]", "<mask>", "<|mask|>", "<MASK>")
_BOS = ("[CLS]", "<s>", "[BOS]", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|bos|>", "<BOS>")
_EOS = ("[SEP]", "</s>", "[EOS]", "<eos>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "<EOS>")


class HFTokenizer:
    """A `tokenizers` JSON file with the ByteTokenizer interface.

    Args:
        path: a tokenizer.json saved by the `tokenizers` library. It must contain a pad
            and a mask token (masked-token training needs both); bos/eos fall back to pad.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer  # optional dependency, only needed here

        path = os.fspath(path)
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path}: cannot load tokenizer: {first_line}") from None
        self.path = path

        def find(spellings):
            for s in spellings:
                i = self._tok.token_to_id(s)
                if i is not None:
                    return i
            return None

        self.pad_id, self.mask_id = find(_PAD), find(_MASK)
        for name, found, spellings in (("pad", self.pad_id, _PAD), ("mask", self.mask_id, _MASK)):
            if found is None:
                raise ValueError(f"{path}: tokenizer has no {name} token (looked for {', '.join(spellings)})")
        bos, eos = find(_BOS), find(_EOS)
        self.bos_id = bos if bos is not None else self.pad_id
        self.eos_id = eos if eos is not None else self.pad_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset({self.pad_id, self.mask_id, self.bos_id, self.eos_id})

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # our special ids need not be flagged special in the file, so drop them here
        return self._tok.decode([int(i) for i in ids if int(i) not in self.special_ids], skip_special_tokens=True)


def load_tokenizer(spec: str):
    """"byte" -> ByteTokenizer(); anything else is a path to a tokenizers JSON file."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


# ---------------------------------------------------------------- records

_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def load_records(data_cfg: DataConfig) -> list[dict]:
    """Read data.source into records.

    Args:
        data_cfg: `source` is "pydoc" (the topic texts that ship with Python, in sorted key
            order) or a file path. Text files give one record per paragraph (blocks separated
            by blank lines), so documents keep their boundaries; JSONL and Parquet give one
            record per line/row, text read from `text_field`.

    Returns:
        [{"text": str}] or, when `target_field` is set, [{"text": str, "target": str | list[int]}].

    Raises:
        ValueError: one line naming the file and the problem.
    """
    src, want_target = data_cfg.source, data_cfg.target_field is not None
    if src == "pydoc":
        if want_target:
            raise ValueError(f"pydoc: the bundled corpus has no targets; data.target_field {data_cfg.target_field!r} needs a JSONL or Parquet file")
        from pydoc_data.topics import topics
        return [{"text": topics[k]} for k in sorted(topics)]

    fmt = data_cfg.format
    if fmt == "auto":
        ext = os.path.splitext(src)[1].lower()
        if ext not in _EXTENSIONS:
            raise ValueError(f"{src}: unknown extension {ext or '(none)'!r}; expected .txt, .jsonl or .parquet (or set data.format)")
        fmt = _EXTENSIONS[ext]
    if fmt == "parquet":
        records = _parquet_records(src, data_cfg.text_field, data_cfg.target_field)
    else:
        try:
            with open(src, encoding="utf-8") as f:
                content = f.read()
        except OSError as e:
            raise ValueError(f"{src}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{src}: not valid UTF-8 (byte {e.start})") from None
        if not content.strip():
            raise ValueError(f"{src}: empty file")
        if fmt == "text":
            if want_target:
                raise ValueError(f"{src}: a text file has no fields, so no target {data_cfg.target_field!r}; use JSONL or Parquet")
            records = [{"text": b.strip("\n")} for b in re.split(r"\n(?:[ \t]*\n)+", content) if b.strip()]
        else:
            records = _jsonl_records(src, content, data_cfg.text_field, data_cfg.target_field)
    if not any(r["text"] for r in records):
        raise ValueError(f"{src}: no text in field {data_cfg.text_field!r}")
    return records


def _jsonl_records(src, content, text_field, target_field):
    records = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}: line {n}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{src}: line {n}: expected a JSON object, got {type(obj).__name__}")
        records.append(_record(obj, text_field, target_field, f"{src}: line {n}"))
    return records


def _parquet_records(src, text_field, target_field):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(src)
    except OSError as e:
        raise ValueError(f"{src}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # pyarrow reports a bad file as ArrowInvalid
        raise ValueError(f"{src}: not a readable Parquet file: {(str(e).splitlines() or [''])[0]}") from None
    if table.num_rows == 0:
        raise ValueError(f"{src}: empty file")
    for name in (text_field, target_field):
        if name is not None and name not in table.column_names:
            raise ValueError(f"{src}: missing column {name!r} (columns: {', '.join(table.column_names)})")
    texts = table.column(text_field).to_pylist()
    targets = table.column(target_field).to_pylist() if target_field else [None] * len(texts)
    out = []
    for n, (text, target) in enumerate(zip(texts, targets)):
        obj = {text_field: text} if target_field is None else {text_field: text, target_field: target}
        out.append(_record(obj, text_field, target_field, f"{src}: row {n}"))
    return out


def _record(obj: dict, text_field, target_field, where) -> dict:
    if text_field not in obj:
        raise ValueError(f"{where}: missing field {text_field!r}")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    if target_field is None:
        return {"text": text}
    if target_field not in obj:
        raise ValueError(f"{where}: missing field {target_field!r}")
    target = obj[target_field]
    ok = isinstance(target, str) or (isinstance(target, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in target))
    if not ok:
        raise ValueError(f"{where}: field {target_field!r} must be a string or a list of token ids, got {type(target).__name__}")
    return {"text": text, "target": target}


# ---------------------------------------------------------------- datasets

class TokenDataset(Dataset):
    """Fixed-length examples with global ids.

    Args:
        input_ids: LongTensor (N, T).
        example_ids: LongTensor (N,), unique across train and validation.
        targets: optional LongTensor (N, T); IGNORE_INDEX marks positions without a target.
    """

    def __init__(self, input_ids: torch.Tensor, example_ids: torch.Tensor, targets: torch.Tensor | None = None):
        assert input_ids.dim() == 2 and example_ids.shape == input_ids.shape[:1]
        assert targets is None or targets.shape == input_ids.shape
        self.input_ids, self.example_ids, self.targets = input_ids, example_ids, targets

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "example_id": int(self.example_ids[i])}
        if self.targets is not None:
            item["targets"] = self.targets[i]
        return item


def build_datasets(config: StackWiseConfig, tokenizer=None):
    """Load, tokenize and split data.source.

    Args:
        config: uses config.data only; seq_len is the window length T.
        tokenizer: None loads config.data.tokenizer.

    Returns:
        (train_ds, val_ds, tokenizer). The split is a permutation seeded by
        data.split_seed (not the training seed): its first max(1, round(N*val_fraction))
        ids, at most N-1, are validation. Each set is ordered by example id.
    """
    d = config.data
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(d.tokenizer)
    records = load_records(d)
    T = d.seq_len
    if d.target_field is None:
        stream = _token_stream(tokenizer, [r["text"] for r in records])
        n = len(stream) // T
        if d.max_examples is not None:
            n = min(n, d.max_examples)
        inputs, targets = stream[: n * T].view(n, T), None
    else:
        if d.max_examples is not None:
            records = records[: d.max_examples]
        inputs, targets = _paired_examples(tokenizer, records, T, d.source)
        n = len(records)
    if n < 2:
        raise ValueError(f"data.source {d.source}: too small for seq_len {T}: {n} example(s), need at least 2")
    return (*split_dataset(TokenDataset(inputs, torch.arange(n), targets), d.val_fraction, d.split_seed), tokenizer)


def split_dataset(ds: TokenDataset, val_fraction: float, split_seed: int) -> tuple[TokenDataset, TokenDataset]:
    """Seeded permutation split: the first max(1, round(N*val_fraction)) rows, at most
    N-1, are validation. Each part keeps the global example ids, ordered by id."""
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = min(max(1, round(n * val_fraction)), n - 1)

    def subset(rows):
        rows = rows.sort().values
        return TokenDataset(ds.input_ids[rows], ds.example_ids[rows], None if ds.targets is None else ds.targets[rows])

    return subset(perm[n_val:]), subset(perm[:n_val])


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


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and joined with eos between documents, as a LongTensor."""
    if isinstance(tokenizer, ByteTokenizer):
        # bulk path: one bytes buffer, eos slots left in place between documents
        parts = [t.encode("utf-8") for t in texts]
        if not parts:
            return torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in parts])
        total = int(lengths.sum()) + len(parts) - 1
        out = torch.full((total,), tokenizer.eos_id, dtype=torch.long)
        if total > 0:
            keep = torch.ones(total, dtype=torch.bool)
            keep[(lengths + 1).cumsum(0)[:-1] - 1] = False
            buf = b"".join(parts)
            if buf:
                out[keep] = torch.frombuffer(bytearray(buf), dtype=torch.uint8).long()
        return out
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i:
            stream.append(tokenizer.eos_id)
        stream.extend(tokenizer.encode(text))
    return torch.tensor(stream, dtype=torch.long)


def _paired_examples(tokenizer, records, T, source):
    inputs = torch.full((len(records), T), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(records), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(records):
        x = tokenizer.encode(r["text"])[:T]
        y = r["target"] if isinstance(r["target"], list) else tokenizer.encode(r["target"])
        y = y[:T]
        bad = [t for t in y if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ValueError(f"{source}: record {i}: target id {bad[0]} outside the vocabulary [0, {tokenizer.vocab_size})")
        if x:
            inputs[i, : len(x)] = torch.tensor(x)
        if y:
            targets[i, : len(y)] = torch.tensor(y)
    return inputs, targets


# ---------------------------------------------------------------- loading

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

    def __iter__(self):
        n, B = len(self.ds), self.batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
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
