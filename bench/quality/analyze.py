"""Every row of bench/quality/README.md, from the H200 scores of ``gpu_scores.py``.

    python bench/quality/analyze.py [bench/quality/results]

Reads ``scores_a.pt`` and ``scores_b.pt`` (per-sample summed log-likelihoods and token counts
of every set over the sigma grid), builds summed and length-normalised choice probabilities,
and computes with the library's own functions (the ones ``tfb bayesianize`` and ``tfb eval``
call): the sigma/T choices of every row on the fit half of ``arc_easy:cal``, the conformal
calibration and abstention threshold on its other half, and every metric on the held-out sets.
Writes ``table.md`` and ``table.json`` beside the scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tfb_core.conformal import calibrate, holdout_split  # noqa: E402
from tfb_core.evaluate import abstention_metrics, metrics, ood_metrics, set_metrics  # noqa: E402
from tfb_core.search import select_sigma_temperature  # noqa: E402
from tfb_core.uncertainty import decompose, fit_temperature, temper  # noqa: E402

HELDOUT = ("arc_easy_heldout", "arc_challenge", "openbookqa")
NAMES = {"arc_easy_heldout": "ARC-Easy held-out (n = 370, in distribution)",
         "arc_challenge": "ARC-Challenge validation (n = 299, harder: a shift)",
         "openbookqa": "OpenBookQA validation (n = 500, a shift)"}
OOD = ("piqa", "hellaswag")
PAPER_SIGMA = 0.001625  # `nll` eps 0.003 on 300 training questions, pseudo-labels (the old demo)
REFERENCE_SIGMA = 0.015  # the reference search's upper end: with tolerance eps * N = 0.9 every midpoint passes
MAX_ACC_DROP, COVERAGE, FRACTION, SEED = 0.01, 0.9, 0.5, 0
RISKS = (0.1, 0.2, 0.3, 0.4, 0.5)  # abstention targets tried, smallest first


def load(folder: Path) -> tuple[dict, dict]:
    scores, labels = {}, None
    for name in ("scores_a.pt", "scores_b.pt"):
        r = torch.load(folder / name)
        scores.update(r["scores"])
        labels = r["labels"]
    return scores, labels


def probabilities(scores: dict, normalize: bool) -> dict:
    """sigma -> set -> (N, K, C) choice probabilities (padding choices 0)."""
    out = {}
    for sigma, sets in scores.items():
        out[sigma] = {}
        for name, (sums, counts) in sets.items():
            s = sums.double() / counts.clamp_min(1)[:, None, :] if normalize else sums.double()
            out[sigma][name] = torch.softmax(s, -1)
    return out


def rows_for(p: dict, labels: dict, fit: list[int]) -> list[tuple[str, float, float]]:
    """(name, sigma, T) of every row, each chosen on the fit half of the calibration split."""
    y = labels["cal"][fit]

    def temp(sigma):
        return fit_temperature(p[sigma]["cal"][fit].mean(1), y)

    averages = {s: p[s]["cal"][fit].mean(1) for s in p}
    sigma, t, trace = select_sigma_temperature(averages, y, MAX_ACC_DROP)
    return [("MLE", 0.0, 1.0), ("temperature only", 0.0, temp(0.0)),
            ("TFB paper `nll`", PAPER_SIGMA, 1.0), ("TFB paper `nll` + T", PAPER_SIGMA, temp(PAPER_SIGMA)),
            ("TFB `reference` (bayesian-peft)", REFERENCE_SIGMA, 1.0),
            ("TFB `reference` + T", REFERENCE_SIGMA, temp(REFERENCE_SIGMA)),
            ("TFB `cv-nll` (sigma and T together)", sigma, t)], trace


def evaluate_row(p, labels, sigma, t, held) -> dict:
    cal = calibrate(p[sigma]["cal"][held], labels["cal"][held], t, coverage=COVERAGE)
    # the smallest target risk the held-out half certifies a threshold for (else the largest tried)
    cal.max_risk = next((r for r in RISKS if cal.risk_threshold(r).threshold is not None), RISKS[-1])
    out = {"sigma": sigma, "T": t, "max_risk": cal.max_risk, "sets": {}}
    for name in HELDOUT:
        sp, y = p[sigma][name], labels[name]
        m = metrics(sp, y, t)
        served = decompose(sp, t).probs
        m["sets"] = set_metrics(served, y, cal, valid=sp.amax(1) > 0)
        m["abstention"] = abstention_metrics(sp, y, cal, t)
        out["sets"][name] = m
    inn = torch.cat([pad(p[sigma][n], 5) for n in ("arc_easy_heldout", "arc_challenge")])
    out["ood"] = {o: ood_metrics(inn, pad(p[sigma][o], 5), t) for o in OOD}
    return out


def pad(x: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, c - x.shape[-1]))


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    scores, labels = load(folder)
    fit, held = holdout_split(len(labels["cal"]), FRACTION, SEED)
    report, md = {"grid": sorted(scores), "fit": fit, "held_out": held}, []
    for norm in (False, True):
        p = probabilities(scores, norm)
        rows, trace = rows_for(p, labels, fit)
        key = "mean" if norm else "sum"
        report[key] = {"rows": {}, "cv_trace": [vars(x) for x in trace]}
        for name, sigma, t in rows:
            report[key]["rows"][name] = evaluate_row(p, labels, sigma, t, held)
    for key in ("sum", "mean"):
        md.append(f"\n## Scores: {'length-normalised (mean log-prob per token)' if key == 'mean' else 'summed log-likelihood'}\n")
        rows = report[key]["rows"]
        for name in HELDOUT:
            md.append(f"\n### {NAMES[name]}\n")
            md.append("| row | sigma | T | ACC % | ECE | NLL | Brier | AUROC err MI | PE | max p "
                      "| set cover / size @0.8 | @0.9 | @0.95 | certified risk | threshold: answered / risk "
                      "| + singleton set: answered / risk |")
            md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for row, r in rows.items():
                m = r["sets"][name]
                sets = " | ".join("-" if m["sets"][c] is None else
                                  f"{m['sets'][c]['coverage'] * 100:.1f}% / {m['sets'][c]['size']:.2f}"
                                  for c in ("0.8", "0.9", "0.95"))
                a = m["abstention"]
                certified = "none" if a["threshold"] is None else f"{a['max_risk']:g}"
                rules = " | ".join(f"{a[k]['coverage'] * 100:.1f}% / "
                                   + ("-" if a[k]["risk"] is None else f"{a[k]['risk'] * 100:.1f}%")
                                   for k in ("threshold_rule", "with_sets"))
                md.append(f"| {row} | {r['sigma']:.4g} | {r['T']:.3g} | {m['acc'] * 100:.1f} | {m['ece']:.2f} "
                          f"| {m['nll']:.3f} | {m['brier']:.3f} | {m['auroc_err_mi']:.3f} | {m['auroc_err_pe']:.3f} "
                          f"| {m['auroc_err_maxprob']:.3f} | {sets} | {certified} | {rules} |")
        md.append("\n### OOD (in = ARC-E held-out + ARC-C; out = 300 PIQA or HellaSwag): AUROC\n")
        md.append("| row | PIQA MI | PIQA PE | PIQA max p | HellaSwag MI | HellaSwag PE | HellaSwag max p |")
        md.append("|---|---|---|---|---|---|---|")
        for row, r in rows.items():
            o = r["ood"]
            md.append(f"| {row} | " + " | ".join(f"{o[d][k]:.3f}" for d in OOD
                                                 for k in ("auroc_mi", "auroc_pe", "auroc_maxprob")) + " |")
        md.append("\n`cv-nll` trace on the fit half of `arc_easy:cal` (sigma: cross-fitted NLL, accuracy, T):\n")
        md.append(", ".join(f"{x['sigma']:.4g}: {x['value']:.4f} / {x['accuracy'] * 100:.0f}% / {x['temperature']:.2f}"
                            + ("" if x["feasible"] else " (acc drop)") for x in report[key]["cv_trace"]))
    md.append("\n## Where the temperature goes: every sample (format 1) vs the model average (format 2), "
              "ARC-E held-out, summed scores\n")
    md.append("| sigma | T | placement | ACC % | NLL | mean MI | AUROC err MI |")
    md.append("|---|---|---|---|---|---|---|")
    p = probabilities(scores, False)
    for name in ("TFB paper `nll` + T", "TFB `cv-nll` (sigma and T together)"):
        r = report["sum"]["rows"][name]
        sp, y = p[r["sigma"]]["arc_easy_heldout"], labels["arc_easy_heldout"]
        for placement, m in (("every sample", metrics(temper(sp, r["T"]), y)), ("model average", metrics(sp, y, r["T"]))):
            md.append(f"| {r['sigma']:g} | {r['T']:.3g} | {placement} | {m['acc'] * 100:.1f} | {m['nll']:.4f} "
                      f"| {m['mean_mi']:.2e} | {m['auroc_err_mi']:.3f} |")
    md.append("\n## Mutual information on `arc_easy:cal` (all 200), summed scores, the demo's sigma: "
              "the drift alert's threshold (docs/operations.md)\n")
    r = report["sum"]["rows"]["TFB `cv-nll` (sigma and T together)"]
    mi = decompose(probabilities(scores, False)[r["sigma"]]["cal"]).mutual_information
    q = torch.quantile(mi, torch.tensor([0.5, 0.9, 0.99], dtype=mi.dtype)).tolist()
    report["sum"]["cal_mi_quantiles"] = q
    md.append(f"sigma {r['sigma']:g}: MI p50 {q[0]:.2g}, p90 {q[1]:.2g}, p99 {q[2]:.2g} nats")
    md.append("\n## The conformal split's luck: coverage at 0.9 on ARC-E held-out over 50 seeded calibration splits\n")
    for key in ("sum", "mean"):
        r = report[key]["rows"]["TFB `cv-nll` (sigma and T together)"]
        p = probabilities(scores, key == "mean")
        covs = []
        for seed in range(50):
            _, held_s = holdout_split(len(labels["cal"]), FRACTION, seed)
            cal = calibrate(p[r["sigma"]]["cal"][held_s], labels["cal"][held_s], r["T"])
            sp = p[r["sigma"]]["arc_easy_heldout"]
            covs.append(set_metrics(decompose(sp, r["T"]).probs, labels["arc_easy_heldout"], cal,
                                    valid=sp.amax(1) > 0)["0.9"]["coverage"])
        c = torch.tensor(covs)
        report[key]["coverage_over_splits"] = covs
        md.append(f"- {key} scores (sigma {r['sigma']:g}, T {r['T']:.3g}, sigma and T kept fixed): mean "
                  f"{c.mean() * 100:.1f}%, min {c.min() * 100:.1f}%, max {c.max() * 100:.1f}%, "
                  f"{(c > 0.95).double().mean() * 100:.0f}% of splits above 95%, "
                  f"{(c < 0.87).double().mean() * 100:.0f}% below 87%")
    (folder / "table.md").write_text("\n".join(md) + "\n")
    (folder / "table.json").write_text(json.dumps(report, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
