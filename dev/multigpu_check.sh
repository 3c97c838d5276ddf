#!/usr/bin/env bash
# Tensor and data parallelism on N GPUs of one host over NCCL (issue #5), in one device call:
#   1. build for Hopper, prepare tiny Shakespeare;
#   2. correctness: 20 iterations of a small GPT (4 x 256, 8 heads, global batch 16) at TP=1 on one
#      GPU, then TP=N, DP=N, DP=N with the distributed optimizer and TP=2 x DP=N/2 (N >= 4): the
#      largest relative loss difference against TP=1 (fp32: the GEMMs are cut differently, expect
#      <= 1e-4; bf16: rounding of differently ordered sums, expect <= 2e-2);
#   3. throughput: GPT-2 124M weak scaling with DP=N (micro-batch 16 per GPU) against one GPU, beside
#      PyTorch DDP (dev/bench_gpt_pytorch.py --ddp under torchrun) in the same call; a 1.6B model of
#      hidden 4096 (8 layers, 32 heads, T2048, micro-batch 4) at TP=1 and TP=N: tokens/s per GPU
#      and the scaling efficiency.
# Ranks meet through the file rendezvous (no MPI needed). NVLink multicast stays off.
# Usage (repo root):  dev/multigpu_check.sh [fp32|bf16]     (correctness precision; throughput is bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PREC=${1:-fp32}
DATA_DIR=${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}
WORK=${OUT:-out}/multigpu
rm -rf "$WORK" && mkdir -p "$WORK"
N=$(nvidia-smi -L | wc -l)
[ "$N" -ge 2 ] || { echo "needs 2 or more GPUs, found $N"; exit 1; }
echo "$N GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
make -j"$(nproc)" GPU_ARCH=sm_90a all > "$WORK/build.log" 2>&1 || { tail -n 20 "$WORK/build.log"; exit 1; }
./prepro/prepare_tinyshakespeare.sh data > /dev/null 2>&1 || { echo "prepare_tinyshakespeare failed"; exit 1; }

# launch NAME RANKS CMD...: RANKS processes of CMD, one GPU each, meeting in a fresh rendezvous directory
launch() {
    local name=$1 n=$2; shift 2
    rm -rf "$WORK/rdv-$name" && mkdir -p "$WORK/rdv-$name"
    for ((r = 0; r < n; r++)); do
        MEGATRON_RENDEZVOUS="$WORK/rdv-$name" WORLD_SIZE=$n RANK=$r LOCAL_RANK=$r \
            "$@" --log-file "$WORK/$name.jsonl" > "$WORK/$name.$r.out" 2>&1 &
    done
    wait
    grep -h "error" "$WORK/$name".*.out | head -n 3
}

SMALL=(./train_gpt --device cuda --"$PREC" --data-path data/tinyshakespeare_text_document
       --vocab-file "$DATA_DIR/gpt2/encoder.json" --merge-file "$DATA_DIR/gpt2/vocab.bpe" --num-layers 4 --hidden-size 256
       --num-attention-heads 8 --seq-length 256 --micro-batch-size 2 --global-batch-size 16 --train-iters 20 --lr 1e-3
       --eval-iters 0 --log-interval 1 --attention-dropout 0 --make-vocab-size-divisible-by $((128 * N)) --collective-timeout 120)
launch tp1 1 "${SMALL[@]}"
runs=("tp$N" "dp$N" "dp${N}_distopt")
launch "tp$N" "$N" "${SMALL[@]}" --tensor-model-parallel-size "$N"
launch "dp$N" "$N" "${SMALL[@]}"
launch "dp${N}_distopt" "$N" "${SMALL[@]}" --use-distributed-optimizer
if [ "$N" -ge 4 ]; then
    launch "tp2dp$((N / 2))" "$N" "${SMALL[@]}" --tensor-model-parallel-size 2 --use-distributed-optimizer
    runs+=("tp2dp$((N / 2))")
fi
for name in "${runs[@]}"; do
    python3 - "$WORK/$name.jsonl" "$WORK/tp1.jsonl" "$name" "$PREC" << 'PY'
import json, sys
load = lambda p: [json.loads(l)["lm_loss"] for l in open(p) if '"train"' in l]
a, b = load(sys.argv[1]), load(sys.argv[2])
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b)) if len(a) == len(b) == 20 else float("inf")
tol = 1e-4 if sys.argv[4] == "fp32" else 2e-2
print(f"{'ok  ' if worst <= tol else 'FAIL'} {sys.argv[3]:14s} vs tp1: largest relative loss difference {worst:.2e} over {len(a)} iterations (tolerance {tol:g})")
PY
done

# tokens/s of a run's log, the first interval (warm-up) left out
rate() { python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '\"train\"' in l][1:]
print('%.0f' % (sum(r['tokens_per_s'] for r in rows) / len(rows)) if rows else 'failed')" "$1"; }
BENCH=(./train_gpt --device cuda --bf16 --data-path data/tinyshakespeare_text_document --split 100,0,0 --train-iters 30
       --lr 1e-4 --hidden-dropout 0 --attention-dropout 0 --log-interval 10 --eval-iters 0 --sample-length 0 --collective-timeout 300)
GPT2=(--vocab-size 50304 --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 --micro-batch-size 16)
launch dp_1gpu 1 "${BENCH[@]}" "${GPT2[@]}" --global-batch-size 16
launch "dp_${N}gpu" "$N" "${BENCH[@]}" "${GPT2[@]}" --global-batch-size $((16 * N))
one=$(rate "$WORK/dp_1gpu.jsonl"); all=$(rate "$WORK/dp_${N}gpu.jsonl")
python3 dev/bench_gpt_pytorch.py --micro-batch 16 --steps 30 2> "$WORK/torch_1gpu.err" | tail -n 1 > "$WORK/torch_1gpu.json"
torchrun --standalone --nproc_per_node "$N" dev/bench_gpt_pytorch.py --ddp --micro-batch 16 --steps 30 2> "$WORK/torch_ddp.err" | tail -n 1 > "$WORK/torch_ddp.json"
python3 - "$one" "$all" "$N" "$WORK/torch_1gpu.json" "$WORK/torch_ddp.json" << 'PY'
import json, sys
one, all_, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def tps(path):
    try: return json.load(open(path))["tokens_per_s"]
    except Exception: return None
t1, tn = tps(sys.argv[4]), tps(sys.argv[5])
if one != "failed" and all_ != "failed":
    print(f"GPT-2 124M DP={n}: ours {float(all_):,.0f} tokens/s ({float(all_) / n:,.0f} per GPU) vs {float(one):,.0f} on one GPU: weak scaling efficiency {float(all_) / (n * float(one)):.1%}")
if t1 and tn:
    print(f"GPT-2 124M DDP={n}: PyTorch {tn:,.0f} tokens/s ({tn / n:,.0f} per GPU) vs {t1:,.0f} on one GPU: efficiency {tn / (n * t1):.1%}")
PY
BIG=(--vocab-size 51200 --num-layers 8 --hidden-size 4096 --num-attention-heads 32 --seq-length 2048 --micro-batch-size 4 --global-batch-size 4)
launch tp_1gpu 1 "${BENCH[@]}" "${BIG[@]}"
launch "tp_${N}gpu" "$N" "${BENCH[@]}" "${BIG[@]}" --tensor-model-parallel-size "$N"
one=$(rate "$WORK/tp_1gpu.jsonl"); all=$(rate "$WORK/tp_${N}gpu.jsonl")
python3 -c "
import sys
one, all_, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if 'failed' in (one, all_): print('hidden-4096 TP runs failed: see', sys.argv[4])
else: print(f'hidden 4096 x 8 layers TP={n}: {float(all_):,.0f} tokens/s ({float(all_) / n:,.0f} per GPU) vs {float(one):,.0f} at TP=1: speed-up {float(all_) / float(one):.2f}x, strong scaling efficiency {float(all_) / (n * float(one)):.1%}')
" "$one" "$all" "$N" "$WORK"
