"""
Makes what test/test_evaluate.sh evaluates, with the Python standard library only (CI has no torch):

    python3 test/eval_tiny_model.py OUT_DIR [DATA_DIR, default $MEGATRON_DATA or ../shared/data]

  OUT_DIR/model/config.json, model.safetensors   a random Hugging Face GPT-2: 2 layers, hidden 64,
                                                 2 heads, 128 positions, GPT-2's 50,257 tokens
  OUT_DIR/wiki.test.tokens                       the first WIKI_LINES lines of WikiText-2's test set
  OUT_DIR/lambada_test.jsonl                     the first LAMBADA_LINES LAMBADA texts, REPEAT_LINES of
                                                 them again with their last word repeated, EXTRA_TEXTS

The weights are uniform draws from random.Random(SEED).randbytes, so every Python (3.9+) writes
the same bytes; test/make_eval_fixtures.py ran torch on exactly these files and recorded the
figures, and the FNV-1a 64 of model.safetensors, which the test checks first. The token
embeddings are large next to everything the layers add, so the model mostly predicts the token
it reads: repeated words make some LAMBADA examples right.
"""
import array
import hashlib
import json
import os
import random
import struct
import sys

SEED = 20240611
L, C, NH, F, V, T = 2, 64, 2, 256, 50257, 128
WIKI_LINES = 16
LAMBADA_LINES = 12
REPEAT_LINES = 12
# last words of repeated BPE tokens (" a" + 7 or 8 x "aaaa"): right for the last token only,
# wrong for --strict-lambada; a no-break space and a newline around the last word
EXTRA_TEXTS = ["He laughed and typed " + "a" * 29, "Then she typed " + "a" * 33, "She said hello\u00a0hello \n"]


def uniform(rng, n, std, center=0.0):
    """n float32 values, uniform with this standard deviation around center."""
    words = array.array("I", rng.randbytes(4 * n))
    if sys.byteorder != "little":
        words.byteswap()
    half_width = std * 3 ** 0.5
    return array.array("f", [center + (w / 2 ** 31 - 1.0) * half_width for w in words])


def tensors():
    """(name, shape, float32 values) in GPT2LMHeadModel's names and Conv1D [in, out] layout."""
    rng = random.Random(SEED)
    out = [("transformer.wte.weight", [V, C], uniform(rng, V * C, 0.1)),
           ("transformer.wpe.weight", [T, C], uniform(rng, T * C, 0.01))]
    for l in range(L):
        p = f"transformer.h.{l}."
        out += [(p + "ln_1.weight", [C], uniform(rng, C, 0.05, 1.0)), (p + "ln_1.bias", [C], uniform(rng, C, 0.02)),
                (p + "attn.c_attn.weight", [C, 3 * C], uniform(rng, 3 * C * C, 0.02)),
                (p + "attn.c_attn.bias", [3 * C], uniform(rng, 3 * C, 0.02)),
                (p + "attn.c_proj.weight", [C, C], uniform(rng, C * C, 0.01)), (p + "attn.c_proj.bias", [C], uniform(rng, C, 0.01)),
                (p + "ln_2.weight", [C], uniform(rng, C, 0.05, 1.0)), (p + "ln_2.bias", [C], uniform(rng, C, 0.02)),
                (p + "mlp.c_fc.weight", [C, F], uniform(rng, C * F, 0.02)), (p + "mlp.c_fc.bias", [F], uniform(rng, F, 0.02)),
                (p + "mlp.c_proj.weight", [F, C], uniform(rng, F * C, 0.01)), (p + "mlp.c_proj.bias", [C], uniform(rng, C, 0.01))]
    out += [("transformer.ln_f.weight", [C], uniform(rng, C, 0.05, 1.0)), ("transformer.ln_f.bias", [C], uniform(rng, C, 0.02))]
    return out


def write_model(folder):
    os.makedirs(folder, exist_ok=True)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape, values in tensors():
        if sys.byteorder != "little":
            values.byteswap()
        blob = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": T, "n_embd": C,
              "n_layer": L, "n_head": NH, "n_inner": F, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05,
              "tie_word_embeddings": True, "bos_token_id": V - 1, "eos_token_id": V - 1, "torch_dtype": "float32"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_data(out, data):
    with open(f"{data}/wikitext/wikitext-2.test.tokens", "rb") as f:
        lines = f.read().split(b"\n")
    with open(f"{out}/wiki.test.tokens", "wb") as f:
        f.write(b"\n".join(lines[:WIKI_LINES]) + b"\n")
    with open(f"{data}/lambada/lambada_test.jsonl", "rb") as f:
        texts = [json.loads(line)["text"] for line in f.read().split(b"\n")[:LAMBADA_LINES]]
    records = [{"text": t} for t in texts]
    records += [{"id": i, "text": t + " " + t.split()[-1]} for i, t in enumerate(texts[:REPEAT_LINES])]
    records += [{"text": t} for t in EXTRA_TEXTS]
    with open(f"{out}/lambada_test.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main():
    out = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    data = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("MEGATRON_DATA", os.path.join(here, "..", "..", "shared", "data"))
    print(f"model.safetensors sha256 {write_model(os.path.join(out, 'model'))}")
    write_data(out, data)


if __name__ == "__main__":
    main()
