"""Text in, fixed-length token windows out: tokenizers, record streams, the token store,
datasets, loaders.

Two example shapes:
- language modelling (no data.target_field): every record is tokenized, the token
  streams are joined with eos between documents, and the stream is cut into
  non-overlapping windows of seq_len tokens.
- custom objective (data.target_field set): one example per record, input and
  target each truncated or padded to seq_len (targets pad with IGNORE_INDEX).

A corpus is tokenized once, streaming, into a token store on disk (token_store.py); the
datasets read examples from its memory map, so no process holds the corpus in memory.
Every example keeps a global id (its window or record index), unique across the
train and validation sets, so cached activations can be keyed by it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import storage, token_store
from .config import DataConfig, StackWiseConfig
from .errors import first_line, show

IGNORE_INDEX = -100  # cross_entropy's default ignore_index
MAX_TARGET_ID = 2**31 - 1  # targets are stored as int32


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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_joined(self, texts: list[str]) -> np.ndarray:
        """Ids of `texts` with eos between them, as uint16 (0xff never occurs in UTF-8, so
        it marks the joins for one vectorised pass)."""
        ids = np.frombuffer(b"\xff".join(t.encode("utf-8") for t in texts), np.uint8).astype(np.uint16)
        ids[ids == 0xFF] = self.eos_id
        return ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (val_bpb): 1, and 0 for the special ids."""
        return np.array([1] * 256 + [0] * 4, dtype=np.int64)


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
        # ids may be sparse (a WordLevel vocabulary with explicit ids, added tokens): the
        # embedding and the token store's id dtype must hold the largest id, not the count
        self.vocab_size = 1 + max([*self._tok.get_vocab(with_added_tokens=True).values(), self.bos_id, self.eos_id])
        self.special_ids = frozenset({self.pad_id, self.mask_id, self.bos_id, self.eos_id})

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_joined(self, texts: list[str]) -> np.ndarray:
        """Ids of `texts` with eos between them (the library encodes the batch in parallel)."""
        ids = self.encode_batch(texts)
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return np.insert(flat, np.cumsum(lengths)[:-1], self.eos_id)

    def decode(self, ids) -> str:
        # our special ids need not be flagged special in the file, so drop them here
        return self._tok.decode([int(i) for i in ids if int(i) not in self.special_ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (val_bpb): a byte-level BPE token's own bytes
        (its characters mapped back through GPT-2's byte alphabet), else the UTF-8 length
        of the token decoded alone; 0 for the special ids."""
        from tokenizers import decoders

        out = np.zeros(self.vocab_size, dtype=np.int64)
        byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        alphabet = {c: b for b, c in _byte_alphabet().items()}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in self.special_ids:
                continue
            if byte_level and all(c in alphabet for c in token):
                out[i] = len(token)  # one character per byte
            else:
                out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(spec: str):
    """"byte" -> ByteTokenizer(); anything else is a path to a tokenizers JSON file."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


# ---------------------------------------------------------------- records, streamed

_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
CHUNK_BYTES = 1 << 20  # what a build reads of a text or JSONL file at a time
LONG_PARAGRAPH = 2 * CHUNK_BYTES  # characters: a longer paragraph is tokenized in pieces cut at line ends
BLANK_LIMIT = 16 * CHUNK_BYTES  # characters of whitespace held before they are kept as a paragraph
PARQUET_ROWS = 1024


class Batch(NamedTuple):
    """Records read from a source, in order.

    texts: the records' texts. targets: their targets (custom objective), else None.
    continues: texts[0] continues the last text of the previous batch (a paragraph longer
        than LONG_PARAGRAPH, cut at a line end; the byte tokenizer's ids are the same).
    done: how much of the source is read (bytes, or rows of a Parquet file).
    """
    texts: list
    targets: list | None
    continues: bool
    done: int


def source_format(data_cfg: DataConfig) -> str:
    """"pydoc", "text", "jsonl" or "parquet"; an unknown extension is an error."""
    if data_cfg.source == "pydoc":
        return "pydoc"
    if data_cfg.format != "auto":
        return data_cfg.format
    ext = os.path.splitext(data_cfg.source)[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"{data_cfg.source}: unknown extension {ext or '(none)'!r}; expected .txt, .jsonl or .parquet (or set data.format)")
    return _EXTENSIONS[ext]


def iter_batches(data_cfg: DataConfig):
    """data.source as a stream of Batches, never held whole.

    `source` is "pydoc" (the topic texts that ship with Python, in sorted key order) or a
    file. Text files give one record per paragraph (blocks separated by blank lines), so
    documents keep their boundaries; JSONL and Parquet give one record per line/row, text
    read from `text_field` and, when `target_field` is set, its target (a string or a list
    of token ids).

    Raises:
        ValueError: one line naming the file and the problem (line or row where it has one).
    """
    src, fmt, target = data_cfg.source, source_format(data_cfg), data_cfg.target_field
    if fmt == "pydoc":
        if target is not None:
            raise ValueError(f"pydoc: the bundled corpus has no targets; data.target_field {target!r} needs a JSONL or Parquet file")
        from pydoc_data.topics import topics
        yield Batch([topics[k] for k in sorted(topics)], None, False, len(topics))
    elif fmt == "text":
        if target is not None:
            raise ValueError(f"{src}: a text file has no fields, so no target {target!r}; use JSONL or Parquet")
        yield from _text_batches(src)
    elif fmt == "jsonl":
        yield from _jsonl_batches(src, data_cfg.text_field, target)
    else:
        yield from _parquet_batches(src, data_cfg.text_field, target)


def source_size(data_cfg: DataConfig) -> tuple[int, str]:
    """(total, unit) of Batch.done for progress: bytes of a file, rows of a Parquet file."""
    fmt = source_format(data_cfg)
    if fmt == "pydoc":
        from pydoc_data.topics import topics
        return len(topics), "topics"
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(data_cfg.source).metadata.num_rows, "rows"
        except Exception:  # an unreadable file: iter_batches says why, in one line
            return 0, "rows"
    return os.path.getsize(data_cfg.source), "bytes"


def _decoded_chunks(src: str):
    """(text, bytes read, last) for each CHUNK_BYTES of the file: UTF-8 checked (the error
    names the byte) and newlines translated as open() does (\\r\\n and \\r become \\n)."""
    try:
        f = open(src, "rb")
    except OSError as e:
        raise ValueError(f"{src}: cannot read: {e.strerror}") from None
    with f:
        pending = b""  # bytes held back for the next chunk
        while True:
            raw = f.read(CHUNK_BYTES)
            last = not raw
            data, pending = pending + raw, b""
            start = f.tell() - len(data)  # file offset of data[0]
            if not last and data.endswith(b"\r"):  # may be the first half of \r\n
                data, pending = data[:-1], b"\r"
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if last or e.reason != "unexpected end of data" or e.end != len(data):
                    raise ValueError(f"{src}: not valid UTF-8 (byte {start + e.start})") from None
                text, pending = data[:e.start].decode("utf-8"), data[e.start:] + pending  # a character cut in two
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            yield text, f.tell() - len(pending), last
            if last:
                return


def _text_batches(src: str):
    """Paragraphs, as `re.split(r"\\n(?:[ \\t]*\\n)+", text)` gives them (each stripped of
    newlines, blank ones dropped), holding only the last, unfinished paragraph across chunks."""
    carry, open_paragraph, any_text = "", False, False  # open: carry continues a paragraph already begun
    for text, done, last in _decoded_chunks(src):
        pieces = _PARAGRAPH_BREAK.split(carry + text)
        if last:
            finished, carry = pieces, ""
        elif len(pieces) > 1:
            # the break before the last piece may go on in the next chunk: "\n" restarts it there
            finished, carry = pieces[:-1], "\n" + pieces[-1]
        else:
            finished, carry = [], pieces[0]
        out, continues = [], open_paragraph
        for i, p in enumerate(finished):
            if i == 0 and open_paragraph:
                out.append(p.rstrip("\n"))  # the end of a paragraph whose start went out already
            elif p.strip():
                out.append(p.strip("\n"))
        if finished:
            open_paragraph = False
        if len(carry) > LONG_PARAGRAPH:
            # out goes the paragraph's beginning; the rest keeps a last "\n" that only spaces
            # follow, as it may begin a paragraph break. A blank beginning waits for text (a
            # blank paragraph is dropped), up to BLANK_LIMIT.
            p = carry.rfind("\n")
            cut = p if p >= 0 and not carry[p + 1:].strip(" \t") and len(carry) <= BLANK_LIMIT else len(carry)
            head = carry[:cut]
            if head and (open_paragraph or head.strip() or len(carry) > BLANK_LIMIT):
                out.append(head if open_paragraph else head.lstrip("\n"))
                carry, open_paragraph = carry[cut:], True
        if out:
            any_text = True
            yield Batch(out, None, continues, done)
    if not any_text:
        raise ValueError(f"{src}: empty file")


def _jsonl_batches(src: str, text_field: str, target_field: str | None):
    carry, n, seen, any_text = "", 0, False, False
    for text, done, last in _decoded_chunks(src):
        lines = (carry + text).split("\n")
        carry = "" if last else lines.pop()
        texts, targets = [], []
        for line in lines:
            n += 1
            if not line.strip():
                continue
            seen = True
            rec = _record(_json_object(line, f"{src}: line {n}"), text_field, target_field, f"{src}: line {n}")
            texts.append(rec["text"])
            any_text = any_text or bool(rec["text"])
            if target_field is not None:
                targets.append(rec["target"])
        if texts:
            yield Batch(texts, targets if target_field is not None else None, False, done)
    if not seen:
        raise ValueError(f"{src}: empty file")
    if not any_text:
        raise ValueError(f"{src}: no text in field {text_field!r}")


def _json_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer past Python's 4300-digit limit
        raise ValueError(f"{where}: invalid JSON: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parquet_batches(src: str, text_field: str, target_field: str | None):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src)
    except OSError as e:
        raise ValueError(f"{src}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # pyarrow reports a bad file as ArrowInvalid
        raise ValueError(f"{src}: not a readable Parquet file: {(str(e).splitlines() or [''])[0]}") from None
    if pf.metadata.num_rows == 0:
        raise ValueError(f"{src}: empty file")
    names = pf.schema_arrow.names
    for name in (text_field, target_field):
        if name is not None and name not in names:
            raise ValueError(f"{src}: missing column {name!r} (columns: {', '.join(names)})")
    row, any_text = 0, False
    columns = [text_field] if target_field is None else [text_field, target_field]
    for batch in _parquet_reads(pf, columns, src):
        texts = batch.column(text_field).to_pylist()
        targets = batch.column(target_field).to_pylist() if target_field else [None] * len(texts)
        out_texts, out_targets = [], []
        for text, target in zip(texts, targets):
            obj = {text_field: text} if target_field is None else {text_field: text, target_field: target}
            rec = _record(obj, text_field, target_field, f"{src}: row {row}")
            out_texts.append(rec["text"])
            out_targets.append(rec.get("target"))
            any_text = any_text or bool(rec["text"])
            row += 1
        yield Batch(out_texts, out_targets if target_field is not None else None, False, row)
    if not any_text:
        raise ValueError(f"{src}: no text in field {text_field!r}")


def _parquet_reads(pf, columns: list[str], src: str):
    """pf's record batches; a page that cannot be decoded (a corrupt file) is one line
    naming the file and the first row of the batch it belongs to."""
    row, batches = 0, pf.iter_batches(batch_size=PARQUET_ROWS, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - pyarrow reports a corrupt page as OSError or ArrowInvalid
            raise ValueError(f"{src}: rows {row} to {row + PARQUET_ROWS - 1}: unreadable Parquet data: "
                             f"{first_line(e)}") from None
        row += batch.num_rows
        yield batch


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
    bad = next((t for t in target if not 0 <= t <= MAX_TARGET_ID), None) if isinstance(target, list) else None
    if bad is not None:  # JSON has no integer limit: 2**70 parses
        raise ValueError(f"{where}: field {target_field!r}: {show(bad)} is not a token id (ids are in [0, 2**31))")
    return {"text": text, "target": target}


def load_records(data_cfg: DataConfig) -> list[dict]:
    """All records of data.source in memory (for small data and inspection; training reads
    the token store): [{"text": str}] or, with `target_field`, [{"text", "target"}]."""
    records = []
    for batch in iter_batches(data_cfg):
        for i, text in enumerate(batch.texts):
            if i == 0 and batch.continues:
                records[-1]["text"] += text
                continue
            records.append({"text": text} if batch.targets is None else {"text": text, "target": batch.targets[i]})
    return records


# ---------------------------------------------------------------- the token store

def store_identity(data_cfg: DataConfig, tokenizer) -> dict:
    """What determines a store's ids: the source's bytes (streamed through sha256), the
    tokenizer file's bytes, format and fields, and seq_len for the custom objective."""
    d, fmt = data_cfg, source_format(data_cfg)
    if fmt == "pydoc":
        from pydoc_data.topics import topics
        source = hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest()
    else:
        try:
            source = token_store.file_digest(d.source)
        except OSError as e:
            raise ValueError(f"{d.source}: cannot read: {e.strerror}") from None
    identity = {"source": source, "format": fmt,
                "tokenizer": "byte" if isinstance(tokenizer, ByteTokenizer) else token_store.file_digest(tokenizer.path)}
    if fmt in ("jsonl", "parquet"):
        identity["text_field"] = d.text_field
    if d.target_field is not None:
        identity.update(target_field=d.target_field, seq_len=d.seq_len)
    return identity


def token_store_location(config: StackWiseConfig, tokenizer=None, for_training: bool = False) -> str:
    """The token store of config.data (`<ray.storage_path>/tokens/<key>`), built first
    where it is missing. A data error (one line naming the file) leaves nothing there;
    `for_training` also refuses a batch larger than the training split before a new store
    is published (a refused run writes nothing)."""
    d = config.data
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(d.tokenizer)
    root = storage.join(storage.storage_dir(config.ray.storage_path), storage.TOKENS_DIR)
    location = storage.join(root, token_store.store_key(store_identity(d, tokenizer)))

    def check(meta: dict) -> int:
        _check_id_width(meta, tokenizer, location)
        n = _example_count(meta, d)
        n_train = n - validation_size(n, d.val_fraction)
        if for_training and d.batch_size > n_train:
            raise ValueError(f"data.batch_size: must be <= the {n_train:,} training examples, got {d.batch_size:,}")
        return n

    return token_store.ensure(location, lambda stage: _write_store(stage, d, tokenizer), check=check)


def _check_id_width(meta: dict, tokenizer, location: str) -> None:
    """A store whose ids are narrower than the tokenizer's largest id (built before sparse
    ids were counted) holds wrapped ids: refused, never trained on."""
    if np.dtype(meta["dtype"]).itemsize < token_store.id_dtype(tokenizer.vocab_size).itemsize:
        raise ValueError(f"{location}: holds ids as {meta['dtype']}, too narrow for the tokenizer's ids up to "
                         f"{tokenizer.vocab_size - 1:,}; remove that directory to rebuild it")


def _example_count(meta: dict, d: DataConfig) -> int:
    n = meta["tokens"] // d.seq_len if meta["kind"] == "stream" else meta["examples"]
    if d.max_examples is not None:
        n = min(n, d.max_examples)
    if n < 2:
        raise ValueError(f"data.source {d.source}: too small for seq_len {d.seq_len}: {n} example(s), need at least 2")
    return n


def _write_store(stage: str, d: DataConfig, tokenizer) -> dict:
    """Tokenize data.source into the directory `stage`, batch by batch; returns the meta."""
    dtype = token_store.id_dtype(tokenizer.vocab_size)
    total, unit = source_size(d)
    progress = token_store.Progress(os.path.basename(d.source), total, unit)
    done = 0
    try:
        if d.target_field is None:
            meta = {"kind": "stream", "tokens": 0, "documents": 0}
            with open(os.path.join(stage, "tokens.bin"), "wb") as f:
                for batch in iter_batches(d):
                    ids = _encode(tokenizer.encode_joined, batch.texts, d.source)
                    if meta["documents"] and not batch.continues:
                        ids = np.concatenate([[tokenizer.eos_id], ids])  # between documents
                    f.write(_stored_ids(ids, dtype, d.source).data)
                    meta["tokens"] += len(ids)
                    meta["documents"] += len(batch.texts) - batch.continues
                    progress.update(done := batch.done)
        else:
            meta = {"kind": "pairs", "examples": 0, "seq_len": d.seq_len}
            with open(os.path.join(stage, "inputs.bin"), "wb") as fi, open(os.path.join(stage, "targets.bin"), "wb") as ft:
                for batch in iter_batches(d):
                    inputs, targets = _paired_examples(tokenizer, batch, d.seq_len, d.source, meta["examples"])
                    fi.write(_stored_ids(inputs, dtype, d.source).data)
                    ft.write(targets.data)
                    meta["examples"] += len(inputs)
                    progress.update(done := batch.done)
    finally:
        progress.close(done)
    return {**meta, "dtype": dtype.name, "source": d.source, "tokenizer": d.tokenizer, "vocab_size": tokenizer.vocab_size}


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


# ---------------------------------------------------------------- datasets

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
