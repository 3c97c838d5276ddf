#!/usr/bin/env bash
# train_gpt --task as a user runs it, on the CPU. test/eval_tiny_model.py writes a random GPT-2
# (2 layers, hidden 64, GPT-2's 50,257 tokens) in Hugging Face's format and excerpts of WikiText-2
# and LAMBADA; test/make_eval_fixtures.py ran torch on the same files and recorded its figures in
# test/fixtures/eval.txt. WIKITEXT103 (windows of 64, stride 32) must give torch's summed loss,
# average loss, perplexity and adjusted perplexity within 1e-5 (relative), and LAMBADA (plain and
# --strict-lambada) torch's number of correct examples, also at TP=2 and DP=2 under mpirun. Then
# bad input: one line on stderr and a non-zero exit. EVAL_DEVICE=cuda runs it all on a GPU (in
# fp32, one rank).
cd "$(dirname "$0")/.."
DEVICE="${EVAL_DEVICE:-cpu}"
DATA_DIR="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
WORK=build/test_evaluate_sh
FIXTURE=test/fixtures/eval.txt
rm -rf "$WORK" && mkdir -p "$WORK"
source test/lib.sh
SCRATCH="$WORK"

for f in wikitext/wikitext-2.test.tokens lambada/lambada_test.jsonl gpt2/encoder.json gpt2/vocab.bpe; do
    if [ ! -s "$DATA_DIR/$f" ]; then echo "skip evaluation runs: $DATA_DIR/$f not found (set MEGATRON_DATA)"; echo "0 passed, 0 failed"; exit 0; fi
done
sha=$(python3 test/eval_tiny_model.py "$WORK" "$DATA_DIR" | awk '{print $3}')
want_sha=$(awk '$1 == "model_sha256" {print $2}' "$FIXTURE")
[ "$sha" = "$want_sha" ] && ok "test/eval_tiny_model.py wrote the model torch evaluated (sha256 ${sha:0:16}...)" ||
    fail "tiny model" "sha256 $sha, the fixture's is $want_sha: the figures below do not apply"

TOK=(--vocab-file "$DATA_DIR/gpt2/encoder.json" --merge-file "$DATA_DIR/gpt2/vocab.bpe")
EVAL=(./train_gpt --device "$DEVICE" --fp32 --load "$WORK/model" "${TOK[@]}" --micro-batch-size 4)
WIKI=(--task WIKITEXT103 --valid-data "$WORK/wiki.test.tokens" --seq-length 64 --overlapping-eval 32)
LAMBADA=(--task LAMBADA --valid-data "$WORK/lambada_test.jsonl")
MPIRUN=()
if [ "$DEVICE" != cpu ]; then
    echo "skip TP=2 and DP=2 runs: CPU ranks only (EVAL_DEVICE=$DEVICE)"
elif command -v mpirun > /dev/null && ldd ./train_gpt 2> /dev/null | grep -q libmpi; then
    MPIRUN=(mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x OMP_NUM_THREADS=1)
else
    echo "skip TP=2 and DP=2 runs: mpirun not found or ./train_gpt built without MPI"
fi

# compare NAME OUT REFERENCE: the run's " > full precision" figures against torch's (or another run's)
compare() {
    local name=$1 out=$2 ref=$3 detail
    if detail=$(python3 - "$out" "$ref" "$FIXTURE" 2>&1 << 'EOF'
import re, sys
out, ref, fixture = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
records = {tuple(l.split()[:2]): l.split() for l in open(fixture) if l.startswith("ref_")}

def figures(text):
    wiki = re.search(r"number of original tokens: (\d+), number of detokenized tokens: (\d+)\n(?:.*\n)*? > full precision: loss sum (\S+) "
                     r"over \d+ targets, (\d+) windows \| avg loss (\S+) \| ppl (\S+) \| adjusted ppl (\S+)", text)
    if wiki:
        w = wiki.groups()
        return "wikitext", [int(w[0]), int(w[1]), int(w[3])], [float(x) for x in (w[2], w[4], w[5], w[6])]
    lam = re.search(r" > full precision: (\d+) correct of (\d+) \((strict|last token)\)", text)
    assert lam, "no result line in the output: " + text.strip().splitlines()[-1]
    return "lambada " + lam.group(3), [int(lam.group(1)), int(lam.group(2))], []

kind, counts, values = figures(out)
if ref == "torch":
    if kind == "wikitext":
        r = records[("ref_wikitext", "64")]
        want_counts, want_values = [int(r[3]), int(r[4]), int(r[5])], [float(x) for x in r[6:10]]
    else:
        r = records[("ref_lambada", "1" if "strict" in kind else "0")]
        want_counts, want_values = [int(r[3]), int(r[4])], []
else:
    _, want_counts, want_values = figures(open(ref).read())
assert counts == want_counts, f"{kind}: counts {counts}, want {want_counts}"
worst = max([abs(a - b) / abs(b) for a, b in zip(values, want_values)] + [0])
assert worst <= 1e-5, f"{kind}: {values} against {want_values}: {worst:.1e} relative"
print(f"{kind}: {counts}" + (f", loss sum {values[0]:.6f}, adjusted ppl {values[3]:.6g}, within {worst:.1e}" if values else ""))
EOF
    ); then ok "$name: $detail"; else fail "$name" "$(echo "$detail" | tail -n 1)"; fi
}

# run NAME RANKS [FLAGS...]: train_gpt --task, on RANKS ranks under mpirun when RANKS > 1
run() {
    local name=$1 np=$2 launcher=(); shift 2
    [ "$np" -gt 1 ] && launcher=("${MPIRUN[@]}" -np "$np")
    "${launcher[@]}" "${EVAL[@]}" "$@" > "$WORK/$name.out" 2>&1 && return 0
    fail "$name" "$(grep -m1 error "$WORK/$name.out")"
    return 1
}

run wiki 1 "${WIKI[@]}" && compare "WIKITEXT103 equals torch" "$WORK/wiki.out" torch
line=$(grep "validation results on WIKITEXT103" "$WORK/wiki.out")
want=$(awk '$1 == "ref_wikitext" {printf " validation results on WIKITEXT103 | avg loss: %.4E | ppl: %.4E | adjusted ppl: %.4E | token ratio: ", $8, $9, $10}' "$FIXTURE")
ratio=$(awk '$1 == "ref_wikitext" {print $5, $4}' "$FIXTURE" | python3 -c "t, w = map(int, input().split()); print(repr((t - 1) / (w - 1)))")
[ "$line" = "$want$ratio |" ] && ok "Megatron's WIKITEXT103 line: $line" || fail "Megatron's WIKITEXT103 line" "'$line', want '$want$ratio |'"
run lambada 1 "${LAMBADA[@]}" && compare "LAMBADA equals torch" "$WORK/lambada.out" torch
run lambada_strict 1 "${LAMBADA[@]}" --strict-lambada && compare "LAMBADA --strict-lambada equals torch" "$WORK/lambada_strict.out" torch
line=$(grep "validation results on LAMBADA" "$WORK/lambada.out")
want=$(awk '$1 == "ref_lambada" && $2 == 0 {printf " validation results on LAMBADA | number correct: %.4E | total examples: %.4E | avg accuracy: %.4E", $4, $5, $4 / $5}' "$FIXTURE")
[ "$line" = "$want" ] && ok "Megatron's LAMBADA line: $line" || fail "Megatron's LAMBADA line" "'$line', want '$want'"

if [ ${#MPIRUN[@]} -gt 0 ]; then
    run wiki_tp2 2 "${WIKI[@]}" --tensor-model-parallel-size 2 && compare "WIKITEXT103 at TP=2 equals TP=1" "$WORK/wiki_tp2.out" "$WORK/wiki.out"
    run wiki_dp2 2 "${WIKI[@]}" && compare "WIKITEXT103 at DP=2 equals TP=1" "$WORK/wiki_dp2.out" "$WORK/wiki.out"
    run lambada_tp2 2 "${LAMBADA[@]}" --strict-lambada --tensor-model-parallel-size 2 &&
        compare "LAMBADA --strict-lambada at TP=2 equals TP=1" "$WORK/lambada_tp2.out" "$WORK/lambada_strict.out"
    run lambada_dp2 2 "${LAMBADA[@]}" --micro-batch-size 3 && compare "LAMBADA at DP=2 (micro-batch 3) equals TP=1" "$WORK/lambada_dp2.out" "$WORK/lambada.out"
fi


: > "$WORK/empty.tokens"
: > "$WORK/empty.jsonl"
printf '{"text": "a good start"}\n{"text": "no closing brace"\n' > "$WORK/bad.jsonl"
printf '{"id": 1}\n' > "$WORK/notext.jsonl"
printf '{"text": "fine words"}\n\n' > "$WORK/blank.jsonl"
printf '{"text": "Hello"}\n' > "$WORK/short.jsonl"
printf ' = Caf\xe9 = \n' > "$WORK/latin1.tokens"
python3 -c "import json; print(json.dumps({'text': 'word ' * 200}))" > "$WORK/long.jsonl"
expect "unknown task" 2 "--task 'RACE' is not one of WIKITEXT103, LAMBADA" "${EVAL[@]}" --task RACE --valid-data "$WORK/wiki.test.tokens"
expect "task without data" 2 "needs one --valid-data file" "${EVAL[@]}" --task LAMBADA
expect "task without a model" 2 "--task needs --load" ./train_gpt --device "$DEVICE" "${TOK[@]}" "${LAMBADA[@]}"
expect "task without a tokenizer" 2 "needs the tokenizer" ./train_gpt --device "$DEVICE" --load "$WORK/model" "${LAMBADA[@]}"
expect "stride 0" 2 "--overlapping-eval must be positive" "${EVAL[@]}" "${WIKI[@]}" --overlapping-eval 0
expect "stride above the window" 2 "--overlapping-eval 100 is above --seq-length 64" "${EVAL[@]}" "${WIKI[@]}" --overlapping-eval 100
expect "missing data file" 1 "cannot open --valid-data file '$WORK/nothere.tokens'" "${EVAL[@]}" --task WIKITEXT103 --valid-data "$WORK/nothere.tokens"
expect "empty WikiText file" 1 "WIKITEXT103 needs at least 2" "${EVAL[@]}" --task WIKITEXT103 --valid-data "$WORK/empty.tokens"
expect "WikiText file not in UTF-8" 1 "latin1.tokens: invalid UTF-8 at byte 6" "${EVAL[@]}" --task WIKITEXT103 --valid-data "$WORK/latin1.tokens"
expect "empty LAMBADA file" 1 "no examples (the file is empty)" "${EVAL[@]}" --task LAMBADA --valid-data "$WORK/empty.jsonl"
expect "malformed JSON line" 1 "bad.jsonl:2: malformed JSON line" "${EVAL[@]}" --task LAMBADA --valid-data "$WORK/bad.jsonl"
expect "record without text" 1 "notext.jsonl:1: the record has no \"text\"" "${EVAL[@]}" --task LAMBADA --valid-data "$WORK/notext.jsonl"
expect "blank line" 1 "blank.jsonl:2: malformed JSON line" "${EVAL[@]}" --task LAMBADA --valid-data "$WORK/blank.jsonl"
expect "one-token text" 1 "short.jsonl:1: the text has 1 tokens" "${EVAL[@]}" --task LAMBADA --valid-data "$WORK/short.jsonl"
expect "example longer than the sequence" 1 "long.jsonl:1: 201 tokens, more than --seq-length 128 + 1" "${EVAL[@]}" --task LAMBADA --valid-data "$WORK/long.jsonl"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
