#!/usr/bin/env bash
# The quick start's training run: a small GPT on tiny Shakespeare (GPT-2 BPE), a few
# minutes on 2 CPU cores (seconds on a GPU), then a generated sample.
# Expects `make` and prepro/prepare_tinyshakespeare.sh to have run (make quickstart does both).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
mkdir -p out
./train_gpt \
    --data-path "$DATA/tinyshakespeare_text_document" --split 949,50,1 \
    --vocab-file "$DATA/gpt2/encoder.json" --merge-file "$DATA/gpt2/vocab.bpe" \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters ${ITERS:-200} \
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
    --hidden-dropout 0.0 --attention-dropout 0.0 \
    --log-interval 10 --eval-interval 50 --eval-iters 4 \
    --log-file out/quickstart.jsonl --sample-length 100 "$@"
