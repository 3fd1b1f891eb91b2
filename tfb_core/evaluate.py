"""``tfb eval``: the deterministic adapter and the TFB posterior side by side (docs/method.md §7).

Scored on the same items: the deterministic adapter is sigma = 0 with K = 1 (the MLE
baseline, never tempered), the posterior is its sigma with K weight samples, first as it is and
then with its temperature on the model average (``softmax(log(mean_k p_k) / T)``: the served
probabilities; PE, EE and MI always come from the untempered samples). Items may have
different numbers of choices: per-sample probabilities are padded with zeros to the largest C
(zero-probability choices change no metric). A posterior with a held-out calibration also
gets its prediction sets' coverage and size, and its abstention's risk and coverage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .artifacts import Inputs, write_output_file
from .confidence import Confidence, log_loss
from .conformal import Calibration, decide, prediction_set, threshold
from .data import MCItem
from .options import Metric
from .scoring import parse_mode, score_items
from .uncertainty import (accuracy, auroc, binary_ece, brier, decompose, ece, fit_temperature, nll,
                          reliability, risk_coverage, temper)

__all__ = ["evaluate", "metrics", "ood_metrics", "set_metrics", "fit_temperature", "temper", "score_mixed",
           "per_item"]

METRIC_KEYS = ("acc", "ece", "nll", "brier", "mean_pe", "mean_mi", "aurc_mi", "aurc_pe",
               "auroc_err_mi", "auroc_err_pe", "auroc_err_maxprob", "auroc_err_confidence", "ece_confidence",
               "log_loss_confidence", "aurc_confidence")


def score_mixed(post, items: Sequence[MCItem], mode: str = "letter", num_samples: int = 1,
                seed: int = 0, sigma: float = 0.0, chat: bool = False, batch_size: int = 8,
                length_normalize: bool = False, progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Per-sample choice probabilities (N, K, C_max) for items with any numbers of choices.

    Items are grouped by their number of choices (each group in ``score_items`` batches); the
    output is in the input order, padded with zeros.
    """
    mode = parse_mode(mode)
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(len(it.choices), []).append(i)
    c_max = max(groups)
    out = torch.zeros(len(items), num_samples, c_max)
    for c, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        probs = score_items(post, [items[i] for i in idx], mode=mode, num_samples=num_samples, seed=seed,
                            sigma=sigma, batch_size=batch_size, chat=chat,
                            length_normalize=length_normalize, progress=progress, desc=desc)
        out[idx, :, :c] = probs
    return out


def metrics(sample_probs: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
            confidence: Confidence | None = None) -> dict:
    """Every metric of ``METRIC_KEYS`` for per-sample probabilities (N, K, C) and labels (N,).

    acc is a fraction, ece x100 (15 bins); PE and MI in nats; aurc_* the area under the
    risk-coverage curve when rejecting by MI / PE / confidence (lower is better); auroc_err_*
    how well a score ranks wrong answers above right ones (max-probability ranks by 1 - max p,
    confidence by 1 - confidence). The temperature tempers the model average (ACC, ECE, NLL,
    Brier, max p), never PE or MI. ``confidence`` (default: the tempered max p) is scored by
    its AUROC, ECE and log loss as P(the prediction is right).
    """
    u = decompose(sample_probs.double(), temperature)
    p = u.probs
    wrong = p.argmax(-1) != labels
    conf = (confidence or Confidence()).of(sample_probs, temperature)
    return {
        "auroc_err_confidence": auroc(-conf, wrong),
        "ece_confidence": binary_ece(conf, ~wrong),
        "log_loss_confidence": log_loss(conf, (~wrong).double()),
        "aurc_confidence": risk_coverage(-conf, ~wrong)[2],
        "acc": accuracy(p, labels),
        "ece": ece(p, labels),
        "nll": nll(p, labels),
        "brier": brier(p, labels),
        "mean_pe": u.predictive_entropy.mean().item(),
        "mean_mi": u.mutual_information.mean().item(),
        "aurc_mi": risk_coverage(u.mutual_information, ~wrong)[2],
        "aurc_pe": risk_coverage(u.predictive_entropy, ~wrong)[2],
        "auroc_err_mi": auroc(u.mutual_information, wrong),
        "auroc_err_pe": auroc(u.predictive_entropy, wrong),
        "auroc_err_maxprob": auroc(-p.max(-1).values, wrong),
    }


def ood_metrics(in_probs: torch.Tensor, out_probs: torch.Tensor, temperature: float = 1.0) -> dict:
    """AUROC of MI, PE and 1 - max p for telling out-of-distribution items (positives) apart."""
    u_in, u_out = decompose(in_probs.double(), temperature), decompose(out_probs.double(), temperature)
    is_out = torch.cat([torch.zeros(len(in_probs)), torch.ones(len(out_probs))]).bool()
    return {
        "auroc_mi": auroc(torch.cat([u_in.mutual_information, u_out.mutual_information]), is_out),
        "auroc_pe": auroc(torch.cat([u_in.predictive_entropy, u_out.predictive_entropy]), is_out),
        "auroc_maxprob": auroc(-torch.cat([u_in.probs.max(-1).values, u_out.probs.max(-1).values]), is_out),
    }


def labels_of(items: Sequence[MCItem]) -> torch.Tensor:
    missing = [i for i, it in enumerate(items) if it.answer is None]
    if missing:
        from .errors import TFBError

        raise TFBError(f"evaluation needs an 'answer' for every item; item {missing[0]} has none")
    return torch.tensor([it.answer for it in items])


COVERAGES = (0.8, 0.9, 0.95)


def set_metrics(probs: torch.Tensor, labels: torch.Tensor, cal: Calibration,
                coverages: Sequence[float] = COVERAGES, valid: torch.Tensor | None = None) -> dict:
    """Empirical coverage and mean size of the prediction sets at each coverage.

    probs (N, C): the served (tempered) model average; ``valid`` (N, C) marks real choices
    (padding is never in a set). A coverage the calibration is too small for maps to None.
    """
    from .conformal import in_set
    from .errors import TFBError

    valid = torch.ones_like(probs, dtype=torch.bool) if valid is None else valid
    out = {}
    for c in coverages:
        try:
            q = threshold(cal.scores, c)
        except TFBError:
            out[f"{c:g}"] = None
            continue
        member = in_set(probs, q, cal.score) & valid
        sizes = member.sum(-1).double()
        out[f"{c:g}"] = {"coverage": member.gather(1, labels[:, None]).double().mean().item(),
                         "size": sizes.mean().item(), "singletons": (sizes == 1).double().mean().item()}
    return out


def abstention_metrics(sample_probs: torch.Tensor, labels: torch.Tensor, cal: Calibration,
                       temperature: float = 1.0, max_risk: float | None = None,
                       confidence: Confidence | None = None) -> dict:
    """Risk (error rate among answered) and coverage (fraction answered) of the abstention rule.

    ``threshold``: answer when the calibrated score (confidence, MI or PE) passes the
    certified threshold (what /v1/choices returns as ``abstain``); ``with_sets``: also abstain
    when the prediction set at the calibration's coverage is not a single choice (``--abstain-on-set``).
    """
    u = decompose(sample_probs.double(), temperature)
    rule = cal.risk_threshold(max_risk)
    conf = (confidence or Confidence()).of(sample_probs, temperature)
    scores = {Metric.MI.value: u.mutual_information, Metric.PE.value: u.predictive_entropy,
              Metric.CONFIDENCE.value: conf}
    values = scores[cal.abstain_on]
    doubt = 1.0 - values if cal.abstain_on == Metric.CONFIDENCE.value else values
    correct = u.probs.argmax(-1) == labels
    accept = doubt <= rule.threshold if rule.threshold is not None else torch.zeros_like(correct)
    decisions = [decide(cal, p, {k: float(v[i]) for k, v in scores.items()}, risk=rule, abstain_on_set=True)
                 for i, p in enumerate(u.probs)]
    accept_sets = torch.tensor([not d.abstain for d in decisions])

    def summary(mask: torch.Tensor) -> dict:
        n = int(mask.sum())
        return {"coverage": n / len(mask), "risk": (~correct[mask]).double().mean().item() if n else None}

    return {"metric": cal.abstain_on, "max_risk": rule.max_risk, "delta": rule.delta,
            "threshold": rule.threshold, "calibration_bound": rule.risk_bound, "calibration_n": rule.n,
            "threshold_rule": summary(accept), "with_sets": summary(accept_sets)}


def evaluate(post, items: Sequence[MCItem], mode: str = "letter", num_samples: int = 10,
             seed: int | None = None, sigma: float | None = None, chat: bool = False,
             temperature: float = 1.0, ood_items: Sequence[MCItem] | None = None,
             batch_size: int = 8, progress: bool = True, length_normalize: bool = False,
             calibration: Calibration | None = None, coverages: Sequence[float] = COVERAGES,
             max_risk: float | None = None, confidence: Confidence | None = None) -> dict:
    """Score ``items`` with the deterministic adapter and with the posterior; the JSON report.

    Returns ``{"n", "deterministic", "tfb", "tfb_tempered", "sets", "abstention", "ood", ...}``
    plus, under ``"_raw"``, the per-sample probabilities (for plots; dropped from the JSON).
    ``calibration`` (the posterior's held-out calibration) adds the prediction sets' coverage
    and size at ``coverages`` and the abstention's risk and coverage.
    """
    sigma = post.sigma if sigma is None else sigma
    seed = post.config.seed if seed is None else seed
    labels = labels_of(items)
    common = dict(mode=mode, seed=seed, chat=chat, batch_size=batch_size, progress=progress,
                  length_normalize=length_normalize)
    det = score_mixed(post, items, num_samples=1, sigma=0.0, desc="deterministic", **common)
    tfb = score_mixed(post, items, num_samples=num_samples, sigma=sigma, desc=f"TFB K={num_samples}", **common)
    report = {"n": len(items), "deterministic": metrics(det, labels), "tfb": metrics(tfb, labels),
              "tfb_tempered": metrics(tfb, labels, temperature) if temperature != 1.0 else None,
              "tfb_confidence": metrics(tfb, labels, temperature, confidence) if confidence else None,
              "confidence_model": (confidence or Confidence()).model,
              "sets": None, "abstention": None, "ood": None,
              "sigma": float(sigma), "samples": int(num_samples), "mode": parse_mode(mode).value,
              "chat": bool(chat), "seed": int(seed), "temperature": float(temperature),
              "length_normalize": bool(length_normalize)}
    if calibration is not None:
        served = decompose(tfb.double(), temperature).probs
        report["sets"] = set_metrics(served, labels, calibration, coverages, valid=tfb.amax(1) > 0)
        report["abstention"] = abstention_metrics(tfb, labels, calibration, temperature, max_risk, confidence)
    raw = {"labels": labels, "deterministic": det, "tfb": tfb}
    if ood_items:
        ood = score_mixed(post, ood_items, num_samples=num_samples, sigma=sigma, desc="OOD", **common)
        report["ood"] = ood_metrics(tfb, ood, temperature)
        report["ood"]["n"] = len(ood_items)
        raw["ood"] = ood
    report["_raw"] = raw
    return report


def per_item(report: dict, items: Sequence[MCItem]) -> list[dict]:
    """One row per item of the posterior's answers: id, answer, prediction, served probabilities
    (tempered), PE, MI and the item's metadata (the JSONL file's other fields)."""
    tfb = report["_raw"]["tfb"]
    u = decompose(tfb.double(), report["temperature"])
    rows = []
    for i, it in enumerate(items):
        c = len(it.choices)
        probs = u.probs[i, :c]
        rows.append({"index": i, "id": it.id, "answer": it.answer, "prediction": int(probs.argmax()),
                     "probs": [round(float(x), 6) for x in probs],
                     "predictive_entropy": float(u.predictive_entropy[i]),
                     "mutual_information": float(u.mutual_information[i]), "metadata": it.metadata})
    return rows


def format_table(report: dict) -> str:
    """The side-by-side table printed by ``tfb eval``."""
    rows = [("ACC (%)", "acc", 100), ("ECE (x100, 15 bins)", "ece", 1), ("NLL", "nll", 1),
            ("Brier", "brier", 1), ("mean PE (nats)", "mean_pe", 1), ("mean MI (nats)", "mean_mi", 1),
            ("AURC by MI", "aurc_mi", 1), ("AURC by PE", "aurc_pe", 1),
            ("AUROC wrong: MI", "auroc_err_mi", 1), ("AUROC wrong: PE", "auroc_err_pe", 1),
            ("AUROC wrong: max p", "auroc_err_maxprob", 1), ("AUROC wrong: conf.", "auroc_err_confidence", 1),
            ("ECE of confidence", "ece_confidence", 1), ("AURC by confidence", "aurc_confidence", 1)]
    columns = [("deterministic", "deterministic"), ("TFB", "tfb")]
    if report.get("tfb_tempered"):
        columns.append((f"TFB + T={report['temperature']:.3g}", "tfb_tempered"))
    if report.get("tfb_confidence"):
        columns.append((f"+ {report['confidence_model']}", "tfb_confidence"))
    head = (f"n={report['n']} mode={report['mode']} chat={report.get('chat', False)} "
            f"length_normalize={report.get('length_normalize', False)} sigma={report['sigma']:.4g} "
            f"K={report['samples']} (deterministic: sigma 0, K 1, no temperature; T tempers the model "
            f"average only, PE and MI are the samples'; confidence: the tempered max p, or the learned "
            f"model in the last column)")
    lines = [head, f"{'metric':<22}" + "".join(f"{name:>17}" for name, _ in columns)]
    for label, key, scale in rows:
        lines.append(f"{label:<22}" + "".join(f"{_fmt(report[col][key], scale):>17}" for _, col in columns))
    if report.get("sets"):
        for c, m in report["sets"].items():
            lines.append(f"prediction sets at {c}: " + ("too few calibration scores" if m is None else
                         f"coverage {m['coverage'] * 100:.1f}%, mean size {m['size']:.2f}, "
                         f"singletons {m['singletons'] * 100:.1f}%"))
    if report.get("abstention"):
        a = report["abstention"]
        if a["threshold"] is None:
            rule = "no certified threshold (abstain on every answer)"
        elif a["metric"] == "confidence":
            rule = f"confidence >= {1 - a['threshold']:.4g}"
        else:
            rule = f"{a['metric']} <= {a['threshold']:.4g}"
        for name, key in (("threshold", "threshold_rule"), ("threshold + singleton set", "with_sets")):
            m = a[key]
            risk = "n/a" if m["risk"] is None else f"{m['risk'] * 100:.1f}%"
            lines.append(f"abstention ({name}; {rule}; target risk {a['max_risk']:g}): "
                         f"answered {m['coverage'] * 100:.1f}%, error rate among answered {risk}")
    if report.get("ood"):
        o = report["ood"]
        lines.append(f"OOD AUROC (n_out={o.get('n', '?')}): MI {o['auroc_mi']:.3f}  PE {o['auroc_pe']:.3f}"
                     + (f"  max p {o['auroc_maxprob']:.3f}" if "auroc_maxprob" in o else ""))
    return "\n".join(lines)


def _fmt(x: float, scale: float) -> str:
    return "nan" if x is None or x != x else f"{x * scale:.4f}" if scale == 1 else f"{x * scale:.2f}"


def write_json(report: dict, path, *, inputs: Inputs = (), flag: str = "output file") -> None:
    """The report as JSON, written to a temporary file beside ``path`` and renamed (never over an
    input: :func:`tfb_core.artifacts.write_output_file`)."""
    clean = {k: v for k, v in report.items() if not k.startswith("_")}

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(clean, f, indent=2, allow_nan=True)

    write_output_file(path, write, inputs=inputs, flag=flag)


def plot(report: dict, path, *, inputs: Inputs = (), flag: str = "output file") -> None:
    """Reliability diagrams of both and MI histograms in and out of distribution (PNG), written
    like :func:`write_json`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = report["_raw"]
    labels = raw["labels"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in ((axes[0], "deterministic", "deterministic (MLE)"),
                           (axes[1], "tfb", f"TFB (sigma={report['sigma']:.3g}, K={report['samples']})")):
        p = raw[key].double().mean(1)
        rel = reliability(p, labels)
        edges = torch.linspace(0, 1, len(rel["count"]) + 1)
        width = float(edges[1] - edges[0])
        accs = [a if a is not None else 0.0 for a in rel["accuracy"]]
        ax.bar(edges[:-1].tolist(), accs, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{title}\nACC {report[key]['acc'] * 100:.1f}%  ECE {report[key]['ece']:.2f}")
        ax.legend(loc="upper left")
    ax = axes[2]
    mi_in = decompose(raw["tfb"].double()).mutual_information
    bins = 30
    hi = float(mi_in.max()) if len(mi_in) else 1.0
    if "ood" in raw:
        mi_out = decompose(raw["ood"].double()).mutual_information
        hi = max(hi, float(mi_out.max()))
        ax.hist(mi_out.tolist(), bins=bins, range=(0, hi or 1), alpha=0.6, density=True, label="out of distribution")
    ax.hist(mi_in.tolist(), bins=bins, range=(0, hi or 1), alpha=0.6, density=True, label="in distribution")
    ax.set(xlabel="mutual information (nats)", ylabel="density", title="TFB epistemic uncertainty (MI)")
    ax.legend()
    fig.tight_layout()
    try:
        write_output_file(path, lambda tmp: fig.savefig(tmp, dpi=110), inputs=inputs, flag=flag)
    finally:
        plt.close(fig)
