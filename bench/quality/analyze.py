"""Every row of the quality table from the raw per-sample probabilities of ``gpu_run.py``.

    python bench/quality/analyze.py RUN_DIR   # reads RUN_DIR/raw.pt and results.json

Writes RUN_DIR/table.md and RUN_DIR/table.json. Temperatures are fitted on the labelled
calibration split (``arc_easy:cal``) only; nothing is fitted on an evaluation set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tfb_core.evaluate import fit_temperature, metrics, ood_metrics, temper  # noqa: E402

IN_SETS = ("arc_easy_heldout", "arc_challenge")
SHIFT = ("openbookqa",)
OOD = ("piqa", "hellaswag")


def nll_of(sample_probs, labels) -> float:
    p = sample_probs.mean(1).double().gather(1, labels[:, None]).clamp_min(1e-12)
    return -torch.log(p).mean().item()


def main(run: Path) -> None:
    raw = torch.load(run / "raw.pt")
    res = json.loads((run / "results.json").read_text())
    labels, probs = raw["labels"], raw["probs"]
    searches = res.get("searches", {})
    extra_file = Path(sys.argv[2]) if len(sys.argv) > 2 else run / "raw_extra.pt"
    if extra_file.is_file():  # run 3 (gpu_extra.py): cal scan + in-domain sets at more sigmas
        extra = torch.load(extra_file)
        for sig, sets in extra["probs"].items():
            probs.setdefault(sig, {}).update(sets)
        for sig, p in extra["cal_scan"].items():
            if sig in probs:
                probs[sig]["cal"] = p
            raw["cal_scan"][sig] = p
        y = labels["cal"]
        scan = {sig: nll_of(p, y) for sig, p in raw["cal_scan"].items()}
        res["nll_min_cal_sigma"] = min(scan, key=scan.get)
        res["cal_scan_nll"] = scan
        print("cal scan NLL:", {f"{k:.4g}": round(v, 4) for k, v in sorted(scan.items())})

    rows = [("MLE (deterministic, K=1)", 0.0, 1.0, "-")]
    names = {"nll_train_pseudo": "TFB nll eps=0.003, train questions, pseudo-labels (paper)",
             "acc_train_pseudo": "TFB accuracy eps=0.01, train questions, pseudo-labels (paper)",
             "nll_cal_pseudo": "TFB nll eps=0.003, held-out cal split, pseudo-labels",
             "acc_cal_gold": "TFB accuracy eps=0.01, held-out cal split, gold labels"}
    for key, label in names.items():
        if key in searches and searches[key]["sigma"] in probs and "cal" in probs[searches[key]["sigma"]]:
            rows.append((label, searches[key]["sigma"], 1.0, key))
    s_min = res.get("nll_min_cal_sigma")
    if s_min in probs:
        rows.append(("TFB sigma = argmin NLL on labelled cal split", s_min, 1.0, "nll_min"))
    # temperature scaling on the calibration split, alone and on top of TFB
    t_mle = fit_temperature(probs[0.0]["cal"], labels["cal"])
    if 0.013 in probs and "cal" in probs[0.013] and "acc_train_pseudo" not in [r[3] for r in rows]:
        rows.append((names["acc_train_pseudo"], 0.013, 1.0, "acc_train_pseudo"))
    rows.append((f"MLE + temperature (T={t_mle:.3g}, fit on cal)", 0.0, t_mle, "temp"))
    for key in ("nll_min", "nll_cal_pseudo", "nll_train_pseudo"):
        sig = s_min if key == "nll_min" else searches.get(key, {}).get("sigma")
        if sig in probs:
            t = fit_temperature(probs[sig]["cal"], labels["cal"])
            rows.append((f"TFB ({key}) + temperature (T={t:.3g}, fit on cal)", sig, t, f"{key}+temp"))

    table = []
    for label, sigma, temp, key in rows:
        p = probs[sigma]
        entry = {"row": label, "key": key, "sigma": sigma, "temperature": temp,
                 "K": int(p["cal"].shape[1]), "sets": {}}
        for name in IN_SETS + SHIFT + ("cal",):
            if name in p:
                entry["sets"][name] = metrics(temper(p[name], temp), labels[name])
        if not all(n in p for n in IN_SETS):
            table.append(entry)
            continue
        inn = torch.cat([temper(p[n], temp) for n in IN_SETS], 0) if len({p[n].shape[-1] for n in IN_SETS}) == 1 \
            else None
        if inn is None:  # pad to the same number of choices
            c = max(p[n].shape[-1] for n in IN_SETS)
            inn = torch.cat([torch.nn.functional.pad(temper(p[n], temp), (0, c - p[n].shape[-1])) for n in IN_SETS])
        entry["ood"] = {o: ood_metrics(inn, temper(p[o], temp)) for o in OOD if o in p}
        table.append(entry)
    (run / "table.json").write_text(json.dumps(table, indent=2))

    lines = []
    for name in IN_SETS + SHIFT:
        lines += [f"\n### {name} (n={len(labels[name])})\n",
                  "| row | sigma | T | K | ACC % | ECE | NLL | Brier | AUROC err MI | AUROC err PE | AUROC err max p | AURC (PE) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in table:
            if name not in e["sets"]:
                continue
            m = e["sets"][name]
            lines.append(f"| {e['row']} | {e['sigma']:.4g} | {e['temperature']:.3g} | {e['K']} | {m['acc'] * 100:.1f} | "
                         f"{m['ece']:.2f} | {m['nll']:.3f} | {m['brier']:.3f} | {m['auroc_err_mi']:.3f} | "
                         f"{m['auroc_err_pe']:.3f} | {m['auroc_err_maxprob']:.3f} | {m['aurc_pe']:.3f} |")
    lines += ["\n### OOD: in = ARC-E held-out + ARC-C, out = PIQA / HellaSwag (first 300 each)\n",
              "| row | PIQA AUROC MI | PIQA AUROC PE | HellaSwag AUROC MI | HellaSwag AUROC PE |", "|---|---|---|---|---|"]
    for e in table:
        o = e.get("ood") or {}
        if len(o) < 2:
            continue
        lines.append(f"| {e['row']} | {o['piqa']['auroc_mi']:.3f} | {o['piqa']['auroc_pe']:.3f} | "
                     f"{o['hellaswag']['auroc_mi']:.3f} | {o['hellaswag']['auroc_pe']:.3f} |")
    (run / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
