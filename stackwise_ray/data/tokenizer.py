"""Tokenizers: the byte tokenizer that needs no files, and a `tokenizers` JSON file with
the same interface (pad, mask, bos and eos ids, encode, encode_joined, decode)."""

from __future__ import annotations

import itertools
import os

import numpy as np

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: targets pad with it

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
