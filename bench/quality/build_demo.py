"""Rebuild the demo (tfb_core/demo/adapter and posterior) from one GPU run of ``gpu_demo.py``.

    python bench/quality/build_demo.py DATA_DIR [bench/quality/results/demo]

The folder holds ``scores_*.pt`` (the demo adapter's per-sample scores of every set over a
sigma grid) and, straight from a GPU run, ``adapter.tar`` (the LoRA trained on ``arc_easy:train`` + ``arc_challenge:train``, installed
as ``tfb_core/demo/adapter``; the repository keeps the installed copy only). What
``tfb bayesianize`` does on ``DATA_DIR/pool.jsonl`` (the 900-question calibration pool), with the
pool's scores read from the scores instead of computed again (a 900-question x 8-sigma K = 10
pass takes hours on a CPU): a seeded half fits T at the demo's sigma (0.01, set by hand:
tfb_core/demo/README.md says why; cv-nll's trace is recorded) and the confidence model
(cross-fitted); the other half is the held-out calibration of prediction sets and abstention
(``bench/quality/decisions.py`` computes the same). The same on a GPU:

    tfb bayesianize --adapter tfb_core/demo/adapter --calibration DATA_DIR/pool.jsonl --mode sequence \\
        --sigma 0.01 --samples 10 --seed 0 --max-risk 0.35 --out tfb_core/demo/posterior --force

Also writes ``tfb_core/demo/recorded.json`` (figures of the first 4 pool questions, from the same
scores) for tests/test_demo.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from decisions import DEMO_RISK as MAX_RISK, fit_demo, load, probabilities  # noqa: E402
from tfb_core.conformal import calibrate, holdout_split  # noqa: E402
from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL, DEMO_POSTERIOR  # noqa: E402
from tfb_core.evaluate import metrics  # noqa: E402
from tfb_core.models import load_base_model  # noqa: E402
from tfb_core.posterior import Posterior  # noqa: E402

HOLDOUT, SEED, K = 0.5, 0, 10


def install_adapter(tar_path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
        config = json.loads((Path(tmp) / "adapter" / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = DEMO_MODEL
        (Path(tmp) / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (Path(tmp) / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model card
        if DEMO_ADAPTER.exists():
            shutil.rmtree(DEMO_ADAPTER)
        shutil.copytree(Path(tmp) / "adapter", DEMO_ADAPTER)


def main() -> None:
    data = Path(sys.argv[1])
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "results" / "demo"
    if (folder / "adapter.tar").is_file():  # a new GPU run: its adapter becomes the demo's
        install_adapter(folder / "adapter.tar")
    scores, labels = load(folder)

    p = probabilities(scores)
    y = labels["pool"]
    fit, held = holdout_split(len(y), HOLDOUT, SEED)
    fitted = fit_demo(p, y, fit)
    sigma, t, conf = fitted["sigma"], fitted["T"], fitted["confidence"]
    cal = calibrate(p[sigma]["pool"][held], y[held], t, "lac", confidence=conf, coverage=0.9,
                    abstain_on="confidence", max_risk=MAX_RISK)
    post = Posterior.from_adapter(load_base_model(DEMO_MODEL, "cpu", "float32"), DEMO_ADAPTER,
                                  num_samples=K, seed=SEED, mode="sequence", chat=False)
    post.sigma = sigma
    cfg = post.config
    cfg.criterion, cfg.eps, cfg.temperature, cfg.length_normalize = None, None, t, False  # sigma set by hand
    cfg.search_trace = [asdict(x) for x in fitted["trace"]]
    cfg.calibration = cal.to_dict()
    cfg.confidence = conf.to_dict()
    post.save(DEMO_POSTERIOR, calibration_file=data / "pool.jsonl", force=True)  # the shipped one, rebuilt
    first = torch.arange(4)
    # the pool file starts with arc_easy:pool, so its first 4 questions are arc_easy:pool's
    recorded = {"data": "arc_easy:pool", "limit": 4, "sigma": sigma, "temperature": t, "samples": K, "seed": SEED,
                "source": "bench/quality/results/demo/scores_*.pt (GPU, float32)",
                "deterministic": metrics(p[0.0]["pool"][first], y[first]),
                "tfb": metrics(p[sigma]["pool"][first], y[first]),
                "tfb_tempered": metrics(p[sigma]["pool"][first], y[first], t)}
    (DEMO_POSTERIOR.parent / "recorded.json").write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps({"sigma": sigma, "temperature": t, "held_out": cal.n, "confidence": conf.model,
                      "threshold": asdict(cal.risk_threshold())}))


if __name__ == "__main__":
    main()
