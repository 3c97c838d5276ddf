#!/usr/bin/env bash
# Runs every test program (build/test_X for each test/test_X.cu, made by `make test`) and test script
# (test/test_*.sh), and adds up their "N passed, N failed" lines. A program that
# dies before its summary counts as one failure. Ends with the total line.
cd "$(dirname "$0")/.."
export MEGATRON_DATA="${MEGATRON_DATA:-$(cd .. && pwd)/shared/data}"
passed=0
failed=0
programs=()
for src in test/test_*.cu; do programs+=("build/$(basename "$src" .cu)"); done
for t in "${programs[@]}" test/test_*.sh; do
    if [ ! -x "$t" ]; then echo "FAIL $t: not built"; failed=$((failed + 1)); continue; fi
    echo "== $t"
    start=$(date +%s)
    out=$("./$t" 2>&1)
    status=$?
    echo "$out"
    summary=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$summary" ]; then
        echo "FAIL $t: exited with status $status before its summary"
        failed=$((failed + 1))
        continue
    fi
    p=${summary%% passed*}
    f=${summary#*, }
    f=${f%% failed}
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $t: exit status $status"
        failed=$((failed + 1))
    fi
    echo "-- $t: $summary ($(( $(date +%s) - start )) s)"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
