"""Sources: data.source read as a stream of record Batches, never held whole.

One reader per format (formats.FORMATS) behind one dispatch, `open_source`: the bundled
pydoc corpus, text files (one record per paragraph), JSONL (one per line) and Parquet
(one per row). Each reader streams its records, says how large it is (for progress) and
what its content is (for the token store's key), and names the file and line or row of
anything it cannot read, in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, NamedTuple

from ..errors import first_line, show
from .formats import WITH_FIELDS, format_of

if TYPE_CHECKING:
    from ..config import DataConfig

MAX_TARGET_ID = 2**31 - 1  # targets are stored as int32
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


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (token_store.file_digest: hashed once per process)."""
    from .token_store import file_digest as digest

    try:
        return digest(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None


class PydocSource:
    """The topic texts that ship with Python (pydoc_data.topics), in sorted key order."""

    format = "pydoc"

    def __init__(self, data_cfg):
        if data_cfg.target_field is not None:
            raise ValueError(f"pydoc: the bundled corpus has no targets; data.target_field {data_cfg.target_field!r} needs a JSONL or Parquet file")
        self.path = "pydoc"

    def batches(self):
        from pydoc_data.topics import topics
        yield Batch([topics[k] for k in sorted(topics)], None, False, len(topics))

    def size(self) -> tuple[int, str]:
        from pydoc_data.topics import topics
        return len(topics), "topics"

    def digest(self) -> str:
        from pydoc_data.topics import topics
        return hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest()


class _FileSource:
    format = ""

    def __init__(self, data_cfg):
        self.path, self.text_field, self.target_field = data_cfg.source, data_cfg.text_field, data_cfg.target_field

    def size(self) -> tuple[int, str]:
        return os.path.getsize(self.path), "bytes"

    def digest(self) -> str:
        return file_digest(self.path)


class TextSource(_FileSource):
    """A text file: one record per paragraph (blocks separated by blank lines), so
    documents keep their boundaries."""

    format = "text"

    def __init__(self, data_cfg):
        super().__init__(data_cfg)
        if self.target_field is not None:
            raise ValueError(f"{self.path}: a text file has no fields, so no target {self.target_field!r}; use JSONL or Parquet")

    def batches(self):
        return _text_batches(self.path)


class JsonlSource(_FileSource):
    """JSONL: one record per line, its text in `text_field` and, when `target_field` is
    set, its target (a string or a list of token ids)."""

    format = "jsonl"

    def batches(self):
        return _jsonl_batches(self.path, self.text_field, self.target_field)


class ParquetSource(_FileSource):
    """Parquet: one record per row, fields as JSONL's; read a record batch at a time."""

    format = "parquet"

    def size(self) -> tuple[int, str]:
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(self.path).metadata.num_rows, "rows"
        except Exception:  # an unreadable file: batches() says why, in one line
            return 0, "rows"

    def batches(self):
        return _parquet_batches(self.path, self.text_field, self.target_field)


SOURCES = {"text": TextSource, "jsonl": JsonlSource, "parquet": ParquetSource}


def source_format(data_cfg: DataConfig) -> str:
    """"pydoc", or a format of formats.FORMATS; an unknown extension is an error."""
    return "pydoc" if data_cfg.source == "pydoc" else format_of(data_cfg.source, data_cfg.format)


def open_source(data_cfg: DataConfig):
    """The reader of data.source (the one dispatch on its format).

    Raises:
        ValueError: one line naming the file and the problem.
    """
    fmt = source_format(data_cfg)
    return PydocSource(data_cfg) if fmt == "pydoc" else SOURCES[fmt](data_cfg)


def has_fields(fmt: str) -> bool:
    return fmt in WITH_FIELDS


def iter_batches(data_cfg: DataConfig):
    """data.source as a stream of Batches, never held whole (open_source's reader).

    Raises:
        ValueError: one line naming the file and the problem (line or row where it has one).
    """
    yield from open_source(data_cfg).batches()


def source_size(data_cfg: DataConfig) -> tuple[int, str]:
    """(total, unit) of Batch.done for progress: bytes of a file, rows of a Parquet file."""
    return open_source(data_cfg).size()


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
