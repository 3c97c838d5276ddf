#!/usr/bin/env bash
# bench_prepro.sh: GPT-2 tokenization throughput of prepro/preprocess_data (--workers 1 and 2)
# next to tiktoken and Hugging Face tokenizers (Python, one thread, where installed), on
# tiny Shakespeare (plain text) and a ~50 MB JSONL made by repeating real text (Gutenberg
# paragraphs and WikiText-2 articles), generated into /tmp. MB/s = MiB of input per second
# of reading, parsing and tokenizing (and for ours writing), the vocabulary's loading not
# counted. Needs $MEGATRON_DATA (default ../shared/data); BENCH_MB sets the JSONL's size.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
TMP="${TMPDIR:-/tmp}/bench_prepro"
MB="${BENCH_MB:-50}"
mkdir -p build "$TMP"
g++ -O3 -std=c++17 -pthread -fopenmp -o build/preprocess_data prepro/preprocess_data.cpp
VOCAB="$DATA/gpt2/encoder.json"
MERGES="$DATA/gpt2/vocab.bpe"

# the JSONL corpus: {"text": paragraph-or-article} lines, repeated up to $MB MiB
python3 - "$DATA" "$TMP/corpus.jsonl" "$MB" << 'EOF'
import glob, json, os, sys
data, out, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = []
for path in sorted(glob.glob(os.path.join(data, "corpus", "gutenberg", "*.txt"))):
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # shakespeare-caesar.txt
    docs += [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
for path in glob.glob(os.path.join(data, "wikitext", "wikitext-2.*.tokens")):
    docs += [a.strip("\n") for a in open(path, encoding="utf-8").read().split("\n = ") if a.strip()]
lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
size, target = 0, mb << 20
with open(out, "w", encoding="utf-8") as f:
    while size < target:
        for line in lines:
            f.write(line)
            size += len(line.encode("utf-8"))
            if size >= target:
                break
EOF

# ours INPUT WORKERS: the MB/s of preprocess_data's summary line (reading, parsing,
# tokenizing and writing; the tokenizer's loading is not counted)
ours() {
    build/preprocess_data --input "$1" --output-prefix "$TMP/out" --tokenizer-type GPT2BPETokenizer \
        --vocab-file "$VOCAB" --merge-file "$MERGES" --workers "$2" --log-interval 0 2> "$TMP/ours.err"
    sed -n 's/^done: .*(\([0-9.]*\) MB\/s.*/\1/p' "$TMP/ours.err"
}

# python_ref INPUT FORMAT: "tiktoken_MB/s hf_MB/s" single-threaded, "n/a" where not installed
python_ref() {
    RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python3 - "$1" "$2" "$VOCAB" "$MERGES" << 'EOF'
import json, os, sys, time
path, fmt, vocab, merges = sys.argv[1:5]

def documents():
    text = open(path, encoding="utf-8", errors="replace").read()
    if fmt == "jsonl":
        return [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
    docs, cur = [], []
    for line in text.split("\n"):
        if line.strip(" \t"):
            cur.append(line + "\n")
        elif cur:
            docs.append("".join(cur)); cur = []
    return docs + (["".join(cur)] if cur else [])

def rate(load, encode):
    enc = load()
    start = time.time()
    for doc in documents():
        encode(enc, doc)
    return "%.1f" % (os.path.getsize(path) / 1048576 / (time.time() - start))

def tiktoken_load():
    from tiktoken.core import Encoding
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return Encoding("gpt2", pat_str=pat, mergeable_ranks=data_gym_to_mergeable_bpe_ranks(merges, vocab),
                    special_tokens={"<|endoftext|>": 50256})

def hf_load():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert tok.get_vocab_size() == 50257
    return tok

results = []
for load, encode in ((tiktoken_load, lambda e, d: e.encode_ordinary(d)), (hf_load, lambda t, d: t.encode(d).ids)):
    try:
        results.append(rate(load, encode))
    except ImportError:
        results.append("n/a")
print(" ".join(results))
EOF
}

printf "%-32s %8s %10s %10s %10s %10s\n" "input" "MiB" "ours w=1" "ours w=2" "tiktoken" "HF tok."
for spec in "$DATA/tinyshakespeare/input.txt:text:tiny Shakespeare (text)" "$TMP/corpus.jsonl:jsonl:Gutenberg+WikiText (jsonl)"; do
    IFS=: read -r input fmt label <<< "$spec"
    w1=$(ours "$input" 1)
    w2=$(ours "$input" 2)
    read -r tt hf <<< "$(python_ref "$input" "$fmt")"
    size=$(python3 -c "import os,sys; print('%.1f' % (os.path.getsize(sys.argv[1]) / 1048576))" "$input")
    printf "%-32s %8s %10s %10s %10s %10s\n" "$label" "$size" "$w1" "$w2" "$tt" "$hf"
done
echo "(MB/s: MiB of input per second, vocabulary loading excluded; Python columns: one thread, reading + JSON + tokenizing; $(nproc) cores)"
rm -f "$TMP"/out_*
