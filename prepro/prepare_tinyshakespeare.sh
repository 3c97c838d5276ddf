#!/usr/bin/env bash
# prepare_tinyshakespeare.sh [OUTDIR]: tiny Shakespeare as a Megatron GPT dataset,
# OUTDIR/tinyshakespeare_text_document.{bin,idx} (default OUTDIR=data), GPT-2 tokens with
# <|endoftext|> after each document. A document is one speech: the text between blank
# lines ("First Citizen:\nBefore we proceed any further, hear me speak.\n"), 7,222 of them.
# The sources come from $MEGATRON_DATA or the web (prepro/fetch_data.sh) into
# OUTDIR/tinyshakespeare/ and OUTDIR/gpt2/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-data}"

BIN="$ROOT/prepro/preprocess_data"
stale=0
for src in prepro/preprocess_data.cpp prepro/tokenizer.h prepro/unicode_tables.h megatron.h; do
    [ "$ROOT/$src" -nt "$BIN" ] && stale=1
done
if [ ! -x "$BIN" ] || [ $stale = 1 ]; then
    echo "building $BIN" >&2
    g++ -O3 -std=c++17 -pthread -fopenmp -o "$BIN" "$ROOT/prepro/preprocess_data.cpp"
fi
"$ROOT/prepro/fetch_data.sh" tinyshakespeare "$OUT/tinyshakespeare" > /dev/null
"$ROOT/prepro/fetch_data.sh" gpt2 "$OUT/gpt2" > /dev/null
WORKERS="$(nproc 2> /dev/null || echo 1)"
[ "$WORKERS" -le 8 ] || WORKERS=8
"$BIN" --input "$OUT/tinyshakespeare/input.txt" --input-format text \
    --output-prefix "$OUT/tinyshakespeare" --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$OUT/gpt2/encoder.json" --merge-file "$OUT/gpt2/vocab.bpe" \
    --append-eod --workers "$WORKERS"
echo "$OUT/tinyshakespeare_text_document"
