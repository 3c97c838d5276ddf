#!/usr/bin/env python3
"""Expected outputs for test/test_prepro.sh, from a faithful Python re-implementation of
Megatron-LM's tools/preprocess_data.py (2022, commit 2755bcb) and its MMapIndexedDataset
writer (megatron/data/indexed_dataset.py). GPT-2 ids come from tiktoken (encode_ordinary:
no special tokens, as Megatron's GPT2Tokenizer.encode), built offline from the reference
encoder.json/vocab.bpe; BERT ids from the `tokenizers` package when it is installed.

Where prepro/preprocess_data.cpp decides what Megatron leaves undefined (Megatron would
crash), this script does the same, marked "ours" below: invalid UTF-8 read as Python's
errors='replace', lone surrogates -> U+FFFD, blank JSON lines skipped, a UTF-8 BOM ignored,
and the plain-text format (documents separated by blank lines).

    pip install tiktoken tokenizers
    python3 test/make_prepro_fixtures.py      # writes test/fixtures/prepro/
"""
import hashlib
import json
import os
import re
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("MEGATRON_DATA", os.path.join(ROOT, "..", "shared", "data"))
OUT = os.path.join(ROOT, "test", "fixtures", "prepro")


# ---------------------------------------------------------------------------------
# tokenizers

def gpt2_encoder():
    from tiktoken.core import Encoding
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(DATA, "gpt2", "vocab.bpe"),
                                           os.path.join(DATA, "gpt2", "encoder.json"))
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = Encoding("gpt2-local", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    assert enc.n_vocab == 50257
    return {"encode": enc.encode_ordinary, "vocab_size": 50257, "eod": 50256}


def bert_encoder(lower):
    try:
        from tokenizers import BertWordPieceTokenizer
    except ImportError:
        return None
    name = "vocab-uncased.txt" if lower else "vocab-cased.txt"
    tok = BertWordPieceTokenizer(os.path.join(DATA, "bert", name), lowercase=lower, strip_accents=lower,
                                 clean_text=True, handle_chinese_chars=True)
    vocab = tok.get_vocab_size()
    assert vocab in (30522, 28996), vocab  # the file really loaded
    # Megatron appends [BOS] and [EOS] to the vocabulary: vocab_size = len(vocab) + 2
    return {"encode": lambda s: tok.encode(s, add_special_tokens=False).ids, "vocab_size": vocab + 2, "eod": None}


# ---------------------------------------------------------------------------------
# Megatron's MMapIndexedDatasetBuilder (2022)

DTYPE_CODES = {np.uint16: 8, np.int32: 4}


def best_fitting_dtype(vocab_size):
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class Builder:
    def __init__(self, dtype):
        self.dtype, self.data, self.sizes, self.doc_idx = dtype, bytearray(), [], [0]

    def add_item(self, ids):
        arr = np.array(ids, dtype=self.dtype)
        self.data += arr.tobytes(order="C")
        self.sizes.append(arr.size)

    def end_document(self):
        self.doc_idx.append(len(self.sizes))

    def index_bytes(self):
        pointers, address = [], 0
        for size in self.sizes:
            pointers.append(address)
            address += size * np.dtype(self.dtype).itemsize
        return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[self.dtype])
                + struct.pack("<Q", len(self.sizes)) + struct.pack("<Q", len(self.doc_idx))
                + np.array(self.sizes, dtype=np.int32).tobytes(order="C")
                + np.array(pointers, dtype=np.int64).tobytes(order="C")
                + np.array(self.doc_idx, dtype=np.int64).tobytes(order="C"))


# ---------------------------------------------------------------------------------
# preprocess_data.py: Encoder.encode and the main loop

def encode_document(text, tok, append_eod, splitter):
    doc_ids = []
    for sentence in splitter(text):
        sentence_ids = tok["encode"](sentence)
        if len(sentence_ids) > 0:
            doc_ids.append(sentence_ids)
    if len(doc_ids) > 0 and append_eod:
        doc_ids[-1].append(tok["eod"])
    return doc_ids


def no_lone_surrogates(text):  # ours: Megatron's tokenizer would crash on them
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def read_text(path):
    # Python's text mode: universal newlines; ours: errors='replace' and the BOM ignored
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        text = f.read()
    return text[1:] if text.startswith("\ufeff") else text


def jsonl_documents(path, keys, skip_bad_lines=False):
    # iterating a text-mode file: universal newlines have turned \r\n and \r into \n
    for line in read_text(path).split("\n"):
        if line.strip(" \t") == "":  # ours: blank lines are skipped
            continue
        try:
            data = json.loads(line)
            fields = {key: data[key] for key in keys}
            assert all(isinstance(v, str) for v in fields.values())
        except Exception:
            if skip_bad_lines:
                continue
            raise
        yield {key: no_lone_surrogates(v) for key, v in fields.items()}


def text_documents(path):
    """Ours: plain text, documents separated by one or more blank lines (empty, or only
    spaces and tabs); each document keeps its lines' newlines."""
    lines = read_text(path).split("\n")
    doc = []
    for i, line in enumerate(lines):
        if line.strip(" \t") == "":
            if doc:
                yield {"text": "".join(doc)}
            doc = []
        else:
            doc.append(line if i == len(lines) - 1 else line + "\n")
    if doc:
        yield {"text": "".join(doc)}


def preprocess(documents, keys, tok, append_eod=False, splitter=lambda text: [text]):
    dtype = best_fitting_dtype(tok["vocab_size"])
    builders = {key: Builder(dtype) for key in keys}
    for doc in documents:
        for key in keys:
            sentences = encode_document(doc[key], tok, append_eod, splitter)
            if len(sentences) == 0:
                continue
            for sentence in sentences:
                builders[key].add_item(sentence)
            builders[key].end_document()
    return builders


def write_outputs(name, builders, level="document"):
    for key, b in builders.items():
        stem = os.path.join(OUT, "%s_%s_%s" % (name, key, level))
        with open(stem + ".bin", "wb") as f:
            f.write(b.data)
        with open(stem + ".idx", "wb") as f:
            f.write(b.index_bytes())
        print("wrote %s.{bin,idx}: %d documents, %d sequences, %d tokens" %
              (stem, len(b.doc_idx) - 1, len(b.sizes), sum(b.sizes)))


def digest_line(name, builders, level="document"):
    lines = []
    for key, b in builders.items():
        stem = "%s_%s_%s" % (name, key, level)
        lines.append("%s.bin %s %d" % (stem, hashlib.sha256(bytes(b.data)).hexdigest(), len(b.doc_idx) - 1))
        lines.append("%s.idx %s %d" % (stem, hashlib.sha256(b.index_bytes()).hexdigest(), len(b.doc_idx) - 1))
    return lines


# ---------------------------------------------------------------------------------
# inputs

SMALL_JSONL = [
    '{"text": "Hello, world! Ünïcödé café naïve — “quotes” ½ ﬁ", "title": "First", "id": 1}',
    '{"id": 2, "meta": {"nested": [1, -0.5, 2.5e-3, 1E+2, true, false, null, {"a": "}]\\"", "b": []}]}, '
    '"text": "\\u00e9\\u4e2d\\u6587 emoji \\ud83d\\ude00 raw 😀 日本語 \\u0000 nul", '
    '"title": "Ⅱ \\"escaped\\" \\\\ \\/ \\b\\f\\n\\r\\t end"}',
    '{"text": "", "title": "an empty text"}',
    '{"text": "   ", "title": ""}',
    '{"title": "dup", "text": "first value", "text": "last value wins"}',
    '{"text": "tabs\\tand\\nnewlines\\n\\nparagraph two.\\n", "title": "-Infinity NaN", "n": -Infinity, '
    '"m": NaN, "i": Infinity, "big": 1.5E+300, "z": 0}',
    '',
    '   \t ',
    '{"text":"no spaces","title":"x"}',
    '  {"text" : "spaces around" , "title" : "t" }  ',
    '{"text": "<|endoftext|> is plain text here", "title": "special"}',
    '{"tëxt": "other", "text": "the title key below is escaped", "\\u0074itle": "escaped key name"}',
]

BAD_UTF8_LINES = [
    b'{"text": "bad \xff byte", "title": "ok"}',
    b'{"text": "truncated \xe2\x82 euro, overlong \xc0\xaf slash", "title": "surrogate \xed\xa0\x80 bytes"}',
    b'{"text": "too big \xf4\x90\x80\x80 and cut \xf0\x9f\x98", "title": "fine \xf0\x9f\x98\x80"}',
    b'{"text": "lone \\ud800 high, lone \\udc00 low, \\ud83d\\u0041 pair broken", "title": "end \xe2\x82"}',
]

SMALL_TEXT = ("\ufeff\n\n  \nFirst Citizen:\nBefore we proceed any further, hear me speak.\n\n"
              "All:\nSpeak, speak.\n\n\n\nFirst Citizen:\r\nYou are all resolved rather to die than to famish?\r\n"
              " \t \nAll:\rResolved. resolved.\r\rlast paragraph\n  indented line\nno newline at the end")


# --split-sentences: NLTK punkt on text where every sentence ends in . ! or ? followed by
# whitespace and a capital letter (no abbreviations, no quotes), so any sane splitter agrees.
SPLIT_JSONL = [
    {"text": "Hello there. General Kenobi! You are a bold one? Yes."},
    {"text": "One sentence without an end"},
    {"text": "First line.\nSecond line.\n\nThird paragraph.\n"},
    {"text": ""},
    {"text": "   "},
    {"text": "Numbers like 3.14 stay. Unicode too: caf\u00e9 na\u00efve. The end."},
]


def punkt_like(text, keep_newlines):
    """Sentences as punkt returns them on such text: whitespace between sentences dropped, or
    with --keep-newlines (Megatron's CustomLanguageVars) kept at the end of the sentence before."""
    if not text.strip():
        return []
    sentences, start = [], 0
    for m in re.finditer(r"[.!?]\s+(?=[A-Z])", text):
        sentences.append(text[start:m.end() if keep_newlines else m.start() + 1])
        start = m.end()
    sentences.append(text[start:].rstrip())
    return sentences


def write_input(name, data):
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    gpt2 = gpt2_encoder()

    small = write_input("small.jsonl", ("\n".join(SMALL_JSONL[:-2]) + "\r\n" + "\n".join(SMALL_JSONL[-2:])).encode("utf-8"))
    write_outputs("small_eod", preprocess(jsonl_documents(small, ["text", "title"]), ["text", "title"], gpt2, append_eod=True))
    write_outputs("small", preprocess(jsonl_documents(small, ["text"]), ["text"], gpt2))

    bad = write_input("bad_utf8.jsonl", b"\n".join(BAD_UTF8_LINES) + b"\n")
    write_outputs("bad_utf8", preprocess(jsonl_documents(bad, ["text", "title"]), ["text", "title"], gpt2, append_eod=True))

    broken = write_input("broken.jsonl", "\n".join([SMALL_JSONL[0], '{"text": "unterminated}', SMALL_JSONL[2],
                                                    '{"text": 12, "title": "a number"}', SMALL_JSONL[4],
                                                    '{"title": "no text key"}', '[1, 2]', SMALL_JSONL[8]]).encode() + b"\n")
    write_outputs("broken_skip", preprocess(jsonl_documents(broken, ["text"], skip_bad_lines=True), ["text"], gpt2, append_eod=True))

    text = write_input("small.txt", SMALL_TEXT.encode("utf-8"))
    for d in text_documents(text):
        print("text document: %r" % d["text"])
    write_outputs("small_txt", preprocess(text_documents(text), ["text"], gpt2, append_eod=True))

    split = write_input("split.jsonl", "".join(json.dumps(d) + "\n" for d in SPLIT_JSONL).encode())
    write_outputs("split_newlines", preprocess(jsonl_documents(split, ["text"]), ["text"], gpt2, append_eod=True,
                                               splitter=lambda t: punkt_like(t, True)), level="sentence")

    bert = bert_encoder(lower=True)
    if bert:
        write_outputs("small_bert", preprocess(jsonl_documents(small, ["text"]), ["text"], bert))
        write_outputs("split_bert", preprocess(jsonl_documents(split, ["text"]), ["text"], bert,
                                               splitter=lambda t: punkt_like(t, False)), level="sentence")
    else:
        print("skip BERT fixtures: pip install tokenizers")

    # real data: only digests (the outputs are hundreds of KB)
    digests = []
    shakespeare = os.path.join(DATA, "tinyshakespeare", "input.txt")
    digests += digest_line("tinyshakespeare", preprocess(text_documents(shakespeare), ["text"], gpt2, append_eod=True))
    lambada = os.path.join(DATA, "lambada", "lambada_test.jsonl")
    digests += digest_line("lambada", preprocess(jsonl_documents(lambada, ["text"]), ["text"], gpt2, append_eod=True))
    with open(os.path.join(OUT, "real_data.sha256"), "w") as f:
        f.write("# file sha256 documents (from test/make_prepro_fixtures.py)\n" + "\n".join(digests) + "\n")
    print("\n".join(digests))


if __name__ == "__main__":
    sys.exit(main())
