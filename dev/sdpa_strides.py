#!/usr/bin/env python3
"""sdpa_strides.py: does PyTorch's cuDNN attention (SDPA) run slower over megatron.c's [s, b, 3h] qkv
layout (per head [q k v], as train_gpt stores it) than over the usual [b, s, 3h]? Times the forward
and the backward (with autograd's copies) at GPT-2's B32 and the 1.7B model's B8, causal, bf16, median
of 20 runs. On the GPU machine: python3 dev/sdpa_strides.py"""
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
torch.manual_seed(0)
def timeit(fn, n=20):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[n // 2]
def run(B, T, NH, HS, layout):
    shape = (T, B, NH, 3, HS) if layout == "sbh" else (B, T, NH, 3, HS)
    qkv = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    perm = (1, 2, 0, 3, 4) if layout == "sbh" else (0, 2, 1, 3, 4)
    gshape = (T, B, NH, HS) if layout == "sbh" else (B, T, NH, HS)
    g = torch.randn(*gshape, device="cuda", dtype=torch.bfloat16).permute(*perm[:2], perm[2], 3)
    def fwd():
        x = qkv.permute(*perm)
        return F.scaled_dot_product_attention(x[..., 0, :], x[..., 1, :], x[..., 2, :], is_causal=True)
    def fwdbwd():
        out = fwd(); out.backward(g)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        f = timeit(lambda: fwd()); fb = timeit(fwdbwd)
    print("B%d T%d NH%d HS%d %s: fwd %.3f ms, bwd %.3f ms" % (B, T, NH, HS, layout, f, fb - f), flush=True)
for shp in ((32, 1024, 12, 64), (8, 2048, 24, 96)):
    for layout in ("bsh", "sbh"):
        run(*shp, layout)
