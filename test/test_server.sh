#!/usr/bin/env bash
# The REST server (Megatron's PUT /api) over HTTP with curl, on a loopback port the system picks
# (--port 0): build/test_server --serve runs it with a stand-in model (see test_server.cu). Checks
# the answer's fields, HTTP 400 for malformed JSON and each out-of-range field, 404/405/413,
# keep-alive, concurrent clients getting the answers they get one at a time, and that no server
# outlives the test.
cd "$(dirname "$0")/.."
W=build/test_server_sh
rm -rf "$W" && mkdir -p "$W"
passed=0; failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }

SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2> /dev/null
    wait "$SERVER_PID" 2> /dev/null
    SERVER_PID=
}
trap stop_server EXIT

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
seeds=(11 12 13 14 15 16 17 18)
body() { echo "{\"prompts\": [\"client $1\", \"second $1\"], \"tokens_to_generate\": 16, \"logprobs\": true, \"random_seed\": $1}"; }
for s in "${seeds[@]}"; do put "$(body "$s")" "$W/alone_$s" > /dev/null; done
clients=()
for s in "${seeds[@]}"; do
    put "$(body "$s")" "$W/together_$s" > "$W/code_$s" &
    clients+=($!)
done
wait "${clients[@]}"
bad=
for s in "${seeds[@]}"; do
    { [ "$(cat "$W/code_$s")" = 200 ] && cmp -s "$W/alone_$s" "$W/together_$s"; } || bad="$bad $s"
done
[ -z "$bad" ] && ok "${#seeds[@]} concurrent clients get the answers they get one at a time" || fail "concurrent clients" "differ for seeds$bad"
for _ in $(seq 100); do grep -q "^stand-in model: idle" "$W/fake.log" && break; sleep 0.1; done
grep -q "^stand-in model: idle" "$W/fake.log" && ok "between requests the model's thread gets its idle calls" || fail "idle calls" "none in the log"
kill -0 "$SERVER_PID" 2> /dev/null && ok "the server is still up after all that" || fail "server alive" "$(tail -n 3 "$W/fake.log")"
grep -q "^PUT /api: 400 top_k must be" "$W/fake.log" && grep -q "^PUT /api: 200, 2 prompts, tokens_to_generate 16" "$W/fake.log" \
    && ok "the server logs each request in one line" || fail "server log" "$(tail -n 3 "$W/fake.log")"

pid=$SERVER_PID
stop_server
kill -0 "$pid" 2> /dev/null && fail "server stopped" "pid $pid still runs" || ok "the server is gone"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
