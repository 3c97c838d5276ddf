#!/usr/bin/env bash
# The largest GPT that fits on one GPU without and with full activation recomputation
# (Megatron-3 §5; --recompute-granularity full --recompute-method uniform). The shape is
# Megatron-2 Table 1 row 1 (hidden 2304, 24 heads, T 2048, V 51200, bf16) with more and more
# layers at one micro-batch, a few iterations each, until train_gpt stops with its one-line
# "GPU out of memory". Run on a GPU machine from the repo root, after `make GPU_ARCH=sm_90a` and
# `./prepro/prepare_tinyshakespeare.sh data`:
#   DATA=data MB=8 dev/bench_recompute.sh
# Per mode: two probe runs (12 and 24 layers, the latter Table 1's model) give the GPU memory one
# more layer costs; the predicted largest count is run, then one more layer at a time until one
# does not fit (or one fewer at a time until one does). LAYERS="40 56" runs just those counts.
# MFU counts model FLOPs only: full recompute's second forward (about 1/3 more work) is not in it.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUTDIR=${OUTDIR:-out/bench_recompute}
ITERS=${ITERS:-4}
MB=${MB:-8}
MODES=${MODES:-"none full"}
H=2304 NH=24 T=2048 V=51200
mkdir -p "$OUTDIR"
: > "$OUTDIR/summary.txt"

# run MODE L -> "ok tokens_per_s mfu gib params_b kept_mib_per_layer" | "oom <error line>" | "failed <last line>"
run() {
    local mode=$1 L=$2 log="$OUTDIR/${1}_L$2" flags=()
    [ "$mode" = full ] && flags=(--recompute-granularity full --recompute-method uniform)
    ./train_gpt --device cuda --bf16 --data-path "$DATA/tinyshakespeare_text_document" --split 100,0,0 \
        --vocab-size "$V" --num-layers "$L" --hidden-size "$H" --num-attention-heads "$NH" --seq-length "$T" \
        --micro-batch-size "$MB" --global-batch-size "$MB" --train-iters "$ITERS" --lr 1e-4 \
        --log-interval 1 --eval-iters 0 "${flags[@]}" --log-file "$log.jsonl" > "$log.txt" 2> "$log.err"
    local status=$?
    if [ $status -ne 0 ]; then
        if grep -q "GPU out of memory" "$log.err" && [ "$(wc -l < "$log.err")" -eq 1 ]; then echo "oom $(cat "$log.err")"
        else echo "failed $(tail -n 1 "$log.err")"; fi
        return
    fi
    python3 - "$log.jsonl" "$log.txt" <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l][1:]  # the first iteration warms up
text = open(sys.argv[2]).read()
mem = float(re.search(r"GPU in use ([0-9.]+) MiB", text).group(1)) / 1024
params = int(re.search(r"([0-9]+) parameters", text).group(1)) / 1e9
kept = re.search(r"= ([0-9.]+) MiB per layer", text).group(1)
print("ok %.0f %.4f %.2f %.2f %s" % (sum(r["tokens_per_s"] for r in rows) / len(rows), sum(r["mfu"] for r in rows) / len(rows), mem, params, kept))
PY
}

row() {  # MODE L RESULT...
    local mode=$1 L=$2; shift 2
    if [ "$1" = ok ]; then printf "%-5s %4s %8s %10s %7s %8s %15s\n" "$mode" "$L" "$5" "$2" "$3" "$4" "$6" | tee -a "$OUTDIR/table.txt"
    else printf "%-5s %4s %s\n" "$mode" "$L" "$*" | tee -a "$OUTDIR/table.txt"; fi
}

total_gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | awk '{print $1 / 1024}')
echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader -i 0), $total_gib GiB; micro-batch $MB x T $T, hidden $H, $NH heads, bf16" | tee "$OUTDIR/table.txt"
printf "%-5s %4s %8s %10s %7s %8s %15s\n" mode L params_B tokens/s MFU GiB kept_MiB/layer | tee -a "$OUTDIR/table.txt"
for mode in $MODES; do
    if [ -n "${LAYERS:-}" ]; then
        for L in $LAYERS; do row "$mode" "$L" $(run "$mode" "$L"); done
        continue
    fi
    probe12=$(run "$mode" 12); row "$mode" 12 $probe12
    probe24=$(run "$mode" 24); row "$mode" 24 $probe24
    if [[ "$probe12" != ok* || "$probe24" != ok* ]]; then echo "$mode: a probe did not fit: try a smaller MB" | tee -a "$OUTDIR/summary.txt"; continue; fi
    # GPU memory is linear in the layer count: predict the largest count that leaves 0.5 GiB free
    L=$(python3 -c "
m12, m24 = float('$probe12'.split()[3]), float('$probe24'.split()[3])
per = (m24 - m12) / 12
print(max(1, int(($total_gib - 0.5 - (m24 - 24 * per)) / per)))")
    best="none"; over=""
    for try in 1 2 3 4 5 6; do
        result=$(run "$mode" "$L"); row "$mode" "$L" $result
        if [[ "$result" == ok* ]]; then best="$L layers ($(echo "$result" | cut -d' ' -f5) B parameters)"; [ -n "$over" ] && break; L=$((L + 1))
        else over="$L layers: ${result#* }"; [ "$best" != none ] && break; L=$((L - 1)); fi
    done
    echo "$mode: largest that fits: $best; $over" | tee -a "$OUTDIR/summary.txt"
done
echo "== summary"; cat "$OUTDIR/table.txt" "$OUTDIR/summary.txt"
