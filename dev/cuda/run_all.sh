#!/usr/bin/env bash
# dev/cuda/run_all.sh: build the kernel ladders, run each (checks against megatron.h's CPU
# references, then timings against the ceilings measured in the same run), time PyTorch's
# equivalents in the same run (torch_ops.py), and print one table:
#   kernel, shape, version, time, GB/s (TFLOP/s for attention), % of the ceiling, check,
#   PyTorch's time and rate (our op's bytes or FLOPs over PyTorch's time), ratio = PyTorch time / ours.
# On a GPU machine, from anywhere: dev/cuda/run_all.sh   (GPU_ARCH=sm_90a by default; logs in $OUT or out/dev_cuda)
set -uo pipefail
cd "$(dirname "$0")"
LOGS=${OUT:-../../out/dev_cuda}
mkdir -p "$LOGS"
PROGRAMS="layernorm attention crossentropy residual adamw embedding gradnorm"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
start=$(date +%s)
make -j"$(nproc)" GPU_ARCH="${GPU_ARCH:-sm_90a}" > "$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
status=0
for p in $PROGRAMS; do
    ./"$p" > "$LOGS/$p.txt" 2>&1 || { rc=$?; status=1; echo "$p: exit $rc, the end of $LOGS/$p.txt:"; tail -n 5 "$LOGS/$p.txt"; }
done
python3 torch_ops.py > "$LOGS/torch_ops.txt" 2>&1 || { status=1; echo "torch_ops.py failed:"; tail -n 5 "$LOGS/torch_ops.txt"; }

python3 - "$LOGS" $PROGRAMS <<'PY'
import os, re, sys
logs, programs = sys.argv[1], sys.argv[2:]
ours, torch, ceilings = [], {}, []
for p in programs:
    path = os.path.join(logs, p + ".txt")
    if not os.path.exists(path):
        continue
    for line in open(path):
        f = line.split()
        if len(f) >= 3 and f[0] == "ceiling":
            ceilings.append("%s %s: %s %s" % (p, f[1], f[2], f[3]))
        elif len(f) >= 11 and re.fullmatch(r"v\d+", f[2]) and f[9] in ("ok", "FAIL"):
            ours.append(f)
torch_log = os.path.join(logs, "torch_ops.txt")
for line in open(torch_log) if os.path.exists(torch_log) else []:
    f = line.split()
    if len(f) >= 4 and f[0] == "torch":
        torch[(f[1], f[2])] = (float(f[3]), " ".join(f[4:]))
print("\nceilings measured in this run: " + "; ".join(ceilings))
print("%-16s %-6s %-4s %10s %9s %-7s %7s %-5s %10s %9s %6s" % ("kernel", "shape", "ver", "time_us", "rate", "unit", "%ceil", "check",
                                                             "torch_us", "torch", "ratio"))
for f in ours:
    kernel, shape, ver, us, rate, unit, pct, check = f[0], f[1], f[2], float(f[3]), float(f[4]), f[5], f[6], f[9]
    t = torch.get((kernel, shape)) if ver != "v0" else None  # v0: the same-size copy, no PyTorch op
    tcols = ("%10.2f %9.1f %6.2f" % (t[0], rate * us / t[0], t[0] / us)) if t else "%10s %9s %6s" % ("-", "-", "-")
    print("%-16s %-6s %-4s %10.2f %9.1f %-7s %7s %-5s %s" % (kernel, shape, ver, us, rate, unit, pct, check, tcols))
known = {(f[0], f[1]) for f in ours}
extra = ["%s %s %.2f us (%s)" % (k, s, v[0], v[1]) for (k, s), v in torch.items() if (k, s) not in known]
if extra:
    print("PyTorch only: " + "; ".join(extra))
print("ratio > 1: ours is faster. PyTorch's ops per kernel: %s/torch_ops.txt" % logs)
PY
echo "run_all: $(( $(date +%s) - start )) s"
exit $status
