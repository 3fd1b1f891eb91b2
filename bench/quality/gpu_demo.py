"""Train the demo adapter and score every quality set over a sigma grid (one GPU command).

    OUT=... python bench/quality/gpu_demo.py DATA_DIR --sigmas 0,0.003,0.006,0.01 [--train]

``DATA_DIR`` holds the JSONL sets of ``export_data.py``. With ``--train``: the demo adapter is
trained on ``train.jsonl`` (``tfb finetune``'s code and settings, below) and saved as
``$OUT/adapter.tar``; without it, the adapter is read from ``$ADAPTER`` (default the built-in
demo's). Then, for each sigma, every set's per-sample summed choice log-likelihoods ``(N, K, C)``
and token counts ``(N, C)`` (``gpu_scores.score_set``: K = 10, seed 0, float32, TF32 off) are
written to ``$OUT/scores_<first sigma>.pt`` after each sigma, for ``build_demo.py`` and
``analyze.py`` to use on any machine. The same adapter on the CPU:

    tfb finetune --data arc_easy:train,arc_challenge:train --heldout arc_easy:cal --out adapter \\
        --mode sequence --rank 4 --alpha 8 --lr 5e-4 --epochs 3 --batch-size 32 --seed 0 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).parent))

from gpu_scores import K, SEED, run_setup, score_set  # noqa: E402
from tfb_core.data import read_jsonl  # noqa: E402
from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL  # noqa: E402
from tfb_core.finetune import FinetuneConfig, finetune  # noqa: E402
from tfb_core.models import load_base_model  # noqa: E402
from tfb_core.posterior import Posterior  # noqa: E402

SETS = ("pool", "arc_easy", "arc_challenge", "openbookqa", "piqa", "hellaswag")
CONFIG = FinetuneConfig(mode="sequence", chat=False, rank=4, alpha=8, lr=5e-4, epochs=3, batch_size=32,
                        warmup_steps=20, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--sigmas", required=True, help="comma-separated")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--limit", type=int, help="the first N items of each set (a dry run)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, device = run_setup("/tmp/tfb_demo_out")
    data = {n: read_jsonl(Path(args.data) / f"{n}.jsonl")[:args.limit] for n in SETS}
    adapter = Path(os.environ.get("ADAPTER", DEMO_ADAPTER))
    if args.train:
        adapter = Path(os.environ.get("TRAIN_DIR", "/root/tfb_demo_adapter"))
        base = load_base_model(DEMO_MODEL, device=device, dtype="float32")
        if args.limit:
            CONFIG.epochs, CONFIG.batch_size = 1, 4
        history = finetune(base, read_jsonl(Path(args.data) / "train.jsonl")[:args.limit], adapter, CONFIG,
                           heldout=data["pool"][:300], progress=False)
        (out / "train.json").write_text(json.dumps({"config": asdict(CONFIG),
                                                    "history": [asdict(h) for h in history]}, indent=2))
        with tarfile.open(out / "adapter.tar", "w") as tar:
            tar.add(adapter, arcname="adapter")
        print(f"[{time.perf_counter() - t0:.0f}s] trained: {history[-1]}", flush=True)
        del base
    post = Posterior.from_adapter(load_base_model(DEMO_MODEL, device=device, dtype="float32"), adapter)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    result = {"labels": {n: torch.tensor([it.answer for it in items]) for n, items in data.items()},
              "K": K, "seed": SEED, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": str(torch.__version__), "scores": {}, "seconds": {}}
    path = out / f"scores_{sigmas[0]:g}.pt"
    for sigma in sigmas:
        t = time.perf_counter()
        result["scores"][sigma] = {n: score_set(post, items, sigma, args.batch_size) for n, items in data.items()}
        result["seconds"][sigma] = round(time.perf_counter() - t, 1)
        torch.save(result, path)
        print(f"[{time.perf_counter() - t0:.0f}s] sigma={sigma:g}: {result['seconds'][sigma]} s", flush=True)


if __name__ == "__main__":
    main()
