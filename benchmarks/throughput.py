"""Headline throughput benchmark: reduced vs unreduced timm model, measured side by side.

    python benchmarks/throughput.py                       # DeiT-S, ToMe r=13, batch 32, fp32 (the issue's check)
    python benchmarks/throughput.py --r 16 --batch-size 256 64 1 --precision fp32 bf16 --device cuda

Any ``vitrim bench`` flag is accepted; results print as a table (or ``--json``). Numbers are
ratios against the unreduced model measured in the same process, medians over repetitions.
"""
import sys

from vitrim.cli import main

DEFAULTS = ["--model", "deit_small_patch16_224", "--method", "tome", "--r", "13", "--batch-size", "32",
            "--warmup", "3", "--repeats", "7", "--iters", "3"]

if __name__ == "__main__":
    user = sys.argv[1:]
    given = {a for a in user if a.startswith("--")}
    merged, i = [], 0
    while i < len(DEFAULTS):  # keep each default flag (and its values) unless the user gave it
        flag, j = DEFAULTS[i], i + 1
        while j < len(DEFAULTS) and not DEFAULTS[j].startswith("--"):
            j += 1
        if flag not in given:
            merged += DEFAULTS[i:j]
        i = j
    sys.exit(main(["bench", *merged, *user]))
