"""Everything ``tfb bayesianize`` (and a start-up search) fits on a calibration set.

1. With labels on every item, a seeded ``holdout`` fraction is set aside; the rest fits.
2. sigma by the criterion (docs/method.md §4) on the fitting items; ``auto`` is ``cv-nll`` (sigma and
   the temperature together) when every item has an answer, else the paper's ``nll``.
3. The temperature of the model average, fitted on the fitting items when they are labelled
   (``cv-nll`` fits it with sigma).
4. The learned confidence (:mod:`tfb_core.confidence`), cross-fitted on the labelled fitting
   items at the chosen sigma and T.
5. On the held-out items, scored exactly as traffic will be (same K, seed, scoring, T): the
   conformal scores and the per-item uncertainty, confidence and correctness
   (:mod:`tfb_core.conformal`), from which prediction sets at any coverage and an abstention
   threshold at any risk follow.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch

from .confidence import fit_confidence
from .conformal import calibrate, holdout_split
from .data import MCItem
from .errors import TFBError
from .options import DELTA, HOLDOUT, SearchConfig
from .scoring import score_items
from .search import LABELLED, Criterion, SearchResult, parse_criterion
from .uncertainty import fit_temperature

log = logging.getLogger(__name__)

AUTO = Criterion.AUTO


def resolve_criterion(criterion: Criterion | str, items: Sequence[MCItem]) -> Criterion:
    """``auto``: ``cv-nll`` when every item has an answer, else ``nll``."""
    criterion = parse_criterion(criterion)
    if criterion is Criterion.AUTO:
        return Criterion.CV_NLL if all(it.answer is not None for it in items) else Criterion.NLL
    return criterion


def unlabelled(items: Sequence[MCItem]) -> int | None:
    """The index of the first item without an answer, or None."""
    return next((i for i, it in enumerate(items) if it.answer is None), None)


def fit_posterior(post, items: Sequence[MCItem], config: SearchConfig | None = None, *,
                  delta: float = DELTA, progress: bool = True, **options) -> SearchResult:
    """Search sigma, fit T, record the held-out calibration; sets ``post.config``.

    config : SearchConfig, default=None
        What to fit and how (:class:`SearchConfig`'s defaults when None).
    options : fields of :class:`SearchConfig` overriding ``config`` (``criterion="nll"``,
        ``num_samples=4``, ...), and the other keyword arguments of
        :func:`tfb_core.search.search_sigma` (``rtol``, ``folds``, ...).
    delta : float, default=0.05
        Abstention thresholds are certified with confidence ``1 - delta``.
    """
    names = SearchConfig.__dataclass_fields__
    cfg = replace(config or SearchConfig(), **{k: v for k, v in options.items() if k in names})
    search = {k: v for k, v in options.items() if k not in names}
    search.update(eps=cfg.eps, max_acc_drop=cfg.max_acc_drop, gold_labels=cfg.gold_labels,
                  sigma_grid=cfg.sigma_grid)
    if not items:
        raise TFBError("the calibration set is empty")
    crit = resolve_criterion(cfg.criterion, items)
    missing = unlabelled(items)
    if crit in LABELLED and missing is not None:
        raise TFBError(f"criterion {crit.value!r} needs an 'answer' on every calibration item; "
                       f"item {missing + 1} has none")
    holdout = (HOLDOUT if missing is None else 0.0) if cfg.holdout is None else cfg.holdout
    if holdout > 0 and missing is not None:
        raise TFBError(f"prediction sets and abstention need an 'answer' on every calibration item; "
                       f"item {missing + 1} has none")
    fit_idx, held_idx = holdout_split(len(items), holdout, cfg.seed) if holdout > 0 else (list(range(len(items))), [])
    fit_items = [items[i] for i in fit_idx]
    common = dict(num_samples=cfg.num_samples, seed=cfg.seed, mode=cfg.mode, chat=cfg.chat,
                  length_normalize=cfg.length_normalize, batch_size=cfg.batch_size)
    log.info("calibration: %d items fit sigma%s, %d are held out for prediction sets and abstention",
             len(fit_items), " and T" if missing is None and cfg.temperature else "", len(held_idx))
    result = post.search(fit_items, criterion=crit, progress=progress, **common, **search)
    post.config.length_normalize = cfg.length_normalize
    labelled = unlabelled(fit_items) is None
    fit_probs = score_items(post, fit_items, desc="fitting items", **common) if labelled else None
    fit_labels = torch.tensor([it.answer for it in fit_items]) if labelled else None
    if result.temperature is None:
        post.config.temperature = 1.0
        if cfg.temperature and labelled:
            post.config.temperature = fit_temperature(fit_probs.mean(1), fit_labels)
    elif not cfg.temperature:
        post.config.temperature = 1.0
    log.info("calibration: sigma = %.6g, T = %.4g", post.sigma, post.config.temperature)
    confidence = fit_confidence(fit_probs, fit_labels, post.config.temperature, seed=cfg.seed) if labelled else None
    post.config.confidence = None if confidence is None else confidence.to_dict()
    if confidence is not None:
        log.info("calibration: confidence %s (cross-fitted log loss %s on %d fitting items)", confidence.model,
                 ", ".join(f"{k} {v:.4f}" for k, v in confidence.cv_log_loss.items()) or "-", confidence.n)
    post.config.calibration = None
    if held_idx:
        held = [items[i] for i in held_idx]
        sample_probs = score_items(post, held, desc="held-out calibration", **common)
        cal = calibrate(sample_probs, torch.tensor([it.answer for it in held]), post.config.temperature,
                        cfg.score, confidence=confidence, coverage=cfg.coverage, abstain_on=cfg.abstain_on.value,
                        max_risk=cfg.max_risk, delta=delta, abstain_on_set=cfg.abstain_on_set)
        post.config.calibration = cal.to_dict()
        rule = cal.risk_threshold()
        log.info("calibration: %d held-out items; %s threshold for risk <= %g: %s", cal.n, cal.abstain_on,
                 cfg.max_risk, "none certified" if rule.threshold is None else f"{rule.threshold:.4g}")
    return result
