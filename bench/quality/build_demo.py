"""Rebuild the demo posterior (tfb_core/demo/posterior) from the H200 scores of gpu_scores.py.

    python bench/quality/build_demo.py DATA_DIR

What ``tfb bayesianize --criterion cv-nll`` does, with the calibration split's scores read from
``results/scores_*.pt`` instead of re-scored on the CPU (a 200-question x 13-sigma K = 10 pass
takes hours there): the seeded half of ``arc_easy:cal`` chooses sigma and T (cv-nll), the
other half is the held-out calibration (prediction sets, abstention). Summed scores
(``length_normalize`` false): see bench/quality/README.md for why. The same run on a GPU:

    tfb bayesianize --adapter tfb_core/demo/adapter --calibration DATA_DIR/cal.jsonl --mode sequence \\
        --criterion cv-nll --sigma-grid 0,0.001625,0.003,0.006,0.01,0.015,0.02,0.025,0.03,0.04,0.05,0.06,0.08 \\
        --samples 10 --seed 0 --out tfb_core/demo/posterior

Also writes ``tfb_core/demo/recorded.json`` (figures of the first 4 calibration questions, from
the same scores) for tests/test_demo.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from analyze import load, probabilities  # noqa: E402
from tfb_core.conformal import calibrate, holdout_split  # noqa: E402
from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL, DEMO_POSTERIOR  # noqa: E402
from tfb_core.evaluate import metrics  # noqa: E402
from tfb_core.models import load_base_model  # noqa: E402
from tfb_core.posterior import Posterior  # noqa: E402
from tfb_core.search import select_sigma_temperature  # noqa: E402

LENGTH_NORMALIZE, MAX_ACC_DROP, HOLDOUT, SEED, K = False, 0.01, 0.5, 0, 10


def main() -> None:
    data = Path(sys.argv[1])
    scores, labels = load(Path(__file__).parent / "results")
    p = probabilities(scores, LENGTH_NORMALIZE)
    y = labels["cal"]
    fit, held = holdout_split(len(y), HOLDOUT, SEED)
    sigma, t, trace = select_sigma_temperature({s: p[s]["cal"][fit].mean(1) for s in p}, y[fit], MAX_ACC_DROP)
    cal = calibrate(p[sigma]["cal"][held], y[held], t, "lac", coverage=0.9, max_risk=0.1)
    post = Posterior.from_adapter(load_base_model(DEMO_MODEL, "cpu", "float32"), DEMO_ADAPTER,
                                  num_samples=K, seed=SEED, mode="sequence", chat=False)
    post.sigma = sigma
    cfg = post.config
    cfg.criterion, cfg.eps, cfg.temperature, cfg.length_normalize = "cv-nll", None, t, LENGTH_NORMALIZE
    cfg.search_trace = [asdict(x) for x in trace]
    cfg.calibration = cal.to_dict()
    post.save(DEMO_POSTERIOR, calibration_file=data / "cal.jsonl", force=True)  # the shipped one, rebuilt
    first = torch.arange(4)
    recorded = {"data": "arc_easy:cal", "limit": 4, "sigma": sigma, "temperature": t, "samples": K, "seed": SEED,
                "source": "bench/quality/results/scores_*.pt (H200, float32)",
                "deterministic": metrics(p[0.0]["cal"][first], y[first]),
                "tfb": metrics(p[sigma]["cal"][first], y[first]),
                "tfb_tempered": metrics(p[sigma]["cal"][first], y[first], t)}
    (DEMO_POSTERIOR.parent / "recorded.json").write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps({"sigma": sigma, "temperature": t, "held_out": cal.n,
                      "threshold": asdict(cal.risk_threshold())}))


if __name__ == "__main__":
    main()
