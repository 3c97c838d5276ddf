#!/usr/bin/env bash
# Text generation as a user runs it, on the CPU: train_gpt --load (a Hugging Face GPT-2 directory
# made from the tiny fixture, and our own checkpoint) with --prompt / --sample-input-file --greedy
# prints Hugging Face generate()'s tokens (test/fixtures/gpt2_tiny_generate.safetensors), also
# with tensor parallelism (2 CPU ranks, when mpirun is there); text prompts through the GPT-2
# tokenizer; the seed fixes sampled text; bad flags and inputs end with one line and exit 2.
# On a GPU: GEN_DEVICE_FLAGS="--device cuda --fp32" ./test/test_generation.sh (generation runs
# there; the tensor-parallel case stays on CPU ranks).
cd "$(dirname "$0")/.."
DATA_DIR="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
W=build/test_generation_sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$W" && mkdir -p "$W"
source test/lib.sh
SCRATCH="$W"


# HF's continuation of fixture case K (token ids separated by spaces), and its prompt
hf() {
    python3 -c "
import json, struct, sys
b = open('test/fixtures/gpt2_tiny_generate.safetensors', 'rb').read()
n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8 + n])
def ids(name):
    s, e = h[name]['data_offsets']; raw = b[8 + n + s:8 + n + e]
    return list(struct.unpack('<%di' % (len(raw) // 4), raw))
p, t = ids('prompt.' + sys.argv[1]), ids('tokens.' + sys.argv[1])
print(' '.join(map(str, p if sys.argv[2] == 'prompt' else t[len(p):])))" "$1" "$2"
}
# the continuations of a generation's output, one line each
continuations() { sed -n 's/^Megatron-LM: //p' "$1"; }

# the tiny fixture as a Hugging Face GPT-2 directory
mkdir -p "$W/hf" && cp test/fixtures/gpt2_tiny_hf.safetensors "$W/hf/model.safetensors"
cat > "$W/hf/config.json" << 'EOF'
{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 200, "n_positions": 32, "n_embd": 64,
 "n_layer": 2, "n_head": 2, "n_inner": null, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05}
EOF
DEV=(${GEN_DEVICE_FLAGS:---device cpu})
GEN=(./train_gpt "${DEV[@]}" --load "$W/hf")

"${GEN[@]}" --prompt "$(hf 0 prompt)" --greedy --out-seq-length 20 > "$W/p0.txt" 2>&1
[ "$(continuations "$W/p0.txt")" = "$(hf 0 new)" ] && grep -q "^Context: $(hf 0 prompt)$" "$W/p0.txt" \
    && ok "--prompt --greedy from a HF directory: HF generate()'s 20 tokens" || fail "--prompt --greedy" "$(tail -n 3 "$W/p0.txt")"
"${GEN[@]}" --prompt "$(hf 1 prompt)" --greedy --out-seq-length 100 > "$W/p1.txt" 2>&1
[ "$(continuations "$W/p1.txt")" = "$(hf 1 new)" ] \
    && ok "--out-seq-length 100 stops at the 32nd position, HF's 27 tokens" || fail "to the position table" "$(tail -n 3 "$W/p1.txt")"

# a file of prompts (an empty line starts at a document boundary), output to a file
printf '%s\n%s\n\n' "$(hf 0 prompt)" "$(hf 1 prompt)" > "$W/prompts.txt"
"${GEN[@]}" --sample-input-file "$W/prompts.txt" --sample-output-file "$W/samples.txt" --greedy --out-seq-length 40 > "$W/file.txt" 2>&1
if [ "$(continuations "$W/samples.txt" | sed -n 1p | cut -d' ' -f1-20)" = "$(hf 0 new)" ] \
    && [ "$(continuations "$W/samples.txt" | sed -n 2p)" = "$(hf 1 new)" ] && [ "$(grep -c '^Context:' "$W/samples.txt")" -eq 3 ] \
    && ! grep -q '^Megatron-LM:' "$W/file.txt"; then
    ok "--sample-input-file (3 lines, one empty) -> --sample-output-file: 3 samples, HF's tokens"
else fail "--sample-input-file" "$(head -c 400 "$W/samples.txt") $(tail -n 2 "$W/file.txt")"; fi
[ "$(continuations "$W/samples.txt" | sed -n 3p)" = 199 ] \
    && ok "the empty line starts at a document boundary and stops after producing end-of-document (199) again" \
    || fail "empty prompt / EOD stop" "$(continuations "$W/samples.txt" | sed -n 3p)"
# case 0 asked for 20 tokens; with 40 the file's first line runs on to the position table
[ "$(continuations "$W/samples.txt" | sed -n 1p | wc -w)" -eq 30 ] && ok "40 tokens asked after 2: 30 made (32 positions)" \
    || fail "first file sample length" "$(continuations "$W/samples.txt" | sed -n 1p)"

# the seed fixes the sampled text
SAMPLE=("${GEN[@]}" --prompt "$(hf 0 prompt)" --top-k 20 --temperature 0.8 --out-seq-length 25)
a=$("${SAMPLE[@]}" --seed 1 2>&1 | continuations /dev/stdin)
b=$("${SAMPLE[@]}" --seed 1 2>&1 | continuations /dev/stdin)
c=$("${SAMPLE[@]}" --seed 2 2>&1 | continuations /dev/stdin)
[ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" != "$c" ] && ok "--top-k 20 --temperature 0.8: --seed 1 twice gives the same text, --seed 2 another" \
    || fail "sampling seed" "'$a' '$b' '$c'"

# tensor parallelism: 2 ranks, each with one head and half the vocabulary, greedy as one rank
if command -v mpirun > /dev/null && ldd ./train_gpt 2> /dev/null | grep -q libmpi; then
    mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x OMP_NUM_THREADS=1 -np 2 \
        ./train_gpt --device cpu --load "$W/hf" --tensor-model-parallel-size 2 --sample-input-file "$W/prompts.txt" --sample-output-file "$W/tp2.txt" \
        --greedy --out-seq-length 40 > "$W/tp2.out" 2>&1
    cmp -s "$W/samples.txt" "$W/tp2.txt" && ok "--tensor-model-parallel-size 2 (2 CPU ranks): the same samples" \
        || fail "tensor-parallel generation" "$(tail -n 3 "$W/tp2.out")"
else
    echo "skip tensor-parallel generation: no mpirun or ./train_gpt built without MPI"
fi

# our own checkpoint (a 1-layer GPT trained one step on random tokens) and the GPT-2 tokenizer: text prompts
python3 -c "
import struct, sys, random
random.seed(1)
docs = [[random.randrange(50257) for _ in range(random.randrange(20, 80))] for _ in range(200)]
open(sys.argv[1] + '.bin', 'wb').write(b''.join(struct.pack('<%dH' % len(d), *d) for d in docs))
ptr = [0]
for d in docs[:-1]: ptr.append(ptr[-1] + 2 * len(d))
with open(sys.argv[1] + '.idx', 'wb') as f:
    f.write(b'MMIDIDX\x00\x00' + struct.pack('<QBQQ', 1, 8, len(docs), len(docs) + 1))
    f.write(struct.pack('<%di' % len(docs), *[len(d) for d in docs]) + struct.pack('<%dq' % len(docs), *ptr))
    f.write(struct.pack('<%dq' % (len(docs) + 1), *range(len(docs) + 1)))
" "$W/random" || fail "make a dataset" "python failed"
TOK=(--vocab-file "$DATA_DIR/gpt2/encoder.json" --merge-file "$DATA_DIR/gpt2/vocab.bpe")
if [ ! -f "$DATA_DIR/gpt2/encoder.json" ]; then echo "skip the GPT-2 tokenizer run: $DATA_DIR/gpt2/encoder.json not found (set MEGATRON_DATA)"
else
./train_gpt --device cpu --data-path "$W/random" "${TOK[@]}" --num-layers 1 --hidden-size 32 --num-attention-heads 1 \
    --seq-length 32 --micro-batch-size 2 --lr 1e-3 --train-iters 1 --eval-iters 0 --save "$W/ckpt" --save-interval 1 > "$W/train.txt" 2>&1
./train_gpt "${DEV[@]}" --load "$W/ckpt" "${TOK[@]}" --prompt "ROMEO: what light" --greedy --out-seq-length 5 > "$W/text.txt" 2>&1
grep -q "loaded checkpoint from $W/ckpt/iter_0000001" "$W/text.txt" && grep -q '^Context: ROMEO: what light$' "$W/text.txt" \
    && [ -n "$(continuations "$W/text.txt")" ] && ok "our checkpoint with the GPT-2 tokenizer: a text prompt, a text continuation" \
    || fail "checkpoint + tokenizer" "$(tail -n 3 "$W/text.txt")"
fi

# bad flags and inputs: one line naming the flag, exit 2
expect "--top-k with --top-p" 2 "--top-k and --top-p are exclusive" "${GEN[@]}" --prompt "1 2" --top-k 5 --top-p 0.9
expect "negative --out-seq-length" 2 "--out-seq-length must be >= 0" "${GEN[@]}" --prompt "1 2" --out-seq-length -1
expect "missing --sample-input-file" 2 "--sample-input-file $W/nothere.txt: No such file" "${GEN[@]}" --sample-input-file "$W/nothere.txt"
expect "--prompt and --sample-input-file" 2 "--prompt and --sample-input-file are exclusive" "${GEN[@]}" --prompt "1" --sample-input-file "$W/prompts.txt"
expect "--prompt without --load" 2 "--prompt needs --load" ./train_gpt --device cpu --vocab-size 200 --prompt "1 2"
expect "--top-k above the vocabulary" 2 "--top-k 300 is not below the vocabulary size 200" "${GEN[@]}" --prompt "1 2" --top-k 300
expect "--top-p above 1" 2 "--top-p must be in \[0, 1\]" "${GEN[@]}" --prompt "1 2" --top-p 1.5
expect "negative --temperature" 2 "--temperature must be >= 0" "${GEN[@]}" --prompt "1 2" --temperature -1
expect "--greedy with --top-p" 2 "--greedy and --top-k/--top-p are exclusive" "${GEN[@]}" --prompt "1 2" --greedy --top-p 0.5
expect "a prompt longer than the positions" 2 "--prompt: the prompt has 40 tokens, more than the model's 32 positions" "${GEN[@]}" --prompt "$(seq -s ' ' 1 40)"
expect "a token id outside the vocabulary" 2 "'250' is not a token id below 200" "${GEN[@]}" --prompt "1 250 3"
printf '1 2\n3 x\n' > "$W/bad_prompts.txt"
expect "a bad line in --sample-input-file" 2 "bad_prompts.txt line 2: 'x' is not a token id" "${GEN[@]}" --sample-input-file "$W/bad_prompts.txt"
expect "unwritable --sample-output-file" 2 "--sample-output-file $W/no/dir.txt" "${GEN[@]}" --prompt "1" --sample-output-file "$W/no/dir.txt"
expect "--sample-input-file a directory" 2 "--sample-input-file $W is a directory" "${GEN[@]}" --sample-input-file "$W"
expect "zero --micro-batch-size given" 2 "--micro-batch-size (a positive integer)" "${GEN[@]}" --prompt "1" --micro-batch-size 0
# non-finite weights: the fixture with its word embeddings overwritten by NaN
mkdir -p "$W/nan" && cp "$W/hf/config.json" "$W/nan/" && python3 - "$W/hf/model.safetensors" "$W/nan/model.safetensors" << 'EOF'
import json, struct, sys
raw = bytearray(open(sys.argv[1], "rb").read())
n = struct.unpack("<Q", raw[:8])[0]
begin, end = json.loads(raw[8:8 + n])["transformer.wte.weight"]["data_offsets"]
raw[8 + n + begin:8 + n + end] = b"\xff" * (end - begin)  # all-ones bits: NaN in fp32
open(sys.argv[2], "wb").write(raw)
EOF
expect "NaN weights stop generation" 1 "the model's logit for token 0 is .*nan: are the weights finite" ./train_gpt "${DEV[@]}" --load "$W/nan" --prompt "1 2" --greedy --out-seq-length 4

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
