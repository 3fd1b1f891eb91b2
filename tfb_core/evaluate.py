"""``tfb eval``: the deterministic adapter and the TFB posterior side by side (TFB_SPEC §5).

Both are scored on the same items: the deterministic adapter is sigma = 0 with K = 1 (the MLE
baseline), the posterior is its sigma with K weight samples. Items may have different numbers
of choices: per-sample probabilities are padded with zeros to the largest C (zero-probability
choices change no metric).

Temperature scaling divides every weight sample's choice logits by T before the softmax
(``p_k^T = softmax(log p_k / T)``), then averages the samples; T is fitted by minimising the
NLL on labelled calibration items.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import torch

from .data import MCItem
from .scoring import parse_mode, score_items
from .uncertainty import accuracy, auroc, brier, decompose, ece, nll, reliability, risk_coverage

METRIC_KEYS = ("acc", "ece", "nll", "brier", "mean_pe", "mean_mi", "aurc_mi", "aurc_pe",
               "auroc_err_mi", "auroc_err_pe", "auroc_err_maxprob")


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


def temper(sample_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` per sample over the last axis; padded zeros stay zero."""
    if temperature == 1.0:
        return sample_probs
    logp = torch.log(sample_probs.double().clamp_min(1e-300)) / temperature
    logp = torch.where(sample_probs > 0, logp, torch.full_like(logp, -math.inf))
    return torch.softmax(logp, -1).to(sample_probs.dtype)


def fit_temperature(sample_probs: torch.Tensor, labels: torch.Tensor,
                    lo: float = 0.05, hi: float = 20.0) -> float:
    """The T that minimises the NLL of the model average of tempered samples (1-D search).

    A log-spaced grid, then golden-section refinement around its best point.
    """
    def loss(t: float) -> float:
        return nll(temper(sample_probs, t).mean(1), labels)

    grid = torch.logspace(math.log10(lo), math.log10(hi), 61).tolist()
    values = [loss(t) for t in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(40):
        if loss(math.exp(c)) < loss(math.exp(d)):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return math.exp((a + b) / 2)


def metrics(sample_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Every metric of ``METRIC_KEYS`` for per-sample probabilities (N, K, C) and labels (N,).

    acc is a fraction, ece x100 (15 bins); PE and MI in nats; aurc_* the area under the
    risk-coverage curve when rejecting by MI / PE (lower is better); auroc_err_* how well a
    score ranks wrong answers above right ones (max-probability ranks by 1 - max p).
    """
    u = decompose(sample_probs.double())
    p = u.probs
    wrong = p.argmax(-1) != labels
    return {
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


def ood_metrics(in_probs: torch.Tensor, out_probs: torch.Tensor) -> dict:
    """AUROC of MI, PE and 1 - max p for telling out-of-distribution items (positives) apart."""
    u_in, u_out = decompose(in_probs.double()), decompose(out_probs.double())
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


def evaluate(post, items: Sequence[MCItem], mode: str = "letter", num_samples: int = 10,
             seed: int | None = None, sigma: float | None = None, chat: bool = False,
             temperature: float = 1.0, ood_items: Sequence[MCItem] | None = None,
             batch_size: int = 8, progress: bool = True) -> dict:
    """Score ``items`` with the deterministic adapter and with the posterior; the JSON report.

    Returns ``{"n", "deterministic", "tfb", "ood", "sigma", "samples", "mode", ...}`` plus, under
    ``"_raw"``, the per-sample probabilities (for plots; dropped from the JSON).
    """
    sigma = post.sigma if sigma is None else sigma
    seed = post.config.seed if seed is None else seed
    labels = labels_of(items)
    common = dict(mode=mode, seed=seed, chat=chat, batch_size=batch_size, progress=progress)
    det = score_mixed(post, items, num_samples=1, sigma=0.0, desc="deterministic", **common)
    tfb = score_mixed(post, items, num_samples=num_samples, sigma=sigma, desc=f"TFB K={num_samples}", **common)
    det, tfb = temper(det, temperature), temper(tfb, temperature)
    report = {"n": len(items), "deterministic": metrics(det, labels), "tfb": metrics(tfb, labels),
              "ood": None, "sigma": float(sigma), "samples": int(num_samples), "mode": parse_mode(mode).value,
              "chat": bool(chat), "seed": int(seed), "temperature": float(temperature)}
    raw = {"labels": labels, "deterministic": det, "tfb": tfb}
    if ood_items:
        ood = temper(score_mixed(post, ood_items, num_samples=num_samples, sigma=sigma, desc="OOD", **common),
                     temperature)
        report["ood"] = ood_metrics(tfb, ood)
        report["ood"]["n"] = len(ood_items)
        raw["ood"] = ood
    report["_raw"] = raw
    return report


def format_table(report: dict) -> str:
    """The side-by-side table printed by ``tfb eval``."""
    rows = [("ACC (%)", "acc", 100), ("ECE (x100, 15 bins)", "ece", 1), ("NLL", "nll", 1),
            ("Brier", "brier", 1), ("mean PE (nats)", "mean_pe", 1), ("mean MI (nats)", "mean_mi", 1),
            ("AURC by MI", "aurc_mi", 1), ("AURC by PE", "aurc_pe", 1),
            ("AUROC wrong: MI", "auroc_err_mi", 1), ("AUROC wrong: PE", "auroc_err_pe", 1),
            ("AUROC wrong: max p", "auroc_err_maxprob", 1)]
    head = (f"n={report['n']} mode={report['mode']} chat={report.get('chat', False)} "
            f"sigma={report['sigma']:.4g} K={report['samples']}"
            + (f" T={report['temperature']:.3g}" if report.get("temperature", 1.0) != 1.0 else ""))
    lines = [head, f"{'metric':<22}{'deterministic':>15}{'TFB':>12}"]
    for label, key, scale in rows:
        d, t = report["deterministic"][key], report["tfb"][key]
        lines.append(f"{label:<22}{_fmt(d, scale):>15}{_fmt(t, scale):>12}")
    if report.get("ood"):
        o = report["ood"]
        lines.append(f"OOD AUROC (n_out={o.get('n', '?')}): MI {o['auroc_mi']:.3f}  PE {o['auroc_pe']:.3f}"
                     + (f"  max p {o['auroc_maxprob']:.3f}" if "auroc_maxprob" in o else ""))
    return "\n".join(lines)


def _fmt(x: float, scale: float) -> str:
    return "nan" if x is None or x != x else f"{x * scale:.4f}" if scale == 1 else f"{x * scale:.2f}"


def write_json(report: dict, path) -> None:
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    with open(path, "w") as f:
        json.dump(clean, f, indent=2, allow_nan=True)


def plot(report: dict, path) -> None:
    """Reliability diagrams of both and MI histograms in and out of distribution (PNG)."""
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
