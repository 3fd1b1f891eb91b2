#!/usr/bin/env python3
"""Summarise the py-spy profiles ``bench/serve.py --profile DIR`` recorded: per cell, how busy
each server thread was, and where the time went (self and inclusive, per thread).

    python bench/profile_report.py DIR [--top 15]

Each ``KEY.all.txt`` holds the stacks of every thread that was not idle, ``KEY.gil.txt`` only
the thread holding the GIL, both as py-spy's collapsed stacks (``frame;frame;... count``)
sampled at 200 Hz.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def read(path: Path) -> list[tuple[list[str], int]]:
    """Collapsed stacks: (frames root first, samples)."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append((stack.split(";"), int(n)))
    return out


def short(frame: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (file.py)``."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    return f"{m.group(1)} ({Path(m.group(2)).name})" if m else frame


def summarise(path: Path, top: int) -> str:
    stacks = read(path)
    total = sum(n for _, n in stacks)
    threads = collections.Counter()
    own = collections.defaultdict(collections.Counter)
    incl = collections.defaultdict(collections.Counter)
    for frames, n in stacks:
        thread = next((f for f in frames if f.startswith("thread")), "thread ?")
        code = [short(f) for f in frames if not f.startswith(("thread", "process"))]
        threads[thread] += n
        if code:
            own[thread][code[-1]] += n
            for f in set(code):
                incl[thread][f] += n
    lines = [f"## {path.name}: {total} samples"]
    for thread, n in threads.most_common():
        lines.append(f"### {thread}: {n} samples ({100 * n / max(total, 1):.0f}%)")
        lines.append("self: " + "; ".join(f"{f} {100 * c / n:.0f}%" for f, c in own[thread].most_common(top)))
        lines.append("incl: " + "; ".join(f"{f} {100 * c / n:.0f}%" for f, c in incl[thread].most_common(top)))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    for path in sorted(Path(args.dir).glob("*.txt")):
        print(summarise(path, args.top), "\n")


if __name__ == "__main__":
    main()
