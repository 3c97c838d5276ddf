#!/usr/bin/env bash
# Where the time goes: GPU time per training step by kernel family, megatron.c beside PyTorch-compile,
# both read through CUPTI in their own training loops (ours: dev/kernel_trace.c loaded into train_gpt;
# PyTorch's: torch.profiler), with the time per step the GPU sat idle. GPT-2 124M at B16 x T1024 by default. Run on a GPU machine from the repo root after
# `make GPU_ARCH=sm_90a` and prepro/prepare_tinyshakespeare.sh:
#   DATA=data dev/profile_gpt.sh            (MODEL=L:H:NH:T:V:MB to change the shape; OURS_FLAGS for
#                                            train_gpt, e.g. "--attention-backend fused --matmul-autotune")
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUTDIR=${OUTDIR:-out/profile}
IFS=: read -r L H NH T V MB <<< "${MODEL:-12:768:12:1024:50304:16}"
ITERS=8  # two warm up, five are timed, the last ends the fifth
mkdir -p "$OUTDIR"
make -s build/libkernel_trace.so || exit 1
CUDA_INJECTION64_PATH=build/libkernel_trace.so KERNEL_TRACE_OUT="$OUTDIR/ours_kernels.json" KERNEL_TRACE_SKIP=2 \
    ./train_gpt --device cuda --bf16 --data-path "$DATA/tinyshakespeare_text_document" --split 100,0,0 \
    --vocab-size "$V" --num-layers "$L" --hidden-size "$H" --num-attention-heads "$NH" --seq-length "$T" \
    --micro-batch-size "$MB" --global-batch-size "$MB" --train-iters "$ITERS" --lr 1e-4 \
    --hidden-dropout 0 --attention-dropout 0 --log-interval 10 --eval-iters 0 --sample-length 0 ${OURS_FLAGS:-} \
    > "$OUTDIR/ours.txt" 2> "$OUTDIR/ours.err" || { echo "train_gpt failed:"; tail -n 5 "$OUTDIR/ours.err"; }
grep "^kernel_trace" -A 12 "$OUTDIR/ours.err"
python3 dev/bench_gpt_pytorch.py --layers "$L" --hidden "$H" --heads "$NH" --seq "$T" --vocab "$V" --micro-batch "$MB" \
    --steps 10 --profile "$OUTDIR/torch_kernels.json" > "$OUTDIR/torch.json" 2> "$OUTDIR/torch.err" || tail -n 5 "$OUTDIR/torch.err"
python3 dev/profile_gpt.py "$OUTDIR/ours_kernels.json" "$OUTDIR/torch_kernels.json" "$OUTDIR/torch.json"
