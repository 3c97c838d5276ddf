#!/usr/bin/env python3
"""check_hf_export.py: Hugging Face transformers loads what `train_gpt --export-hf` wrote.

  mkdir -p build/hf && cp test/fixtures/gpt2_tiny_hf.safetensors build/hf/model.safetensors
  (write build/hf/config.json: test/test_checkpoint.sh's hf_dir shows one)
  ./train_gpt --load build/hf --export-hf build/hf_export
  python3 test/check_hf_export.py build/hf_export [test/fixtures/gpt2_tiny_hf.safetensors]

GPT2LMHeadModel.from_pretrained must load the directory with no missing or unexpected
weights, its state_dict must equal the file's tensors, and the LM head must be tied to the
embedding. With a fixture (made by test/hf_reference.py) whose weights the export holds, the
logits and loss on the fixture's batch must equal the ones stored there. Needs torch,
transformers and safetensors; CI does not run it.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel


def main():
    export = sys.argv[1]
    fixture = sys.argv[2] if len(sys.argv) > 2 else None
    model, info = GPT2LMHeadModel.from_pretrained(export, output_loading_info=True)
    model.eval()
    missing = [k for k in info["missing_keys"] if not k.endswith("attn.bias") and k != "lm_head.weight"]
    assert not missing and not info["unexpected_keys"], info
    print(f"loaded {export}: {sum(p.numel() for p in model.parameters())} parameters, config {model.config.n_layer} layers, "
          f"hidden {model.config.n_embd}, {model.config.n_head} heads, vocab {model.config.vocab_size}")
    state = model.state_dict()
    tensors = load_file(f"{export}/model.safetensors")
    for name, value in tensors.items():
        assert torch.equal(state[name], value), name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "LM head not tied"
    print(f"ok: the state_dict equals the file's {len(tensors)} tensors, LM head tied to wte")
    if not fixture:
        return
    ref = load_file(fixture)
    same = all(torch.equal(ref[name], value) for name, value in tensors.items())
    tokens = ref["tokens"].long()
    with torch.no_grad():
        out = model(tokens[:, :-1])
    logits_err = (out.logits - ref["logits"]).abs().max().item()
    print(f"logits on the fixture's batch: max |ours - reference| = {logits_err:.3g} (weights {'equal' if same else 'differ from'} the fixture's)")
    if same:
        assert logits_err < 1e-4, logits_err
        print("ok: logits equal the fixture's")


if __name__ == "__main__":
    main()
