"""The library's options, each defined once: the enums of its choices, its defaults,
:class:`ScoreOptions` and :class:`SearchConfig`.

The ``tfb bayesianize`` flags (generated from :class:`SearchConfig`), the ``tfb serve``
settings, :class:`tfb_core.posterior.TFBConfig`, the protocol's fields and the functions'
keyword defaults all read them here. Enums are ``str`` enums: each member equals its plain
string (``Mode.LETTER == "letter"``), and every function that takes one also takes the string.
This module imports no torch, so the command line can build its parser quickly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum

from .errors import TFBError

# --- defaults ---------------------------------------------------------------------------------

NUM_SAMPLES = 10  # K weight samples per answer
SEED = 0  # the weight draws' seed
EPS = 0.003  # nll / accuracy tolerance: 0.3% relative NLL change (the paper's)
MAX_ACC_DROP = 0.01  # cv-nll: the accuracy sigma may cost against sigma 0 (1 point)
HOLDOUT = 0.5  # the fraction of a labelled calibration set held out for sets and abstention
COVERAGE = 0.9  # prediction sets' default coverage
MAX_RISK = 0.1  # abstention: the error rate answered items may have
DELTA = 0.05  # abstention: the risk is certified with confidence 1 - DELTA
BATCH_SIZE = 8  # calibration items per forward
ALL_LAYERS = "all"  # stochastic_layers: the noise in every decoder layer's LoRA modules (the paper's)


# --- choices ----------------------------------------------------------------------------------


class Mode(str, Enum):
    """How a multiple-choice answer is scored."""

    LETTER = "letter"  #: the label token after a prompt that lists the choices (the paper's)
    SEQUENCE = "sequence"  #: the likelihood of each choice's text after the question

    def __str__(self) -> str:
        return self.value


def parse_mode(mode: "Mode | str") -> Mode:
    return _parse(Mode, mode, "mode")


class Criterion(str, Enum):
    """What "the adapter accepts sigma" means."""

    NLL = "nll"  #: relative NLL change of the targets, |NLL(s) - NLL(0)| / NLL(0) <= eps (the paper's)
    ACCURACY = "accuracy"  #: fraction of changed answers (or accuracy drop with gold labels) <= eps
    CV_NLL = "cv-nll"  #: labelled: sigma and T minimising the cross-fitted NLL, accuracy drop <= max_acc_drop
    REFERENCE = "reference"  #: the bayesian-peft search: [0.001, 0.015], 5 bisections, tolerance eps * N
    AUTO = "auto"  #: cv-nll when every item has an answer, else nll (``tfb_core.fit.resolve_criterion``)

    def __str__(self) -> str:
        return self.value


def parse_criterion(criterion: "Criterion | str") -> Criterion:
    return _parse(Criterion, criterion, "criterion")


def _parse(kind: type[Enum], value, what: str):
    """``kind(value)``, or a TFBError that names the allowed values."""
    try:
        return kind(value)
    except ValueError:
        raise TFBError(f"unknown {what} {value!r}; allowed: {', '.join(m.value for m in kind)}") from None


class Score(str, Enum):
    """Nonconformity score of a candidate answer."""

    LAC = "lac"  #: 1 - p_c: the smallest sets on average
    APS = "aps"  #: sum of p over choices at least as likely as c: sets adapt to the item's difficulty

    def __str__(self) -> str:
        return self.value


class Metric(str, Enum):
    """The uncertainty an abstention threshold is put on."""

    MI = "mutual_information"  #: the samples' disagreement: epistemic uncertainty
    PE = "predictive_entropy"  #: the model average's entropy: total uncertainty
    CONFIDENCE = "confidence"  #: the learned P(right) (tfb_core.confidence); the threshold is on 1 - it

    def __str__(self) -> str:
        return self.value


def parse_stochastic_layers(value) -> "int | str":
    """``"all"``, or the number L >= 1 of top decoder layers whose LoRA modules get the noise (an
    int, or its string: ``"4"`` from a flag or an environment variable)."""
    if value == ALL_LAYERS:
        return ALL_LAYERS
    try:
        layers = int(value)
    except (TypeError, ValueError):
        layers = None
    if isinstance(value, (bool, float)) or layers is None or layers < 1:
        raise TFBError(f"stochastic_layers must be 'all' or a number of decoder layers >= 1, got {value!r}")
    return layers


def parse_score(score) -> Score:
    return _parse(Score, score, "conformal score")


def parse_metric(metric) -> Metric:
    return _parse(Metric, metric, "abstention metric")


# --- how an item is scored -----------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreOptions:
    """Every option that changes a multiple-choice item's score.

    A posterior records its calibration's (:attr:`tfb_core.posterior.TFBConfig.score_options`);
    a request resolves its own against the server's defaults with :meth:`resolve`
    (``server.protocol.ChoiceItem.to_score_options``), as ``tfb eval`` does against its flags. An
    item is scored as the calibration was exactly when the two are equal, so an option added here
    takes part in that comparison without anyone listing it.
    """

    mode: Mode = Mode.LETTER  # letter: the label's next-token probability; sequence: each choice's text
    chat: bool = False  # the prompt is wrapped in the tokenizer's chat template
    length_normalize: bool = False  # sequence mode: a choice's mean log-probability per token
    num_samples: int = NUM_SAMPLES  # K weight samples
    seed: int = SEED  # which weight samples: (seed, 0..K-1)

    def __post_init__(self):
        object.__setattr__(self, "mode", parse_mode(self.mode))

    def resolve(self, **given) -> "ScoreOptions":
        """These options with each given value that is not None in place of the field of its name
        (user, then server, then posterior: ``posterior.resolve(**server).resolve(**user)``)."""
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise TFBError(f"unknown score options {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return replace(self, **{k: v for k, v in given.items() if v is not None})


# --- the search ---------------------------------------------------------------------------------


def _opt(default, help: str, flag: str | None = None, check=None, **kw):
    """A :class:`SearchConfig` field: its default, its CLI flag's help (and name, when it is not
    the field's), and ``check(value) -> problem or None``."""
    return field(default=default, metadata=dict(help=help, flag=flag, check=check), **kw)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _fraction(v):  # [0, 1)
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _open_fraction(v):  # (0, 1)
    return None if 0 < v < 1 else "must be in (0, 1)"


def _at_least_one(v):
    return None if v >= 1 else "must be >= 1"


def _sigmas(v):
    return None if v is None or (v and all(x >= 0 for x in v)) else "must be one or more sigmas >= 0"


@dataclass
class SearchConfig:
    """How ``tfb bayesianize`` (and a start-up search of ``tfb serve``) fits a posterior.

    Each field's metadata holds its CLI flag's help (``tfb bayesianize`` generates its flags
    from these fields) and its check; a bad value raises :class:`TFBError` naming the field.
    Enum fields accept their plain strings (``criterion="cv-nll"``).
    """

    criterion: Criterion = _opt(Criterion.AUTO, "how sigma is chosen: cv-nll (labelled items: sigma and the "
                                "temperature that minimise the cross-fitted NLL), nll / accuracy (the paper's), "
                                "reference (the paper's code: [0.001, 0.015], 5 bisections, tolerance eps x N); "
                                "auto: cv-nll when every item has an answer, else nll")
    eps: float = _opt(EPS, "tolerance of nll / accuracy", check=_positive)
    max_acc_drop: float = _opt(MAX_ACC_DROP, "cv-nll: the accuracy sigma may cost against sigma 0 "
                               "(0.01 = 1 point)", check=_fraction)
    sigma_grid: tuple[float, ...] | None = _opt(None, "cv-nll: the candidate sigmas, comma-separated "
                                                "(default: 0 and 1e-3 x 1.5^i up to ~0.09)", check=_sigmas)
    num_samples: int = _opt(NUM_SAMPLES, "K weight samples", flag="--samples", check=_at_least_one)
    seed: int = _opt(SEED, "the weight draws' seed",
                     check=lambda v: None if v >= 0 else "must be >= 0")
    mode: Mode | None = _opt(None, "how choices are scored: letter (the label after a prompt listing "
                             "them, the paper's) or sequence (each choice's text); default: with an answer on "
                             "every item, the one (and the length normalisation) with the best accuracy, then "
                             "cross-fitted NLL, at sigma 0 on the fitting items; without, letter")
    length_normalize: bool | None = _opt(None, "sequence mode: score a choice by its mean log-probability per "
                                         "token, not the sum (default: chosen with the mode when it is measured, "
                                         "else off)")
    chat: bool = _opt(False, "wrap each prompt in the tokenizer's chat template")
    gold_labels: bool = _opt(False, "nll / accuracy against the items' answers, not pseudo-labels")
    holdout: float | None = _opt(None, "fraction of the (labelled) calibration items held out for "
                                 "prediction sets and abstention (default: 0.5 when every item has an "
                                 "answer, else 0)", check=_fraction)
    coverage: float = _opt(COVERAGE, "default coverage of prediction sets", check=_open_fraction)
    score: Score = _opt(Score.LAC, "prediction sets' nonconformity score", flag="--conformal-score")
    abstain_on: Metric = _opt(Metric.CONFIDENCE, "what abstention thresholds: confidence (the learned "
                              "P(right), fitted on the labelled fitting items), mutual_information or "
                              "predictive_entropy")
    max_risk: float = _opt(MAX_RISK, "abstention: the error rate the answered items may have, "
                           "certified with confidence 0.95 on the held-out items", check=_open_fraction)
    abstain_on_set: bool = _opt(False, "also abstain when the default-coverage prediction set holds more "
                                "than one choice")
    stochastic_layers: str | int = _opt(ALL_LAYERS, "the LoRA modules of only the last L decoder layers (and an "
                                        "adapted LM head) get the noise; the layers below use the mean adapter, "
                                        "so every weight sample shares their computation: L from 1 to the "
                                        "model's layers, or all")
    temperature: bool = _opt(True, "do not fit a temperature", flag="--no-temperature")
    batch_size: int = _opt(BATCH_SIZE, "items per forward", check=_at_least_one)

    def __post_init__(self):
        self.criterion = parse_criterion(self.criterion)
        self.mode = None if self.mode is None else parse_mode(self.mode)
        self.score, self.abstain_on = parse_score(self.score), parse_metric(self.abstain_on)
        self.stochastic_layers = parse_stochastic_layers(self.stochastic_layers)
        if self.sigma_grid is not None:
            self.sigma_grid = tuple(float(x) for x in self.sigma_grid)
        for f in fields(self):
            value, check = getattr(self, f.name), f.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise TFBError(f"{f.name} {problem}, got {value!r}")

    @classmethod
    def flag(cls, name: str) -> str:
        """The ``tfb bayesianize`` flag of a field: ``--max-acc-drop``, ``--samples``, ..."""
        f = cls.__dataclass_fields__[name]
        return f.metadata.get("flag") or "--" + name.replace("_", "-")

    @classmethod
    def help(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata["help"]

    @classmethod
    def default(cls, name: str):
        return cls.__dataclass_fields__[name].default
