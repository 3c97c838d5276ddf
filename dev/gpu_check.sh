#!/usr/bin/env bash
# Everything that needs a GPU, in as few device calls as its time limit allows. Steps:
#   tests    every test program with its GPU parts (each CUDA kernel against its CPU reference,
#            the model against HF, resume, recompute, generation, evaluation), the quick start on the GPU, and
#            NCCL at world size 1 (40 iterations bitwise equal with and without --debug-force-nccl)
#   kernels  dev/cuda/run_all.sh (each kernel ladder against measured ceilings and PyTorch) and
#            dev/profile_gpt.sh (GPU time per step by kernel family, ours beside PyTorch)
#   bench    dev/bench_gpt.sh (tokens/s against torch.compile)
#   recompute  dev/bench_recompute.sh (the largest model that fits, with and without recompute)
#   perf     one device call's worth of performance work (~8 min): the attention and matmul
#            micro-benchmarks (test_attention / test_matmul_ce --bench), dev/bench_gpt.sh at each
#            side's best micro-batch (GPT-2 B64, 1.7B B8), and dev/profile_gpt.sh for both models
# Usage (repo root, data from $MEGATRON_DATA):  dev/gpu_check.sh [tests] [kernels] [bench] [recompute] [perf]
# (none: the first four; more than 10 minutes together, so the device tool needs two or three calls)
# Logs go to $LOGS (out/gpu_check); the summary lines to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${*:-tests kernels bench recompute}
mkdir -p "${LOGS:=out/gpu_check}"
LOGS=$(cd "$LOGS" && pwd)
export MEGATRON_DATA=${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}
# cuDNN (--attention-backend fused): the nvidia-cudnn wheel beside PyTorch where the toolkit has none
[ -n "${CUDNN_HOME:-}" ] || CUDNN_HOME=$(python3 -c "import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0])" 2>/dev/null) || true
export CUDNN_HOME
# (and at run time that cuDNN, not an older one on the library path)
[ -n "$CUDNN_HOME" ] && export LD_LIBRARY_PATH="$CUDNN_HOME/lib:$CUDNN_HOME/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
nvcc --version | tail -n 1
start=$(date +%s)
step() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
targets=(all); step tests && targets+=($(ls test/test_*.cu | sed 's|test/\(.*\)\.cu|build/\1|'))
step perf && targets+=(build/test_attention build/test_matmul_ce)
make -j"$(nproc)" GPU_ARCH="${GPU_ARCH:-sm_90a}" "${targets[@]}" > "$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
./prepro/prepare_tinyshakespeare.sh data > /dev/null 2>&1 || echo "prepare_tinyshakespeare failed"

if step tests; then
    ./test/run_tests.sh > "$LOGS/tests.log" 2>&1
    grep -E "^(FAIL|skip|-- )" "$LOGS/tests.log"
    tail -n 1 "$LOGS/tests.log"
    GEN_DEVICE_FLAGS="--device cuda --fp32" ./test/test_generation.sh > "$LOGS/generation_gpu.log" 2>&1
    echo "generation on the GPU: $(grep -E '^FAIL' "$LOGS/generation_gpu.log"; tail -n 1 "$LOGS/generation_gpu.log")"
    EVAL_DEVICE=cuda ./test/test_evaluate.sh > "$LOGS/evaluate_gpu.log" 2>&1
    echo "evaluation on the GPU: $(grep -E '^FAIL' "$LOGS/evaluate_gpu.log"; tail -n 1 "$LOGS/evaluate_gpu.log")"
    ITERS=300 ./dev/quickstart.sh --device cuda > "$LOGS/quickstart.log" 2>&1
    grep -E "validation loss|iteration +300/" "$LOGS/quickstart.log" | tail -n 2
    sed -n '/---- sample/,/^----$/p' "$LOGS/quickstart.log" | head -n 12
    for mode in plain nccl nccl_distopt; do
        extra=(); [ "$mode" != plain ] && extra+=(--debug-force-nccl); [ "$mode" = nccl_distopt ] && extra+=(--use-distributed-optimizer)
        ITERS=40 ./dev/quickstart.sh --device cuda --log-interval 1 --sample-length 0 "${extra[@]}" > "$LOGS/nccl_$mode.log" 2>&1
        grep -oE "lm loss: [^|]*\|.*grad norm: [^|]*" "$LOGS/nccl_$mode.log" > "$LOGS/nccl_$mode.losses"
    done
    if [ "$(wc -l < "$LOGS/nccl_plain.losses")" -eq 40 ] && cmp -s "$LOGS/nccl_plain.losses" "$LOGS/nccl_nccl.losses" \
        && cmp -s "$LOGS/nccl_plain.losses" "$LOGS/nccl_nccl_distopt.losses"; then
        echo "NCCL world size 1: 40 iterations, losses and grad norms bitwise equal to the run without NCCL (plain and distributed optimizer)"
    else echo "FAIL NCCL world size 1: losses differ or missing (see $LOGS/nccl_*.log)"; fi
fi
if step kernels; then
    OUT="$LOGS/dev_cuda" ./dev/cuda/run_all.sh 2>&1 | tee "$LOGS/dev_cuda.txt" | tail -n 60
    OUTDIR="$LOGS/profile" ./dev/profile_gpt.sh 2>&1 | tee "$LOGS/profile.txt"
fi
if step bench; then OUTDIR="$LOGS/bench" ITERS=${ITERS:-30} ./dev/bench_gpt.sh 2>&1 | tail -n 15; fi
if step perf; then
    ./build/test_attention --bench > "$LOGS/attention_bench.log" 2>&1; grep -E "^FAIL|^bench|passed" "$LOGS/attention_bench.log"
    ./build/test_matmul_ce --bench > "$LOGS/matmul_bench.log" 2>&1; grep -E "^FAIL|^bench|passed" "$LOGS/matmul_bench.log"
    MODELS="gpt2-124M:12:768:12:1024:50304:64 row1-1.7B:24:2304:24:2048:51200:8" OUTDIR="$LOGS/bench" ITERS=${ITERS:-20} \
        ./dev/bench_gpt.sh 2>&1 | tail -n 9
    flags="--attention-backend fused --matmul-autotune"  # as the README's profiles
    OURS_FLAGS="$flags" MODEL=12:768:12:1024:50304:64 OUTDIR="$LOGS/profile" ./dev/profile_gpt.sh > "$LOGS/profile_gpt2.txt" 2>&1
    head -n 12 "$LOGS/profile_gpt2.txt"
    OURS_FLAGS="$flags" MODEL=24:2304:24:2048:51200:8 OUTDIR="$LOGS/profile_1.7b" ./dev/profile_gpt.sh > "$LOGS/profile_1.7b.txt" 2>&1
    head -n 12 "$LOGS/profile_1.7b.txt"
fi
if step recompute; then OUTDIR="$LOGS/bench_recompute" DATA=data ./dev/bench_recompute.sh 2>&1 | tail -n 12; fi
echo "gpu_check: $(( $(date +%s) - start )) s"
