#!/usr/bin/env bash
# GPT training throughput, megatron.c against a PyTorch reference measured in the same
# run (dev/bench_gpt_pytorch.py: nanoGPT-style, bf16 autocast, flash SDPA, fused AdamW,
# torch.compile). Run on a GPU machine, from the repo root, after `make GPU_ARCH=sm_90a`:
#   DATA=data dev/bench_gpt.sh            (DATA holds tinyshakespeare_text_document.*)
# Models: GPT-2 124M (12 x 768, 12 heads, T1024, V 50304) and Megatron-2 Table 1 row 1
# (24 x 2304, 24 heads, T2048, V 51200). Each side at the micro-batches listed; bf16.
# Prints one table: tokens/s, MFU (Megatron's model FLOPs, 989 TFLOP/s peak), memory, ratio.
# Ours runs with the hand-written attention (side "ours") and, where the binary has cuDNN,
# again with --attention-backend fused (side "cudnn"); BACKENDS="local" skips the second.
# OURS_FLAGS (default --matmul-autotune) go to every run of ours.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUTDIR=${OUTDIR:-out/bench}
ITERS=${ITERS:-30}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

BACKENDS=${BACKENDS:-local fused}
OURS_FLAGS=${OURS_FLAGS---matmul-autotune}
ldd ./train_gpt | grep -q libcudnn || BACKENDS=${BACKENDS//fused/}

# ours MODEL L H NH T V MB BACKEND -> "tokens_per_s mfu mem_gib"
ours() {
    local name=$1 L=$2 H=$3 NH=$4 T=$5 V=$6 MB=$7 backend=$8 log="$OUTDIR/ours_$1_mb$7_$8"
    ./train_gpt --device cuda --bf16 --attention-backend "$backend" $OURS_FLAGS --data-path "$DATA/tinyshakespeare_text_document" --split 100,0,0 \
        --vocab-size "$V" --num-layers "$L" --hidden-size "$H" --num-attention-heads "$NH" --seq-length "$T" \
        --micro-batch-size "$MB" --global-batch-size "$MB" --train-iters "$ITERS" --lr 1e-4 \
        --hidden-dropout 0 --attention-dropout 0 --log-interval 10 --eval-iters 0 \
        --log-file "$log.jsonl" > "$log.txt" 2>&1
    if [ $? -ne 0 ]; then echo "failed - -"; tail -n 3 "$log.txt" >&2; return; fi
    python3 - "$log.jsonl" "$log.txt" <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l][1:]  # the first interval warms up
mem = re.search(r"GPU in use ([0-9.]+) MiB", open(sys.argv[2]).read())
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
print("%.0f %.4f %.1f" % (tps, sum(r["mfu"] for r in rows) / len(rows), float(mem.group(1)) / 1024 if mem else -1))
PY
}

# torch MODEL L H NH T V MB -> "tokens_per_s mfu mem_gib"
torchref() {
    local L=$2 H=$3 NH=$4 T=$5 V=$6 MB=$7
    python3 dev/bench_gpt_pytorch.py --layers "$L" --hidden "$H" --heads "$NH" --seq "$T" --vocab "$V" \
        --micro-batch "$MB" --steps "$ITERS" 2> "$OUTDIR/torch_$1_mb$7.err" | tail -n 1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read() or "{}")
print("oom - -" if r.get("oom") or "tokens_per_s" not in r else "%.0f %.4f %.1f" % (r["tokens_per_s"], r["mfu"], r["peak_mem_gib"]))'
}

MODELS=${MODELS:-"gpt2-124M:12:768:12:1024:50304:32,64 row1-1.7B:24:2304:24:2048:51200:4,8"}
printf "%-12s %-6s %-3s %12s %7s %9s\n" model side mb tokens/s MFU mem_GiB > "$OUTDIR/table.txt"
for spec in $MODELS; do
    IFS=: read -r name L H NH T V MBS <<< "$spec"
    best_local=0; best_fused=0; best_torch=0
    for MB in ${MBS//,/ }; do
        for backend in $BACKENDS; do
            read -r tps mfu mem <<< "$(ours "$name" "$L" "$H" "$NH" "$T" "$V" "$MB" "$backend")"
            side=$([ "$backend" = fused ] && echo cudnn || echo ours)
            printf "%-12s %-6s %-3s %12s %7s %9s\n" "$name" "$side" "$MB" "$tps" "$mfu" "$mem" | tee -a "$OUTDIR/table.txt"
            best=best_$backend
            [[ "$tps" =~ ^[0-9]+$ ]] && [ "$tps" -gt "${!best}" ] && printf -v "$best" %s "$tps"
        done
        read -r tps mfu mem <<< "$(torchref "$name" "$L" "$H" "$NH" "$T" "$V" "$MB")"
        printf "%-12s %-6s %-3s %12s %7s %9s\n" "$name" torch "$MB" "$tps" "$mfu" "$mem" | tee -a "$OUTDIR/table.txt"
        [[ "$tps" =~ ^[0-9]+$ ]] && [ "$tps" -gt "$best_torch" ] && best_torch=$tps
    done
    ratio() { python3 -c "print('%.2f' % ($1 / $best_torch) if $best_torch else 'n/a')"; }
    line="$name: best torch.compile $best_torch tokens/s"
    [ "$best_local" -gt 0 ] && line+="; best ours $best_local (ratio $(ratio $best_local))"
    [ "$best_fused" -gt 0 ] && line+="; with cuDNN attention $best_fused (ratio $(ratio $best_fused))"
    echo "$line" | tee -a "$OUTDIR/table.txt"
done
echo "== summary"; cat "$OUTDIR/table.txt"
