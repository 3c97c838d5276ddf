#!/usr/bin/env bash
# Tests of prepro/preprocess_data: outputs byte-identical to Megatron-LM's preprocess_data.py
# (expected files in test/fixtures/prepro/ come from test/make_prepro_fixtures.py), the same
# bytes for any --workers, the 82-byte .idx of megatron-lm-notes.md §1.2, and a clear
# one-line error with a non-zero exit for each kind of bad input. Needs the GPT-2 files of
# $MEGATRON_DATA (default ../shared/data); never the network.
cd "$(dirname "$0")/.." || exit 1
DATA="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
FIX=test/fixtures/prepro
BIN=build/preprocess_data
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
passed=0
failed=0

pass() { echo "ok $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
summary() { echo "$passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit $?; }

# run NAME ARGS...: runs the tool, stderr in $TMP/NAME.err, exit status in $rc
run() {
    local name="$1"
    shift
    "$BIN" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err"
    rc=$?
}

# same_dataset NAME PREFIX EXPECTED_PREFIX: both .bin and .idx byte-identical
same_dataset() {
    local name="$1" got="$2" want="$3"
    if [ "$rc" -ne 0 ]; then fail "$name" "exit $rc: $(head -c 300 "$TMP/$name.err")"; return; fi
    for ext in bin idx; do
        if ! cmp -s "$got.$ext" "$want.$ext"; then fail "$name" "$got.$ext differs from $want.$ext"; return; fi
    done
    pass "$name"
}

# one_line_error NAME WANT_RC PATTERN: failed with that status and one "error: " line matching PATTERN
one_line_error() {
    local name="$1" want="$2" pattern="$3" err="$TMP/$1.err"
    if [ "$rc" -eq 0 ] || { [ "$want" != any ] && [ "$rc" -ne "$want" ]; }; then
        fail "$name" "exit status $rc, expected $want"
    elif [ "$(wc -l < "$err")" -ne 1 ] || ! grep -qE "^error: .*$pattern" "$err"; then
        fail "$name" "stderr was: $(head -c 300 "$err")"
    else
        pass "$name"
    fi
}

# no_outputs NAME PREFIX: neither final names nor temporaries left behind
no_outputs() {
    if ls "$2".* > /dev/null 2>&1; then fail "$1" "left $(ls "$2".* | tr '\n' ' ')"; else pass "$1"; fi
}

mkdir -p build
if g++ -O3 -std=c++17 -pthread -fopenmp -o "$BIN" prepro/preprocess_data.cpp 2> "$TMP/build.err"; then
    pass build
else
    fail build "$(head -c 1000 "$TMP/build.err")"
    summary
fi
if [ ! -s "$DATA/gpt2/encoder.json" ] || [ ! -s "$DATA/gpt2/vocab.bpe" ]; then
    echo "skip test_prepro: no GPT-2 encoder.json/vocab.bpe in $DATA (set MEGATRON_DATA)"
    summary
fi
GPT2=(--tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/gpt2/encoder.json" --merge-file "$DATA/gpt2/vocab.bpe")

# --- byte-identical outputs on small inputs --------------------------------------------
run small_two_keys --input $FIX/small.jsonl --output-prefix "$TMP/a" --json-keys text title --append-eod "${GPT2[@]}"
same_dataset small_two_keys "$TMP/a_text_document" $FIX/small_eod_text_document
same_dataset small_two_keys_title "$TMP/a_title_document" $FIX/small_eod_title_document

run small_default_key --input $FIX/small.jsonl --output-prefix "$TMP/b" "${GPT2[@]}" --workers 2
same_dataset small_default_key "$TMP/b_text_document" $FIX/small_text_document

run invalid_utf8_replaced --input $FIX/bad_utf8.jsonl --output-prefix "$TMP/u" --json-keys text title --append-eod "${GPT2[@]}"
same_dataset invalid_utf8_replaced "$TMP/u_text_document" $FIX/bad_utf8_text_document
same_dataset invalid_utf8_replaced_title "$TMP/u_title_document" $FIX/bad_utf8_title_document

run text_mode_small --input $FIX/small.txt --output-prefix "$TMP/t" --append-eod "${GPT2[@]}"
same_dataset text_mode_small "$TMP/t_text_document" $FIX/small_txt_text_document

# sentences: text where punkt's boundaries are unambiguous (see make_prepro_fixtures.py)
run split_keep_newlines --input $FIX/split.jsonl --output-prefix "$TMP/sk" --split-sentences --keep-newlines \
    --append-eod "${GPT2[@]}"
same_dataset split_keep_newlines "$TMP/sk_text_sentence" $FIX/split_newlines_text_sentence

if [ -s $FIX/small_bert_text_document.bin ] && [ -s "$DATA/bert/vocab-uncased.txt" ]; then
    BERT=(--tokenizer-type BertWordPieceLowerCase --vocab-file "$DATA/bert/vocab-uncased.txt")
    run bert_lower --input $FIX/small.jsonl --output-prefix "$TMP/bert" "${BERT[@]}"
    same_dataset bert_lower "$TMP/bert_text_document" $FIX/small_bert_text_document
    run bert_split_sentences --input $FIX/split.jsonl --output-prefix "$TMP/bs" --split-sentences "${BERT[@]}" --workers 2
    same_dataset bert_split_sentences "$TMP/bs_text_sentence" $FIX/split_bert_text_sentence
fi

# --- real data: digests of Megatron's output, and the same bytes for any --workers ------
# check_digest NAME FILE EXPECTED: sha256 and document count as real_data.sha256 gives for EXPECTED
check_digest() {
    local name="$1" file="$2" line
    line="$(grep "^$3 " $FIX/real_data.sha256)"
    local want_sha want_docs got_sha got_docs
    want_sha="$(echo "$line" | cut -d' ' -f2)"
    want_docs="$(echo "$line" | cut -d' ' -f3)"
    got_sha="$(sha256sum "$file" | cut -d' ' -f1)"
    got_docs=$(($(od -An -t u8 -j 26 -N 8 "${file%.*}.idx") - 1))
    if [ "$got_sha" = "$want_sha" ] && [ "$got_docs" = "$want_docs" ]; then pass "$name"
    else fail "$name" "sha256 $got_sha, $got_docs documents; expected $want_sha, $want_docs"; fi
}

SHAKESPEARE="$DATA/tinyshakespeare/input.txt"
if [ -s "$SHAKESPEARE" ]; then
    for w in 1 2 4; do
        run "shakespeare_w$w" --input "$SHAKESPEARE" --output-prefix "$TMP/ts$w" --append-eod "${GPT2[@]}" --workers $w
    done
    if [ "$rc" -eq 0 ]; then
        check_digest tinyshakespeare_text_mode_bin "$TMP/ts1_text_document.bin" tinyshakespeare_text_document.bin
        check_digest tinyshakespeare_text_mode_idx "$TMP/ts1_text_document.idx" tinyshakespeare_text_document.idx
        # the first document is the first speech with its newlines, then <|endoftext|>:
        # "First Citizen:\nBefore we proceed any further, hear me speak.\n" (ids from tiktoken)
        want="5962 22307 25 198 8421 356 5120 597 2252 11 3285 502 2740 13 198 50256"
        size0=$(od -An -t u4 -j 34 -N 4 "$TMP/ts1_text_document.idx" | tr -d ' ')
        ids0=$(od -An -t u2 -v -N 32 "$TMP/ts1_text_document.bin" | xargs)
        [ "$size0" = 16 ] && [ "$ids0" = "$want" ] && pass tinyshakespeare_first_speech ||
            fail tinyshakespeare_first_speech "first document: $size0 tokens, $ids0"
    else
        fail tinyshakespeare_text_mode "exit $rc: $(head -c 300 "$TMP/shakespeare_w4.err")"
    fi
    same=1
    for w in 2 4; do
        for ext in bin idx; do cmp -s "$TMP/ts1_text_document.$ext" "$TMP/ts${w}_text_document.$ext" || same=0; done
    done
    [ $same = 1 ] && pass workers_1_2_4_identical_text || fail workers_1_2_4_identical_text
fi
LAMBADA="$DATA/lambada/lambada_test.jsonl"
if [ -s "$LAMBADA" ]; then
    run lambada_w1 --input "$LAMBADA" --output-prefix "$TMP/l1" --append-eod "${GPT2[@]}" --workers 1
    run lambada_w3 --input "$LAMBADA" --output-prefix "$TMP/l3" --append-eod "${GPT2[@]}" --workers 3
    check_digest lambada_jsonl_bin "$TMP/l3_text_document.bin" lambada_text_document.bin
    check_digest lambada_jsonl_idx "$TMP/l3_text_document.idx" lambada_text_document.idx
    cmp -s "$TMP/l1_text_document.bin" "$TMP/l3_text_document.bin" && cmp -s "$TMP/l1_text_document.idx" "$TMP/l3_text_document.idx" &&
        pass workers_1_3_identical_jsonl || fail workers_1_3_identical_jsonl
fi

# --- the worked example of megatron-lm-notes.md §1.2: two documents [10,11,12,EOD], [13,EOD]
# (with no merges at all, "+,-" is the three byte tokens 10 11 12 and "." is 13)
head -n 1 "$DATA/gpt2/vocab.bpe" > "$TMP/no_merges.bpe"
printf '{"text": "+,-"}\n{"text": "."}\n' > "$TMP/vector.jsonl"
run vector_82_bytes --input "$TMP/vector.jsonl" --output-prefix "$TMP/v" --append-eod --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$DATA/gpt2/encoder.json" --merge-file "$TMP/no_merges.bpe"
# the .idx as megatron-lm-notes.md §1.2 prints it
WANT_IDX="4d 4d 49 44 49 44 58 00 00 01 00 00 00 00 00 00
          00 08 02 00 00 00 00 00 00 00 03 00 00 00 00 00
          00 00 04 00 00 00 02 00 00 00 00 00 00 00 00 00
          00 00 08 00 00 00 00 00 00 00 00 00 00 00 00 00
          00 00 01 00 00 00 00 00 00 00 02 00 00 00 00 00
          00 00"
printf "$(echo $WANT_IDX | tr -d ' ' | sed 's/../\\x&/g')" > "$TMP/want.idx"
printf '\x0a\x00\x0b\x00\x0c\x00\x50\xc4\x0d\x00\x50\xc4' > "$TMP/want.bin"
same_dataset vector_82_bytes "$TMP/v_text_document" "$TMP/want"

run empty_input --input /dev/null --input-format jsonl --output-prefix "$TMP/e" "${GPT2[@]}"
[ "$rc" -eq 0 ] && [ "$(stat -c %s "$TMP/e_text_document.idx")" = 42 ] && [ "$(stat -c %s "$TMP/e_text_document.bin")" = 0 ] &&
    pass empty_input || fail empty_input "exit $rc"

# --- bad input: one line, non-zero exit, nothing under the final names --------------------
run malformed_json --input $FIX/broken.jsonl --output-prefix "$TMP/m" "${GPT2[@]}" --workers 2
one_line_error malformed_json 1 "broken.jsonl:2: unterminated string"
no_outputs malformed_json_no_outputs "$TMP/m_text_document"

run skip_bad_lines --input $FIX/broken.jsonl --output-prefix "$TMP/s" --append-eod --skip-bad-lines "${GPT2[@]}"
same_dataset skip_bad_lines "$TMP/s_text_document" $FIX/broken_skip_text_document
grep -q "skipped 4 bad lines" "$TMP/skip_bad_lines.err" && pass skip_bad_lines_count || fail skip_bad_lines_count

printf '{"text": "a", "title": "b"}\n{"text": "c"}\n' > "$TMP/nokey.jsonl"
run missing_key --input "$TMP/nokey.jsonl" --output-prefix "$TMP/k" --json-keys text title "${GPT2[@]}"
one_line_error missing_key 1 "nokey.jsonl:2: missing key 'title'"
no_outputs missing_key_no_outputs "$TMP/k_title_document"

printf '{"text": ["a list"]}\n' > "$TMP/list.jsonl"
run non_string_value --input "$TMP/list.jsonl" --output-prefix "$TMP/n" "${GPT2[@]}"
one_line_error non_string_value 1 "list.jsonl:1: key 'text' holds an array, not a string"

run missing_vocab --input $FIX/small.jsonl --output-prefix "$TMP/x" --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$TMP/nope.json" --merge-file "$DATA/gpt2/vocab.bpe"
one_line_error missing_vocab any "nope.json"
run missing_merges --input $FIX/small.jsonl --output-prefix "$TMP/x" --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$DATA/gpt2/encoder.json" --merge-file "$TMP/nope.bpe"
one_line_error missing_merges any "nope.bpe"
run missing_input --input "$TMP/nope.jsonl" --output-prefix "$TMP/x" "${GPT2[@]}"
one_line_error missing_input 1 "nope.jsonl"
run output_dir_missing --input $FIX/small.jsonl --output-prefix "$TMP/no/such/dir/x" "${GPT2[@]}"
one_line_error output_dir_missing 1 "no/such/dir"
run output_dir_is_file --input $FIX/small.jsonl --output-prefix $FIX/small.jsonl/x "${GPT2[@]}"
one_line_error output_dir_is_file 1 "not a folder"
[ -s "$DATA/bert/vocab-uncased.txt" ] && run bert_has_no_eod --input $FIX/small.jsonl --output-prefix "$TMP/x" --tokenizer-type BertWordPieceLowerCase \
    --vocab-file "${DATA}/bert/vocab-uncased.txt" --append-eod
[ -s "$DATA/bert/vocab-uncased.txt" ] && one_line_error bert_has_no_eod 1 "append-eod"

# --- flags ----------------------------------------------------------------------------
run unknown_flag --input $FIX/small.jsonl --output-prefix "$TMP/x" "${GPT2[@]}" --bogus 3
one_line_error unknown_flag 2 "unknown flag --bogus"
run bad_workers --input $FIX/small.jsonl --output-prefix "$TMP/x" "${GPT2[@]}" --workers zero
one_line_error bad_workers 2 "--workers"
run dataset_impl_lazy --input $FIX/small.jsonl --output-prefix "$TMP/x" "${GPT2[@]}" --dataset-impl lazy
one_line_error dataset_impl_lazy 2 "--dataset-impl lazy"
run bad_tokenizer --input $FIX/small.jsonl --output-prefix "$TMP/x" --tokenizer-type SentencePieceTokenizer --vocab-file x
one_line_error bad_tokenizer 2 "--tokenizer-type SentencePieceTokenizer"
run no_input --output-prefix "$TMP/x" "${GPT2[@]}"
one_line_error no_input 2 "--input is required"
run help --help
[ "$rc" -eq 0 ] && grep -q -- "--output-prefix" "$TMP/help.out" && pass help || fail help
run flag_equals --input=$FIX/small.jsonl --output-prefix="$TMP/eq" --tokenizer-type=GPT2BPETokenizer \
    --vocab-file="$DATA/gpt2/encoder.json" --merge-file="$DATA/gpt2/vocab.bpe" --workers=2 --dataset-impl=mmap
same_dataset flag_equals "$TMP/eq_text_document" $FIX/small_text_document

# --- interrupted runs leave nothing under the final names --------------------------------
# Killed 0.1 s after its temporaries appear: a 44 MB input takes far longer than that.
if [ -s "$SHAKESPEARE" ]; then
    for i in $(seq 40); do cat "$SHAKESPEARE"; done > "$TMP/big.txt"
    for sig in KILL TERM; do
        out="$TMP/big${sig}_text_document"
        "$BIN" --input "$TMP/big.txt" --output-prefix "$TMP/big$sig" --append-eod "${GPT2[@]}" --workers 1 2> /dev/null &
        pid=$!
        for i in $(seq 200); do ls "$out".bin.tmp-* > /dev/null 2>&1 && break; sleep 0.02; done
        sleep 0.1
        kill -s $sig $pid 2> /dev/null
        wait $pid 2> /dev/null
        if [ -e "$out.idx" ] || [ -e "$out.bin" ]; then
            fail "killed_$sig" "final names exist after kill -$sig"
        elif [ $sig = KILL ] && ! ls "$out".bin.tmp-* > /dev/null 2>&1; then
            fail "killed_$sig" "no temporary left: the run was not interrupted midway"
        elif [ $sig = TERM ] && ls "$out".* > /dev/null 2>&1; then
            fail "killed_$sig" "SIGTERM left $(ls "$out".*)"  # the handler removes the temporaries
        else
            pass "killed_$sig"
        fi
    done
fi

summary
