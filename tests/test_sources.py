"""Sources as researchers keep them: directories and globs of shards, compressed text and
JSONL, datasets directories, sources read in units, bad shards named; the parallel build
byte for byte the single-process one."""

import gzip
import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import sources, token_store
from stackwise_ray.data.dataset import token_store_location
from stackwise_ray.data.tokenizer import ByteTokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def cfg(store, **data):
    return StackWiseConfig.from_dict({"data": {"seq_len": 16, **data}, "ray": {"storage_path": str(store)}})


def docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def jsonl(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def make_shards(root, n=40):
    """Five shards of five kinds; returns their texts in sorted path order."""
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    parts = [docs(n, i) for i in range(5)]
    (root / "a.jsonl").write_bytes(jsonl(parts[0]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(parts[1])))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(parts[2])))
    (root / "d.txt.gz").write_bytes(gzip.compress("\n\n".join(parts[3]).encode()))
    pq.write_table(pa.table({"text": parts[4]}), root / "e.parquet", row_group_size=7)
    (root / "README.md").write_text("not a shard")  # skipped: its extension names no format
    return [t for p in parts for t in p]


def stream(store):
    [key] = [k for k in os.listdir(store / "tokens") if token_store.is_complete(str(store / "tokens" / k))]
    meta = json.loads((store / "tokens" / key / "meta.json").read_text())
    return key, (store / "tokens" / key / "tokens.bin").read_bytes(), meta


def expected_stream(texts) -> bytes:
    import numpy as np

    return ByteTokenizer().encode_joined(texts).astype(np.uint16).tobytes()


def test_a_directory_of_mixed_compressed_shards_is_read_in_sorted_order(tmp_path):
    texts = make_shards(tmp_path / "shards")
    assert [r["text"] for r in sources.load_records(cfg(tmp_path, source=str(tmp_path / "shards")).data)] == texts
    token_store_location(cfg(tmp_path / "store", source=str(tmp_path / "shards")))
    _, ids, meta = stream(tmp_path / "store")
    assert ids == expected_stream(texts) and meta["documents"] == len(texts)


def test_a_glob_takes_the_files_it_matches(tmp_path):
    texts = make_shards(tmp_path / "shards")
    got = sources.load_records(cfg(tmp_path, source=str(tmp_path / "shards" / "*.jsonl*")).data)
    assert [r["text"] for r in got] == texts[:120]
    with pytest.raises(ValueError, match=r"\*\.xml: no file matches"):
        sources.load_records(cfg(tmp_path, source=str(tmp_path / "shards" / "*.xml")).data)


def key_of(store, source):
    token_store_location(cfg(store, source=str(source)))
    return stream(store)[0]


def test_the_key_follows_shard_order_and_content_not_names(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "1.jsonl").write_bytes(jsonl(docs(30, 1)))
    (d / "2.jsonl").write_bytes(jsonl(docs(30, 2)))
    first = key_of(tmp_path / "s1", d)
    os.rename(d / "1.jsonl", d / "0.jsonl")  # renamed, same order: the same store
    assert key_of(tmp_path / "s2", d) == first
    os.rename(d / "0.jsonl", d / "3.jsonl")  # now after 2.jsonl: another order, another store
    swapped = key_of(tmp_path / "s3", d)
    assert swapped != first
    (d / "2.jsonl").write_bytes(jsonl(docs(30, 9)))  # a shard's content
    assert key_of(tmp_path / "s4", d) not in (first, swapped)


def test_a_single_files_key_is_the_one_it_had_before_shards(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "hello"}\n')
    identity = token_store.store_identity(cfg(tmp_path, source=str(path)).data, ByteTokenizer())
    assert identity == {"source": token_store.file_digest(str(path)), "format": "jsonl", "text_field": "text",
                        "tokenizer": "byte"}


def records_by_units(data_cfg):
    out = []
    for unit in sources.open_source(data_cfg).units():
        for batch in sources.read_unit(unit):
            for i, text in enumerate(batch.texts):
                if i == 0 and batch.continues:
                    out[-1] += text
                else:
                    out.append(text)
    return out


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_a_large_file_read_in_byte_ranges_gives_the_whole_files_records_and_store(tmp_path, monkeypatch, kind):
    rng = random.Random(kind)
    texts = [("\n" * rng.randint(0, 2)).join(docs(rng.randint(1, 4), i)) if kind == "text" else t
             for i, t in enumerate(docs(400, 5))]
    path = tmp_path / f"big.{'txt' if kind == 'text' else 'jsonl'}"
    path.write_bytes(("\n\n \n".join(texts) + "\n").encode() if kind == "text" else jsonl(texts))
    c = cfg(tmp_path, source=str(path))
    whole = [r["text"] for r in sources.load_records(c.data)]
    token_store_location(cfg(tmp_path / "one", source=str(path)))
    for chunk, unit in ((64, 1000), (4096, 2000), (333, 777)):
        monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
        monkeypatch.setattr(sources, "LONG_PARAGRAPH", 2 * chunk)
        monkeypatch.setattr(sources, "UNIT_BYTES", unit)
        units = sources.open_source(c.data).units()
        assert len(units) > 3
        assert records_by_units(c.data) == [r["text"] for r in sources.load_records(c.data)]
        monkeypatch.setattr(sources, "LONG_PARAGRAPH", 2 * (1 << 20))
        assert records_by_units(c.data) == whole
    token_store_location(cfg(tmp_path / "units", source=str(path)))
    assert stream(tmp_path / "units")[1] == stream(tmp_path / "one")[1]


def test_parquet_row_groups_and_a_datasets_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = docs(300, 3)
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet", row_group_size=20)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    monkeypatch.setattr(sources, "UNIT_BYTES", 1000)
    for source in (tmp_path / "p.parquet", tmp_path / "hf"):
        c = cfg(tmp_path, source=str(source))
        assert len(sources.open_source(c.data).units()) > 2
        assert records_by_units(c.data) == texts
    token_store_location(cfg(tmp_path / "s", source=str(tmp_path / "hf")))
    assert stream(tmp_path / "s")[1] == expected_stream(texts)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd: a datasets DatasetDict \(train\); name one of its splits"):
        sources.load_records(cfg(tmp_path, source=str(tmp_path / "dd")).data)


def test_without_the_datasets_package_one_line_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text('{"_data_files": []}')
    (tmp_path / "hf" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(ValueError, match=r"hf: a datasets directory needs the datasets package: pip install 'stackwise-ray\[datasets\]'"):
        sources.load_records(cfg(tmp_path, source=str(tmp_path / "hf")).data)


def bad_shards(tmp_path):
    import zstandard

    good = jsonl(docs(50, 1))
    cases = {}
    d = tmp_path / "zst"
    d.mkdir()
    (d / "a.jsonl").write_bytes(good)
    data = zstandard.ZstdCompressor().compress(jsonl(docs(2000, 2)))
    (d / "b.jsonl.zst").write_bytes(data[:len(data) // 2])
    cases["zst"] = (d, rf"{d / 'b.jsonl.zst'}: corrupt zst data after byte [\d,]+ of its decompressed text: .*truncated")
    d = tmp_path / "schema"
    d.mkdir()
    pq.write_table(pa.table({"text": docs(10, 3)}), d / "a.parquet")
    pq.write_table(pa.table({"body": docs(10, 4)}), d / "b.parquet")
    cases["schema"] = (d, rf"{d / 'b.parquet'}: missing column 'text' \(columns: body\)")
    d = tmp_path / "utf8"
    d.mkdir()
    (d / "a.txt").write_bytes(b"fine\n\nline two\nbad \xff here\n")
    cases["utf8"] = (d, rf"{d / 'a.txt'}: line 4: not valid UTF-8 \(byte 19\)")
    return cases


def test_a_bad_shard_is_one_line_naming_it_and_nothing_is_kept(tmp_path):
    for name, (source, message) in bad_shards(tmp_path).items():
        store = tmp_path / f"store-{name}"
        with pytest.raises(ValueError, match=message):
            token_store_location(cfg(store, source=str(source)))
        assert not (store / "tokens").exists() or not os.listdir(store / "tokens"), name


@pytest.mark.slow
def test_prepare_refuses_a_bad_shard_with_status_2(tmp_path):
    source, _ = bad_shards(tmp_path)["zst"]
    config = tmp_path / "x.yaml"
    config.write_text(f"data:\n  source: {source}\nray:\n  storage_path: {tmp_path / 'runs'}\n")
    out = subprocess.run([sys.executable, "-m", "stackwise_ray.prepare", str(config), "--local"], capture_output=True,
                         text=True, timeout=120, check=False, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()[-1:]
    assert "b.jsonl.zst" in line and line.startswith("error: ")
    assert not (tmp_path / "runs" / "tokens").exists() or not os.listdir(tmp_path / "runs" / "tokens")


def test_the_parallel_build_is_byte_for_byte_the_single_process_one(tmp_path, monkeypatch, ray_session):
    make_shards(tmp_path / "shards", n=300)
    big = tmp_path / "shards" / "f.txt"
    big.write_text("\n\n".join(docs(2000, 7)))
    monkeypatch.setattr(sources, "UNIT_BYTES", 8000)  # the big text file in byte ranges, Parquet in row groups
    assert len(sources.open_source(cfg(tmp_path, source=str(tmp_path / "shards")).data).units()) > 10
    # the tasks plan nothing: they read the units they are given, so the patch need not reach them
    token_store_location(cfg(tmp_path / "local", source=str(tmp_path / "shards")))
    token_store_location(cfg(tmp_path / "par", source=str(tmp_path / "shards")), parallel=True)
    key, ids, meta = stream(tmp_path / "par")
    assert (key, ids) == stream(tmp_path / "local")[:2] and meta["units"] > 10
    # custom objective: inputs and targets
    d = tmp_path / "pairs"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.jsonl").write_bytes("".join(json.dumps({"text": t, "y": t[::-1]}) + "\n" for t in docs(40, i)).encode())
    for where, parallel in (("plocal", False), ("ppar", True)):
        token_store_location(cfg(tmp_path / where, source=str(d), target_field="y"), parallel=parallel)
    for name in ("inputs.bin", "targets.bin"):
        [a] = (tmp_path / "plocal" / "tokens").glob(f"*/{name}")
        [b] = (tmp_path / "ppar" / "tokens").glob(f"*/{name}")
        assert a.read_bytes() == b.read_bytes()


def test_prepare_builds_the_store_that_train_then_opens(tmp_path, monkeypatch, capsys):
    from stackwise_ray import prepare

    make_shards(tmp_path / "shards")
    config = tmp_path / "x.yaml"
    config.write_text(f"data:\n  source: {tmp_path / 'shards'}\n  seq_len: 16\nray:\n  storage_path: {tmp_path / 'runs'}\n")
    assert prepare.main([str(config), "--local"]) == 0
    out = capsys.readouterr().out
    key, _, meta = stream(tmp_path / "runs")
    assert f"token store {key}" in out and f"{meta['tokens']:,} tokens" in out and "MB/s" in out

    def no_build(*args):
        raise AssertionError("the store was built again")

    monkeypatch.setattr(token_store, "write_store", no_build)
    assert prepare.main([str(config), "--local"]) == 0 and "found" in capsys.readouterr().out
    c = StackWiseConfig.from_yaml(str(config))
    assert token_store_location(c, for_training=True).endswith(key)  # what train's preflight and the trainer call


def test_a_shard_of_empty_texts_among_others_is_no_error_but_a_file_of_them_is(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_bytes(jsonl(docs(20, 1)))
    pq.write_table(pa.table({"text": ["", ""]}), d / "b.parquet")  # empty __init__.py files, say
    assert [r["text"] for r in sources.load_records(cfg(tmp_path, source=str(d)).data)] == docs(20, 1) + ["", ""]
    with pytest.raises(ValueError, match=r"b\.parquet: no text in field 'text'"):
        sources.load_records(cfg(tmp_path, source=str(d / "b.parquet")).data)
