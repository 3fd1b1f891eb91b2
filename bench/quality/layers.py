"""Only the last L layers stochastic: what it costs the demo's uncertainty (one GPU command).

    OUT=... python bench/quality/layers.py DATA_DIR [--layers all,8,4,2,1] [--budget 540]
    python bench/quality/layers.py --table bench/quality/results/layers    # the tables again, offline

``DATA_DIR`` holds the JSONL sets of ``export_data.py``. The demo adapter (``tfb_core/demo/adapter``)
is scored once at sigma 0 (K = 1) on every set. Then, for each L: the posterior with
``stochastic_layers = L`` searches its own sigma with the paper's criterion (``nll`` against the
sigma-0 answers, ``tfb_core.search.search_sigma``) at eps 0.05, about what the shipped demo's
sigma 0.01 costs with every layer (4.6% there), on the fitting half of the 900-question ``pool``
(the demo's calibration file; the same seeded half as ``decisions.py``), and every set is scored
at that sigma (K = 10, seed 0, float32, TF32 off). Offline, as ``tfb bayesianize`` does: T and
the learned confidence are fitted on the fitting half, the held-out half calibrates prediction
sets and abstention, and each evaluation set gets ACC, ECE, NLL, AUROC for wrong answers of MI /
PE / max p / confidence, 0.9 prediction sets' coverage, and OOD AUROC (ARC-E + ARC-C validation
against PIQA and HellaSwag).

Writes ``$OUT/layers_scores.pt`` after each L (the raw per-sample scores), then ``layers.json``
and ``layers.md`` beside it. ``cv-nll`` is not the criterion here: on this adapter it picks
sigma 0 with every layer stochastic (``README.md``), which would leave nothing to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).parent))

from decisions import HELDOUT, OOD, evaluate_row  # noqa: E402
from gpu_scores import K, SEED, run_setup, score_set  # noqa: E402

SETS = ("pool",) + tuple(HELDOUT) + OOD
EPS = 0.05  # |NLL(sigma) - NLL(0)| / NLL(0) <= 5% on the fitting half: the demo's sigma 0.01 costs 4.6%
SIGMA_ALL = 0.01  # where the search lands with every layer; a smaller L starts higher


def sigma_start(layers, num_layers: int) -> float:
    """A first bracket point a little under the expected answer: the noise of L layers of N moves
    the output about sqrt(L / N) as much as every layer's, so sigma scales about sqrt(N / L)."""
    share = 1.0 if layers == "all" else layers / num_layers
    return SIGMA_ALL * share ** -0.5 / 2


def score_gpu(args) -> Path:
    from tfb_core.conformal import holdout_split
    from tfb_core.data import read_jsonl
    from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior
    from tfb_core.search import search_sigma

    t0 = time.perf_counter()
    out, device = run_setup("/tmp/tfb_layers")
    data = {n: read_jsonl(Path(args.data) / f"{n}.jsonl")[:args.limit] for n in SETS}
    post = Posterior.from_adapter(load_base_model(DEMO_MODEL, device=device, dtype="float32"), DEMO_ADAPTER)
    fit, _ = holdout_split(len(data["pool"]), 0.5, SEED)
    fit_items = [data["pool"][i] for i in fit]
    result = {"labels": {n: torch.tensor([it.answer for it in items]) for n, items in data.items()},
              "K": K, "seed": SEED, "eps": args.eps, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": str(torch.__version__), "num_layers": post.num_layers, "scores": {}, "search": {},
              "seconds": {}}
    result["scores"]["0"] = {n: score_set(post, items, 0.0, args.batch_size)[0] for n, items in data.items()}
    path = out / "layers_scores.pt"
    print(f"[{time.perf_counter() - t0:.0f}s] sigma 0 scored on {result['device']}", flush=True)
    for layers in args.layers.split(","):
        t = time.perf_counter()
        if result["seconds"] and t - t0 + max(result["seconds"].values()) > args.budget:
            print(f"stopping before L={layers}: out of budget", flush=True)
            break
        post.stochastic_layers = layers
        found = search_sigma(post, fit_items, criterion="nll", eps=args.eps, num_samples=K, seed=SEED, mode="sequence",
                             sigma_init=sigma_start(post.stochastic_layers, post.num_layers), rtol=0.1,
                             batch_size=args.batch_size, progress=False)
        searched = time.perf_counter() - t
        result["search"][layers] = {"sigma": found.sigma, "trace": [vars(p) for p in found.trace],
                                    "seconds": round(searched, 1)}
        result["scores"][layers] = {n: score_set(post, items, found.sigma, args.batch_size)[0]
                                    for n, items in data.items()}
        result["seconds"][layers] = round(time.perf_counter() - t, 1)
        torch.save(result, path)
        print(f"[{time.perf_counter() - t0:.0f}s] L={layers}: sigma {found.sigma:.5g} after "
              f"{len(found.trace)} evaluations ({searched:.0f} s), sets scored ({result['seconds'][layers]} s)",
              flush=True)
    return path


def analyze(path: Path) -> dict:
    """Each L's row (and sigma 0's) from the saved scores, as tfb bayesianize would fit and calibrate it."""
    from tfb_core.confidence import Confidence, fit_confidence
    from tfb_core.conformal import holdout_split
    from tfb_core.uncertainty import fit_temperature

    r = torch.load(path)
    labels, y = r["labels"], r["labels"]["pool"]
    fit, held = holdout_split(len(y), 0.5, SEED)
    probs = {layers: {n: torch.softmax(s.double(), -1) for n, s in sets.items()} for layers, sets in r["scores"].items()}
    rows = {}
    for layers, sets in probs.items():
        sigma = 0.0 if layers == "0" else r["search"][layers]["sigma"]
        t = fit_temperature(sets["pool"][fit].mean(1), y[fit])
        conf = fit_confidence(sets["pool"][fit], y[fit], t, seed=SEED) if sigma > 0 else Confidence()
        p = {sigma: sets}
        row = evaluate_row(p, labels, held, sigma, t, "confidence", conf)
        row["mi"] = evaluate_row(p, labels, held, sigma, t, "mutual_information", None)["sets"]
        row["layers"] = "sigma 0, T fitted" if layers == "0" else layers
        rows[layers] = row
    report = {"device": r["device"], "torch": r["torch"], "K": r["K"], "eps": r["eps"], "num_layers": r["num_layers"],
              "search": r["search"], "seconds": r["seconds"], "rows": rows}
    md = [f"{r['device']}, float32 (TF32 off), K = {r['K']}, seed {SEED}; sigma searched per L with `nll` "
          f"(eps {r['eps']}, pseudo-labels) on the pool's fitting half (450); T and the learned confidence "
          f"fitted there; the other 450 calibrate the 0.9 prediction sets. N = {r['num_layers']} layers.\n",
          "| L | sigma | evaluations | T |", "|---|---|---|---|"]
    for layers, row in rows.items():
        s = r["search"].get(layers)
        md.append(f"| {row['layers']} | {row['sigma']:.4g} | {len(s['trace']) if s else '-'} | {row['T']:.3g} |")
    for name, title in HELDOUT.items():
        md += [f"\n#### {title.split(' (')[0]}\n",
               "| L | ACC % | ECE | NLL | AUROC wrong: MI | PE | max p | confidence | 0.9 sets: cover / size |",
               "|---|---|---|---|---|---|---|---|---|"]
        for row in rows.values():
            m = row["sets"][name]
            s9 = m["sets"]["0.9"]
            md.append(f"| {row['layers']} | {m['acc'] * 100:.1f} | {m['ece']:.2f} | {m['nll']:.3f} "
                      f"| {m['auroc_err_mi']:.3f} | {m['auroc_err_pe']:.3f} | {m['auroc_err_maxprob']:.3f} "
                      f"| {m['auroc_err_confidence']:.3f} | {s9['coverage'] * 100:.1f}% / {s9['size']:.2f} |")
    md += ["\n#### OOD AUROC (in: ARC-E + ARC-C validation; out: 300 PIQA or HellaSwag)\n",
           "| L | PIQA MI | PE | max p | HellaSwag MI | PE | max p |", "|---|---|---|---|---|---|---|"]
    for row in rows.values():
        o = row["ood"]
        md.append(f"| {row['layers']} | " + " | ".join(f"{o[d][k]:.3f}" for d in OOD
                                                      for k in ("auroc_mi", "auroc_pe", "auroc_maxprob")) + " |")
    (path.parent / "layers.md").write_text("\n".join(md) + "\n")
    (path.parent / "layers.json").write_text(json.dumps(report, indent=1, default=float))
    print("\n".join(md))
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?")
    ap.add_argument("--layers", default="all,4,1,8,2", help="comma-separated L (in the order run)")
    ap.add_argument("--eps", type=float, default=EPS, help="the nll criterion's tolerance")
    ap.add_argument("--budget", type=float, default=540, help="seconds: no new L starts after this")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, help="the first N items of each set (a dry run)")
    ap.add_argument("--table", type=Path, help="a folder with layers_scores.pt: only the tables")
    args = ap.parse_args()
    analyze(args.table / "layers_scores.pt" if args.table else score_gpu(args))


if __name__ == "__main__":
    main()
