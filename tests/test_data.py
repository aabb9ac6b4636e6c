import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import (
    ByteTokenizer,
    HFTokenizer,
    TokenDataset,
    build_datasets,
    collate,
    load_records,
    load_tokenizer,
    make_dataloader,
)


from .conftest import TOKEN_STORAGE


def cfg(**data):
    return StackWiseConfig.from_dict({"data": data, "ray": {"storage_path": TOKEN_STORAGE}})


def all_ids(train, val):
    return torch.cat([train.example_ids, val.example_ids])


# ---------------------------------------------------------------- default corpus and split

def test_default_corpus_builds_disjoint_split():
    train, val, tok = build_datasets(cfg(seq_len=64))
    assert isinstance(tok, ByteTokenizer)
    n = len(train) + len(val)
    assert n > 1000  # ~465 KB of pydoc text in 64-token windows
    assert len(val) == round(n * 0.1)
    assert train.input_ids.shape == (len(train), 64) and train.input_ids[:].dtype == torch.long
    assert set(train.example_ids.tolist()).isdisjoint(val.example_ids.tolist())
    assert sorted(all_ids(train, val).tolist()) == list(range(n))
    assert train.targets is None and "targets" not in train[0]


def test_split_is_deterministic_and_ignores_training_seed():
    a_train, a_val, _ = build_datasets(cfg(seq_len=64))
    b_train, b_val, _ = build_datasets(StackWiseConfig.from_dict({"data": {"seq_len": 64}, "training": {"seed": 123},
                                                                  "ray": {"storage_path": TOKEN_STORAGE}}))
    assert torch.equal(a_val.example_ids, b_val.example_ids)
    assert torch.equal(a_train.input_ids[:], b_train.input_ids[:])
    c_train, c_val, _ = build_datasets(cfg(seq_len=64, split_seed=1))
    assert not torch.equal(a_val.example_ids, c_val.example_ids)


def test_windows_concatenate_to_token_stream():
    tok = ByteTokenizer()
    train, val, _ = build_datasets(cfg(seq_len=50, max_examples=40))
    assert len(train) + len(val) == 40
    records = load_records(cfg().data)
    stream = []
    for i, r in enumerate(records):
        stream += ([tok.eos_id] if i else []) + tok.encode(r["text"])
    ids = all_ids(train, val)
    windows = torch.cat([train.input_ids[:], val.input_ids[:]])[ids.argsort()]
    assert windows.shape == (40, 50)
    assert windows.flatten().tolist() == stream[: 40 * 50]


def test_eos_between_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("ab\n\n  \ncd\nef\n\n\ngh", encoding="utf-8")
    assert [r["text"] for r in load_records(cfg(source=str(path)).data)] == ["ab", "cd\nef", "gh"]
    train, val, tok = build_datasets(cfg(source=str(path), seq_len=3))
    windows = torch.cat([train.input_ids[:], val.input_ids[:]])[all_ids(train, val).argsort()]
    e = tok.eos_id
    assert windows.tolist() == [[97, 98, e], [99, 100, 10], [101, 102, e]]  # tail "gh" dropped


def test_too_small_names_source(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.source .*tiny.txt.*too small for seq_len 16"):
        build_datasets(cfg(source=str(path), seq_len=16))


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "naïve café — 日本語 🙂"
    ids = tok.encode(text)
    assert ids[:3] == [110, 97, 195] and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.special_ids == frozenset({256, 257, 258, 259}) and tok.vocab_size == 260
    assert tok.decode(torch.tensor([104, 105])) == "hi"


def _save_word_level(path, tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return vocab


def test_hf_tokenizer_encode_decode(tmp_path):
    path = tmp_path / "tok.json"
    vocab = _save_word_level(path, ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]", "hello", "world"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 4, 7)
    assert tok.special_ids == frozenset({0, 2, 3, 4})
    assert tok.encode("hello world hello") == [5, 6, 5]  # no [CLS]/[SEP] added
    assert tok.encode("hello bogus") == [5, vocab["[UNK]"]]
    assert tok.decode([3, 5, 6, 0, 0]) == "hello world"


def test_hf_tokenizer_bos_eos_fall_back_to_pad(tmp_path):
    path = tmp_path / "tok.json"
    _save_word_level(path, ["<pad>", "<mask>", "[UNK]", "x"])
    tok = HFTokenizer(path)
    assert (tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id) == (0, 1, 0, 0)


def test_hf_tokenizer_without_mask_names_file(tmp_path):
    path = tmp_path / "nomask.json"
    _save_word_level(path, ["[PAD]", "[UNK]", "hello"])
    with pytest.raises(ValueError, match=r"nomask\.json: tokenizer has no mask token"):
        HFTokenizer(str(path))


def test_hf_tokenizer_builds_datasets(tmp_path):
    tok_path = tmp_path / "tok.json"
    _save_word_level(tok_path, ["[PAD]", "[UNK]", "[MASK]", "[SEP]", "a", "b"])
    data = tmp_path / "d.txt"
    data.write_text("a b a\n\nb b\n\na", encoding="utf-8")
    train, val, tok = build_datasets(cfg(source=str(data), tokenizer=str(tok_path), seq_len=3))
    windows = torch.cat([train.input_ids[:], val.input_ids[:]])[all_ids(train, val).argsort()]
    assert windows.tolist() == [[4, 5, 4], [3, 5, 5]]


# ---------------------------------------------------------------- file formats

def test_jsonl_records_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first", "x": 1}\n\n{"body": "second"}\n', encoding="utf-8")
    assert load_records(cfg(source=str(path), text_field="body").data) == [{"text": "first"}, {"text": "second"}]


def test_parquet_records(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two", "three"], "label": ["1", "2", "3"]}), path)
    assert [r["text"] for r in load_records(cfg(source=str(path)).data)] == ["one", "two", "three"]
    recs = load_records(cfg(source=str(path), target_field="label").data)
    assert recs[2] == {"text": "three", "target": "3"}


def test_format_overrides_extension(tmp_path):
    path = tmp_path / "d.data"
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    assert load_records(cfg(source=str(path), format="jsonl").data) == [{"text": "x"}]
    with pytest.raises(ValueError, match=r"d\.data: unknown extension '\.data'"):
        load_records(cfg(source=str(path)).data)


def test_custom_targets_padded(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "abcdefgh", "y": "xy"}, {"text": "ab", "y": [1, 2, 3, 4, 5, 6, 7]}, {"text": "q", "y": "z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    train, val, tok = build_datasets(cfg(source=str(path), target_field="y", seq_len=5, val_fraction=0.3))
    assert len(train) == 2 and len(val) == 1
    ids = all_ids(train, val)
    inputs = torch.cat([train.input_ids[:], val.input_ids[:]])[ids.argsort()]
    targets = torch.cat([train.targets[:], val.targets[:]])[ids.argsort()]
    p = tok.pad_id
    assert inputs.tolist() == [[97, 98, 99, 100, 101], [97, 98, p, p, p], [113, p, p, p, p]]
    assert targets.tolist() == [[120, 121, -100, -100, -100], [1, 2, 3, 4, 5], [122, -100, -100, -100, -100]]
    item = train[0]
    assert set(item) == {"input_ids", "example_id", "targets"} and item["targets"].shape == (5,)


def test_custom_max_examples(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": str(i), "y": "t"}) for i in range(10)), encoding="utf-8")
    train, val, _ = build_datasets(cfg(source=str(path), target_field="y", seq_len=4, max_examples=4))
    assert sorted(all_ids(train, val).tolist()) == [0, 1, 2, 3]


# ---------------------------------------------------------------- errors name the file

def test_jsonl_missing_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl: line 2: missing field 'text'"):
        load_records(cfg(source=str(path)).data)


def test_jsonl_missing_target(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "y": "b"}\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.jsonl: line 2: missing field 'y'"):
        load_records(cfg(source=str(path), target_field="y").data)


def test_jsonl_bad_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_records(cfg(source=str(path)).data)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(name) + ": empty file"):
        load_records(cfg(source=str(path)).data)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(ValueError, match=r"p\.parquet: missing column 'text'"):
        load_records(cfg(source=str(path)).data)


@pytest.mark.parametrize("target, expected", [
    ("[1, 1180591620717411303424]", "field 'y': 1180591620717411303424 is not a token id (ids are in [0, 2**31))"),
    ("[3, -4]", "field 'y': -4 is not a token id"),
    ("[" + "9" * 5000 + "]", "invalid JSON: Exceeds the limit (4300 digits)"),
], ids=["2**70", "negative", "5000-digits"])
def test_a_target_id_beyond_what_a_store_holds_names_file_and_line(tmp_path, target, expected):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "y": [1, 2]}\n\n{"text": "b", "y": ' + target + "}\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_records(cfg(source=str(path), target_field="y").data)
    assert str(e.value).startswith(f"{path}: line 3: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_a_corrupt_parquet_page_names_file_and_rows(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " + "x" * 50 for i in range(3000)]}), path, row_group_size=1000,
                   compression="none", use_dictionary=False)
    offset = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset  # the footer stays readable
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as e:
        load_records(cfg(source=str(path)).data)
    assert re.match(rf"{re.escape(str(path))}: rows \d+ to \d+: unreadable Parquet data: ", str(e.value))
    first = int(str(e.value).split("rows ")[1].split(" ")[0])
    assert 1000 <= first <= 2000  # the batch that reaches the third row group, not the file's start


# ---------------------------------------------------------------- batching

def test_collate_and_seeded_dataloader():
    ds = TokenDataset(torch.arange(40).view(10, 4), torch.arange(100, 110))
    batch = collate([ds[3], ds[1]])
    assert batch["input_ids"].tolist() == [[12, 13, 14, 15], [4, 5, 6, 7]]
    assert batch["example_ids"].tolist() == [103, 101] and "targets" not in batch

    def order(seed):
        return [b["example_ids"].tolist() for b in make_dataloader(ds, 3, shuffle=True, seed=seed)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(sum(order(0), [])) == list(range(100, 110))
    assert len(list(make_dataloader(ds, 3, shuffle=False, seed=0, drop_last=True))) == 3
