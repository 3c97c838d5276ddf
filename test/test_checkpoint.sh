#!/usr/bin/env bash
# Checkpoints on the CPU: exact resume (a run stopped at iteration 50 and resumed logs the
# same losses and ends with byte-identical weights and optimizer state as an uninterrupted
# run), crashes in the middle of a save, bad checkpoint files (one-line errors), and
# Hugging Face GPT-2 import/export with the committed tiny fixture.
cd "$(dirname "$0")/.."
DATA_DIR="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
TEXT="$DATA_DIR/tinyshakespeare/input.txt"  # any text does: the runs are compared with each other
if [ ! -f "$TEXT" ]; then echo "note: $TEXT not found (set MEGATRON_DATA): training on README.md's bytes"; TEXT=README.md; fi
W=build/test_checkpoint
# Tiny models run fastest on one thread (resume is exact for any fixed thread count).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$W" && mkdir -p "$W"
source test/lib.sh
SCRATCH="$W"

# Python (standard library only) with st(path) -> (metadata, {name: (dtype, shape, bytes)}).
py() {
    python3 -c "
import json, struct, sys
def st(path):
    b = open(path, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n])
    meta = h.pop('__metadata__', {}) or {}
    return meta, {k: (v['dtype'], v['shape'], b[8 + n + v['data_offsets'][0]:8 + n + v['data_offsets'][1]]) for k, v in h.items()}
def write_st(path, meta, tensors):
    header, data = {'__metadata__': meta} if meta else {}, b''
    for k, (dtype, shape, raw) in tensors.items():
        header[k] = {'dtype': dtype, 'shape': shape, 'data_offsets': [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    open(path, 'wb').write(struct.pack('<Q', len(h)) + h + data)
$1" "${@:2}"
}

# A dataset of bytes as tokens (vocabulary 200, 199 = end of document; bytes past 198, none in
# ASCII text, folded below it), as preprocess_data writes it.
py "
text = open(sys.argv[1], 'rb').read()[:60000]
seqs = [[b % 199 for b in d] + [199] for d in text.split(b'\n\n') if d]
with open(sys.argv[2] + '.bin', 'wb') as f:
    for s in seqs: f.write(struct.pack('<%dH' % len(s), *s))
pointers = [0]
for s in seqs[:-1]: pointers.append(pointers[-1] + 2 * len(s))
with open(sys.argv[2] + '.idx', 'wb') as f:
    f.write(b'MMIDIDX\x00\x00' + struct.pack('<QBQQ', 1, 8, len(seqs), len(seqs) + 1))
    f.write(struct.pack('<%di' % len(seqs), *[len(s) for s in seqs]))
    f.write(struct.pack('<%dq' % len(seqs), *pointers))
    f.write(struct.pack('<%dq' % (len(seqs) + 1), *range(len(seqs) + 1)))
" "$TEXT" "$W/bytes" || fail "make the byte dataset" "python failed"
DATA=(--device cpu --data-path "$W/bytes" --split 80,10,10 --vocab-size 200)
MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 2 --seq-length 32)
TRAIN=(--micro-batch-size 4 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 5 --lr-decay-style cosine --log-interval 1)
RUN=(./train_gpt "${DATA[@]}" "${MODEL[@]}" "${TRAIN[@]}")

# The log lines without their timings.
losses() { grep -E '^ (iteration|validation loss)' "$1" | sed -E 's/elapsed time per iteration \(ms\): [0-9.]+//; s/tokens\/s: [0-9]+//; s/TFLOP\/s: [0-9.]+//'; }
# Every tensor of two checkpoints byte-equal, and the training position the same.
same_state() {
    py "
for f in ['model', 'optim']:
    (ma, ta), (mb, tb) = st(sys.argv[1] + '/' + f + '.safetensors'), st(sys.argv[2] + '/' + f + '.safetensors')
    assert ta.keys() == tb.keys(), f
    bad = [k for k in ta if ta[k] != tb[k]]
    assert not bad, '%s: %d tensors differ, e.g. %s' % (f, len(bad), bad[0])
    for k in ['iteration', 'consumed_train_samples', 'consumed_valid_samples', 'step', 'scheduler_samples', 'loss_scale']:
        assert ma.get(k) == mb.get(k), (k, ma.get(k), mb.get(k))
" "$1" "$2"
}

# ---- exact resume: 60 iterations straight vs 50, stop, resume to 60 (dropout on, 2 micro-batches,
# warmup + cosine schedule, validation every 20 iterations). resume_check TAG [FLAGS...], run under ${LAUNCH[@]}
resume_check() {
    local tag=$1 D="$W/$1"; shift
    local R=("${LAUNCH[@]}" "${RUN[@]}" "$@" --train-iters 60 --eval-interval 20 --eval-iters 2)
    mkdir -p "$D"
    "${R[@]}" --save "$D/full" --save-interval 1000 > "$D/full.txt" 2>&1 || { fail "$tag: uninterrupted run" "$(tail -n 2 "$D/full.txt")"; return; }
    "${R[@]}" --save "$D/res" --save-interval 25 --exit-interval 50 > "$D/first.txt" 2>&1
    [ "$(cat "$D/res/latest_checkpointed_iteration.txt")" = 50 ] && [ -d "$D/res/iter_0000025" ] && ! grep -q 'iteration       51/' "$D/first.txt" \
        && ok "$tag: --exit-interval 50 saves iterations 25 and 50 and stops" || fail "$tag: --exit-interval" "$(tail -n 2 "$D/first.txt")"
    "${R[@]}" --save "$D/res" --save-interval 25 --load "$D/res" > "$D/second.txt" 2>&1
    grep -q "loaded checkpoint from $D/res/iter_0000050 at iteration 50$" "$D/second.txt" && ok "$tag: resume reports iteration 50" || fail "$tag: resume" "$(tail -n 2 "$D/second.txt")"
    if diff <(losses "$D/full.txt" | sed -n '/iteration       51\//,$p') <(losses "$D/second.txt") > "$D/diff.txt" && [ "$(losses "$D/second.txt" | wc -l)" -eq 11 ]; then
        ok "$tag: resumed log lines 51..60 (loss, grad norm, lr, loss scale, validation) equal the uninterrupted run's"
    else fail "$tag: resumed log lines" "$(head -c 600 "$D/diff.txt")"; fi
    same_state "$D/full/iter_0000060" "$D/res/iter_0000060" 2> "$W/err" && ok "$tag: final weights, master weights, Adam moments and positions are byte-identical" \
        || fail "$tag: final state" "$(tail -n 1 "$W/err")"
}
LAUNCH=()
resume_check cpu
# ---- a resumed run's learning-rate schedule must be the checkpoint's (Megatron's scheduler check)
# unless a flag says which wins: the 60-iteration run's checkpoint at 50, resumed as a 52-iteration run
lr_of() { grep -o "iteration       $2/.*learning rate: [0-9.E+-]*" "$1" | grep -o '[0-9.E+-]*$'; }
mkdir -p "$W/sched" && cp -r "$W/cpu/res/iter_0000050" "$W/sched/" && echo 50 > "$W/sched/latest_checkpointed_iteration.txt"
expect "resumed with another schedule" 2 "differs from the checkpoint's in its decay samples" "${RUN[@]}" --train-iters 52 --load "$W/sched"
expect "both schedule flags" 2 "are exclusive" "${RUN[@]}" --train-iters 52 --load "$W/sched" --override-opt_param-scheduler --use-checkpoint-opt-param-scheduler
"${RUN[@]}" --train-iters 52 --eval-iters 0 --load "$W/sched" --use-checkpoint-opt_param-scheduler > "$W/sched_keep.txt" 2>&1
"${RUN[@]}" --train-iters 52 --eval-iters 0 --load "$W/sched" --override-opt-param-scheduler > "$W/sched_new.txt" 2>&1
keep=$(lr_of "$W/sched_keep.txt" 51) new=$(lr_of "$W/sched_new.txt" 51) full=$(lr_of "$W/cpu/full.txt" 51)
[ -n "$keep" ] && [ "$keep" = "$full" ] && [ -n "$new" ] && [ "$new" != "$full" ] \
    && ok "--use-checkpoint-opt-param-scheduler keeps the checkpoint's schedule (lr $keep at 51, as uninterrupted), --override-opt-param-scheduler takes this run's ($new)" \
    || fail "schedule flags on resume" "lr at 51: kept '$keep', overridden '$new', uninterrupted '$full'"

# fp16's hysteresis tracker counts below 0 through a run of overflows (from 2^32 there are many):
# such a checkpoint must load (seen failing on an H200 before the fix)
mkdir -p "$W/hyst" && cp -r "$W/cpu/res/iter_0000050" "$W/hyst/" && echo 50 > "$W/hyst/latest_checkpointed_iteration.txt"
py "
meta, t = st(sys.argv[1])
meta['loss_scale_hysteresis_tracker'] = '-13'
write_st(sys.argv[1], meta, t)
" "$W/hyst/iter_0000050/optim.safetensors"
"${RUN[@]}" --train-iters 52 --override-opt-param-scheduler --load "$W/hyst" > "$W/hyst.txt" 2>&1 && grep -q "at iteration 50$" "$W/hyst.txt" \
    && ok "a negative loss-scale hysteresis tracker (fp16 after many overflows) loads" || fail "negative hysteresis tracker" "$(grep error "$W/hyst.txt")"
# the same on a GPU in each dtype (fp16: dynamic loss scaling from 2^32, so skipped steps too)
if nvidia-smi -L > /dev/null 2>&1; then
    for dtype in fp32 bf16 fp16; do resume_check "gpu-$dtype" --device cuda --$dtype; done
else echo "skip GPU resume (fp32, bf16, fp16): no GPU"; fi

# with tensor and data parallelism (once train_gpt has them): the same exactness under mpirun, and a
# TP=2 x DP=2 checkpoint (distributed optimizer) resumed by one process
if command -v mpirun > /dev/null && ./train_gpt --help | grep -q -- --use-distributed-optimizer; then
    MPI=(mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x OMP_NUM_THREADS=1)
    LAUNCH=("${MPI[@]}" -np 2)
    resume_check tp2 --tensor-model-parallel-size 2
    LAUNCH=("${MPI[@]}" -np 4)
    resume_check tp2dp2 --tensor-model-parallel-size 2 --use-distributed-optimizer
    LAUNCH=()
    cp -r "$W/tp2dp2/res" "$W/tp2dp2/at50" && echo 50 > "$W/tp2dp2/at50/latest_checkpointed_iteration.txt"
    "${RUN[@]}" --train-iters 60 --eval-interval 20 --eval-iters 2 --load "$W/tp2dp2/at50" --save "$W/tp2dp2/one" --save-interval 100 > "$W/one.txt" 2>&1
    py "
ma, ta = st(sys.argv[1] + '/model.safetensors'); mb, tb = st(sys.argv[2] + '/model.safetensors')
assert ta.keys() == tb.keys() and all(ta[k][:2] == tb[k][:2] for k in ta)
worst = max(max(abs(x - y) for x, y in zip(struct.unpack('<%df' % (len(ta[k][2]) // 4), ta[k][2]), struct.unpack('<%df' % (len(tb[k][2]) // 4), tb[k][2]))) for k in ta)
assert worst < 1e-3, worst
print('%.1e' % worst)" "$W/tp2dp2/full/iter_0000060" "$W/tp2dp2/one/iter_0000060" > "$W/out" 2> "$W/err" \
        && ok "a TP=2 x DP=2 checkpoint resumed by one process ends within $(cat "$W/out") of the parallel run (the single-device layout on disk)" \
        || fail "TP=2 x DP=2 checkpoint resumed by one process" "$(tail -n 1 "$W/err") $(tail -n 2 "$W/one.txt")"
else echo "skip parallel checkpoints: no mpirun or no tensor parallelism in this train_gpt"; fi

# ---- layout and contents
py "
meta, t = st(sys.argv[1] + '/model.safetensors')
assert meta['iteration'] == '60' and meta['consumed_train_samples'] == '480' and meta['--hidden-size'] == '64', meta
assert meta['dtype'] == 'F32' and meta['vocab_size'] == '200' and meta['padded_vocab_size'] == '256', meta
assert t['language_model.embedding.word_embeddings.weight'][:2] == ('F32', [256, 64])
assert t['language_model.encoder.layers.1.self_attention.query_key_value.weight'][:2] == ('F32', [192, 64])
assert t['language_model.encoder.layers.0.mlp.dense_4h_to_h.weight'][:2] == ('F32', [64, 256]) and len(t) == 4 + 12 * 2
ometa, o = st(sys.argv[1] + '/optim.safetensors')
assert ometa['step'] == '60' and ometa['scheduler_samples'] == '480' and len(o) == 2 * len(t), ometa
assert sorted(set(k.split('.')[0] for k in o)) == ['exp_avg', 'exp_avg_sq']
" "$W/cpu/res/iter_0000060" 2> "$W/err" && ok "Megatron layout: iter_0000060/{model,optim}.safetensors, Megatron names, flags and positions as metadata" \
    || fail "layout" "$(tail -n 1 "$W/err")"
[ -z "$(find "$W/cpu/full" "$W/cpu/res" -name '*.tmp-*')" ] && ok "no temporary files left behind" || fail "temporaries" "$(find "$W/cpu/res" -name '*.tmp-*')"

# ---- a crash in the middle of a save leaves the previous checkpoint in force. A save commits
# model.safetensors and optim.safetensors in iter_N.tmp-<pid>/, that directory as iter_N, then the
# tracker: commits 5 to 8 are the second save's.
SHORT=(--train-iters 4 --lr-warmup-iters 1 --save-interval 2 --eval-iters 0)
"${RUN[@]}" "${SHORT[@]}" --save "$W/short" > "$W/short.txt" 2>&1
for k in 5 6 7 8; do
    D="$W/crash$k"
    (MEGATRON_TEST_CRASH_AT_FILE=$k "${RUN[@]}" "${SHORT[@]}" --save "$D") > "$W/crash.txt" 2>&1
    status=$?
    if [ "$status" -ne 137 ] || [ "$(cat "$D/latest_checkpointed_iteration.txt")" != 2 ] || [ -z "$(find "$D" -name '*.tmp-*')" ]; then
        fail "killed in the save of iteration 4 before file $k was renamed" "status $status, tracker $(cat "$D/latest_checkpointed_iteration.txt")"; continue
    fi
    "${RUN[@]}" "${SHORT[@]}" --save "$D" --load "$D" > "$W/resume.txt" 2>&1
    if grep -q "at iteration 2$" "$W/resume.txt" && diff <(losses "$W/short.txt" | sed -n 3,4p) <(losses "$W/resume.txt") > /dev/null \
        && same_state "$W/short/iter_0000004" "$D/iter_0000004" 2> /dev/null && [ -z "$(find "$D" -name '*.tmp-*')" ]; then
        ok "killed in a save before commit $k ($(echo model optim directory tracker | cut -d' ' -f$((k - 4)))): resumes from iteration 2, ends bit-identical, the dead run's temporaries removed"
    else fail "resume after a crash in file $k" "$(tail -n 2 "$W/resume.txt")"; fi
done

# ---- saving again an iteration the tracker names (a rerun into the same --save): a crash at any
# commit leaves the old checkpoint whole; a finished save replaces it
for k in 1 2 3 0; do
    D="$W/resave$k"
    rm -rf "$D" && cp -r "$W/short" "$D"
    (MEGATRON_TEST_CRASH_AT_FILE=$k "${RUN[@]}" --train-iters 4 --lr-warmup-iters 1 --save-interval 4 --eval-iters 0 --seed 99 --save "$D") > "$W/resave.txt" 2>&1
    status=$?
    if [ $k -gt 0 ]; then
        [ "$status" -eq 137 ] && [ "$(cat "$D/latest_checkpointed_iteration.txt")" = 4 ] && same_state "$W/short/iter_0000004" "$D/iter_0000004" 2> "$W/err" \
            && ok "killed while saving iteration 4 again (commit $k of 4): the tracked iteration 4 is the old one, whole" \
            || fail "killed while saving iteration 4 again (commit $k)" "status $status $(tail -n 1 "$W/err")"
    else
        [ "$status" -eq 0 ] && ! same_state "$W/short/iter_0000004" "$D/iter_0000004" 2> /dev/null && [ -z "$(find "$D" -name '*.tmp-*')" ] \
            && ok "saving iteration 4 again replaces it, leaving no temporaries" || fail "saving iteration 4 again" "status $status"
    fi
done

# ---- the same where the filesystem cannot exchange two directories (NFS, FUSE): an untracked
# iteration (a crash before the tracker moved) is replaced by renaming it aside; the tracked one is
# not touched, and the run stops keeping its new checkpoint as iter_N.unsaved
D="$W/noexchange"
rm -rf "$D" && cp -r "$W/short" "$D" && echo 2 > "$D/latest_checkpointed_iteration.txt"
MEGATRON_TEST_NO_EXCHANGE=1 "${RUN[@]}" "${SHORT[@]}" --save "$D" --load "$D" > "$W/nx.txt" 2>&1 \
    && [ "$(cat "$D/latest_checkpointed_iteration.txt")" = 4 ] && same_state "$W/short/iter_0000004" "$D/iter_0000004" 2> /dev/null \
    && [ -z "$(find "$D" -name '*.tmp-*')" ] && ok "no directory exchange: an untracked iteration 4 is replaced (renamed aside), bit-identical" \
    || fail "no directory exchange, untracked" "$(tail -n 1 "$W/nx.txt")"
D="$W/noexchange2"
rm -rf "$D" && cp -r "$W/short" "$D"
expect "no directory exchange, tracked iteration" 1 "is the checkpoint in force and this filesystem cannot replace a directory in one step" \
    env MEGATRON_TEST_NO_EXCHANGE=1 "${RUN[@]}" --train-iters 4 --lr-warmup-iters 1 --save-interval 4 --eval-iters 0 --seed 99 --save "$D"
[ -d "$D/iter_0000004.unsaved" ] && same_state "$W/short/iter_0000004" "$D/iter_0000004" 2> /dev/null \
    && ok "... the tracked iteration 4 stays the old one, the new checkpoint kept in iter_0000004.unsaved" || fail "no exchange, tracked: state" "$(ls "$D")"

# ---- the cleanup of dead savers' temporaries leaves everything else in --save alone
D="$W/userfiles"
rm -rf "$D" && mkdir -p "$D/backup.tmp-1999999/sub" && echo keep > "$D/notes.tmp-12345" && echo keep > "$D/iter_0000009.tmp-elsewhere-1999999"
"${RUN[@]}" "${SHORT[@]}" --save "$D" > "$W/uf.txt" 2>&1 && [ -f "$D/notes.tmp-12345" ] && [ -d "$D/backup.tmp-1999999/sub" ] \
    && [ -f "$D/iter_0000009.tmp-elsewhere-1999999" ] && ok "saving leaves other files named *.tmp-* (and other hosts' temporaries) alone" \
    || fail "user files in --save" "$(tail -n 1 "$W/uf.txt"; ls "$D")"

# ---- another vocabulary padding (another tensor-parallel size pads to 128 x t rows): the real rows
# load, the padding rows start at 0, and the run continues with the same losses
"${RUN[@]}" --train-iters 6 --eval-iters 0 > "$W/pad.txt" 2>&1
"${RUN[@]}" --train-iters 6 --eval-iters 0 --save "$W/pad" --save-interval 4 --exit-interval 4 > /dev/null 2>&1
"${RUN[@]}" --train-iters 6 --eval-iters 0 --load "$W/pad" --make-vocab-size-divisible-by 8 > "$W/pad8.txt" 2>&1
if grep -q "pads the vocabulary to 256 rows, this run to 200" "$W/pad8.txt" && [ -n "$(losses "$W/pad8.txt")" ] \
    && diff <(losses "$W/pad.txt" | sed -n 5,6p) <(losses "$W/pad8.txt") > /dev/null; then
    ok "a checkpoint padded to 256 vocabulary rows resumes padded to 200 with the same losses"
else fail "resume with another vocabulary padding" "$(grep -m1 -E 'error|note' "$W/pad8.txt")"; fi

# ---- --load and --save spelled differently for one fresh directory: a restart loop's first start
"${RUN[@]}" --train-iters 2 --lr-warmup-iters 1 --eval-iters 0 --save "$W/fresh" --save-interval 1 --load "./$W/fresh/" > "$W/fresh.txt" 2>&1 \
    && grep -q "starting from scratch" "$W/fresh.txt" && ok "--load ./DIR/ with --save DIR on a fresh directory starts from scratch" \
    || fail "--load and --save spelled differently" "$(tail -n 1 "$W/fresh.txt")"

# kill -9 from outside while a bigger model (13M parameters, 150 MB per checkpoint) saves
BIG=(./train_gpt "${DATA[@]}" --num-layers 4 --hidden-size 512 --num-attention-heads 8 --seq-length 8 --micro-batch-size 1 --lr 1e-4 --eval-iters 0 --train-iters 2 --save "$W/big" --save-interval 1)
"${BIG[@]}" > "$W/big.txt" 2>&1 &
pid=$!
for i in $(seq 3000); do
    [ -n "$(find "$W/big" -path '*iter_0000002*' -name '*.tmp-*' 2> /dev/null)" ] && break
    kill -0 $pid 2> /dev/null || break
    sleep 0.01
done
kill -9 $pid 2> /dev/null && caught="killed during the save of iteration 2" || caught="finished before the kill"
wait $pid 2> /dev/null
latest=$(cat "$W/big/latest_checkpointed_iteration.txt" 2> /dev/null)
"${BIG[@]}" --load "$W/big" > "$W/big2.txt" 2>&1
if grep -q "loaded checkpoint from $W/big/iter_000000$latest at iteration $latest" "$W/big2.txt" && [ "$(grep -c '^ iteration' "$W/big2.txt")" -eq $((2 - latest)) ]; then
    ok "kill -9 of a 13M-parameter save ($caught): resumes from the tracker's iteration $latest"
else fail "kill -9 during a save ($caught)" "tracker '$latest': $(tail -n 2 "$W/big2.txt")"; fi
rm -rf "$W/big"

# ---- bad input: a clear one-line error and a non-zero exit
GOOD="$W/cpu/res/iter_0000060"
bad_copy() { rm -rf "$W/bad" && mkdir -p "$W/bad" && cp -r "$GOOD" "$W/bad/" && echo 60 > "$W/bad/latest_checkpointed_iteration.txt"; }
ONE=("${RUN[@]}" --train-iters 61 --eval-iters 0)
expect "--save without --save-interval" 2 "--save needs --save-interval" "${ONE[@]}" --save "$W/x"
expect "--load of an empty directory" 1 "no checkpoint there" "${ONE[@]}" --load "$W/bytes.bin.nothing"
expect "another model size" 1 "holds a model with --hidden-size 64, but this run has --hidden-size 128" "${ONE[@]}" --load "$W/cpu/res" --hidden-size 128
expect "another depth" 1 "holds a model with --num-layers 2, but this run has --num-layers 3" "${ONE[@]}" --load "$W/cpu/res" --num-layers 3
expect "another vocabulary" 1 "holds a model with --vocab-size 200, but this run has --vocab-size 300" "${ONE[@]}" --load "$W/cpu/res" --vocab-size 300
bad_copy; echo "sixty" > "$W/bad/latest_checkpointed_iteration.txt"
expect "garbage tracker" 1 "expected an iteration number" "${ONE[@]}" --load "$W/bad"
bad_copy; echo 70 > "$W/bad/latest_checkpointed_iteration.txt"
expect "tracker names a missing iteration" 1 "iter_0000070/model.safetensors: No such file" "${ONE[@]}" --load "$W/bad"
bad_copy; rm "$W/bad/iter_0000060/optim.safetensors"
expect "missing optim.safetensors" 1 "optim.safetensors: No such file" "${ONE[@]}" --load "$W/bad"
bad_copy; head -c 300000 "$GOOD/model.safetensors" > "$W/bad/iter_0000060/model.safetensors"
expect "truncated model.safetensors" 1 "file truncated?" "${ONE[@]}" --load "$W/bad"
bad_copy; printf '\xff\xff\xff\x00\x00\x00\x00\x00{}' > "$W/bad/iter_0000060/model.safetensors"
expect "header length past the end" 1 "runs past the end of the file" "${ONE[@]}" --load "$W/bad"
bad_copy; printf '\x08\x00\x00\x00\x00\x00\x00\x00{"a":[1,' > "$W/bad/iter_0000060/optim.safetensors"
expect "malformed header JSON" 1 "malformed safetensors header JSON" "${ONE[@]}" --load "$W/bad"
bad_copy; py "
meta, t = st(sys.argv[1]); k = 'language_model.embedding.position_embeddings.weight'
t[k] = ('I32',) + t[k][1:]; write_st(sys.argv[1], meta, t)" "$W/bad/iter_0000060/model.safetensors"
expect "dtype disagreeing with the checkpoint" 1 "has dtype I32, the checkpoint's dtype is F32" "${ONE[@]}" --load "$W/bad"
bad_copy; py "
meta, t = st(sys.argv[1]); k = 'exp_avg.language_model.embedding.word_embeddings.weight'
t[k] = (t[k][0], [64, 256], t[k][2]); write_st(sys.argv[1], meta, t)" "$W/bad/iter_0000060/optim.safetensors"
expect "shape disagreeing with the config" 1 "has shape \[64, 256\], the model needs \[256, 64\]" "${ONE[@]}" --load "$W/bad"

# ---- --finetune, --no-load-optim, --no-load-rng
"${RUN[@]}" --train-iters 2 --lr-warmup-iters 1 --eval-iters 0 --load "$W/cpu/res" --finetune --no-load-rng > "$W/ft.txt" 2>&1
first_loss=$(grep -o 'iteration        1/.*lm loss: [0-9.E+-]*' "$W/ft.txt" | grep -o '[0-9.E+-]*$')
grep -q "(weights only: iteration 0)" "$W/ft.txt" && grep -q "iteration        1/       2 | consumed samples:            8 " "$W/ft.txt" \
    && python3 -c "import sys; sys.exit(0 if float('$first_loss') < 4.5 else 1)" 2> /dev/null \
    && ok "--finetune: trained weights (first loss $first_loss, not ln 200 = 5.3), iteration 1 and sample 0 again (--no-load-rng accepted)" || fail "--finetune" "$(tail -n 3 "$W/ft.txt")"
"${RUN[@]}" --train-iters 61 --eval-iters 0 --load "$W/cpu/res" --no-load-optim > "$W/nlo.txt" 2>&1
grep -q "no-load-optim" "$W/nlo.txt" && grep -q "iteration       61/      61 | consumed samples:          488 | .* learning rate: 2.000E-04" "$W/nlo.txt" \
    && ok "--no-load-optim: continues at iteration 61 with a fresh schedule (back in warmup)" || fail "--no-load-optim" "$(tail -n 2 "$W/nlo.txt")"

# ---- Hugging Face GPT-2: config.json + model.safetensors (the fixture holds HF's tensors under
# "transformer.*", next to reference values the import ignores)
FIX=test/fixtures/gpt2_tiny_hf.safetensors
hf_dir() {  # hf_dir DIR [JSON overrides]: the fixture as a HF directory
    mkdir -p "$1" && cp "$FIX" "$1/model.safetensors"
    py "
cfg = {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': 200, 'n_positions': 32, 'n_embd': 64, 'n_layer': 2,
       'n_head': 2, 'n_inner': None, 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-05, 'task_specific_params': {'x': {'y': [1, 2]}}}
cfg.update(json.loads(sys.argv[2]) or {}); json.dump(cfg, open(sys.argv[1] + '/config.json', 'w'), indent=2)" "$1" "${2:-null}"
}
same_as_fixture() {  # an exported model.safetensors equals the fixture's HF tensors, byte for byte
    py "
_, want = st(sys.argv[1]); want = {k: v for k, v in want.items() if k.startswith('transformer.')}
meta, got = st(sys.argv[2])
assert meta.get('format') == 'pt', meta
assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:4]
bad = [k for k in got if got[k] != want[k]]
assert not bad, '%d tensors differ, e.g. %s %s %s' % (len(bad), bad[0], got[bad[0]][:2], want[bad[0]][:2])
cfg = json.load(open(sys.argv[3]))
assert (cfg['n_layer'], cfg['n_embd'], cfg['n_head'], cfg['n_positions'], cfg['vocab_size']) == (2, 64, 2, 32, 200), cfg
" "$FIX" "$1/model.safetensors" "$1/config.json"
}
hf_dir "$W/hf"
./train_gpt --load "$W/hf" --export-hf "$W/hf_out" > "$W/out" 2>&1 && same_as_fixture "$W/hf_out" 2> "$W/err" \
    && ok "import a HF directory and --export-hf it: every tensor byte-equal to the original" || fail "HF round trip" "$(tail -n 1 "$W/err") $(tail -n 1 "$W/out")"
mkdir -p "$W/hub" && cp "$W/hf/config.json" "$W/hub/" && py "
meta, t = st(sys.argv[1])
write_st(sys.argv[2], {'format': 'pt'}, {k[len('transformer.'):]: v for k, v in t.items() if k.startswith('transformer.')})" "$FIX" "$W/hub/model.safetensors"
./train_gpt --load "$W/hub" --export-hf "$W/hub_out" > "$W/out" 2>&1 && same_as_fixture "$W/hub_out" 2> "$W/err" \
    && ok "hub-style names (no 'transformer.' prefix) import too" || fail "hub names" "$(tail -n 1 "$W/err") $(tail -n 1 "$W/out")"
# train from the HF weights with the model flags taken from config.json, save, export, re-import
./train_gpt "${DATA[@]}" --seq-length 32 "${TRAIN[@]}" --train-iters 3 --lr-warmup-iters 1 --eval-iters 0 --load "$W/hf" --save "$W/hf_ft" --save-interval 3 > "$W/hf_ft.txt" 2>&1
grep -q "loaded Hugging Face GPT-2 weights" "$W/hf_ft.txt" && grep -q "model: 2 layers, hidden 64, 2 heads, ffn 256, vocab 200 (padded 256)" "$W/hf_ft.txt" \
    && grep -q "iteration        3/" "$W/hf_ft.txt" && ok "train from HF weights: shape flags filled from config.json" || fail "train from HF" "$(tail -n 2 "$W/hf_ft.txt")"
./train_gpt --load "$W/hf_ft" --export-hf "$W/ft_out" > /dev/null 2>&1 && ./train_gpt --load "$W/ft_out" --export-hf "$W/ft_out2" > /dev/null 2>&1 && py "
a, b = st(sys.argv[1] + '/model.safetensors')[1], st(sys.argv[2] + '/model.safetensors')[1]
assert a == b and len(a) == 4 + 12 * 2 and a['transformer.wte.weight'][1] == [200, 64]
_, ours = st(sys.argv[3] + '/iter_0000003/model.safetensors')
assert a['transformer.wpe.weight'][2] == ours['language_model.embedding.position_embeddings.weight'][2]
" "$W/ft_out" "$W/ft_out2" "$W/hf_ft" 2> "$W/err" && ok "export a trained checkpoint, re-import, re-export: identical" || fail "checkpoint export" "$(tail -n 1 "$W/err")"
expect "HF config disagreeing with a flag" 1 "holds a model with --hidden-size 64, but this run has --hidden-size 128" ./train_gpt "${DATA[@]}" --seq-length 32 "${TRAIN[@]}" --train-iters 1 --load "$W/hf" --hidden-size 128
hf_dir "$W/hf_bad" '{"n_positions": 64}'
expect "HF tensor shape disagreeing with config.json" 1 "'transformer.wpe.weight' has shape \[32, 64\] but config.json gives \[64, 64\]" ./train_gpt --load "$W/hf_bad" --export-hf "$W/x"
hf_dir "$W/hf_act" '{"activation_function": "relu"}'
expect "HF activation we don't have" 1 "activation_function is \"relu\"" ./train_gpt --load "$W/hf_act" --export-hf "$W/x"
printf '{"n_layer": 2, "n_embd": 64,, }' > "$W/hf_bad/config.json"
expect "malformed config.json" 1 "config.json: malformed JSON at byte" ./train_gpt --load "$W/hf_bad" --export-hf "$W/x"
hf_dir "$W/hf_empty" && rm "$W/hf_empty/model.safetensors"
expect "HF directory without model.safetensors" 1 "model.safetensors: No such file" ./train_gpt --load "$W/hf_empty" --export-hf "$W/x"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
