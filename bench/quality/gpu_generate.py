"""Free-text QA answered by the demo posterior at several sigmas (one GPU command; any machine).

    OUT=... ADAPTER=DIR python bench/quality/gpu_generate.py DATA_DIR --sigmas 0,0.01,0.02 [--limit N]

For each ``qa_*.jsonl`` of ``export_data.py`` and each sigma: ``tfb eval --generate``'s report
(``tfb_core.qa.evaluate_generation``: greedy answers from the model average, K = 10 weight
samples, K = 1 at sigma 0; float32, TF32 off), per item included, in ``$OUT/generate.json``,
written after each sigma. ``ADAPTER``: a peft LoRA directory (default: the built-in demo's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).parent))

from gpu_scores import K, SEED, run_setup  # noqa: E402
from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL  # noqa: E402
from tfb_core.engines import make_decoder  # noqa: E402
from tfb_core.models import load_base_model  # noqa: E402
from tfb_core.posterior import Posterior  # noqa: E402
from tfb_core.qa import format_generation, load_qa, evaluate_generation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--sigmas", required=True, help="comma-separated")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, device = run_setup("/tmp/tfb_generate_out")
    sets = {p.stem.removeprefix("qa_"): load_qa(str(p), args.limit) for p in sorted(Path(args.data).glob("qa_*.jsonl"))}
    post = Posterior.from_adapter(load_base_model(DEMO_MODEL, device=device, dtype="float32"),
                                  Path(os.environ.get("ADAPTER", DEMO_ADAPTER)), seed=SEED)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": str(torch.__version__),
              "K": K, "seed": SEED, "runs": {}}
    for sigma in (float(s) for s in args.sigmas.split(",")):
        post.sigma = sigma
        decoder = make_decoder(post)  # the static engine's noise buffers take sigma when made
        for name, items in sets.items():
            t = time.perf_counter()
            report = evaluate_generation(post, items, num_samples=1 if sigma == 0 else K, max_tokens=args.max_tokens,
                                         batch_size=args.batch_size, decoder=decoder)
            report["seconds"] = round(time.perf_counter() - t, 1)
            result["runs"][f"{name}@{sigma:g}"] = report
            print(f"[{time.perf_counter() - t0:.0f}s] {name} sigma={sigma:g}\n{format_generation(report)}", flush=True)
        (out / "generate.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
