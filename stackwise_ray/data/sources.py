"""Sources: data.source read as a stream of record Batches, never held whole.

data.source is "pydoc" (the topic texts that ship with Python), a file, a directory of
shards (every file in it, recursively, whose extension names a format; hidden files and
others are skipped), a glob of shards, or a Hugging Face `datasets` directory
(`save_to_disk`). Shards are read in sorted path order, and may mix formats: text (one
record per paragraph), JSONL (one per line), Parquet (one per row), text and JSONL also
compressed (.gz, .zst), decompressed as they are read.

A source is planned as `Unit`s, each read on its own (by a Ray task in a parallel build):
a whole shard, or a byte range of a large uncompressed text or JSONL file (cut at a line
end, or a paragraph break for text), or row groups of a Parquet file, or rows of a
`datasets` directory. Reading the units one after another gives the records of the
whole source, in order. `READERS` is the one dispatch on a format. Anything unreadable
is one line naming the shard and its line or row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, NamedTuple

from ..errors import first_line, show
from .formats import GLOB_CHARS, WITH_FIELDS, compression_of, format_of, known

if TYPE_CHECKING:
    from ..config import DataConfig

MAX_TARGET_ID = 2**31 - 1  # targets are stored as int32
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
CHUNK_BYTES = 1 << 20  # what a build reads of a text or JSONL file at a time
LONG_PARAGRAPH = 2 * CHUNK_BYTES  # characters: a longer paragraph is tokenized in pieces cut at line ends
BLANK_LIMIT = 16 * CHUNK_BYTES  # characters of whitespace held before they are kept as a paragraph
PARQUET_ROWS = 1024
UNIT_BYTES = 16 << 20  # a larger uncompressed file, Parquet file or datasets directory is read in units of about this


class Batch(NamedTuple):
    """Records read from a source, in order.

    texts: the records' texts. targets: their targets (custom objective), else None.
    continues: texts[0] continues the last text of the previous batch (a paragraph longer
        than LONG_PARAGRAPH, cut at a line end; the byte tokenizer's ids are the same).
    done: how much of the unit is read, in bytes of the source (estimated for rows).
    """
    texts: list
    targets: list | None
    continues: bool
    done: int


class Shard(NamedTuple):
    """One file of a source (or a `datasets` directory): its path, format, compression."""
    path: str
    format: str
    compression: str | None = None


class Unit(NamedTuple):
    """A piece of a source read on its own: a shard's bytes [start, end) (text, JSONL),
    row groups [start, end) (Parquet), rows [start, end) (datasets); end None: to the end.
    `size`: its bytes in the source, for progress. `whole`: the unit is the whole shard
    (an empty one is refused). `alone`: the shard is the whole source (one without any
    text is refused; a shard of empty texts among others is not)."""
    shard: Shard
    start: int
    end: int | None
    size: int
    whole: bool
    text_field: str
    target_field: str | None
    alone: bool = False


class PydocSource:
    """The topic texts that ship with Python (pydoc_data.topics), in sorted key order."""

    format = "pydoc"
    label = "pydoc"
    shards = ()

    def __init__(self, data_cfg):
        if data_cfg.target_field is not None:
            raise ValueError(f"pydoc: the bundled corpus has no targets; data.target_field {data_cfg.target_field!r} needs a JSONL or Parquet file")

    def units(self) -> list:
        return ["pydoc"]

    def identity(self) -> dict:
        from pydoc_data.topics import topics
        return {"source": hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest(), "format": "pydoc"}


class FileSource:
    """A file, a directory or glob of shards, or a `datasets` directory (see the module)."""

    def __init__(self, data_cfg):
        self.spec, self.forced = data_cfg.source, data_cfg.format
        self.text_field, self.target_field = data_cfg.text_field, data_cfg.target_field
        if os.path.isfile(os.path.join(self.spec, "dataset_dict.json")):
            splits = sorted(n for n in os.listdir(self.spec) if _is_datasets_dir(os.path.join(self.spec, n)))
            raise ValueError(f"{self.spec}: a datasets DatasetDict ({', '.join(splits)}); name one of its splits' "
                             "directories")
        globbed = any(c in self.spec for c in GLOB_CHARS) and not os.path.exists(self.spec)  # "a[1].txt" may be a file
        self.sharded = globbed or (os.path.isdir(self.spec) and not _is_datasets_dir(self.spec))
        self.shards = [self._shard(p) for p in self._paths()]
        self.format = self.shards[0].format if not self.sharded else "shards"
        self.label = os.path.basename(self.spec.rstrip("/")) or self.spec
        for shard in self.shards:
            if self.target_field is not None and shard.format == "text":
                raise ValueError(f"{shard.path}: a text file has no fields, so no target {self.target_field!r}; use JSONL or Parquet")

    def _paths(self) -> list[str]:
        spec = self.spec
        if any(c in spec for c in GLOB_CHARS) and not os.path.exists(spec):
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not paths:
                raise ValueError(f"{spec}: no file matches")
            return paths
        if os.path.isdir(spec) and not _is_datasets_dir(spec):
            paths = sorted(os.path.join(root, name) for root, dirs, names in os.walk(spec)
                           for name in names if not name.startswith(".") and (self.forced != "auto" or known(name))
                           and not any(part.startswith(".") for part in os.path.relpath(root, spec).split(os.sep) if part != "."))
            if not paths:
                raise ValueError(f"{spec}: no shard in this directory (files ending .txt, .jsonl or .parquet, "
                                 "optionally .gz or .zst)")
            return paths
        return [spec]

    def _shard(self, path: str) -> Shard:
        if self.forced == "datasets" or os.path.isdir(path):
            if not _is_datasets_dir(path):
                raise ValueError(f"{path}: not a datasets directory saved by save_to_disk (no state.json)")
            return Shard(path, "datasets")
        base, compression = compression_of(path)
        fmt = format_of(base if self.forced == "auto" else path, self.forced)
        if compression is not None and fmt == "parquet":
            raise ValueError(f"{path}: a compressed Parquet file; Parquet compresses its own pages (leave it uncompressed)")
        return Shard(path, fmt, compression)

    def identity(self) -> dict:
        """What determines the records: every shard's bytes and how it is read, in order
        (a single file keeps the key it had before shards were read)."""
        fields = {"text_field": self.text_field} if any(s.format in WITH_FIELDS for s in self.shards) else {}
        if not self.sharded:
            [s] = self.shards
            out = {"source": shard_digest(s), "format": s.format, **fields}
            return {**out, "compression": s.compression} if s.compression else out
        return {"source": [[s.format, s.compression, shard_digest(s)] for s in self.shards], "format": "shards", **fields}

    def units(self) -> list[Unit]:
        """The source's units, in order."""
        units = [u for s in self.shards for u in _shard_units(s, self.text_field, self.target_field)]
        return units if self.sharded else [u._replace(alone=u.whole) for u in units]


def _is_datasets_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (token_store.file_digest: hashed once per process)."""
    from .token_store import file_digest as digest

    try:
        return digest(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None


def shard_digest(shard: Shard) -> str:
    if shard.format != "datasets":
        return file_digest(shard.path)
    h = hashlib.sha256()  # the Arrow files, in the order the dataset lists them, and their names
    for name in _datasets_files(shard.path):
        h.update(f"{name}:{file_digest(os.path.join(shard.path, name))};".encode())
    return h.hexdigest()


def _datasets_files(path: str) -> list[str]:
    try:
        with open(os.path.join(path, "state.json")) as f:
            return [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable datasets directory (state.json: {first_line(e)})") from None


def _shard_units(shard: Shard, text_field: str, target_field: str | None) -> list[Unit]:
    def unit(start, end, size, whole=False):
        return Unit(shard, start, end, size, whole, text_field, target_field)

    if shard.format == "datasets":
        ds = _load_dataset(shard.path)
        _check_columns(shard.path, ds.column_names, text_field, target_field)
        rows, size = ds.num_rows, max(1, sum(os.path.getsize(os.path.join(shard.path, n)) for n in _datasets_files(shard.path)))
        if rows == 0:
            raise ValueError(f"{shard.path}: empty file")
        step = max(1, rows * UNIT_BYTES // size)
        return [unit(a, min(a + step, rows), size * (min(a + step, rows) - a) // rows, whole=step >= rows)
                for a in range(0, rows, step)]
    if shard.format == "parquet":
        pf = _open_parquet(shard.path)
        if pf.metadata.num_rows == 0:
            raise ValueError(f"{shard.path}: empty file")
        _check_columns(shard.path, pf.schema_arrow.names, text_field, target_field)
        groups, out, first, acc = pf.metadata.num_row_groups, [], 0, 0
        size = os.path.getsize(shard.path)
        for g in range(groups):
            acc += pf.metadata.row_group(g).total_byte_size
            if acc >= UNIT_BYTES or g == groups - 1:
                out.append((first, g + 1, acc))
                first, acc = g + 1, 0
        total = sum(a for *_, a in out) or 1
        return [unit(a, b, size * n // total, whole=len(out) == 1) for a, b, n in out]
    try:
        size = os.path.getsize(shard.path)
    except OSError as e:
        raise ValueError(f"{shard.path}: cannot read: {e.strerror}") from None
    if shard.compression is not None or size <= UNIT_BYTES:
        return [unit(0, None, size, whole=True)]
    cuts = [0] + [c for c in (_cut_after(shard, k * UNIT_BYTES) for k in range(1, -(-size // UNIT_BYTES))) if c is not None]
    cuts = sorted(set(cuts))
    return [unit(a, b, (b if b is not None else size) - a) for a, b in zip(cuts, cuts[1:] + [None])]


def _cut_after(shard: Shard, offset: int) -> int | None:
    """The first place at or after `offset` where a unit can begin: after a line end
    (JSONL), or after a blank line that text follows (a paragraph break, for text).
    Only raw b"\\n\\n" counts for text, so a cut never splits \\r\\n or a UTF-8 character."""
    with open(shard.path, "rb") as f:
        f.seek(offset)
        pos, tail = offset, b""
        while block := f.read(1 << 16):
            data = tail + block
            base = pos - len(tail)
            if shard.format == "jsonl":
                i = data.find(b"\n")
                if i >= 0:
                    return base + i + 1
            else:
                for m in re.finditer(rb"\n\n(?=[^ \t\r\n])", data):
                    return base + m.end()
            pos += len(block)
            tail = data[-2:]
    return None


def _load_dataset(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: a datasets directory needs the datasets package: pip install 'stackwise-ray[datasets]'") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise their own types
        raise ValueError(f"{path}: unreadable datasets directory: {first_line(e)}") from None
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{path}: a DatasetDict ({', '.join(ds)}); name one of its splits' directories")
    return ds


def _check_columns(path: str, names, text_field: str, target_field: str | None) -> None:
    for name in (text_field, target_field):
        if name is not None and name not in names:
            raise ValueError(f"{path}: missing column {name!r} (columns: {', '.join(names)})")


def open_source(data_cfg: DataConfig):
    """The source of data.source: PydocSource or FileSource (their `units()` are read by
    `read_unit`, their `identity()` goes into the token store's key).

    Raises:
        ValueError: one line naming the file and the problem.
    """
    return PydocSource(data_cfg) if data_cfg.source == "pydoc" else FileSource(data_cfg)


def source_format(data_cfg: DataConfig) -> str:
    """"pydoc", "shards" (a directory or glob), or the format of the one file."""
    return open_source(data_cfg).format


def read_unit(unit):
    """The Batches of one unit, in order (READERS: the one dispatch on a format)."""
    if unit == "pydoc":
        from pydoc_data.topics import topics
        yield Batch([topics[k] for k in sorted(topics)], None, False, len(topics))
        return
    yield from READERS[unit.shard.format](unit)


def iter_batches(data_cfg: DataConfig):
    """data.source as a stream of Batches, never held whole: its units read in order.

    Raises:
        ValueError: one line naming the file and the problem (line or row where it has one).
    """
    for unit in open_source(data_cfg).units():
        yield from read_unit(unit)


def _opened(shard: Shard):
    """The shard's bytes as a binary stream, decompressed as read."""
    try:
        f = open(shard.path, "rb")
    except OSError as e:
        raise ValueError(f"{shard.path}: cannot read: {e.strerror}") from None
    if shard.compression == "gz":
        import gzip
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    if shard.compression == "zst":
        try:
            import zstandard
        except ImportError:
            f.close()
            raise ValueError(f"{shard.path}: a .zst file needs the zstandard package: pip install zstandard") from None
        return _ZstdReader(f, zstandard), f
    return f, f


class _ZstdReader:
    """read(n) over the frames of a .zst stream; a stream that ends inside a frame is an
    error (zstandard's stream_reader would just stop)."""

    def __init__(self, f, zstandard):
        self.f, self.d = f, zstandard.ZstdDecompressor()
        self.obj, self.fed, self.out, self.done = self.d.decompressobj(), False, b"", False

    def read(self, n: int) -> bytes:
        while len(self.out) < n and not self.done:
            raw = self.f.read(1 << 20)
            if not raw:
                self.done = True
                if self.fed and not self.obj.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                break
            while raw:
                self.out += self.obj.decompress(raw)
                self.fed = True
                if self.obj.eof:
                    raw, self.obj, self.fed = self.obj.unused_data, self.d.decompressobj(), False
                else:
                    raw = b""
        data, self.out = self.out[:n], self.out[n:]
        return data


def _decoded_chunks(unit: Unit):
    """(text, bytes read, last) for each CHUNK_BYTES of the unit, read at the file offsets a
    read of the whole file from its start would use: UTF-8 checked (the error names the
    line and byte) and newlines translated as open() does (\\r\\n and \\r become \\n)."""
    shard, src = unit.shard, unit.shard.path
    stream, f = _opened(shard)
    with f:
        if unit.start:
            f.seek(unit.start)
        pos, end = unit.start, unit.end  # pos: offset of the next byte read
        pending, lines = b"", 0  # bytes held back for the next chunk; line ends passed
        while True:
            want = CHUNK_BYTES - pos % CHUNK_BYTES
            if end is not None:
                want = min(want, end - pos)
            try:
                raw = stream.read(want) if want > 0 else b""
            except (OSError, EOFError) as e:
                raise ValueError(f"{src}: corrupt {shard.compression or 'file'} data after byte {pos:,}"
                                 f"{' of its decompressed text' if shard.compression else ''}: {first_line(e)}") from None
            except Exception as e:  # noqa: BLE001 - zstandard.ZstdError
                raise ValueError(f"{src}: corrupt {shard.compression} data after byte {pos:,} of its decompressed "
                                 f"text: {first_line(e)}") from None
            pos += len(raw)
            last = not raw
            data, pending = pending + raw, b""
            start = pos - len(data)  # offset of data[0]
            if not last and data.endswith(b"\r"):  # may be the first half of \r\n
                data, pending = data[:-1], b"\r"
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if last or e.reason != "unexpected end of data" or e.end != len(data):
                    line = _lines_before(shard, unit.start) + lines + data[:e.start].count(b"\n") + 1
                    raise ValueError(f"{src}: line {line:,}: not valid UTF-8 (byte {start + e.start})") from None
                text, pending = data[:e.start].decode("utf-8"), data[e.start:] + pending  # a character cut in two
            lines += text.count("\n")
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            # done: bytes of the file as stored (a compressed one's read so far)
            yield text, (f.tell() if shard.compression else pos - len(pending)) - unit.start, last
            if last:
                return


def _lines_before(shard: Shard, offset: int) -> int:
    """Line ends in the shard before byte `offset` (for a message naming a line)."""
    if not offset:
        return 0
    n, left = 0, offset
    with open(shard.path, "rb") as f:
        while left and (block := f.read(min(left, 1 << 20))):
            n, left = n + block.count(b"\n"), left - len(block)
    return n


def _text_batches(unit: Unit):
    """Paragraphs, as `re.split(r"\\n(?:[ \\t]*\\n)+", text)` gives them (each stripped of
    newlines, blank ones dropped), holding only the last, unfinished paragraph across chunks."""
    src = unit.shard.path
    # a unit begins after a paragraph break: "\n" stands for it, as the carry of a read of
    # the whole file would hold it
    carry, open_paragraph, any_text = ("\n" if unit.start else ""), False, False  # open: carry continues a paragraph already begun
    for text, done, last in _decoded_chunks(unit):
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
    if not any_text and unit.whole:
        raise ValueError(f"{src}: empty file")


def _jsonl_batches(unit: Unit):
    src, text_field, target_field = unit.shard.path, unit.text_field, unit.target_field
    carry, n, seen, any_text = "", 0, False, False
    base = []  # line ends before the unit, counted when a message needs them

    def where(n: int) -> str:
        if not base:
            base.append(_lines_before(unit.shard, unit.start))
        return f"{src}: line {base[0] + n}"

    for text, done, last in _decoded_chunks(unit):
        lines = (carry + text).split("\n")
        carry = "" if last else lines.pop()
        texts, targets = [], []
        for line in lines:
            n += 1
            if not line.strip():
                continue
            seen = True
            rec = _record(_json_object(line, n, where), text_field, target_field, where(n))
            texts.append(rec["text"])
            any_text = any_text or bool(rec["text"])
            if target_field is not None:
                targets.append(rec["target"])
        if texts:
            yield Batch(texts, targets if target_field is not None else None, False, done)
    if unit.whole and not seen:
        raise ValueError(f"{src}: empty file")
    if unit.alone and not any_text:
        raise ValueError(f"{src}: no text in field {text_field!r}")


def _json_object(line: str, n: int, where) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where(n)}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{where(n)}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer past Python's 4300-digit limit
        raise ValueError(f"{where(n)}: invalid JSON: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where(n)}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _open_parquet(src: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(src)
    except OSError as e:
        raise ValueError(f"{src}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # pyarrow reports a bad file as ArrowInvalid
        raise ValueError(f"{src}: not a readable Parquet file: {first_line(e)}") from None


def _parquet_batches(unit: Unit):
    """Rows of the unit's row groups [start, end)."""
    src, text_field, target_field = unit.shard.path, unit.text_field, unit.target_field
    pf = _open_parquet(src)
    groups = range(unit.start, unit.end)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    rows = max(1, sum(pf.metadata.row_group(g).num_rows for g in groups))
    columns = [text_field] if target_field is None else [text_field, target_field]
    yield from _rows_batches(unit, _parquet_reads(pf, columns, src, groups, row), row, rows)


def _rows_batches(unit: Unit, batches, row: int, rows: int):
    """Batches of records from Arrow record batches whose first row is `row` (of `rows`
    in the unit)."""
    src, text_field, target_field = unit.shard.path, unit.text_field, unit.target_field
    first, any_text = row, False
    for batch in batches:
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
        yield Batch(out_texts, out_targets if target_field is not None else None, False, unit.size * (row - first) // rows)
    if not any_text and unit.alone:
        raise ValueError(f"{src}: no text in field {text_field!r}")


def _datasets_batches(unit: Unit):
    """Rows [start, end) of a `datasets` directory, read from its memory-mapped Arrow files."""
    ds = _load_dataset(unit.shard.path).with_format("arrow")
    columns = [c for c in (unit.text_field, unit.target_field) if c is not None]

    def reads():
        for a in range(unit.start, unit.end, PARQUET_ROWS):
            try:
                table = ds[a:min(a + PARQUET_ROWS, unit.end)].select(columns)
            except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise their own types
                raise ValueError(f"{unit.shard.path}: rows {a} to {a + PARQUET_ROWS - 1}: unreadable: {first_line(e)}") from None
            yield from table.to_batches()

    yield from _rows_batches(unit, reads(), unit.start, max(1, unit.end - unit.start))


def _parquet_reads(pf, columns: list[str], src: str, groups, row: int):
    """pf's record batches of row groups `groups`, the first being row `row`; a page that
    cannot be decoded (a corrupt file) is one line naming the file and the first row of
    the batch it belongs to."""
    batches = pf.iter_batches(batch_size=PARQUET_ROWS, columns=columns, row_groups=list(groups))
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


READERS = {"text": _text_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches, "datasets": _datasets_batches}


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
