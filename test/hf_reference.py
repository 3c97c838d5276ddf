#!/usr/bin/env python3
"""hf_reference.py: the outside reference for the GPT model test, from Hugging Face's GPT-2.

Builds a tiny GPT2LMHeadModel (fp32, CPU, eager attention), runs one forward/backward on a
fixed batch and then 10 AdamW steps on the same batch, and writes everything the C model
must reproduce into ONE safetensors file (default test/fixtures/gpt2_tiny_hf.safetensors):

  <param>               every parameter under its name in named_parameters(), fp32, HF shapes
                        ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", ...).
                        lm_head.weight is tied to transformer.wte.weight and is NOT stored.
                        Conv1D weights are [in, out]: y = x @ W + b.
  tokens                I32 [B, T+1]; x = tokens[:, :-1], y = tokens[:, 1:] (batch-major)
  logits                F32 [B, T, V] of model(x)
  loss                  F32 [1], mean cross-entropy over the B*T positions
  grad.<param>          F32, d loss / d param (wte's includes the tied lm_head's share)
  adamw_losses          F32 [10], the loss before each AdamW step
  adamw_grad_norms      F32 [10], the global gradient L2 norm before clipping, each step
  adamw_final.<param>   F32, every parameter after the 10 steps

The AdamW run restarts from the same initial weights: torch.optim.AdamW(lr=1e-3,
betas=(0.9, 0.95), eps=1e-8), weight decay 0.1 on 2-D tensors (wte, wpe, Conv1D weights)
and 0 on biases and LayerNorm, clip_grad_norm_(1.0) before each step, no LR schedule.
Metadata holds the config and these settings as strings.

Needs torch, transformers and safetensors; runs in seconds on a CPU.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

CONFIG = dict(vocab_size=200, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", layer_norm_epsilon=1e-5)
B, T = 3, 16
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip_grad_norm=1.0, steps=10)


def build_model():
    torch.manual_seed(0)
    config = GPT2Config(**CONFIG, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "eager"  # plain softmax(QK^T/sqrt(d))V, nothing fused
    model = GPT2LMHeadModel(config).float().eval()  # eval: no dropout (all p are 0 anyway)
    # HF initialises LayerNorm to (1, 0) and biases to 0; move them off those values so a
    # bug that drops a bias or a LayerNorm gain cannot pass.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    assert model.lm_head.weight is model.transformer.wte.weight, "expected tied embeddings"
    return model


def loss_of(model, tokens):
    logits = model(tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    return logits, loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "fixtures", "gpt2_tiny_hf.safetensors"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)

    model = build_model()
    params = dict(model.named_parameters())  # tied lm_head.weight appears once, as wte
    initial = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, CONFIG["vocab_size"], (B, T + 1), generator=g)

    out = {n: p.contiguous() for n, p in initial.items()}
    logits, loss = loss_of(model, tokens)
    loss.backward()
    out["tokens"] = tokens.to(torch.int32)
    out["logits"] = logits.detach().contiguous()
    out["loss"] = loss.detach().reshape(1)
    for n, p in params.items():
        out["grad." + n] = p.grad.detach().clone()

    # AdamW from the same initial weights
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(initial[n])
    decay = [p for p in params.values() if p.dim() == 2]
    no_decay = [p for p in params.values() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"], foreach=False)
    losses, norms = [], []
    for _ in range(ADAMW["steps"]):
        opt.zero_grad(set_to_none=True)
        _, loss = loss_of(model, tokens)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["clip_grad_norm"]).item())
        opt.step()
        losses.append(loss.item())
    out["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    out["adamw_grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    for n, p in params.items():
        out["adamw_final." + n] = p.detach().clone()

    metadata = {
        "config": json.dumps(CONFIG),
        "batch": json.dumps({"B": B, "T": T, "token_seed": 1234, "layout": "tokens[b, t], x = tokens[:, :-1], y = tokens[:, 1:]"}),
        "adamw": json.dumps(ADAMW),
        "adamw_param_groups": "weight_decay on 2-D tensors (wte, wpe, Conv1D weights); 0 on biases and LayerNorm",
        "clip": "torch.nn.utils.clip_grad_norm_: g *= min(1, max_norm / (total_norm + 1e-6)) over all parameters",
        "tied": "lm_head.weight = transformer.wte.weight (not stored)",
        "conv1d_layout": "Conv1D weight is [in, out]: y = x @ W + b",
        "init": "torch.manual_seed(0) HF init; then LN weights += 0.1*randn, biases += 0.02*randn (generator seed 1)",
        "versions": "torch %s, transformers %s" % (torch.__version__, transformers.__version__),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(out, args.out, metadata=metadata)

    n_params = sum(p.numel() for p in params.values())
    print("GPT-2 tiny: %d parameters in %d tensors (lm_head tied to wte, not stored)" % (n_params, len(params)))
    print("loss %.6f (ln V = %.6f)" % (out["loss"].item(), torch.log(torch.tensor(float(CONFIG["vocab_size"]))).item()))
    print("adamw losses " + " ".join("%.4f" % l for l in losses))
    print("adamw grad norms " + " ".join("%.3f" % x for x in norms))
    print("wrote %s: %d tensors, %.2f MB (torch %s, transformers %s)" % (
        args.out, len(out), os.path.getsize(args.out) / 1e6, torch.__version__, transformers.__version__))


if __name__ == "__main__":
    main()
