"""Write labelled multiple-choice files in tfb's calibration format (README, "Calibration and
evaluation files").

    python examples/make_questions.py      # examples/questions.jsonl (40), examples/test_questions.jsonl (20)
    python examples/make_questions.py --from arc_easy:cal --out cal.jsonl   # a built-in set (make install)

Without ``--from``: arithmetic questions anyone can check by hand, four choices each, seeded
(the same files every run). The answer is written as the choice's index, its label ("B") or its
text, in turn, to show the three forms the format accepts. With ``--from NAME``: the items of a
built-in benchmark (``tfb eval --data``'s names; needs the eval extra and the benchmark data,
``make install``), with their answers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = "ABCD"


def arithmetic(n: int, seed: int) -> list[dict]:
    """``n`` questions like "What is 7 + 5?" with three wrong choices near the right one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice("+-x")
        if op == "-" and b > a:
            a, b = b, a
        right = a + b if op == "+" else a - b if op == "-" else a * b
        wrong = set()
        while len(wrong) < 3:
            guess = right + rng.choice([-10, -2, -1, 1, 2, 10])
            if guess >= 0 and guess != right:
                wrong.add(guess)
        choices = [str(x) for x in rng.sample(sorted(wrong | {right}), 4)]
        index = choices.index(str(right))
        answer = [index, LABELS[index], choices[index]][i % 3]  # index, label or text
        rows.append({"id": f"arith-{seed}-{i}", "question": f"What is {a} {op} {b}?", "choices": choices,
                     "answer": answer})
    return rows


def builtin(name: str, limit: int | None) -> list[dict]:
    from tfb_core import benchmarks

    return [{"question": it.question, "choices": it.choices, "answer": it.answer}
            for it in benchmarks.load(name, limit)]


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} items")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", default=None, help="a built-in benchmark (arc_easy:cal, ...)")
    p.add_argument("--limit", type=int, default=None, help="with --from: the first N items")
    p.add_argument("--out", type=Path, default=None, help="with --from: the file to write")
    args = p.parse_args()
    if args.source:
        write(builtin(args.source, args.limit), args.out or Path(f"{args.source.replace(':', '_')}.jsonl"))
        return
    write(arithmetic(40, seed=1), HERE / "questions.jsonl")
    write(arithmetic(20, seed=2), HERE / "test_questions.jsonl")


if __name__ == "__main__":
    main()
