# What the shell tests share (sourced from the repo root): ok/fail count the checks, and
#   expect NAME STATUS WORDS CMD...
# runs CMD and requires exit status STATUS and one line on stderr containing WORDS
# (scratch files in $SCRATCH, which the test sets first).
passed=0; failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
expect() {
    local name=$1 want=$2 words=$3; shift 3
    "$@" > "$SCRATCH/out" 2> "$SCRATCH/err"
    local status=$?
    if [ "$status" -ne "$want" ]; then fail "$name" "exit status $status, expected $want ($(head -c 300 "$SCRATCH/err"))"
    elif [ "$(wc -l < "$SCRATCH/err")" -ne 1 ] || ! grep -q -- "$words" "$SCRATCH/err"; then fail "$name" "stderr: $(head -c 300 "$SCRATCH/err")"
    else ok "$name: $(cat "$SCRATCH/err")"; fi
}
