"""The token store: built once per content, reused, never half-finished, and read through
memory maps so that memory does not follow the corpus."""

import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest
import torch

from stackwise_ray.data import sources, token_store, tokenizer
from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import ByteTokenizer, build_datasets, open_datasets, token_store_location

from .conftest import TOKEN_STORAGE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(storage, **data_keys):
    return StackWiseConfig.from_dict({"data": data_keys, "ray": {"storage_path": str(storage)}})


def stores(storage) -> list[str]:
    """Complete stores under a storage path."""
    root = os.path.join(storage, "tokens")
    return sorted(d for d in os.listdir(root) if token_store.is_complete(os.path.join(root, d))) if os.path.isdir(root) else []


def reference_split(stream: list[int], T: int, split_seed: int = 0, val_fraction: float = 0.1):
    """The windows and split as the in-memory implementation before the store made them."""
    n = len(stream) // T
    windows = torch.tensor(stream[: n * T]).view(n, T)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return [(rows.sort().values, windows[rows.sort().values]) for rows in (perm[n_val:], perm[:n_val])]


# ---------------------------------------------------------------- same examples as before

def test_pydoc_ids_and_windows_are_unchanged():
    from pydoc_data.topics import topics

    tok = ByteTokenizer()
    stream = []
    for i, k in enumerate(sorted(topics)):
        stream += ([tok.eos_id] if i else []) + list(topics[k].encode("utf-8"))
    train, val, _ = build_datasets(cfg(TOKEN_STORAGE, seq_len=128))
    for ds, (ids, windows) in zip((train, val), reference_split(stream, 128)):
        assert torch.equal(ds.example_ids, ids)
        assert torch.equal(ds.input_ids[:], windows)
    digest = hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest()
    if digest.startswith("e"):  # pinned on this Python's topics (3.11): the numbers of the in-memory code
        w = torch.arange(1, 129)
        assert (len(train), len(val)) == (3278, 364)
        assert val.example_ids[:6].tolist() == [8, 12, 22, 25, 28, 64]
        assert train.input_ids[0][:12].tolist() == [84, 104, 101, 32, 34, 97, 115, 115, 101, 114, 116, 34]
        assert int((train.input_ids[:] * w).sum()) == 2290852613 and int((val.input_ids[:] * w).sum()) == 250910198


PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def test_text_streamed_in_small_chunks_gives_the_same_paragraphs_and_ids(tmp_path, monkeypatch):
    """Chunk boundaries anywhere (inside a paragraph break, a \\r\\n or a character) and long
    paragraphs cut into pieces change nothing."""
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\r", "\r\n", "é", "日", "\u00a0", "\x1c", "🙂"]
    tok, path = ByteTokenizer(), tmp_path / "t.txt"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        path.write_bytes(text.encode("utf-8"))
        monkeypatch.setattr(sources, "CHUNK_BYTES", rng.randint(1, 9))
        monkeypatch.setattr(sources, "LONG_PARAGRAPH", rng.choice([10**9, rng.randint(1, 12)]))
        content = text.replace("\r\n", "\n").replace("\r", "\n")
        expected = [b.strip("\n") for b in PARAGRAPH_BREAK.split(content) if b.strip()]
        if not expected:
            with pytest.raises(ValueError, match="empty file"):
                sources.load_records(cfg(tmp_path, source=str(path)).data)
            continue
        assert [r["text"] for r in sources.load_records(cfg(tmp_path, source=str(path)).data)] == expected, repr(text)
        ids, docs = [], 0
        for batch in sources.iter_batches(cfg(tmp_path, source=str(path)).data):
            ids += ([tok.eos_id] if docs and not batch.continues else []) + tok.encode_joined(batch.texts).tolist()
            docs += len(batch.texts) - batch.continues
        assert ids == tok.encode_joined(expected).tolist(), repr(text)


# ---------------------------------------------------------------- built once, by content

def test_store_is_built_once_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(50)), encoding="utf-8")
    store = tmp_path / "store"
    a_train, a_val, _ = build_datasets(cfg(store, source=str(path), seq_len=16))
    [key] = stores(store)
    meta = store / "tokens" / key / "meta.json"
    built_at = meta.stat().st_mtime_ns

    def no_rebuild(*args):
        raise AssertionError("the store was built again")

    monkeypatch.setattr(token_store, "write_store", no_rebuild)
    # another run, another seq_len and a worker opening by location: the same store
    b_train, _, _ = build_datasets(cfg(store, source=str(path), seq_len=16))
    c_train, _, _ = build_datasets(cfg(store, source=str(path), seq_len=8))
    location = token_store_location(cfg(store, source=str(path), seq_len=16))
    d_train, _ = open_datasets(cfg(store, source=str(path), seq_len=16), location)
    assert stores(store) == [key] and meta.stat().st_mtime_ns == built_at
    assert torch.equal(a_train.input_ids[:], b_train.input_ids[:]) and torch.equal(a_train.input_ids[:], d_train.input_ids[:])
    assert c_train.input_ids.shape[1] == 8
    with pytest.raises(ValueError, match="too small for seq_len 8192"):  # checked on an existing store too
        token_store_location(cfg(store, source=str(path), seq_len=8192))
    assert json.loads(meta.read_text())["dtype"] == "uint16"  # 260 byte-tokenizer ids fit
    assert (store / "tokens" / key / "tokens.bin").stat().st_size == 2 * json.loads(meta.read_text())["tokens"]


def test_changed_content_gets_a_new_store(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("aaaa " * 40, encoding="utf-8")
    first, _, _ = build_datasets(cfg(tmp_path, source=str(path), seq_len=8, val_fraction=0.5))
    path.write_text("bbbb " * 40, encoding="utf-8")  # same size, same name
    second, _, _ = build_datasets(cfg(tmp_path, source=str(path), seq_len=8, val_fraction=0.5))
    assert len(stores(tmp_path)) == 2
    assert set(first.input_ids[:].unique().tolist()) == {32, 97}
    assert set(second.input_ids[:].unique().tolist()) == {32, 98}


def test_custom_objective_store_holds_inputs_and_targets_per_seq_len(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "abcdef", "y": [1, 2, 3]}) for _ in range(4)), encoding="utf-8")
    a, _, _ = build_datasets(cfg(tmp_path, source=str(path), target_field="y", seq_len=4))
    b, _, _ = build_datasets(cfg(tmp_path, source=str(path), target_field="y", seq_len=2))
    assert len(stores(tmp_path)) == 2  # records are cut to seq_len when the store is built
    assert a.input_ids[0].tolist() == [97, 98, 99, 100] and a.targets[0].tolist() == [1, 2, 3, -100]
    assert b.targets[0].tolist() == [1, 2]


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[MASK]", "[SEP]"] + [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    path = tmp_path / "d.txt"
    path.write_text("w69999 w5 w70000 w123\n\nw69990 w69991", encoding="utf-8")
    train, val, _ = build_datasets(cfg(tmp_path, source=str(path), tokenizer=str(tmp_path / "tok.json"), seq_len=2))
    [key] = stores(tmp_path)
    assert json.loads((tmp_path / "tokens" / key / "meta.json").read_text())["dtype"] == "uint32"
    windows = torch.cat([train.input_ids[:], val.input_ids[:]])[torch.cat([train.example_ids, val.example_ids]).argsort()]
    assert windows.tolist() == [[70003, 9], [1, 127], [3, 69994]]  # w70000 is [UNK]; [SEP] between documents


# ---------------------------------------------------------------- nothing half-finished

def test_a_data_error_leaves_nothing_in_the_storage_path(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "x" * 100})] * 30 + ["{oops"]
    path.write_text("\n".join(lines), encoding="utf-8")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 256)  # the error comes after batches were written
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"d\.jsonl: line 31: invalid JSON"):
        build_datasets(cfg(store, source=str(path)))
    assert not store.exists()
    path.write_text("\n".join(lines[:2]), encoding="utf-8")  # 201 tokens: one window
    with pytest.raises(ValueError, match="too small for seq_len 128"):  # refused before it is published
        build_datasets(cfg(store, source=str(path)))
    assert not store.exists()


KILLED_BUILD = """
import sys, time
from stackwise_ray import data
from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import sources
sources.CHUNK_BYTES = 4096
encode = data.ByteTokenizer.encode_joined
def slow(self, texts):
    time.sleep(0.05)
    return encode(self, texts)
data.ByteTokenizer.encode_joined = slow
data.build_datasets(StackWiseConfig.from_dict({"data": {"source": sys.argv[1]}, "ray": {"storage_path": sys.argv[2]}}))
"""


def test_a_killed_build_is_not_taken_as_finished(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("some words here\n\n" * 20_000, encoding="utf-8")
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(path), str(store)], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until the build has written tokens
            parts = [p for p in (store / "tokens").glob(".*.part-*/tokens.bin")] if (store / "tokens").exists() else []
            if parts and parts[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        assert parts, "the build never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert stores(store) == []
    train, val, _ = build_datasets(cfg(store, source=str(path)))  # built anew, complete
    assert len(stores(store)) == 1 and len(train) + len(val) == (20_000 * 16 - 1) // 128  # 15 bytes and an eos each


def test_a_store_pickles_as_its_location(tmp_path):
    train, _, _ = build_datasets(cfg(TOKEN_STORAGE, seq_len=32))
    blob = pickle.dumps(train)
    assert len(blob) < 10 * len(train) + 4096  # the example ids, not the windows
    again = pickle.loads(blob)
    assert torch.equal(again.input_ids[:], train.input_ids[:]) and torch.equal(again.example_ids, train.example_ids)


# ---------------------------------------------------------------- memory does not follow the corpus

# What each build adds to RSS at its peak, in one process (one torch import): VmHWM, reset
# before each build through clear_refs, less VmRSS then (a child's ru_maxrss would start at
# its parent's, pytest's, RSS at fork)
PEAK_RSS = """
import sys
from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import GlobalBatches, build_datasets
def status_mb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
for source, seq_len, storage in zip(*[iter(sys.argv[1:])] * 3):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_mb("VmRSS")
    config = StackWiseConfig.from_dict({"data": {"source": source, "seq_len": int(seq_len)}, "ray": {"storage_path": storage}})
    for _ in range(2):  # build, then open the built store
        train, val, _ = build_datasets(config)
    for _, batch in zip(range(50), GlobalBatches(train, 16, 0)):
        pass
    print(round(status_mb("VmHWM") - start))
"""


def peak_rss_mb(*runs) -> list[int]:
    """MB that building, opening and reading 50 batches of each (source, seq_len, storage)
    adds to RSS at its peak."""
    args = [str(x) for run in runs for x in run]
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    return [int(x) for x in out.stdout.split()]


def stdlib_jsonl(path) -> int:
    """The running Python's own library sources, one file per JSONL line (~30 MB, ~70x pydoc)."""
    lib = sysconfig.get_paths()["stdlib"]
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for dirpath, dirnames, filenames in os.walk(lib):
            dirnames[:] = sorted(d for d in dirnames if d != "site-packages")
            for name in sorted(n for n in filenames if n.endswith(".py")):
                try:
                    text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                size += f.write(json.dumps({"text": text}) + "\n")
    return size


@pytest.mark.slow
def test_driver_memory_does_not_follow_the_corpus(tmp_path):
    """Building and opening a corpus ~70x pydoc, or a 128 MB text file that is one long
    paragraph, peaks within a fixed margin of pydoc (the in-memory code held the text and
    int64 copies: +870 MB for the first)."""
    corpus = tmp_path / "stdlib.jsonl"
    assert stdlib_jsonl(corpus) > 20e6
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: NUL bytes, no line end
        f.write(b"start\n\n")
        f.seek(128 << 20)
        f.write(b"\n\nend\n")
    pydoc, jsonl, text = peak_rss_mb(("pydoc", 128, tmp_path / "a"), (corpus, 128, tmp_path / "b"),
                                     (big, 1024, tmp_path / "c"))
    print(f"driver peak RSS added: pydoc {pydoc} MB, stdlib JSONL {jsonl} MB, 128 MB text {text} MB")
    assert jsonl - pydoc < 64 and text - pydoc < 64


def test_progress_line_on_long_builds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(token_store, "PROGRESS_AFTER_S", 0.0)
    path = tmp_path / "d.txt"
    path.write_text("word " * 2000, encoding="utf-8")
    build_datasets(cfg(tmp_path, source=str(path), seq_len=64))
    assert re.fullmatch(r"tokenizing d\.txt: 0/0 MB \([\d.,]+ MB/s\)\n", capsys.readouterr().err)
    monkeypatch.setattr(token_store, "PROGRESS_AFTER_S", 3.0)
    path.write_text("other " * 2000, encoding="utf-8")
    build_datasets(cfg(tmp_path, source=str(path), seq_len=64))
    assert capsys.readouterr().err == ""


def test_byte_tokenizer_encodes_a_batch_as_one_vector():
    tok = ByteTokenizer()
    texts = ["ab", "", "é🙂", "\x00"]
    ids = tok.encode_joined(texts)
    assert ids.dtype == np.uint16
    assert ids.tolist() == [97, 98, 259, 259, 195, 169, 240, 159, 153, 130, 259, 0]


# ---------------------------------------------------------------- ids that do not fit, disks that fill

def sparse_tokenizer(path) -> str:
    """Five tokens, one of them id 70,000: a small vocabulary whose ids pass uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[MASK]": 1, "[UNK]": 2, "hello": 3, "world": 70_000},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_a_tokenizer_with_sparse_ids_gets_a_store_that_holds_its_largest_id(tmp_path):
    tok = sparse_tokenizer(tmp_path / "tok.json")
    assert tokenizer.HFTokenizer(tok).vocab_size == 70_001  # the embedding needs a row for id 70,000
    path = tmp_path / "d.txt"
    path.write_text("hello world world hello", encoding="utf-8")
    train, val, _ = build_datasets(cfg(tmp_path, source=str(path), tokenizer=tok, seq_len=2))
    [key] = stores(tmp_path)
    assert json.loads((tmp_path / "tokens" / key / "meta.json").read_text())["dtype"] == "uint32"
    windows = torch.cat([train.input_ids[:], val.input_ids[:]])[torch.cat([train.example_ids, val.example_ids]).argsort()]
    assert windows.tolist() == [[3, 70_000], [70_000, 3]]  # 70,000 reads back as 70,000, not 4,464


def test_a_store_whose_ids_are_too_narrow_is_refused_not_read(tmp_path):
    tok = sparse_tokenizer(tmp_path / "tok.json")
    path = tmp_path / "d.txt"
    path.write_text("hello world world hello", encoding="utf-8")
    config = cfg(tmp_path, source=str(path), tokenizer=tok, seq_len=2)
    build_datasets(config)
    [key] = stores(tmp_path)
    meta_path = tmp_path / "tokens" / key / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "dtype": "uint16"}))  # as an older build
    with pytest.raises(ValueError, match=rf"tokens/{key}: holds ids as uint16, too narrow for the tokenizer's ids up to 70,000"):
        build_datasets(config)


class FillingFile:
    """A file opened for writing whose disk is full after `room` bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_full_after(monkeypatch, room: int) -> None:
    """token_store.py's writes (the store's .bin files) hit a full disk; its reads are untouched."""
    monkeypatch.setattr(token_store, "open", lambda path, mode="r", *a, **k: FillingFile(open(path, mode, *a, **k), room)
                        if "w" in mode else open(path, mode, *a, **k), raising=False)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)  # several batches: the disk fills after some were written


def test_a_full_disk_while_tokenizing_is_one_error_naming_the_store_and_keeps_nothing(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    path.write_text("some words here\n\n" * 2000, encoding="utf-8")
    disk_full_after(monkeypatch, 10_000)
    store = tmp_path / "store"
    with pytest.raises(token_store.StoreWriteError) as e:
        build_datasets(cfg(store, source=str(path)))
    assert re.fullmatch(rf"{store}/tokens/\w+: cannot build the token store: No space left on device; nothing was "
                        r"kept \(the partial build is removed\)", str(e.value))
    assert not store.exists()


def test_a_full_disk_while_train_tokenizes_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    from stackwise_ray.train import main

    path = tmp_path / "d.txt"
    path.write_text("some words here\n\n" * 2000, encoding="utf-8")
    config = tmp_path / "x.yaml"
    config.write_text(f"data: {{source: {path}, seq_len: 32, batch_size: 8}}\nmodel: {{d_model: 32, n_heads: 2, "
                      "max_seq_len: 32}\n")
    disk_full_after(monkeypatch, 10_000)
    assert main([str(config), "--storage", str(tmp_path / "runs")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {config}: {tmp_path / 'runs' / 'tokens'}/") and "No space left on device" in err
    assert not (tmp_path / "runs").exists()
