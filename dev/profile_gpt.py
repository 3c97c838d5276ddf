#!/usr/bin/env python3
"""profile_gpt.py OURS_NCU_CSV ITERS TORCH_JSON: GPU milliseconds per training step by kernel
family, megatron.c beside PyTorch, and the ten costliest kernels of each side (dev/profile_gpt.sh)."""
import csv
import json
import re
import sys

FAMILIES = [  # (family, pattern over the kernel name), first match wins
    ("attention backward", r"attention_backward|flash_bwd|flash.*bwd|_bwd_|bprop"),
    ("attention forward", r"attention_forward|flash_fwd|flash.*fwd|_fwd_|fprop"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|matmul_dbias|splitK|sm90_"),
    ("layernorm", r"layernorm|layer_norm|native_layer_norm"),
    ("cross-entropy", r"crossentropy|cross_entropy|log_softmax|nll_loss|vocab_ce"),
    ("embedding", r"embedding|bitonic|sort|index_put|indexing_backward|gather"),
    ("optimizer", r"adam|multi_tensor|grad_norm|norm_kernel|foreach"),
    ("elementwise (gelu, dropout, residual, casts)", r"gelu|dropout|residual|add_floats|triton|elementwise|vectorized|copy|fill|cast"),
]


def family(name):
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def ours(path, iters):
    per_kernel = {}
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's CSV rows; the program's own output is not quoted
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            name = row["Kernel Name"]
            per_kernel[name] = per_kernel.get(name, 0.0) + float(row["Metric Value"].replace(",", "")) / 1e3 / iters  # ns -> us per step
    return per_kernel


def by_family(per_kernel):
    fams = {}
    for name, us in per_kernel.items():
        fams[family(name)] = fams.get(family(name), 0.0) + us
    return fams


def main():
    mine = ours(sys.argv[1], int(sys.argv[2]))
    torch = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else {}
    a, b = by_family(mine), by_family(torch)
    print("%-46s %10s %10s %7s" % ("GPU ms per step", "ours", "torch", "ratio"))
    for fam in [f for f, _ in FAMILIES] + ["other"]:
        x, y = a.get(fam, 0) / 1e3, b.get(fam, 0) / 1e3
        print("%-46s %10.3f %10.3f %7s" % (fam, x, y, "%.2f" % (x / y) if y > 0 else "-"))
    x, y = sum(a.values()) / 1e3, sum(b.values()) / 1e3
    print("%-46s %10.3f %10.3f %7s" % ("total kernel time", x, y, "%.2f" % (x / y) if y > 0 else "-"))
    for side, table in (("ours", mine), ("torch", torch)):
        print("-- %s: costliest kernels (us per step)" % side)
        for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:10]:
            print("%10.1f  %s" % (us, name[:110]))


if __name__ == "__main__":
    main()
