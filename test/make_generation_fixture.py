#!/usr/bin/env python3
"""make_generation_fixture.py: Hugging Face's greedy generate() on the tiny GPT-2 of
test/fixtures/gpt2_tiny_hf.safetensors (made by hf_reference.py), the reference for
test/test_generation.cu.

The fixture's transformer.* tensors go into a GPT2LMHeadModel with hf_reference.py's CONFIG
(fp32, CPU, eager attention), and each prompt of token ids below runs through
generate(do_sample=False) with its own max_new_tokens and eos_token_id. Written to
test/fixtures/gpt2_tiny_generate.safetensors:

  prompt.K   I32 [n]          the prompt's token ids
  tokens.K   I32 [length]     prompt + HF's greedy continuation
  logits.K   F32 [steps, V]   HF's raw logits at each generated position (output_logits)
  max_new    I32 [cases]      max_new_tokens of each case
  eod        I32 [cases]      its eos_token_id, -1 for none

The random tiny model repeats tokens under greedy decoding, so the prompts were picked (from
random ones) for a continuation that changes token, one that fills all 32 positions, and one
whose continuation contains a token used as the end-of-document id (the vocabulary's own 199
never comes up greedily here), where generate() stops after producing it.

Needs torch, transformers and safetensors; runs in seconds on a CPU.
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from hf_reference import CONFIG

CASES = [
    dict(prompt=[147, 167], max_new=20, eod=-1),                       # 167 x 15, then 116
    dict(prompt=[145, 173, 184, 36, 59], max_new=27, eod=-1),          # to the 32nd position
    dict(prompt=[66, 158, 54, 92, 53, 12, 123], max_new=20, eod=143),  # stops at the 5th new token
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--weights", default=os.path.join(here, "fixtures", "gpt2_tiny_hf.safetensors"))
    parser.add_argument("--out", default=os.path.join(here, "fixtures", "gpt2_tiny_generate.safetensors"))
    args = parser.parse_args()

    config = GPT2Config(**CONFIG, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).float().eval()
    weights = {k: v for k, v in load_file(args.weights).items() if k.startswith("transformer.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied to wte
    assert model.lm_head.weight is model.transformer.wte.weight

    out = {"max_new": torch.tensor([c["max_new"] for c in CASES], dtype=torch.int32),
           "eod": torch.tensor([c["eod"] for c in CASES], dtype=torch.int32)}
    for k, case in enumerate(CASES):
        prompt = torch.tensor([case["prompt"]])
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=case["max_new"], eos_token_id=case["eod"] if case["eod"] >= 0 else None,
                                 pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        tokens = gen.sequences[0]
        assert len(tokens) <= CONFIG["n_positions"]
        out["prompt.%d" % k] = prompt[0].to(torch.int32)
        out["tokens.%d" % k] = tokens.to(torch.int32).contiguous()
        out["logits.%d" % k] = torch.cat(gen.logits).float().contiguous()
        print("case %d: %s -> %s" % (k, case["prompt"], tokens[len(case["prompt"]):].tolist()))
    metadata = {"cases": json.dumps(CASES), "config": json.dumps(CONFIG),
                "versions": "torch %s, transformers %s" % (torch.__version__, transformers.__version__)}
    save_file(out, args.out, metadata=metadata)
    print("wrote %s (%d bytes)" % (args.out, os.path.getsize(args.out)))


if __name__ == "__main__":
    main()
