#!/usr/bin/env python3
"""profile_gpt.py OURS_JSON [TORCH_JSON [TORCH_REPORT]]: GPU milliseconds per training step by kernel
family, megatron.c beside PyTorch, the ten costliest kernels of each side, and every matmul kernel and
every kernel counted as "other" with its launches per step (dev/profile_gpt.sh). The JSONs are {name: [us, launches]} per step
(dev/kernel_trace.c, dev/bench_gpt_pytorch.py --profile); TORCH_REPORT, the benchmark's line, gives
PyTorch's wall time per step, so its idle time is that less its kernels'."""
import json
import re
import sys

FAMILIES = [  # (family, pattern over the kernel name), first match wins
    ("GPU idle (waiting for the host)", r"^\[idle\]$"),
    ("copies to and from the host, memsets", r"^\[mem"),
    ("attention backward", r"attention_backward|flash_bwd|flash.*bwd|_bwd_|bprop|dot_do_o|convert_dq"),
    ("attention forward", r"attention_forward|flash_fwd|flash.*fwd|_fwd_|fprop"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|column_sums_kernel|matmul_dbias|splitK|sm90_"),  # (with our bias-gradient sums)
    ("layernorm", r"layernorm|layer_norm|native_layer_norm|column_sum_kernel"),
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


def kernels(path):
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
    mine, mine_calls = kernels(sys.argv[1])
    torch, torch_calls = kernels(sys.argv[2]) if len(sys.argv) > 2 else ({}, {})
    if len(sys.argv) > 3 and torch:
        lines = [l for l in open(sys.argv[3]) if l.startswith("{")]
        wall_us = 1e3 * json.loads(lines[-1])["ms_per_step"] if lines else 0
        torch["[idle]"], torch_calls["[idle]"] = max(0.0, wall_us - sum(torch.values())), float("nan")
    a, b = by_family(mine), by_family(torch)
    print("%-46s %10s %10s %7s" % ("GPU ms per step", "ours", "torch", "ratio"))
    for fam in [f for f, _ in FAMILIES] + ["other"]:
        x, y = a.get(fam, 0) / 1e3, b.get(fam, 0) / 1e3
        print("%-46s %10.3f %10.3f %7s" % (fam, x, y, "%.2f" % (x / y) if y > 0 else "-"))
    x, y = sum(a.values()) / 1e3, sum(b.values()) / 1e3
    print("%-46s %10.3f %10.3f %7s" % ("step (kernels and idle)", x, y, "%.2f" % (x / y) if y > 0 else "-"))
    for side, table in (("ours", mine), ("torch", torch)):
        print("-- %s: costliest kernels (us per step)" % side)
        for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:10]:
            print("%10.1f  %s" % (us, name[:110]))
    for fam in ("matmul", "other"):
        for side, table, calls in (("ours", mine, mine_calls), ("torch", torch, torch_calls)):
            print("-- %s: %s kernels (us per step, launches per step, us per launch)" % (side, fam))
            for name, us in sorted(table.items(), key=lambda kv: -kv[1]):
                if family(name) == fam:
                    print("%10.1f %6.1f %8.1f  %s" % (us, calls[name], us / calls[name], name[:100]))


if __name__ == "__main__":
    main()
