"""Per-sample choice log-likelihoods of the demo adapter on every quality set, over a sigma grid.

    OUT=... python bench/quality/gpu_scores.py DATA_DIR --sigmas 0,0.001625,0.003 [--budget S]

For each sigma and each set (the JSONL files ``export_data.py`` writes): the summed
log-likelihood of every choice under every weight sample, ``(N, K, C)`` (K = 1 at sigma = 0,
else 10; seed 0; float32 model, TF32 off), and each choice's token count ``(N, C)`` (padding
choices: -inf and 0). Summed and length-normalised (mean per token) scores both follow from
these offline, so ``analyze.py`` computes every row of the tables (temperature, conformal sets,
abstention, the sigma/T selection) on the CPU. Results: ``$OUT/scores_<first sigma>.pt``,
written after every sigma.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tfb_core.data import read_jsonl  # noqa: E402
from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL  # noqa: E402
from tfb_core.models import load_base_model  # noqa: E402
from tfb_core.posterior import Posterior  # noqa: E402
from tfb_core.encoding import encode_item  # noqa: E402
from tfb_core.scoring import choice_scores, max_context  # noqa: E402

SETS = ("cal", "arc_easy_heldout", "arc_challenge", "openbookqa", "piqa", "hellaswag")
K, SEED = 10, 0


def score_set(post, items, sigma: float, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, C_max) summed log-likelihoods and (N, C_max) token counts."""
    num = 1 if sigma == 0 else K
    limit = max_context(post.model)
    encoded = [encode_item(post.tokenizer, it, "sequence", max_length=limit) for it in items]
    c_max = max(e.num_choices for e in encoded)
    sums = torch.full((len(items), num, c_max), -float("inf"))
    counts = torch.zeros(len(items), c_max, dtype=torch.long)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        out = choice_scores(post, chunk, [(SEED, num)] * len(chunk), sigma=sigma)
        for i, (enc, s) in enumerate(zip(chunk, out)):
            sums[start + i, :, :s.shape[1]] = s.float()
            counts[start + i, :s.shape[1]] = torch.tensor([len(t) for t in enc.targets])
    return sums, counts


def run_setup(default_out: str) -> tuple[Path, str]:
    """Every quality run's start: ``$OUT`` (made), float32 without TF32, the device."""
    out = Path(os.environ.get("OUT", default_out))
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return out, "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--sigmas", required=True, help="comma-separated")
    ap.add_argument("--budget", type=float, default=560)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, device = run_setup("/tmp/tfb_scores")
    data = {n: read_jsonl(Path(args.data) / f"{n}.jsonl") for n in SETS}
    post = Posterior.from_adapter(load_base_model(DEMO_MODEL, device=device, dtype="float32"), DEMO_ADAPTER)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    result = {"labels": {n: torch.tensor([it.answer for it in items]) for n, items in data.items()},
              "K": K, "seed": SEED, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": str(torch.__version__), "scores": {}, "seconds": {}}
    path = out / f"scores_{sigmas[0]:g}.pt"
    print(f"[{time.perf_counter() - t0:.0f}s] loaded on {device}", flush=True)
    for sigma in sigmas:
        t = time.perf_counter()
        if result["seconds"] and t - t0 + max(result["seconds"].values()) > args.budget:
            print(f"stopping before sigma={sigma}: out of budget", flush=True)
            break
        result["scores"][sigma] = {n: score_set(post, items, sigma, args.batch_size) for n, items in data.items()}
        result["seconds"][sigma] = round(time.perf_counter() - t, 1)
        torch.save(result, path)
        print(f"[{time.perf_counter() - t0:.0f}s] sigma={sigma:g} done in {result['seconds'][sigma]} s", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
