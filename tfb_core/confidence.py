"""A learned confidence: P(the served prediction is right), from what the posterior computes anyway.

Per item, from the K weight samples' choice probabilities ``(K, C)`` and the temperature:

- ``log_max_prob``: log of the tempered model average's largest probability;
- ``margin``: its largest minus its second largest probability;
- ``predictive_entropy``, ``expected_entropy``, ``mutual_information``: the untempered samples'
  (:func:`tfb_core.uncertainty.decompose`);
- ``agreement``: the share of the K samples whose own argmax is the prediction.

Candidate models, chosen by cross-fitted log loss on the labelled fitting items (never on
the held-out calibration items, which later certify the abstention threshold):

- ``max_prob``: the tempered maximum probability as it is (nothing fitted; also what an
  unlabelled posterior serves);
- a logistic regression on one feature (``log_max_prob``: Platt scaling; ``margin``,
  ``predictive_entropy``, ...): the best single score, calibrated;
- ``all``: a logistic regression on every feature (standardised, L2 penalty 1).

The chosen model (``model``: ``max_prob`` or ``logistic``, with its ``features``), its
coefficients and every candidate's cross-fitted log loss are recorded in ``tfb_config.json``
(``confidence``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .errors import TFBError

FEATURES = ("log_max_prob", "margin", "predictive_entropy", "expected_entropy", "mutual_information",
            "agreement")
CANDIDATES = {"max_prob": (), **{f: (f,) for f in FEATURES}, "all": FEATURES}  # name -> its features
MODELS = ("max_prob", "logistic")
FOLDS, L2 = 5, 1.0


def features(sample_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Every item's features: sample_probs (N, K, C) -> (N, len(FEATURES)), float64."""
    from .uncertainty import decompose

    sp = sample_probs.double()
    u = decompose(sp, temperature)
    top = u.probs.topk(min(2, sp.shape[-1]), -1).values  # (N, 2)
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    pred = u.probs.argmax(-1)  # (N,)
    agreement = (sp.argmax(-1) == pred[:, None]).double().mean(1)  # (N,)
    return torch.stack([top[:, 0].clamp_min(1e-300).log(), top[:, 0] - second, u.predictive_entropy,
                        u.expected_entropy, u.mutual_information, agreement], 1)


@dataclass
class Confidence:
    """A fitted confidence model; ``conf(features)`` -> (N,) probabilities that the prediction is right."""

    model: str = "max_prob"  # one of MODELS
    features: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)  # standardisation of each feature
    scale: list[float] = field(default_factory=list)
    coef: list[float] = field(default_factory=list)  # on the standardised features
    intercept: float = 0.0
    cv_log_loss: dict = field(default_factory=dict)  # candidate -> cross-fitted log loss
    n: int = 0  # labelled items it was fitted on

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.double()
        if self.model == "max_prob":
            return feats[:, FEATURES.index("log_max_prob")].exp()
        cols = [FEATURES.index(f) for f in self.features]
        z = (feats[:, cols] - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.scale, dtype=torch.float64)
        return torch.sigmoid(z @ torch.tensor(self.coef, dtype=torch.float64) + self.intercept)

    def of(self, sample_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The confidence of each item's prediction: sample_probs (N, K, C) -> (N,)."""
        return self(features(sample_probs, temperature))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "tfb_config.json") -> "Confidence":
        if not isinstance(data, dict):
            raise TFBError(f"{where}: 'confidence' must be an object, got {type(data).__name__}")
        try:
            conf = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise TFBError(f"{where}: 'confidence' is malformed: {e}") from None
        if conf.model not in MODELS:
            raise TFBError(f"{where}: 'confidence.model' must be one of {', '.join(MODELS)}, got {conf.model!r}")
        if conf.model != "max_prob":
            k = len(conf.features)
            if (not conf.features or any(f not in FEATURES for f in conf.features)
                    or not all(len(v) == k for v in (conf.mean, conf.scale, conf.coef))
                    or not all(math.isfinite(x) for v in (conf.mean, conf.scale, conf.coef) for x in v)
                    or not math.isfinite(conf.intercept) or any(s <= 0 for s in conf.scale)):
                raise TFBError(f"{where}: 'confidence' needs features from {', '.join(FEATURES)} and finite "
                               f"mean, scale (> 0) and coef lists of their length")
        return conf


def fit_logistic(x: torch.Tensor, y: torch.Tensor, names=FEATURES, l2: float = L2) -> Confidence:
    """L2-penalised logistic regression of y (N,) on x (N, F) standardised (``names``: its F
    feature names); float64, L-BFGS; the intercept is not penalised."""
    x, y = x.double(), y.double()
    mean, scale = x.mean(0), x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))  # a constant feature stays 0
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum") + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Confidence(model="logistic", features=list(names), mean=mean.tolist(), scale=scale.tolist(),
                      coef=w.detach().tolist(), intercept=float(b.detach()), n=len(y))


def log_loss(p: torch.Tensor, y: torch.Tensor) -> float:
    p = p.double().clamp(1e-6, 1 - 1e-6)
    y = y.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def _fit_candidate(name: str, x: torch.Tensor, y: torch.Tensor) -> Confidence:
    if name == "max_prob":
        return Confidence(model="max_prob", n=len(y))
    cols = [FEATURES.index(f) for f in CANDIDATES[name]]
    return fit_logistic(x[:, cols], y, CANDIDATES[name])


def fit_confidence(sample_probs: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   folds: int = FOLDS, seed: int = 0) -> Confidence:
    """The candidate with the lowest ``folds``-fold cross-fitted log loss, refitted on every item.

    sample_probs : (N, K, C) labelled fitting items' per-sample probabilities (the held-out
        calibration items must not be among them).
    labels : (N,) their answers.
    With fewer than ``2 * folds`` items, or items all right or all wrong, nothing can be
    learned: ``max_prob``.
    """
    x = features(sample_probs, temperature)
    y = (decided(sample_probs, temperature) == labels).double()
    n = len(y)
    if n < 2 * folds or y.min() == y.max():
        return Confidence(model="max_prob", n=n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    losses = {}
    for name in CANDIDATES:
        out = torch.empty(n, dtype=torch.float64)
        for f in range(folds):
            test = order[f::folds]
            train = torch.ones(n, dtype=torch.bool)
            train[test] = False
            out[test] = _fit_candidate(name, x[train], y[train])(x[test])
        losses[name] = round(log_loss(out, y), 6)
    best = min(losses, key=losses.get)
    conf = _fit_candidate(best, x, y)
    conf.cv_log_loss = losses
    return conf


def decided(sample_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The served prediction of each item: the argmax of the (tempered) model average, (N,).

    Tempering does not move the argmax; it is the mean's."""
    return sample_probs.double().mean(1).argmax(-1)
