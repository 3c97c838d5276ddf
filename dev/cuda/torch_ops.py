#!/usr/bin/env python3
"""torch_ops.py: PyTorch's equivalents of the dev/cuda kernels, at the same shapes, timed the same
way in the same device run: CUDA events, the L2 cache flushed before each launch, the median of 21
after 3 warm-ups (dev/cuda/common.h). One line per op:

    torch <kernel> <shape> <time_us> <what>

run_all.sh sets them beside ours (PyTorch's GB/s there: our op's byte count over PyTorch's time).
Usage (on a GPU machine): python3 dev/cuda/torch_ops.py
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # as dev/cuda/common.h
    "gpt2": dict(B=16, T=1024, C=768, NH=12, V=50257, Vp=50304, L=12),
    "1.7b": dict(B=4, T=2048, C=2304, NH=24, V=51200, Vp=51200, L=24),
}
WARMUP, REPS = 3, 21
DEV, BF16 = "cuda", torch.bfloat16


def time_us(fn):
    flush = time_us.flush  # written before each launch: nothing of the last one stays in L2
    for _ in range(WARMUP):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(REPS):
        flush.fill_(i & 0xFF)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return sorted(times)[REPS // 2]


def emit(kernel, shape, fn, what):
    print(f"torch {kernel} {shape} {time_us(fn):.2f} {what}", flush=True)


def params(s):  # GPT's parameter count, as shape_params() in common.h
    C = s["C"]
    return s["L"] * (12 * C * C + 13 * C) + (s["Vp"] + s["T"]) * C + 2 * C


def randn(*shape, dtype=BF16, scale=1.0):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).mul_(scale).to(dtype)


def layernorm(name, s):
    N, C = s["B"] * s["T"], s["C"]
    x, w, b, dy = randn(N, C), randn(C, scale=0.1) + 1, randn(C, scale=0.1), randn(N, C)
    with torch.no_grad():
        emit("layernorm_fwd", name, lambda: F.layer_norm(x, (C,), w, b, 1e-5), "F.layer_norm")
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], w, b, 1e-5)
        emit("layernorm_bwd", name, lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [C], mean, rstd, w, b, [True, True, True]),
             "aten.native_layer_norm_backward (dx =, dweight/dbias bf16)")


def attention(name, s):
    B, T, NH, HS = s["B"], s["T"], s["NH"], s["C"] // s["NH"]
    q, k, v = (randn(B, NH, T, HS).requires_grad_() for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            emit("attention_fwd", name, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), "SDPA flash, causal")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dout = torch.randn_like(out)
        emit("attention_bwd", name, lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), "SDPA flash backward")


def crossentropy(name, s):
    N, V, Vp = s["B"] * s["T"], s["V"], s["Vp"]
    logits = randn(N, Vp, scale=2).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEV)
    emit("crossentropy", name, lambda: torch.autograd.grad(F.cross_entropy(logits, targets), logits),
         "F.cross_entropy forward + backward, bf16 logits")


def gelu(name, s):
    x, dy = randn(s["B"] * s["T"], 4 * s["C"], scale=2), randn(s["B"] * s["T"], 4 * s["C"])
    with torch.no_grad():
        emit("gelu_fwd", name, lambda: F.gelu(x, approximate="tanh"), "F.gelu(approximate='tanh')")
        emit("gelu_bwd", name, lambda: torch.ops.aten.gelu_backward(dy, x, approximate="tanh"), "aten.gelu_backward")


def residual(name, s):
    N, C = s["B"] * s["T"], s["C"]
    for p, suffix in ((0.0, ""), (0.1, "_p.1")):
        res, x, bias = randn(N, C), randn(N, C).requires_grad_(), randn(C).requires_grad_()
        with torch.no_grad():
            emit("residual_fwd" + suffix, name, lambda: res + F.dropout(x + bias, p, True), "eager res + dropout(x + bias): 3 kernels")
        y = res + F.dropout(x + bias, p, True)
        dy = torch.randn_like(y)
        emit("residual_bwd" + suffix, name, lambda: torch.autograd.grad(y, (x, bias), dy, retain_graph=True),
             "eager autograd: dropout backward, bias sum")


def adamw(name, s):
    n = params(s)
    p = torch.nn.Parameter(randn(n, dtype=torch.float32, scale=0.05))
    p.grad = randn(n, dtype=torch.float32, scale=0.01)
    opt = torch.optim.AdamW([p], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    emit("adamw", name, opt.step, "AdamW(fused=True), fp32 params (28 B a parameter, ours 30)")


def embedding(name, s):
    B, T, C, V, Vp = s["B"], s["T"], s["C"], s["V"], s["Vp"]
    u = torch.rand(T, B, device=DEV, dtype=torch.float64)
    tokens = (torch.exp(u * math.log(V + 1)).floor().long() - 1).clamp_(0, V - 1)  # log-uniform, as embedding.cu
    wte, wpe, dout = randn(Vp, C, scale=0.02), randn(T, C, scale=0.01), randn(T, B, C)
    with torch.no_grad():
        emit("embedding_fwd", name, lambda: F.embedding(tokens, wte) + wpe[:, None, :], "F.embedding + wpe: 2 kernels")
        emit("embedding_bwd", name, lambda: (torch.ops.aten.embedding_dense_backward(dout, tokens, Vp, -1, False), dout.sum(1)),
             "aten.embedding_dense_backward (dense bf16 dwte) + the wpe sum")


def gradnorm(name, s):
    p = torch.nn.Parameter(torch.empty(params(s), device=DEV))
    p.grad = randn(params(s), dtype=torch.float32, scale=0.01)
    with torch.no_grad():
        emit("gradnorm", name, lambda: torch.linalg.vector_norm(p.grad), "linalg.vector_norm, stays on the GPU")
        emit("gradnorm_clip", name, lambda: torch.nn.utils.clip_grad_norm_([p], 1.0, foreach=True), "clip_grad_norm_ (norm and scaling)")


if __name__ == "__main__":
    time_us.flush = torch.empty(4 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device=DEV)
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    for name, s in SHAPES.items():
        for op in (layernorm, attention, crossentropy, gelu, residual, adamw, embedding, gradnorm):
            op(name, s)
            torch.cuda.empty_cache()
