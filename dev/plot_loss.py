#!/usr/bin/env python3
"""Turn a train_gpt --log-file (JSONL or CSV) into a loss-curve PNG.

    python3 dev/plot_loss.py out/quickstart.jsonl out/quickstart.png

Needs matplotlib (pip install matplotlib)."""
import csv
import json
import sys


def read_log(path):
    rows = []
    with open(path) as f:
        if path.endswith(".csv"):
            for r in csv.DictReader(f):
                rows.append({k: v for k, v in r.items() if v != ""})
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    train = [(int(r["iteration"]), float(r["lm_loss"])) for r in rows if r["kind"] == "train"]
    valid = [(int(r["iteration"]), float(r["lm_loss"])) for r in rows if r["kind"] == "valid"]
    return train, valid


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_loss.py LOG.jsonl|LOG.csv OUT.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, valid = read_log(sys.argv[1])
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (mean over log interval)")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)
    print("wrote", sys.argv[2])


if __name__ == "__main__":
    main()
