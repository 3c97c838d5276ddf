"""
Writes test/fixtures/eval.txt, what test/test_evaluate.cu and test/test_evaluate.sh check the
zero-shot evaluation (--task WIKITEXT103 | LAMBADA) against:

    pip install tiktoken torch transformers
    python test/make_eval_fixtures.py [data dir, default $MEGATRON_DATA or ../shared/data]

The reference is a Python port of Megatron-LM's tasks/zeroshot_gpt (datasets.py, detokenizer.py,
evaluate.py): the WikiText detokenizer, the word count, _LMDataset's windows, _LambadaDataset's
examples and the printed figures, with tiktoken's `gpt2` as the tokenizer (the same ids as
Megatron's GPT2Tokenizer). The model figures come from transformers' GPT2LMHeadModel in fp32 on the
tiny random model of test/eval_tiny_model.py, run over Megatron's samples as Megatron builds them
(padded to --seq-length + 1 with EOD).

Records (one per line, fields space-separated; text as hex of its UTF-8 bytes; FNV-1a 64 in hex):
  detok <input> <output>                       wikitext_detokenizer on hand-picked and real lines
  words <input> <count>                        len(text.strip().split(" "))
  wikitext <file> <bytes> <words> <detok bytes> <detok fnv> <tokens> <tokens fnv>
                                               a whole file: tokens hashed as int32 LE
  windows <file> <s> <stride> <count> <fnv>    every window's s + 1 tokens (int32 LE) then s mask bytes
  window_case <n> <s> <stride> <count> <k> <tokens...> / <mask...>
                                               window k of tokens 100, 101, ... (pad 7)
  lambada <strict> <examples> <fnv>            the whole file: per example num_context, num_label (uint32
                                               LE) and the tokens (int32 LE)
  lambada_line <strict> <line> <num_context> <tokens...>   the first LAMBADA_EXACT lines
  lambada_case <strict> <text> <num_context> <tokens...>   hand-picked texts
  repr <float.hex()> <repr>                    Python's repr of a float
  metrics <loss sum hex> <tokenized> <original> <avg loss hex> <ppl hex> <adjusted ppl hex> <ratio repr>
  model_sha256 <hex>                           test/eval_tiny_model.py's model.safetensors
  ref_wikitext <s> <stride> <words> <tokens> <windows> <loss sum> <avg loss> <ppl> <adjusted ppl>
  ref_lambada <strict> <s> <correct> <examples>
"""
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile

import numpy as np
import tiktoken
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import eval_tiny_model  # noqa: E402

LAMBADA_EXACT = 24
EOD = 50256
WIKI_SEQ, WIKI_STRIDE, LAMBADA_SEQ = 64, 32, 128

# --- the port of Megatron's zero-shot tasks


def wikitext_detokenizer(string):
    """detokenizer.py's rules, in its order."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]:
        string = string.replace(a, b)
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    for a, b in [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)), (" \n", "\n"),
                 ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]:
        string = string.replace(a, b)
    return string


def word_count(text):
    return len(text.strip().split(" "))


def lm_windows(tokens, seq_len, overlapping_eval, pad=EOD):
    """_LMDataset: (tokens, mask) of every window."""
    stride = max(1, overlapping_eval)
    targets = max(len(tokens) - 1 - stride, 0)
    count = max(math.ceil(targets / stride) + 1, 1)
    out = []
    for idx in range(count):
        window = tokens[idx * stride: idx * stride + seq_len + 1]
        mask = [1] * len(window) + [0] * (seq_len + 1 - len(window))
        window = window + [pad] * (seq_len + 1 - len(window))
        mask = np.array(mask[1:])
        if stride != seq_len and idx != 0:
            mask[:-stride] *= 0
        out.append((window, [int(m) for m in mask]))
    return out


def lambada_tokens(text, strict, encode):
    """_LambadaDataset.get_tokens: (context, label)."""
    if not strict:
        tokens = encode(text)
        return tokens[:-1], [tokens[-1]]
    last = text.split()[-1]
    start = text.rfind(last)
    return encode(text[:start].strip()), encode(" " + last)


def lambada_sample(context, label, seq_len):
    """_LambadaDataset.__getitem__: (tokens, mask)."""
    tokens = context + label
    mask = [0] * len(context) + [1] * len(label) + [0] * (seq_len + 1 - len(tokens))
    return tokens + [EOD] * (seq_len + 1 - len(tokens)), mask[1:]


def lm_metrics(loss_sum, tokenized, original):
    """evaluate.py's figures."""
    avg = loss_sum / (tokenized - 1)
    ratio = (tokenized - 1) / (original - 1)
    return avg, math.exp(min(20, avg)), math.exp(min(20, avg * ratio)), ratio


# --- helpers


def fnv1a64(data, h=0xCBF29CE484222325):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def int32s(values):
    return struct.pack(f"<{len(values)}i", *values)


def load_gpt2(data):
    cache = tempfile.mkdtemp()
    shutil.copy(f"{data}/gpt2/vocab.bpe", f"{cache}/6d1cbeee0f20b3d9449abfede4726ed8212e3aee")
    shutil.copy(f"{data}/gpt2/encoder.json", f"{cache}/6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    enc = tiktoken.get_encoding("gpt2")
    assert enc.n_vocab == 50257, enc.n_vocab
    return enc.encode_ordinary


DETOK_CASES = [
    "", " ", "plain words only", "the cat 's hat", "the dogs ' bones", "it 's rock 'n' roll", "1 @,@ 000 @.@ 5 km @-@ long",
    " @-@ @-@ ", "a : b ; c . d ! e ? f , g", "a . . . b", "( a )", "(  )", "( a ( b ) c )", "( open only", "close ) only ( x",
    "[ x ]", "{ y }", "\" quoted text \"", "\" a \n b \"", "' single '", "' a ' b ' c '", "= = = = Title = = = =",
    "= = = Sub = = =", "= = Head = =", "= = = = =", "10 ° C", "a \n b \n c", " N N N ", "N N", "the N values",
    "/' 5/", "x /' 5/ y /' a/ /'  5/", "s ' s ' s '", "( \u3000x\u00a0 )", "( \x1c x \x1f )", "\" \u2003 \"",
    "caf\u00e9 ( na\u00efve )", "( \u00e9 \u0301 )", "{ [ ( \" ' mixed ' \" ) ] }", "it 's", " 's", "' 's '",
]
WORDS_CASES = ["", " ", "one", " one two ", "a  b", " = Title = \n body \n", "\u3000x y\u00a0", "x\n\ny", "\x1c a \x1f"]
LAMBADA_CASES = [
    "the end", "a  b  c ", "  leading and trailing  \n", "word\u00a0after\u00a0nbsp", "multi\nline\n\nlast",
    "repeat repeat repeat", "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "ends with punctuation.", "x " + "a" * 29, "tab\tseparated\tword",
]
REPR_VALUES = [1.1375987654321, 10.0, 1e16, 1e15, 1.5e-7, 0.0001, 0.00012345, 123456789012345.6, 1e-5, 2.5, 100.0, -0.0, 0.0,
               1234567890123456.0, 0.1, 1 / 3, 1e22, 5e-324, 1.7976931348623157e308, -2.75, 1.0869565217391304, 7.0]


def hexs(text):
    return text.encode().hex() or "-"


def main():
    data = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MEGATRON_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
    encode = load_gpt2(data)
    out = [f"# written by test/make_eval_fixtures.py: tiktoken {tiktoken.__version__}, torch {torch.__version__}, "
           f"transformers {transformers.__version__}, Python {sys.version.split()[0]}"]

    wiki_lines = open(f"{data}/wikitext/wikitext-2.test.tokens", encoding="utf-8").read().split("\n")
    picked = []  # real lines: the first two holding each rule's pattern, around its first match
    for pattern in ["s '", "@-@", "@,@", "@.@", " : ", " ; ", " ! ", " ? ", "( ", "[ ", "\"", " '", "= = =", "\u00b0", " N ", " 's"]:
        picked += [line[max(0, line.find(pattern) - 100):line.find(pattern) + 140] for line in wiki_lines if pattern in line][:2]
    for text in DETOK_CASES + picked:
        out.append(f"detok {hexs(text)} {hexs(wikitext_detokenizer(text))}")
    for text in WORDS_CASES:
        out.append(f"words {hexs(text)} {word_count(text)}")

    for name in ["wikitext-2.test.tokens", "wikitext-2.valid.tokens"]:
        raw = open(f"{data}/wikitext/{name}", "rb").read()
        text = raw.decode("utf-8")
        detok = wikitext_detokenizer(text).encode()
        tokens = encode(detok.decode())
        out.append(f"wikitext {name} {len(raw)} {word_count(text)} {len(detok)} {fnv1a64(detok):016x} {len(tokens)} "
                   f"{fnv1a64(int32s(tokens)):016x}")
        if name.startswith("wikitext-2.test"):
            for s, o in [(128, 32), (1024, 1024)]:
                h, windows = 0xCBF29CE484222325, lm_windows(tokens, s, o)
                for window, mask in windows:
                    h = fnv1a64(int32s(window) + bytes(mask), h)
                out.append(f"windows {name} {s} {o} {len(windows)} {h:016x}")
            out.append(f"windows {name} 1024 32 {len(lm_windows(tokens, 1024, 32))} -")

    for n, s, o in [(1, 4, 2), (2, 4, 2), (3, 4, 4), (10, 4, 2), (10, 4, 4), (10, 4, 1), (10, 4, 6), (9, 8, 3), (20, 6, 6), (5, 8, 32),
                    (17, 5, 3)]:
        windows = lm_windows(list(range(100, 100 + n)), s, o, pad=7)
        for k, (window, mask) in enumerate(windows):
            out.append(f"window_case {n} {s} {o} {len(windows)} {k} {' '.join(map(str, window))} / {' '.join(map(str, mask))}")

    lambada = [json.loads(line)["text"] for line in open(f"{data}/lambada/lambada_test.jsonl", encoding="utf-8").readlines()]
    for strict in [0, 1]:
        h = 0xCBF29CE484222325
        for i, text in enumerate(lambada):
            context, label = lambada_tokens(text, strict, encode)
            h = fnv1a64(struct.pack("<II", len(context), len(label)) + int32s(context + label), h)
            if i < LAMBADA_EXACT:
                out.append(f"lambada_line {strict} {i + 1} {len(context)} {' '.join(map(str, context + label))}")
        out.append(f"lambada {strict} {len(lambada)} {h:016x}")
        for text in LAMBADA_CASES:
            context, label = lambada_tokens(text, strict, encode)
            out.append(f"lambada_case {strict} {hexs(text)} {len(context)} {' '.join(map(str, context + label))}")

    for x in REPR_VALUES:
        out.append(f"repr {float(x).hex()} {repr(float(x))}")
    for loss_sum, tokenized, original in [(13896.903198242188, 1256, 1098), (3.0e5, 287644, 245569), (5000.0, 100, 90)]:
        avg, ppl, adjusted, ratio = lm_metrics(loss_sum, tokenized, original)
        out.append(f"metrics {loss_sum.hex()} {tokenized} {original} {avg.hex()} {ppl.hex()} {adjusted.hex()} {ratio!r}")

    out += reference_figures(data, encode)
    with open(os.path.join(HERE, "fixtures", "eval.txt"), "w") as f:
        f.write("\n".join(out) + "\n")


def reference_figures(data, encode):
    """torch's figures on test/eval_tiny_model.py's model and data."""
    folder = tempfile.mkdtemp()
    sha = eval_tiny_model.write_model(os.path.join(folder, "model"))
    eval_tiny_model.write_data(folder, data)
    torch.set_num_threads(os.cpu_count())
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(folder, "model"), torch_dtype=torch.float32).eval()
    lines = [f"model_sha256 {sha}"]

    def logits_of(samples):
        with torch.no_grad():
            x = torch.tensor([s[:-1] for s in samples])
            return model(input_ids=x).logits.double()

    raw = open(f"{folder}/wiki.test.tokens", encoding="utf-8").read()
    tokens = encode(wikitext_detokenizer(raw))
    windows = lm_windows(tokens, WIKI_SEQ, WIKI_STRIDE)
    loss_sum = 0.0
    for start in range(0, len(windows), 8):
        batch = windows[start:start + 8]
        logits = logits_of([w for w, _ in batch])
        targets = torch.tensor([w[1:] for w, _ in batch])
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss_sum += float((losses * torch.tensor([m for _, m in batch], dtype=torch.float64)).sum())
    avg, ppl, adjusted, _ = lm_metrics(loss_sum, len(tokens), word_count(raw))
    lines.append(f"ref_wikitext {WIKI_SEQ} {WIKI_STRIDE} {word_count(raw)} {len(tokens)} {len(windows)} {loss_sum!r} {avg!r} {ppl!r} {adjusted!r}")

    texts = [json.loads(line)["text"] for line in open(f"{folder}/lambada_test.jsonl", encoding="utf-8")]
    for strict in [0, 1]:
        correct = 0
        for text in texts:
            tokens, mask = lambada_sample(*lambada_tokens(text, strict, encode), LAMBADA_SEQ)
            predicted = logits_of([tokens])[0].argmax(-1)
            correct += all(int(predicted[t]) == tokens[t + 1] for t in range(LAMBADA_SEQ) if mask[t])
        lines.append(f"ref_lambada {strict} {LAMBADA_SEQ} {correct} {len(texts)}")
    shutil.rmtree(folder)
    return lines


if __name__ == "__main__":
    main()
