#!/usr/bin/env python3
"""bench_gpt_pytorch.py: the PyTorch reference for megatron.c's GPT throughput benchmark.

A nanoGPT-style GPT trained on random tokens: pre-LN blocks, learned positions, a 4h MLP
with tanh GELU, embeddings tied to the output layer, biases everywhere, no dropout. bf16
autocast, F.scaled_dot_product_attention(is_causal=True) (flash on a GPU), fused AdamW,
gradient clipping at 1.0 (Megatron's default), torch.compile. Prints one JSON line:

  {"tokens_per_s": ..., "mfu": ..., "tflops": ..., "ms_per_step": ..., "peak_mem_gib": ..., ...}

MFU counts Megatron-2 §5.1's model FLOPs, 72 B s l h^2 (1 + s/6h + V/12hl) per iteration,
i.e. 72 l h^2 + 12 l s h + 6 V h per token (what megatron.c's gpt_flops_per_token counts),
against --peak-tflops (H100/H200 dense bf16: 989). --vocab is the padded vocabulary the
model is built with (GPT-2's 50257 padded to a multiple of 128 is 50304).
If a micro-batch does not fit, prints {"oom": true, ...} and exits 0.
With --ddp (under torchrun) every rank trains its own micro-batch in DistributedDataParallel and
rank 0 prints the tokens/s of all ranks together. With --profile FILE, after the timed steps a few more run under torch.profiler and FILE gets
each CUDA kernel's time and launches per step (JSON {name: [microseconds, launches]}; dev/profile_gpt.sh compares them).

  python dev/bench_gpt_pytorch.py --layers 12 --hidden 768 --heads 12 --seq 1024 --micro-batch 16
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C)
        self.attn_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers, hidden, heads, seq, vocab):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), output layers scaled
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output layer
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def flops_per_token(a):
    l, h, s, V = a.layers, a.hidden, a.seq, a.vocab
    return 72 * l * h * h + 12 * l * s * h + 6 * V * h


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(a, report):
    device = "cuda"
    world = 1
    if a.ddp:
        torch.distributed.init_process_group("nccl")
        world = torch.distributed.get_world_size()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = GPT(a.layers, a.hidden, a.heads, a.seq, a.vocab).to(device)
    report["params"] = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if a.ddp else model
    step_model = wrapped if a.no_compile else torch.compile(wrapped)
    torch.manual_seed(1 + (torch.distributed.get_rank() if a.ddp else 0))  # each rank its own batch
    tokens = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = step_model(x, y)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loss = step()
    report["first_loss"] = loss.item()
    for _ in range(a.warmup - 1):
        step()
    torch.cuda.synchronize()
    report["warmup_s"] = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    tokens_per_s = world * a.micro_batch * a.seq * a.steps / seconds
    report["world_size"] = world
    report.update(tokens_per_s=tokens_per_s, ms_per_step=1e3 * seconds / a.steps,
                  tflops=tokens_per_s * flops_per_token(a) / 1e12,
                  mfu=tokens_per_s * flops_per_token(a) / (world * a.peak_tflops * 1e12),
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, last_loss=loss.item())
    if a.profile:
        write_kernel_profile(a.profile, step, steps=3)


def write_kernel_profile(path, step, steps):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_step = {}  # name -> [microseconds, launches] per step
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us, calls = per_step.get(e.name, [0.0, 0.0])
            per_step[e.name] = [us + e.time_range.elapsed_us() / steps, calls + 1.0 / steps]
    with open(path, "w") as f:
        json.dump(per_step, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304, help="padded vocabulary size")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel over torchrun's ranks")
    p.add_argument("--profile", metavar="FILE", help="write each CUDA kernel's microseconds per step here")
    a = p.parse_args()
    if a.hidden % a.heads:
        p.error("--hidden %d is not divisible by --heads %d" % (a.hidden, a.heads))
    if not torch.cuda.is_available():
        p.error("no CUDA GPU found")
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    report = dict(framework="pytorch", torch=torch.__version__, gpu=torch.cuda.get_device_name(),
                  layers=a.layers, hidden=a.hidden, heads=a.heads, seq=a.seq, vocab=a.vocab,
                  micro_batch=a.micro_batch, steps=a.steps, compile=not a.no_compile, dtype="bf16",
                  flops_per_token=flops_per_token(a), peak_tflops=a.peak_tflops)
    try:
        run(a, report)
    except Exception as e:  # torch.compile may wrap the OOM in its own exception
        if not is_oom(e):
            raise
        report.update(oom=True, error=str(e).splitlines()[0][:200])
    if not a.ddp or torch.distributed.get_rank() == 0:
        print(json.dumps(report), flush=True)
    if a.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
