"""
Writes test/fixtures/tokenizer.txt, the reference ids that test/test_tokenizer.cu checks
prepro/tokenizer.h against:

    pip install tiktoken tokenizers transformers
    python test/make_tokenizer_fixtures.py [data dir, default $MEGATRON_DATA or ../shared/data]

References: GPT-2 = tiktoken's `gpt2` encode_ordinary, cross-checked against the `tokenizers`
package's byte-level BPE built from the same files. BERT = transformers' Python BertTokenizer
(BertTokenizerLegacy, the port of Google's tokenization.py that Megatron copies: its basic and
WordPiece tokenizers, with Megatron's 200-character word limit), cross-checked against `tokenizers`' BertNormalizer + BertPreTokenizer +
WordPiece. Each reference is first checked to have really loaded its vocabulary.

Records (one per line; ids space-separated):
  corpus <tokenizer> <corpus> <documents> <tokens> <hash>   whole corpus: count + FNV-1a 64 over
                                                           each document's (length, ids) as uint32 LE
  prefix <tokenizer> <corpus> <n> <bytes|docs> <ids...>    ids of the first n bytes / documents
  case <tokenizer> <input bytes as hex> <ids...>           hand-picked strings
Corpora: tinyshakespeare and wikitext2-test as one document each, lambada one document per line's
"text". Tokenizers: gpt2, bert-lower, bert-case.
"""
import json
import os
import shutil
import struct
import sys
import tempfile
import unicodedata

import tiktoken
import tokenizers
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX_BYTES = 16384
PREFIX_DOCS = 16

# Strings where tokenizers go wrong. Where Megatron's BERT (Google's code) and transformers
# disagree (private-use/unassigned characters, NFC composition in cased mode) none is used:
# test_tokenizer.cu checks those cases by hand.
CASES = [
    b"Hello world", b"", b" ", b"a", b"\n",
    b"I'm can't you're we've he'll she'd it's 'S 'LL 'Re O'Neil rock'n'roll",
    b"  \n\n  ", b"a  \n\n  b", b"\t\t x \t", b"trailing spaces   ", b"   leading", b"\r\n\r\nCRLF\r\n",
    b"12345 678,901.23 3.14159 1e10 0x1F \xc2\xbd \xe2\x85\xa7 \xd9\xa3",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇯🇵".encode(),
    "CJK 中文字符，日本語のテキスト。한국어 텍스트 𠀀𪜀".encode(),
    "accents: café naïve Ünïcödé Øresund ÅNGSTRÖM façade".encode(),
    "nbsp:\u00a0x\u00a0 \u00a0y \u2009thin\u3000ideographic\u2028line\u2029para\u0085nel".encode(),
    "Σ ΟΔΟΣ ΟΔΟΣ. σοφός ΣΑΣ Σ. ΆΣ'Σ".encode(),
    "İstanbul ﬁ ligature ẞ straße ǅ ǈ Ⅻ ① x\u0301y".encode(),
    "<|endoftext|> [CLS] [SEP] <unk> @-@ @,@ @.@".encode(),
    b"\x00nul \x0bvt \x1fus \x7fdel \xc2\x80c1",
    b"invalid: \xff\xfe \xc3( \xe2\x82 \xf0\x80abc \xed\xa0\x80 \xf4\x90\x80\x80 \xc0\xaf \xe2\x82\xac ok",
    b"\xe2\x82", b"\xf0\x9f\x98", b"abc\xf0\x9f", "中".encode(), "ǅ".encode(),
    b"!" * 300, b"a" * 150, b"b" * 201 + b" c", b"x" * 1000,
    "math ∑ x² ≤ ½ — “quotes” ‘single’ «guillemets» …".encode(),
    "Zalgo t\u0337\u0322e\u0334\u0301x\u0335t".encode(),
    "Hangul 한글 jamo \u1100\u1161".encode(),
    b"--- ... ;;; ''' \"\"\" ### $$$ %%% &&& *** +++",
    " The 's ' s '\u00a0s".encode(),
]


def fnv1a_docs(docs):
    h = 0xCBF29CE484222325
    for ids in docs:
        for word in [len(ids)] + list(ids):
            for byte in struct.pack("<I", word):
                h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def load_gpt2(data):
    cache = tempfile.mkdtemp()
    shutil.copy(f"{data}/gpt2/vocab.bpe", f"{cache}/6d1cbeee0f20b3d9449abfede4726ed8212e3aee")
    shutil.copy(f"{data}/gpt2/encoder.json", f"{cache}/6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    enc = tiktoken.get_encoding("gpt2")
    assert enc.n_vocab == 50257, enc.n_vocab
    hf = Tokenizer(models.BPE.from_file(f"{data}/gpt2/encoder.json", f"{data}/gpt2/vocab.bpe"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert hf.get_vocab_size() == 50257, hf.get_vocab_size()
    return enc.encode_ordinary, lambda text: hf.encode(text, add_special_tokens=False).ids


def load_bert(data, lower):
    vocab = f"{data}/bert/vocab-{'uncased' if lower else 'cased'}.txt"
    slow = BertTokenizerLegacy(vocab, do_lower_case=lower)
    slow.wordpiece_tokenizer.max_input_chars_per_word = 200  # Megatron's (Google's) limit; HF's is 100
    n_lines = sum(1 for _ in open(vocab, encoding="utf-8"))
    assert len(slow.vocab) == n_lines and slow.convert_tokens_to_ids("the") != slow.unk_token_id, "BertTokenizer did not load"
    fast = Tokenizer(models.WordPiece.from_file(vocab, unk_token="[UNK]", max_input_chars_per_word=200))
    fast.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
    fast.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert fast.get_vocab_size() == n_lines
    # basic + wordpiece directly: BertTokenizer.tokenize() would also keep "[CLS]" etc. in the
    # text whole (never_split), which Megatron's tokenizer does not do
    words = lambda text: [p for w in slow.basic_tokenizer.tokenize(text) for p in slow.wordpiece_tokenizer.tokenize(w)]
    return (lambda text: slow.convert_tokens_to_ids(words(text)),
            lambda text: fast.encode(text, add_special_tokens=False).ids)


def corpora(data):
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    lambada = [json.loads(line)["text"].encode() for line in read(f"{data}/lambada/lambada_test.jsonl").splitlines()]
    return {"tinyshakespeare": [read(f"{data}/tinyshakespeare/input.txt")],
            "wikitext2-test": [read(f"{data}/wikitext/wikitext-2.test.tokens")],
            "lambada": lambada}


def main():
    data = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MEGATRON_DATA", os.path.join(HERE, "../../shared/data"))
    tokenizers_ = {"gpt2": load_gpt2(data), "bert-lower": load_bert(data, True), "bert-case": load_bert(data, False)}
    docs_of = corpora(data)
    out = [f"# written by test/make_tokenizer_fixtures.py: tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}, "
           f"transformers {transformers.__version__}, Python {sys.version.split()[0]} (Unicode {unicodedata.unidata_version})"]
    for name, (ref, check) in tokenizers_.items():
        decode = lambda b: b.decode("utf-8", errors="replace")
        for corpus, docs in docs_of.items():
            ids = [ref(decode(d)) for d in docs]
            other = [check(decode(d)) for d in docs]
            n = sum(len(x) for x in ids)
            diff_docs = sum(a != b for a, b in zip(ids, other))
            diff_tokens = sum(sum(p != q for p, q in zip(a, b)) + abs(len(a) - len(b)) for a, b in zip(ids, other))
            print(f"{name:10s} {corpus:15s} {len(docs):5d} docs {n:8d} tokens; cross-check: {diff_docs} docs / {diff_tokens} tokens differ",
                  file=sys.stderr)
            out.append(f"corpus {name} {corpus} {len(docs)} {n} {fnv1a_docs(ids)}")
            if len(docs) == 1:
                cut = docs[0][:PREFIX_BYTES].rfind(b"\n") + 1
                prefix_ids, unit, count = ref(decode(docs[0][:cut])), "bytes", cut
            else:
                prefix_ids, unit, count = [t for d in docs[:PREFIX_DOCS] for t in ref(decode(d))], "docs", PREFIX_DOCS
            out.append(f"prefix {name} {corpus} {count} {unit} " + " ".join(map(str, prefix_ids)))
        for case in CASES:
            ids, other = ref(decode(case)), check(decode(case))
            if ids != other:
                print(f"{name}: references differ on {case!r}:\n  {ids}\n  {other}", file=sys.stderr)
            out.append(f"case {name} {case.hex() or '-'} " + " ".join(map(str, ids)))
    path = os.path.join(HERE, "fixtures", "tokenizer.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
