#!/usr/bin/env bash
# Tensor and data parallelism on GPUs (NCCL), for a machine with 2 or more GPUs and no MPI:
# ranks meet through the file rendezvous (doc/parallelism.md). 20 iterations of a small GPT on
# tiny Shakespeare at TP=1 on one GPU, then TP=2, DP=2 and DP=2 with the distributed optimizer;
# prints the largest relative loss difference of each against TP=1 (fp32: expect ~1e-5 or
# less, the GEMMs are cut differently; bf16: ~1e-2).
# Usage (repo root, after make and prepro/prepare_tinyshakespeare.sh data): dev/gpu_parallel_check.sh [fp32|bf16]
set -uo pipefail
cd "$(dirname "$0")/.."
PREC=${1:-fp32}
DATA_DIR=${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}
WORK=${OUT:-out}/gpu_parallel
rm -rf "$WORK" && mkdir -p "$WORK"
GPUS=$(nvidia-smi -L | wc -l)
[ "$GPUS" -ge 2 ] || { echo "needs 2 GPUs, found $GPUS"; exit 1; }
RUN=(./train_gpt --device cuda --"$PREC" --data-path data/tinyshakespeare_text_document
     --vocab-file "$DATA_DIR/gpt2/encoder.json" --merge-file "$DATA_DIR/gpt2/vocab.bpe" --num-layers 4 --hidden-size 256
     --num-attention-heads 8 --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --train-iters 20 --lr 1e-3
     --eval-iters 0 --log-interval 1 --attention-dropout 0 --make-vocab-size-divisible-by 256 --collective-timeout 120)

# launch NAME RANKS [FLAGS...]: RANKS processes, one GPU each
launch() {
    local name=$1 n=$2; shift 2
    rm -rf "$WORK/rdv-$name" && mkdir -p "$WORK/rdv-$name"
    for ((r = 0; r < n; r++)); do
        MEGATRON_RENDEZVOUS="$WORK/rdv-$name" WORLD_SIZE=$n RANK=$r LOCAL_RANK=$r \
            "${RUN[@]}" --log-file "$WORK/$name.jsonl" "$@" > "$WORK/$name.$r.out" 2>&1 &
    done
    wait
    grep -h "error" "$WORK/$name".*.out | head -n 3
}

launch tp1 1
launch tp2 2 --tensor-model-parallel-size 2 --make-vocab-size-divisible-by 128
launch dp2 2
launch dp2_distopt 2 --use-distributed-optimizer
for name in tp2 dp2 dp2_distopt; do
    python3 - "$WORK/$name.jsonl" "$WORK/tp1.jsonl" "$name" << 'EOF'
import json, sys
load = lambda p: [json.loads(l)["lm_loss"] for l in open(p)]
a, b = load(sys.argv[1]), load(sys.argv[2])
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b)) if len(a) == len(b) == 20 else float("inf")
print(f"{sys.argv[3]:12s} vs tp1: largest relative loss difference {worst:.2e} over {len(a)} iterations (final {a[-1] if a else None} vs {b[-1]})")
EOF
done
grep -h "elapsed time per iteration" "$WORK"/tp1.0.out "$WORK"/tp2.0.out | tail -n 1
