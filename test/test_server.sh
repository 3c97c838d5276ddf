#!/usr/bin/env bash
# The REST server (Megatron's PUT /api) over HTTP with curl, on a loopback port the system picks
# (--port 0): build/test_server --serve runs it with a stand-in model (see test_server.cu). Checks
# the answer's fields, HTTP 400 for malformed JSON and each out-of-range field, 404/405/413,
# keep-alive, concurrent clients getting the answers they get one at a time, and that no server
# outlives the test.
cd "$(dirname "$0")/.."
DATA_DIR="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
W=build/test_server_sh
rm -rf "$W" && mkdir -p "$W"
source test/lib.sh
SCRATCH="$W"

SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2> /dev/null
    wait "$SERVER_PID" 2> /dev/null
    SERVER_PID=
}
trap stop_server EXIT

# stop_checked NAME: stops the server and checks that neither it nor a process it started is left.
stop_checked() {
    local pids="$SERVER_PID $(ps -o pid= --ppid "$SERVER_PID" 2> /dev/null)" left=
    stop_server
    for _ in $(seq 50); do  # mpirun's ranks end just after it
        left=
        for p in $pids; do kill -0 "$p" 2> /dev/null && left="$left $p"; done
        [ -z "$left" ] && break
        sleep 0.1
    done
    [ -z "$left" ] && ok "$1: the server is gone" || fail "$1: server stopped" "processes$left still run"
}

# start_server LOG CMD...: CMD in the background; waits for its "serving" line and sets PORT.
start_server() {
    local log=$1; shift
    "$@" > "$log" 2>&1 &
    SERVER_PID=$!
    PORT=
    for _ in $(seq 3000); do  # a model may load first: up to 5 minutes on a busy machine
        PORT=$(sed -n 's|^serving PUT http://127\.0\.0\.1:\([0-9]*\)/api .*|\1|p' "$log")
        [ -n "$PORT" ] && return 0
        kill -0 "$SERVER_PID" 2> /dev/null || break
        sleep 0.1
    done
    return 1
}

# put BODY [OUT]: PUT /api; prints the HTTP status, the answer goes to OUT ($W/body).
put() { curl -s -o "${2:-$W/body}" -w '%{http_code}' -X PUT -H 'Content-Type: application/json' --data-binary "$1" "http://127.0.0.1:$PORT/api"; }

# refused NAME BODY MESSAGE: HTTP 400 whose text starts with MESSAGE.
refused() {
    local code
    code=$(put "$2")
    [ "$code" = 400 ] && [ "$(head -c ${#3} "$W/body")" = "$3" ] && ok "400 for $1: $3" || fail "400 for $1" "HTTP $code: $(head -c 200 "$W/body")"
}

# check_answer FILE N_PROMPTS TOKENS LOGPROBS PROMPT...: the answer's shape (Python's json reads it).
check_answer() {
    python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
n, tokens, logprobs, prompts = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == 'true', sys.argv[5:]
assert sorted(r) == ['logprobs', 'segments', 'text'], sorted(r)
assert len(r['text']) == n and len(r['segments']) == n, r
for i in range(n):
    assert r['text'][i].startswith(prompts[i]), (r['text'][i], prompts[i])
    assert ''.join(r['segments'][i]) == r['text'][i], r['segments'][i]
    assert len(r['segments'][i]) == len(prompts[i]) + tokens, r['segments'][i]
if logprobs:
    assert [len(l) for l in r['logprobs']] == [len(s) - 1 for s in r['segments']], r['logprobs']
    assert all(isinstance(x, float) and x <= 0 for l in r['logprobs'] for x in l), r['logprobs']
else:
    assert r['logprobs'] is None, r['logprobs']
" "$@"
}

if ! [ -x build/test_server ]; then fail "build/test_server" "not built (make build/test_server)"; echo "$passed passed, $failed failed"; exit 1; fi
if ! start_server "$W/fake.log" build/test_server --serve 0; then
    if grep -q "built without libmicrohttpd" "$W/fake.log"; then
        grep -q "^error: --port: built without libmicrohttpd" "$W/fake.log" && ok "without libmicrohttpd, --port says so in one line" \
            || fail "without libmicrohttpd" "$(cat "$W/fake.log")"
        echo "skip the HTTP checks: built without libmicrohttpd (apt-get install libmicrohttpd-dev, then make)"
        echo "$passed passed, $failed failed"
        [ "$failed" -eq 0 ]; exit
    fi
    fail "start the server" "$(tail -n 3 "$W/fake.log")"
    echo "$passed passed, $failed failed"
    exit 1
fi
ok "the server listens on the loopback port the system chose ($PORT)"
build/test_server --serve "$PORT" > "$W/taken.log" 2>&1
[ $? -eq 1 ] && [ "$(wc -l < "$W/taken.log")" -eq 1 ] && grep -q "^error: cannot serve on 127.0.0.1 port $PORT: .*in use" "$W/taken.log" \
    && ok "a port in use: $(cat "$W/taken.log")" || fail "a port in use" "$(cat "$W/taken.log")"

# ---- answers
code=$(put '{"prompts": ["Hello world", "Caf\u00e9 \"quoted\""], "tokens_to_generate": 5, "logprobs": true, "random_seed": 42}')
[ "$code" = 200 ] && check_answer "$W/body" 2 5 true "Hello world" 'Café "quoted"' 2> "$W/err" \
    && ok "PUT /api answers text, segments (one per token, joined = text) and logprobs (tokens - 1 each)" \
    || fail "valid request" "HTTP $code: $(head -c 300 "$W/body") $(tail -n 1 "$W/err")"
code=$(put '{"prompts": ["Hi"], "tokens_to_generate": 3}')
[ "$code" = 200 ] && check_answer "$W/body" 1 3 false "Hi" 2> "$W/err" && ok "without logprobs: \"logprobs\": null" \
    || fail "request without logprobs" "HTTP $code: $(head -c 300 "$W/body") $(tail -n 1 "$W/err")"
code=$(put '{"prompts": ["Score me"], "tokens_to_generate": 0, "logprobs": true}')
[ "$code" = 200 ] && check_answer "$W/body" 1 0 true "Score me" 2> "$W/err" && ok "tokens_to_generate 0 with logprobs scores the prompt" \
    || fail "tokens_to_generate 0" "HTTP $code: $(head -c 300 "$W/body") $(tail -n 1 "$W/err")"
put '{"prompts": ["a"], "tokens_to_generate": 8, "random_seed": 5}' "$W/seed5a" > /dev/null
put '{"prompts": ["a"], "tokens_to_generate": 8, "random_seed": 5}' "$W/seed5b" > /dev/null
put '{"prompts": ["a"], "tokens_to_generate": 8, "random_seed": 6}' "$W/seed6" > /dev/null
cmp -s "$W/seed5a" "$W/seed5b" && ! cmp -s "$W/seed5a" "$W/seed6" && ok "random_seed: the same seed gives the same answer, another seed another" \
    || fail "random_seed" "$(cat "$W/seed5a" "$W/seed5b" "$W/seed6")"
code=$(put '{"prompts": ["a"], "tokens_to_generate": 2, "some_other_key": [1, {"x": null}]}')
[ "$code" = 200 ] && ok "unknown keys are ignored (as Megatron)" || fail "unknown keys" "HTTP $code: $(cat "$W/body")"

# ---- refused requests
refused "malformed JSON" '{"prompts": ["a"' "malformed JSON at byte 16"
refused "a body that is not an object" '["a"]' "malformed JSON at byte 0: expected '{'"
refused "an empty body" '' "malformed JSON at byte 0"
refused "missing prompts" '{"tokens_to_generate": 4}' "prompts argument required"
refused "prompts not a list" '{"prompts": "a"}' "prompts is not a list of strings"
refused "a prompt not a string" '{"prompts": [1]}' "prompts is not a list of strings"
refused "no prompts" '{"prompts": []}' "prompts is empty"
refused "an empty prompt" '{"prompts": [""]}' "Empty prompts require add_BOS=true"
refused "tokens_to_generate -1" '{"prompts": ["a"], "tokens_to_generate": -1}' "tokens_to_generate must be an integer greater than or equal to 0"
refused "tokens_to_generate 0 without logprobs" '{"prompts": ["a"], "tokens_to_generate": 0}' "tokens_to_generate=0 implies logprobs should be True"
refused "temperature 0" '{"prompts": ["a"], "temperature": 0}' "temperature must be a positive number less than or equal to 100.0"
refused "temperature 101" '{"prompts": ["a"], "temperature": 101}' "temperature must be a positive number less than or equal to 100.0"
refused "top_k -1" '{"prompts": ["a"], "top_k": -1}' "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"
refused "top_k 1001" '{"prompts": ["a"], "top_k": 1001}' "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"
refused "top_p 1.5" '{"prompts": ["a"], "top_p": 1.5}' "top_p must be a number from 0 to 1.0"
refused "top_p -0.5" '{"prompts": ["a"], "top_p": -0.5}' "top_p must be a number from 0 to 1.0"
refused "top_k with top_p" '{"prompts": ["a"], "top_k": 4, "top_p": 0.5}' "cannot set both top-k and top-p samplings."
refused "logprobs not a boolean" '{"prompts": ["a"], "logprobs": "yes"}' "logprobs must be a boolean value"
refused "random_seed -3" '{"prompts": ["a"], "random_seed": -3}' "random_seed must be an integer from 0 to 4294967295"
refused "beam search" '{"prompts": ["a"], "beam_width": 2}' "beam search (beam_width) is not supported by this server"
refused "a prompt too long for the model" "{\"prompts\": [\"$(head -c 1100 /dev/zero | tr '\0' a)\"]}" "Length of prompt + tokens_to_generate longer than allowed"

# ---- HTTP
code=$(curl -s -D "$W/headers" -o "$W/body" -w '%{http_code}' "http://127.0.0.1:$PORT/api")
[ "$code" = 405 ] && grep -qi '^Allow: PUT' "$W/headers" && ok "GET /api: 405 with Allow: PUT" || fail "GET /api" "HTTP $code $(cat "$W/headers")"
code=$(curl -s -o "$W/body" -w '%{http_code}' -X POST -d '{"prompts": ["a"]}' "http://127.0.0.1:$PORT/api")
[ "$code" = 405 ] && ok "POST /api: 405" || fail "POST /api" "HTTP $code"
code=$(curl -s -o "$W/body" -w '%{http_code}' -X PUT -d '{"prompts": ["a"]}' "http://127.0.0.1:$PORT/generate")
[ "$code" = 404 ] && ok "PUT /generate: 404" || fail "PUT /generate" "HTTP $code"
head -c 5000000 /dev/zero | tr '\0' ' ' > "$W/big.json"
code=$(curl -s -o "$W/body" -w '%{http_code}' -X PUT --data-binary @"$W/big.json" "http://127.0.0.1:$PORT/api")
[ "$code" = 413 ] && ok "a 5 MB body: 413" || fail "a 5 MB body" "HTTP $code"
echo '{"prompts": ["a"], "tokens_to_generate": 2}' > "$W/small.json"
curl -s -o /dev/null -o /dev/null -w '%{http_code} %{num_connects}\n' -X PUT --data-binary @"$W/small.json" \
    "http://127.0.0.1:$PORT/api" "http://127.0.0.1:$PORT/api" > "$W/keepalive"
[ "$(tr '\n' ' ' < "$W/keepalive")" = "200 1 200 0 " ] && ok "keep-alive: two requests over one connection" || fail "keep-alive" "$(cat "$W/keepalive")"

# ---- concurrent clients: one generation at a time, each answer as when sent alone
# The request body(seed) for each seed sent alone, then all at once: bad lists the seeds whose
# concurrent answer was not HTTP 200 or differed from the lone one. $1 names the files.
same_together() {
    local name=$1 s clients=()
    shift
    for s in "$@"; do put "$(body "$s")" "$W/${name}_alone_$s" > /dev/null; done
    for s in "$@"; do
        put "$(body "$s")" "$W/${name}_together_$s" > "$W/${name}_code_$s" &
        clients+=($!)
    done
    wait "${clients[@]}"
    bad=
    for s in "$@"; do
        { [ "$(cat "$W/${name}_code_$s")" = 200 ] && cmp -s "$W/${name}_alone_$s" "$W/${name}_together_$s"; } || bad="$bad $s"
    done
}
seeds=(11 12 13 14 15 16 17 18)
body() { echo "{\"prompts\": [\"client $1\", \"second $1\"], \"tokens_to_generate\": 16, \"logprobs\": true, \"random_seed\": $1}"; }
same_together stand_in "${seeds[@]}"
[ -z "$bad" ] && ok "${#seeds[@]} concurrent clients get the answers they get one at a time" || fail "concurrent clients" "differ for seeds$bad"
for _ in $(seq 100); do grep -q "^stand-in model: idle" "$W/fake.log" && break; sleep 0.1; done
grep -q "^stand-in model: idle" "$W/fake.log" && ok "between requests the model's thread gets its idle calls" || fail "idle calls" "none in the log"
kill -0 "$SERVER_PID" 2> /dev/null && ok "the server is still up after all that" || fail "server alive" "$(tail -n 3 "$W/fake.log")"
grep -q "^PUT /api: 400 top_k must be" "$W/fake.log" && grep -q "^PUT /api: 200, 2 prompts, tokens_to_generate 16" "$W/fake.log" \
    && ok "the server logs each request in one line" || fail "server log" "$(tail -n 3 "$W/fake.log")"

stop_checked stand-in

# ---- train_gpt --port: a tiny random GPT-2 (Hugging Face layout, GPT-2's vocabulary, 64 positions)
G="$DATA_DIR/gpt2"
if ! [ -f "$G/encoder.json" ] || ! [ -x ./train_gpt ]; then
    echo "skip train_gpt --port: no ./train_gpt or no GPT-2 encoder.json/vocab.bpe in $G (set MEGATRON_DATA)"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]; exit
fi
export OMP_NUM_THREADS=1  # tiny models run fastest on one thread, and every run below sees the same sums
mkdir -p "$W/hf"
python3 - "$W/hf" << 'PY' || fail "make the model" "python failed"
import json, random, struct, sys
V, P, C, L = 50257, 64, 32, 2
rng, tensors = random.Random(1), {}
def add(name, shape, std=0.0, fill=0.0):
    n = 1
    for d in shape: n *= d
    tensors[name] = (shape, struct.pack('<%df' % n, *([rng.gauss(0, std) for _ in range(n)] if std else [fill] * n)))
add('transformer.wte.weight', [V, C], 0.5)  # large weights: peaked next-token distributions
add('transformer.wpe.weight', [P, C], 0.2)
for l in range(L):
    h = 'transformer.h.%d.' % l
    for ln in ['ln_1', 'ln_2']:
        add(h + ln + '.weight', [C], fill=1.0); add(h + ln + '.bias', [C])
    for name, shape in [('attn.c_attn', [C, 3 * C]), ('attn.c_proj', [C, C]), ('mlp.c_fc', [C, 4 * C]), ('mlp.c_proj', [4 * C, C])]:
        add(h + name + '.weight', shape, 0.2); add(h + name + '.bias', [shape[1]], 0.02)
add('transformer.ln_f.weight', [C], fill=1.0); add('transformer.ln_f.bias', [C])
header, data = {}, b''
for k, (shape, raw) in tensors.items():
    header[k] = {'dtype': 'F32', 'shape': shape, 'data_offsets': [len(data), len(data) + len(raw)]}
    data += raw
h = json.dumps(header).encode()
open(sys.argv[1] + '/model.safetensors', 'wb').write(struct.pack('<Q', len(h)) + h + data)
json.dump({'model_type': 'gpt2', 'vocab_size': V, 'n_positions': P, 'n_embd': C, 'n_layer': L, 'n_head': 2}, open(sys.argv[1] + '/config.json', 'w'))
PY
TOK=(--device cpu --vocab-file "$G/encoder.json" --merge-file "$G/vocab.bpe")

# check_gpt FILE PROMPT...: the answer's shape for a real tokenizer (segments are BPE tokens)
check_gpt() {
    python3 -c "
import json, sys
r, prompts = json.load(open(sys.argv[1])), sys.argv[2:]
assert len(r['text']) == len(prompts) == len(r['segments']), r
for i, p in enumerate(prompts):
    assert r['text'][i].startswith(p), (r['text'][i], p)
    assert len(r['logprobs'][i]) == len(r['segments'][i]) - 1 and all(x <= 0 for x in r['logprobs'][i]), r
" "$@"
}
# continuation FILE: the text after the prompt of an answer's first entry
continuation() { python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(r['text'][0][len(sys.argv[2]):])" "$1" "$2"; }

expect "--port without --load" 2 "--port needs --load" ./train_gpt "${TOK[@]}" --port 0
expect "--port without a tokenizer" 2 "--port needs --vocab-file and --merge-file" ./train_gpt --device cpu --load "$W/hf" --port 0
expect "--port out of range" 2 "--port 70000: expected 0 to 65535" ./train_gpt --load "$W/hf" "${TOK[@]}" --port 70000
expect "--port -1 given" 2 "--port -1: expected 0 to 65535" ./train_gpt --load "$W/hf" "${TOK[@]}" --port -1
expect "--port with --prompt" 2 "--port does not go with --prompt" ./train_gpt --load "$W/hf" "${TOK[@]}" --port 0 --prompt "Hi"
expect "--bind-address not an address" 2 "--bind-address localhost: not a numeric IPv4 or IPv6 address" \
    ./train_gpt --load "$W/hf" "${TOK[@]}" --port 0 --bind-address localhost

if start_server "$W/gpt.log" ./train_gpt --load "$W/hf" "${TOK[@]}" --port 0; then
    ok "train_gpt --load (a Hugging Face GPT-2 directory) --port 0 serves"
    code=$(put '{"prompts": ["Hello world", "The cat sat on"], "tokens_to_generate": 12, "top_k": 1, "logprobs": true}' "$W/greedy")
    [ "$code" = 200 ] && check_gpt "$W/greedy" "Hello world" "The cat sat on" 2> "$W/err" \
        && ok "a greedy request (top_k 1) answers text, segments and logprobs" || fail "greedy request" "HTTP $code $(head -c 300 "$W/greedy") $(tail -n 1 "$W/err")"
    ./train_gpt --load "$W/hf" "${TOK[@]}" --prompt "Hello world" --greedy --out-seq-length 12 > "$W/prompt.txt" 2>&1
    want=$(python3 -c "import sys; t = open(sys.argv[1]).read(); print(t.split('Megatron-LM: ', 1)[1][:-1])" "$W/prompt.txt")
    [ -n "$want" ] && [ "$(continuation "$W/greedy" "Hello world")" = "$want" ] && ok "the greedy answer equals train_gpt --prompt ... --greedy: '$want'" \
        || fail "greedy answer vs --prompt --greedy" "server '$(continuation "$W/greedy" "Hello world")', --prompt '$want'"
    code=$(put '{"prompts": ["Hello world", "The cat sat on"], "tokens_to_generate": 0, "logprobs": true}' "$W/score")
    python3 -c "
import json, sys
g, s = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
for i in range(2):
    n = len(s['segments'][i])
    assert s['segments'][i] == g['segments'][i][:n] and s['logprobs'][i] == g['logprobs'][i][:n - 1], i
" "$W/greedy" "$W/score" 2> "$W/err" && ok "tokens_to_generate 0 scores the prompts: the greedy answer's first logprobs" || fail "scoring" "HTTP $code $(tail -n 1 "$W/err")"
    code=$(put '{"prompts": [""], "add_BOS": true, "tokens_to_generate": 4, "logprobs": true}' "$W/bos")
    [ "$code" = 200 ] && check_gpt "$W/bos" "<|endoftext|>" 2> "$W/err" && ok "add_BOS: an empty prompt starts from <|endoftext|>" || fail "add_BOS" "HTTP $code $(cat "$W/bos")"
    refused "prompt + tokens_to_generate over the 64 positions" '{"prompts": ["Hello world"], "tokens_to_generate": 63}' "Length of prompt + tokens_to_generate longer than allowed"
    seeds=(21 22 23 24)
    body() { echo "{\"prompts\": [\"Once upon a time $1\", \"The $1\"], \"tokens_to_generate\": 10, \"top_p\": 0.9, \"logprobs\": true, \"random_seed\": $1}"; }
    same_together gpt "${seeds[@]}"
    [ -z "$bad" ] && ok "${#seeds[@]} concurrent clients of the model get the answers they get one at a time" || fail "concurrent clients of the model" "differ for seeds$bad"
    stop_checked "train_gpt --port"
else
    fail "train_gpt --port" "$(tail -n 3 "$W/gpt.log")"
    stop_server
fi

# ---- tensor parallelism (mpirun -np 2): rank 0 serves, rank 1 generates beside it; the answers are one
# process's. The checkpoint: the model above through one training step of learning rate 1e-9, saved
# in our format (Hugging Face weights load into one process only).
if ! command -v mpirun > /dev/null || ! ldd ./train_gpt 2> /dev/null | grep -q libmpi || ! [ -x prepro/preprocess_data ]; then
    echo "skip the tensor-parallel server: no mpirun, no MPI in ./train_gpt or no prepro/preprocess_data"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]; exit
fi
./prepro/preprocess_data --input "$DATA_DIR/tinyshakespeare/input.txt" --input-format text --output-prefix "$W/ts" --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$G/encoder.json" --merge-file "$G/vocab.bpe" --append-eod --log-interval 0 > "$W/prepro.txt" 2>&1
./train_gpt --load "$W/hf" "${TOK[@]}" --data-path "$W/ts_text_document" --split 100,0,0 --seq-length 16 --micro-batch-size 1 \
    --global-batch-size 1 --train-iters 1 --lr 1e-9 --eval-iters 0 --save "$W/ckpt" --save-interval 1 > "$W/ckpt.txt" 2>&1 \
    || fail "make the checkpoint" "$(tail -n 2 "$W/ckpt.txt")"
greedy='{"prompts": ["Hello world", "The cat sat on"], "tokens_to_generate": 12, "top_k": 1, "logprobs": true}'
sampled='{"prompts": ["Hello world", "The cat sat on"], "tokens_to_generate": 12, "temperature": 0.8, "random_seed": 7, "logprobs": true}'
start_server "$W/one.log" ./train_gpt --load "$W/ckpt" "${TOK[@]}" --port 0 && put "$greedy" "$W/one_greedy" > /dev/null && put "$sampled" "$W/one_sampled" > /dev/null
stop_server
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x OMP_NUM_THREADS=1 -np 2)
TP=(--tensor-model-parallel-size 2 --make-vocab-size-divisible-by 64 --collective-timeout 3)
if start_server "$W/tp.log" "${MPIRUN[@]}" ./train_gpt --load "$W/ckpt" "${TOK[@]}" "${TP[@]}" --port 0; then
    put "$greedy" "$W/tp_greedy" > /dev/null
    put "$sampled" "$W/tp_sampled" > /dev/null
    python3 -c "
import json, sys
for one, tp in [(sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])]:
    a, b = json.load(open(one)), json.load(open(tp))
    assert a['text'] == b['text'], (a['text'], b['text'])
    worst = max(abs(x - y) for la, lb in zip(a['logprobs'], b['logprobs']) for x, y in zip(la, lb))
    assert worst < 1e-4, worst
" "$W/one_greedy" "$W/tp_greedy" "$W/one_sampled" "$W/tp_sampled" 2> "$W/err" \
        && ok "TP=2 under mpirun: greedy and seeded answers equal one process's (logprobs within 1e-4)" || fail "TP=2 answers" "$(tail -n 1 "$W/err")"
    sleep 7  # over twice --collective-timeout without a request: rank 0's idle messages keep rank 1 waiting
    code=$(put "$greedy" "$W/tp_later")
    [ "$code" = 200 ] && cmp -s "$W/tp_greedy" "$W/tp_later" && ok "TP=2: after 7 s idle (--collective-timeout 3) the next request is answered the same" \
        || fail "TP=2 after idling" "HTTP $code $(tail -n 3 "$W/tp.log")"
    stop_checked "TP=2"
else
    fail "TP=2 server" "$(tail -n 3 "$W/tp.log")"
    stop_server
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
