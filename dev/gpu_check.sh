#!/usr/bin/env bash
# Everything that needs a GPU, in one run (the lent H200's time is short):
#   1. build for Hopper;  2. every test program, now with its GPU parts (each CUDA kernel
#   against its CPU reference in fp32/bf16, the model against HF in fp32/bf16), and
#   train_gpt's generation mode on the GPU (test/test_generation.sh);
#   3. the attention benchmark;  4. the quick start on the GPU;  5. dev/bench_gpt.sh.
# Usage (repo root, data from $MEGATRON_DATA):  dev/gpu_check.sh [tests|bench|all]
# Logs go to $OUT (the device tool's folder) or out/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
LOGS=${OUT:-out/gpu_check}
mkdir -p "$LOGS"
export MEGATRON_DATA=${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
nvcc --version | tail -n 1
start=$(date +%s)
make -j"$(nproc)" GPU_ARCH=sm_90 all $(ls test/test_*.cu | sed 's|test/\(.*\)\.cu|build/\1|') > "$LOGS/build.log" 2>&1 \
    || { tail -n 30 "$LOGS/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
./prepro/prepare_tinyshakespeare.sh data > /dev/null 2>&1 || echo "prepare_tinyshakespeare failed"

if [ "$WHAT" != bench ]; then
    ./test/run_tests.sh > "$LOGS/tests.log" 2>&1
    grep -E "^(FAIL|skip|-- )" "$LOGS/tests.log"
    tail -n 1 "$LOGS/tests.log"
    GEN_DEVICE_FLAGS="--device cuda --fp32" ./test/test_generation.sh > "$LOGS/generation_gpu.log" 2>&1
    echo "generation on the GPU: $(grep -E '^FAIL' "$LOGS/generation_gpu.log"; tail -n 1 "$LOGS/generation_gpu.log")"
    ./build/test_attention --bench 2>&1 | tail -n 8 | tee "$LOGS/attention_bench.log"
    ITERS=300 ./dev/quickstart.sh --device cuda > "$LOGS/quickstart.log" 2>&1
    grep -E "validation loss|iteration +300/" "$LOGS/quickstart.log" | tail -n 2
    sed -n '/---- sample/,/^----$/p' "$LOGS/quickstart.log" | head -n 12
    ITERS=300 ./dev/quickstart.sh --device cuda --fp16 --log-file out/quickstart_fp16.jsonl --sample-length 0 > "$LOGS/quickstart_fp16.log" 2>&1
    echo "fp16: $(grep -E 'validation loss|iteration +300/' "$LOGS/quickstart_fp16.log" | tail -n 2 | tr -s ' ')"
    # NCCL with world size 1: every collective through one-rank communicators, losses bitwise as without
    for mode in plain nccl nccl_distopt; do
        extra=(); [ "$mode" != plain ] && extra+=(--debug-force-nccl); [ "$mode" = nccl_distopt ] && extra+=(--use-distributed-optimizer)
        ITERS=40 ./dev/quickstart.sh --device cuda --log-interval 1 --sample-length 0 "${extra[@]}" > "$LOGS/nccl_$mode.log" 2>&1
        grep -oE "lm loss: [^|]*\|.*grad norm: [^|]*" "$LOGS/nccl_$mode.log" > "$LOGS/nccl_$mode.losses"
    done
    if [ -s "$LOGS/nccl_plain.losses" ] && cmp -s "$LOGS/nccl_plain.losses" "$LOGS/nccl_nccl.losses" && cmp -s "$LOGS/nccl_plain.losses" "$LOGS/nccl_nccl_distopt.losses"; then
        echo "NCCL world size 1: 40 iterations, losses and grad norms bitwise equal to the run without NCCL (plain and distributed optimizer)"
    else echo "FAIL NCCL world size 1: losses differ or missing (see nccl_*.log)"; fi
fi
if [ "$WHAT" != tests ]; then
    OUTDIR="$LOGS/bench" ITERS=${ITERS:-30} ./dev/bench_gpt.sh 2>&1 | tail -n 12
fi
echo "gpu_check: $(( $(date +%s) - start )) s"
