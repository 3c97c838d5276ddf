#!/usr/bin/env python3
"""compare_generate_hf.py: our greedy generation against Hugging Face's on the same weights.

  python3 dev/compare_generate_hf.py GPT2_DIR "The meaning of life is" [--new 40] [--device cuda]

GPT2_DIR is a Hugging Face GPT-2 directory (config.json + model.safetensors, e.g. the hub's
openai-community/gpt2). The prompt becomes token ids with the directory's tokenizer (vocab.json +
merges.txt) or is given as ids with --ids "464 3616 286". HF's GPT2LMHeadModel.generate(
do_sample=False) runs in fp32 on the CPU; then ./train_gpt --load GPT2_DIR --prompt IDS --greedy
--fp32 runs on --device (without --vocab-file it reads and prints token ids; its end-of-document
is the last token of the vocabulary, GPT-2's <|endoftext|>, which HF is also given). Prints both
continuations and exits 0 when they are equal token for token, 1 when not.

Needs torch and transformers; run it from the repository root after `make`.
"""
import argparse
import subprocess
import sys

import torch
from transformers import GPT2LMHeadModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("prompt", nargs="?", default="The meaning of life is")
    parser.add_argument("--ids", help="the prompt as token ids separated by spaces (instead of text)")
    parser.add_argument("--new", type=int, default=40, help="tokens to generate (40)")
    parser.add_argument("--device", default="auto", help="train_gpt's --device (auto)")
    args = parser.parse_args()

    model = GPT2LMHeadModel.from_pretrained(args.model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    if args.ids:
        prompt = [int(x) for x in args.ids.split()]
        decode = None
    else:
        from transformers import GPT2TokenizerFast
        tokenizer = GPT2TokenizerFast.from_pretrained(args.model_dir)
        prompt = tokenizer.encode(args.prompt)
        decode = tokenizer.decode
    eod = model.config.vocab_size - 1
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.new,
                             eos_token_id=eod, pad_token_id=eod)
    hf = out[0, len(prompt):].tolist()

    cmd = ["./train_gpt", "--device", args.device, "--fp32", "--load", args.model_dir, "--prompt", " ".join(map(str, prompt)),
           "--greedy", "--out-seq-length", str(args.new)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit("train_gpt failed:\n" + run.stdout + run.stderr)
    line = [l for l in run.stdout.splitlines() if l.startswith("Megatron-LM: ")][0]
    ours = [int(t) for t in line[len("Megatron-LM: "):].split()]

    print("prompt  ", prompt)
    print("HF      ", hf)
    print("ours    ", ours)
    if decode:
        print("HF text   %r" % decode(hf))
        print("our text  %r" % decode(ours))
    same = ours == hf
    first = next((i for i, (a, b) in enumerate(zip(ours, hf)) if a != b), min(len(ours), len(hf)))
    print("equal: %d of %d tokens" % (len(hf), len(hf)) if same else "differ from token %d on" % first)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
