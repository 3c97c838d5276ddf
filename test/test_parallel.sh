#!/usr/bin/env bash
# Tensor and data parallelism as a user runs them: train_gpt under mpirun on CPU ranks.
# Same global batch, 20 iterations of a tiny GPT on tiny Shakespeare at TP=1 (the reference),
# TP=2, TP=4, DP=2, TP=2 x DP=2 and the distributed optimizer: every loss within 1e-5
# (relative) of the reference and the gathered parameters after training equal; then the
# bad inputs: t not dividing heads / ffn / world size, mismatched flags, a hanging rank.
# Activation recomputation at TP=2 and TP=2 x DP=2 is bitwise the run without it.
# The vocabulary is padded to the same size at every t (--make-vocab-size-divisible-by 512/t;
# Megatron pads to a multiple of 128 x t), so all runs start from the same full weights.
cd "$(dirname "$0")/.."
DATA_DIR="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
WORK=build/test_parallel_sh
rm -rf "$WORK" && mkdir -p "$WORK"
source test/lib.sh

if ! command -v mpirun > /dev/null; then
    echo "skip parallel runs: mpirun not found (apt-get install openmpi-bin libopenmpi-dev, then make)"
    echo "0 passed, 0 failed"; exit 0
fi
if ! ldd ./train_gpt 2> /dev/null | grep -q libmpi; then
    echo "skip parallel runs: ./train_gpt was built without MPI (install libopenmpi-dev, then make)"
    echo "0 passed, 0 failed"; exit 0
fi
# (no single-copy shared memory: containers often forbid the ptrace it needs)
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x OMP_NUM_THREADS=1)

./prepro/preprocess_data --input "$DATA_DIR/tinyshakespeare/input.txt" --input-format text --output-prefix "$WORK/ts" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA_DIR/gpt2/encoder.json" --merge-file "$DATA_DIR/gpt2/vocab.bpe" \
    --append-eod --log-interval 0 > /dev/null 2>&1 || fail "prepare tiny Shakespeare" "preprocess_data failed"
RUN=(./train_gpt --device cpu --data-path "$WORK/ts_text_document" --vocab-file "$DATA_DIR/gpt2/encoder.json"
     --merge-file "$DATA_DIR/gpt2/vocab.bpe" --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16
     --micro-batch-size 2 --global-batch-size 8 --train-iters 20 --lr 1e-3 --lr-warmup-iters 2 --eval-iters 0
     --log-interval 1 --attention-dropout 0 --collective-timeout 120)

# run NAME RANKS TP [FLAGS...]: a training run writing $WORK/NAME.jsonl and $WORK/NAME.params
run() {
    local name=$1 np=$2 tp=$3; shift 3
    "${MPIRUN[@]}" -np "$np" "${RUN[@]}" --tensor-model-parallel-size "$tp" --make-vocab-size-divisible-by $((512 / tp)) \
        --log-file "$WORK/$name.jsonl" --debug-dump-params "$WORK/$name.params" "$@" > "$WORK/$name.out" 2>&1
}

# compare NAME REF TOL: losses of every iteration and the final parameters
compare() {
    local name=$1 ref=$2 tol=$3 detail
    if detail=$(python3 - "$WORK/$name" "$WORK/$ref" "$tol" 2>&1 << 'EOF'
import json, math, sys
from array import array
got, ref, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
load = lambda p: [json.loads(l)["lm_loss"] for l in open(p + ".jsonl")]
a, b = load(got), load(ref)
assert len(a) == len(b) == 20, f"{len(a)} and {len(b)} loss rows"
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
assert worst <= tol, f"loss differs by {worst:.2e} relative (iteration losses {a[-1]} vs {b[-1]})"
p, q = array("f", open(got + ".params", "rb").read()), array("f", open(ref + ".params", "rb").read())
assert len(p) == len(q), f"{len(p)} vs {len(q)} parameters"
err = math.sqrt(sum((x - y) ** 2 for x, y in zip(p, q)) / sum(y * y for y in q))
assert err <= tol, f"parameters differ by {err:.2e} relative"
print(f"losses within {worst:.1e}, parameters within {err:.1e}")
EOF
    ); then ok "$name vs $ref: $detail"; else fail "$name vs $ref" "$(echo "$detail" | tail -n 1) ($(grep -m1 error "$WORK/$name.out"))"; fi
}

run tp1 1 1
grep -q "parallel: world size 1" "$WORK/tp1.out" || fail "reference run" "$(tail -n 3 "$WORK/tp1.out")"
run tp2 2 2 && compare tp2 tp1 1e-5 || fail "TP=2 run" "$(grep -m1 error "$WORK/tp2.out")"
run tp4 4 4 && compare tp4 tp1 1e-5 || fail "TP=4 run" "$(grep -m1 error "$WORK/tp4.out")"
run dp2 2 1 --ddp-bucket-size 5000 && compare dp2 tp1 1e-5 || fail "DP=2 run" "$(grep -m1 error "$WORK/dp2.out")"
run tp2dp2 4 2 --ddp-bucket-size 70000 && compare tp2dp2 tp1 1e-5 || fail "TP=2 x DP=2 run" "$(grep -m1 error "$WORK/tp2dp2.out")"
# without hidden dropout one rank's projections add the bias and the residual inside the matmul,
# while t ranks all-reduce first and run the bias-dropout-add kernel: the same model
run tp1_nodrop 1 1 --hidden-dropout 0 || fail "reference run without hidden dropout" "$(grep -m1 error "$WORK/tp1_nodrop.out")"
run tp2_nodrop 2 2 --hidden-dropout 0 && compare tp2_nodrop tp1_nodrop 1e-5 ||
    fail "TP=2 run without hidden dropout" "$(grep -m1 error "$WORK/tp2_nodrop.out")"
run tp2dp2_distopt 4 2 --use-distributed-optimizer && compare tp2dp2_distopt tp2dp2 1e-6 ||
    fail "TP=2 x DP=2 distributed optimizer run" "$(grep -m1 error "$WORK/tp2dp2_distopt.out")"
run dp2_distopt 2 1 --use-distributed-optimizer --ddp-bucket-size 1000 && compare dp2_distopt dp2 1e-6 ||
    fail "DP=2 distributed optimizer run" "$(grep -m1 error "$WORK/dp2_distopt.out")"
# activation recomputation (the backward re-runs layers' forward, g all-reduces included) gives
# bitwise the run that stores everything: TP=2 with both dropouts on, and TP=2 x DP=2 while the
# data-parallel gradient all-reduces run during the backward
DROP=(--attention-dropout 0.1)
run tp2_drop 2 2 "${DROP[@]}" || fail "TP=2 run with attention dropout" "$(grep -m1 error "$WORK/tp2_drop.out")"
run tp2_full 2 2 "${DROP[@]}" --recompute-granularity full --recompute-method uniform && compare tp2_full tp2_drop 0 ||
    fail "TP=2 full uniform recompute run" "$(grep -m1 error "$WORK/tp2_full.out")"
run tp2_block 2 2 "${DROP[@]}" --recompute-granularity full --recompute-method block --recompute-num-layers 1 &&
    compare tp2_block tp2_drop 0 || fail "TP=2 full block recompute run" "$(grep -m1 error "$WORK/tp2_block.out")"
run tp2dp2_full 4 2 --ddp-bucket-size 70000 --checkpoint-activations && compare tp2dp2_full tp2dp2 0 ||
    fail "TP=2 x DP=2 --checkpoint-activations run" "$(grep -m1 error "$WORK/tp2dp2_full.out")"
grep -q "parallel: world size 4 = tensor-parallel 2 x data-parallel 2, distributed optimizer" "$WORK/tp2dp2_distopt.out" &&
    ok "rank layout line: world size 4 = tensor-parallel 2 x data-parallel 2" || fail "rank layout line" "$(grep parallel "$WORK/tp2dp2_distopt.out")"

# expect NAME WORDS NP [ARGS...]: a non-zero exit and WORDS in the output, within the time limit
expect_ranks() {
    local name=$1 words=$2 np=$3; shift 3
    timeout 60 "${MPIRUN[@]}" -np "$np" "$@" > "$WORK/err" 2>&1
    local status=$?
    if [ "$status" -eq 0 ]; then fail "$name" "exit status 0"
    elif [ "$status" -eq 124 ]; then fail "$name" "hung (killed after 60 s)"
    elif ! grep -q -- "$words" "$WORK/err"; then fail "$name" "no '$words' in: $(grep -m2 error "$WORK/err")"
    else ok "$name: $(grep -m1 -- "$words" "$WORK/err")"; fi
}
SHORT=("${RUN[@]}" --train-iters 3)  # (past the 2 warmup iterations, as Megatron requires)
expect_ranks "t does not divide the heads" "--tensor-model-parallel-size 4 does not divide --num-attention-heads 2" 4 \
    "${SHORT[@]}" --tensor-model-parallel-size 4 --num-attention-heads 2
expect_ranks "t does not divide the ffn size" "--tensor-model-parallel-size 4 does not divide --ffn-hidden-size 130" 4 \
    "${SHORT[@]}" --tensor-model-parallel-size 4 --ffn-hidden-size 130
expect_ranks "t does not divide the world size" "--tensor-model-parallel-size 2 does not divide the world size 3" 3 \
    "${SHORT[@]}" --tensor-model-parallel-size 2
timeout 60 "${MPIRUN[@]}" -np 1 "${SHORT[@]}" --seed 1 : -np 1 "${SHORT[@]}" --seed 2 > "$WORK/err" 2>&1
if [ $? -ne 0 ] && grep -q "rank 1 was started with different flags than rank 0" "$WORK/err"; then
    ok "mismatched flags across ranks: $(grep -m1 'different flags' "$WORK/err")"
else fail "mismatched flags across ranks" "$(grep -m2 error "$WORK/err")"; fi
expect_ranks "a hanging rank: the collective times out naming rank, collective and group" "rank 0: all_reduce #1 in group tp (2 ranks) timed out after 3 s" 2 \
    "${SHORT[@]}" --tensor-model-parallel-size 2 --debug-hang-rank 1 --collective-timeout 3
expect_ranks "a hanging data-parallel rank" "all_reduce #1 in group dp (2 ranks) timed out after 3 s" 2 \
    "${SHORT[@]}" --debug-hang-rank 0 --collective-timeout 3

# a build without MPI started by mpirun with 2 ranks says so instead of training twice
g++ -O0 -std=c++17 -fopenmp -x c++ -o "$WORK/train_gpt_no_mpi" train_gpt.cu -lm 2> "$WORK/err" || fail "build without MPI" "$(head -n 3 "$WORK/err")"
expect_ranks "a build without MPI under mpirun -np 2" "built without MPI and runs as one process, but the launcher started 2" 2 \
    "$WORK/train_gpt_no_mpi" "${SHORT[@]:1}"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
