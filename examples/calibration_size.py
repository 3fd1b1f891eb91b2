"""How the held-out size moves what a calibration can promise: the table in README's "How many
calibration items". No model runs: these follow from the rules tfb applies to held-out items.

- coverage spread: with n held-out scores, the realised coverage of split-conformal sets at
  target c is Beta(k, n + 1 - k), k = ceil((n + 1) c) (over calibration draws); its standard
  deviation is how far one calibration's sets may cover from another's.
- certified risk: the smallest error rate (in steps of 0.01) that tfb's abstention rule
  (tfb_core.conformal.risk_threshold: SGR, 95% confidence) certifies on n held-out answers when
  (a) every answer is right, (b) 10% are wrong and the confidence ranks them last (a perfect
  confidence), (c) 10% are wrong and the confidence ranks them at random (median of 50 draws).

Run: python examples/calibration_size.py
"""

from __future__ import annotations

import math
import random
import statistics

import torch

from tfb_core.conformal import risk_threshold
from tfb_core.report import held_out_needed

COVERAGE = 0.9
RISKS = [r / 100 for r in range(1, 100)]


def coverage_sd(n: int, c: float = COVERAGE) -> float:
    k = math.ceil((n + 1) * c - 1e-9)
    a, b = k, n + 1 - k
    return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


def smallest_risk(correct: torch.Tensor) -> float | None:
    """The smallest certified risk when the uncertainty ranks items in their order here."""
    u = torch.arange(len(correct), dtype=torch.float64)
    return next((r for r in RISKS if risk_threshold(u, correct, r).threshold is not None), None)


def main() -> None:
    print(f"{'held out':>8} {'labelled':>8} {'0.9 sets: sd':>13} {'all right':>10} "
          f"{'10% wrong, last':>16} {'10% wrong, random':>18}")
    for n in (25, 50, 100, 200, 400):
        right = torch.ones(n, dtype=torch.bool)
        wrong = round(0.1 * n)
        last = right.clone()
        last[n - wrong:] = False
        rng = random.Random(0)
        draws = []
        for _ in range(50):
            order = torch.tensor(rng.sample(range(n), n))
            draws.append(smallest_risk(last[order]) or 1.0)
        print(f"{n:>8} {2 * n:>8} {coverage_sd(n) * 100:>11.1f} pt {smallest_risk(right):>10} "
              f"{smallest_risk(last):>16} {statistics.median(draws):>18}")
    print(f"held-out items an all-right set needs to certify 0.1: {held_out_needed(0.1)}; "
          f"0.05: {held_out_needed(0.05)}")


if __name__ == "__main__":
    main()
