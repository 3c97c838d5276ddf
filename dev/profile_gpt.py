#!/usr/bin/env python3
"""profile_gpt.py OURS_NCU_CSV ITERS TORCH_JSON: GPU milliseconds per training step by kernel
family, megatron.c beside PyTorch, the ten costliest kernels of each side and every matmul kernel with
its launches per step (dev/profile_gpt.sh)."""
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
    per_kernel, calls = {}, {}
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's CSV rows; the program's own output is not quoted
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            name = row["Kernel Name"]
            per_kernel[name] = per_kernel.get(name, 0.0) + float(row["Metric Value"].replace(",", "")) / 1e3 / iters  # ns -> us per step
            calls[name] = calls.get(name, 0.0) + 1.0 / iters
    return per_kernel, calls


def torch_kernels(path):
    """{name: [us, launches]} per step (older files: {name: us})."""
    table = json.load(open(path))
    us = {k: v[0] if isinstance(v, list) else v for k, v in table.items()}
    calls = {k: v[1] if isinstance(v, list) else float("nan") for k, v in table.items()}
    return us, calls


def by_family(per_kernel):
    fams = {}
    for name, us in per_kernel.items():
        fams[family(name)] = fams.get(family(name), 0.0) + us
    return fams


def main():
    mine, mine_calls = ours(sys.argv[1], int(sys.argv[2]))
    torch, torch_calls = torch_kernels(sys.argv[3]) if len(sys.argv) > 3 else ({}, {})
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
    for side, table, calls in (("ours", mine, mine_calls), ("torch", torch, torch_calls)):
        print("-- %s: matmul kernels (us per step, launches per step, us per launch)" % side)
        for name, us in sorted(table.items(), key=lambda kv: -kv[1]):
            if family(name) == "matmul":
                print("%10.1f %6.1f %8.1f  %s" % (us, calls[name], us / calls[name], name[:100]))


if __name__ == "__main__":
    main()
