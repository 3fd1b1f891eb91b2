"""The generation tables of bench/quality/README.md, from ``gpu_generate.py``'s ``generate.json``.

    python bench/quality/generation_table.py [bench/quality/results/demo/generate.json]

Per QA set and sigma: accuracy, then each sequence-level score's AUROC for wrong answers, AURC
and PRR (``tfb_core.qa``); and, per set, whether the weight samples add anything: the best
sample-based score (token MI, sequence MI) against the model average's NLL at the same sigma.
Writes ``generate.md`` beside the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAMPLE_SCORES = ("mean_token_mi", "max_token_mi", "sequence_mi", "sequence_mi_per_token")


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "demo" / "generate.json")
    result = json.loads(path.read_text())
    runs = result["runs"]
    sets = sorted({k.split("@")[0] for k in runs})
    sigmas = sorted({float(k.split("@")[1]) for k in runs})
    scores = list(next(iter(runs.values()))["scores"])
    md = [f"{result['device']}, torch {result['torch']}, K = {result['K']} (K = 1 at sigma 0), greedy, "
          f"{next(iter(runs.values()))['max_tokens']} tokens at most.\n"]
    for name in sets:
        cols = [f"{name}@{s:g}" for s in sigmas if f"{name}@{s:g}" in runs]
        n = runs[cols[0]]["n"]
        md += [f"\n### {name} (n = {n}): AUROC for wrong answers / PRR\n",
               "| score | " + " | ".join(f"sigma {c.split('@')[1]}" for c in cols) + " |",
               "|---|" + "---|" * len(cols),
               "| accuracy | " + " | ".join(f"{runs[c]['accuracy'] * 100:.1f}%" for c in cols) + " |"]
        for s in scores:
            md.append(f"| {s} | " + " | ".join(_cell(runs[c]["scores"][s]) for c in cols) + " |")
    md.append("\n### Do the weight samples add anything? Best sample-based score vs the average's mean NLL "
              "(AUROC), per set and sigma > 0\n")
    md += ["| set | sigma | mean NLL | best sample-based (which) | sequence MI |", "|---|---|---|---|---|"]
    for name in sets:
        for s in sigmas:
            key = f"{name}@{s:g}"
            if s == 0 or key not in runs:
                continue
            sc = runs[key]["scores"]
            best = max(SAMPLE_SCORES, key=lambda x: _num(sc[x]["auroc"]))
            md.append(f"| {name} | {s:g} | {sc['mean_nll']['auroc']:.3f} | {sc[best]['auroc']:.3f} ({best}) "
                      f"| {sc['sequence_mi']['auroc']:.3f} |")
    (path.parent / "generate.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _num(x) -> float:
    return -1.0 if x is None or x != x else x


def _cell(m: dict) -> str:
    a, p = m["auroc"], m["prr"]
    return ("nan" if a != a else f"{a:.3f}") + " / " + ("nan" if p != p else f"{p:.2f}")


if __name__ == "__main__":
    main()
