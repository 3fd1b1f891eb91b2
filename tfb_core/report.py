"""What a fit produced, in one short table, with what to do when something is off.

:func:`tfb_core.fit.fit_posterior` measures; :func:`assess` reads the numbers and writes the
warnings and the verdict; :meth:`FitReport.table` is what ``tfb bayesianize`` prints and the
start-up search logs. The report is recorded in ``tfb_config.json`` (``fit_report``) and served
by ``/v1/posterior``.

The warnings, each with what to do:

- sigma = 0: the posterior adds no uncertainty (every MI is 0 while K samples still run);
- sigma at the top or bottom edge of the searched grid: the best sigma may lie outside it;
- accuracy near chance in the chosen mode (``1 / choices`` plus :func:`chance_margin`), with
  another mode's accuracy when it is clearly better;
- fewer held-out items than the risk target needs even if every answer were right
  (:func:`held_out_needed`);
- a calibration file smaller than :data:`RECOMMENDED_ITEMS` (README, "How many calibration items").
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

from .errors import TFBError
from .options import DELTA, MAX_RISK

#: labelled calibration items recommended: half of them, 200, held out, with which an all-correct
#: held-out half certifies an error rate of 0.06 (0.1 takes 96 held-out items) and the 0.9 sets'
#: realised coverage has a standard deviation of 2.1 points (3.0 at 100); README, "How many
#: calibration items", and examples/calibration_size.py
RECOMMENDED_ITEMS = 400
RISKS = (0.1, 0.2, 0.3, 0.4, 0.5)  # the certified-risk ladder the report climbs


@dataclass
class ModeScore:
    """One scoring mode measured at sigma 0, K 1 on the labelled fitting items."""

    mode: str
    length_normalize: bool
    accuracy: float
    nll: float  # cross-fitted (5 folds, T fitted on the others); plain NLL under 10 items

    @property
    def name(self) -> str:
        return f"{self.mode}{' (length-normalised)' if self.length_normalize else ''}"


@dataclass
class FitReport:
    """Everything the table shows; ``None`` where it was not measured (no labels, no held-out half)."""

    sigma: float
    temperature: float
    mode: str
    length_normalize: bool = False
    criterion: str | None = None  # None: --sigma given
    grid: list[float] = field(default_factory=list)  # the sigmas evaluated, ascending
    grid_index: int | None = None  # the chosen sigma's place in ``grid`` (cv-nll)
    edge: str | None = None  # "top" or "bottom" when sigma sits at an edge of the grid
    mode_choice: str = "given"  # given | measured | default (unlabelled: letter) | ...
    modes: list[ModeScore] = field(default_factory=list)  # the measured candidates
    mode_note: str = ""  # why a mode was not a candidate (letter: uneven choice counts)
    calibration_items: int = 0
    fit_items: int = 0
    labelled: bool = False
    chance: float | None = None  # mean over the fitting items of 1 / their choice count
    choices: str = ""  # "4", or "2-5" when they differ
    nll_0: float | None = None  # cross-fitted NLL and accuracy on the fitting items at sigma 0
    accuracy_0: float | None = None
    nll_sigma: float | None = None  # ... and at the chosen sigma
    accuracy_sigma: float | None = None
    held_out: int = 0
    coverage: float | None = None  # the prediction sets' default coverage
    set_coverage: float | None = None  # their coverage and mean size on the held-out items
    set_size: float | None = None
    max_risk: float = MAX_RISK
    delta: float = DELTA
    certified_risk: float | None = None  # the smallest of RISKS certified on the held-out items
    answered: float | None = None  # the share answered at max_risk (0: none certified)
    held_out_needed: int | None = None  # for max_risk, if every held-out answer were right
    confidence_model: str | None = None
    num_samples: int = 10
    warnings: list[str] = field(default_factory=list)
    verdict: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "tfb_config.json") -> "FitReport":
        if not isinstance(data, dict):
            raise TFBError(f"{where}: 'fit_report' must be an object, got {type(data).__name__}")
        try:
            report = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
            report.modes = [m if isinstance(m, ModeScore) else ModeScore(**m) for m in report.modes]
        except TypeError as e:
            raise TFBError(f"{where}: 'fit_report' is malformed: {e}") from None
        return report

    def table(self) -> str:
        """The report as a short plain-text table, warnings and verdict last."""
        rows = [("calibration items", self._items()),
                ("mode", self._mode()),
                ("sigma", self._sigma()),
                ("temperature T", f"{self.temperature:.4g}"),
                ("NLL / accuracy", self._fit_numbers()),
                ("prediction sets", self._sets()),
                ("abstention", self._abstention()),
                ("confidence", self.confidence_model or "max_prob (nothing fitted: no labels)")]
        width = max(len(k) for k, _ in rows)
        lines = ["tfb fit report"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)

    # the table's cells ----------------------------------------------------------------------

    def _items(self) -> str:
        if not self.labelled:
            return f"{self.calibration_items} (no answers: sigma only, no T, sets or abstention)"
        return f"{self.calibration_items}: {self.fit_items} fit sigma, T and the confidence; {self.held_out} held out"

    def _mode(self) -> str:
        name = f"{self.mode}{', length-normalised' if self.length_normalize else ''}"
        measured = "; ".join(f"{m.name} {m.accuracy:.1%} / NLL {m.nll:.3f}" for m in self.modes)
        how = {"measured": f"chosen by accuracy, then NLL, at sigma 0: {measured}"}.get(self.mode_choice)
        if how is None:
            how = self.mode_choice + (f"; measured at sigma 0: {measured}" if measured else "")
        note = f"; {self.mode_note}" if self.mode_note else ""
        chance = f"; chance {self.chance:.1%} ({self.choices} choices)" if self.chance is not None else ""
        return f"{name} ({how}{note}){chance}"

    def _sigma(self) -> str:
        if self.criterion is None:
            return f"{self.sigma:.6g} (given with --sigma; no search)"
        if self.grid_index is not None:
            place = f"grid point {self.grid_index + 1} of {len(self.grid)} ({self.grid[0]:g}..{self.grid[-1]:g})"
        else:
            place = f"after {len(self.grid)} evaluations"
        edge = f", at the {self.edge} edge" if self.edge else ""
        return f"{self.sigma:.6g} ({self.criterion}, {place}{edge})"

    def _fit_numbers(self) -> str:
        if self.nll_0 is None:
            return "- (needs answers)"
        return (f"on the {self.fit_items} fitting items, cross-fitted: sigma 0: {self.nll_0:.4f} / "
                f"{self.accuracy_0:.1%}; sigma {self.sigma:.4g}: {self.nll_sigma:.4f} / {self.accuracy_sigma:.1%}")

    def _sets(self) -> str:
        if not self.held_out or self.set_coverage is None:
            return "none (no held-out items)" if not self.held_out else \
                f"none at {self.coverage:g}: {self.held_out} held-out items are too few"
        return (f"coverage {self.set_coverage:.1%} at target {self.coverage:g}, mean size {self.set_size:.2f} "
                f"(on the {self.held_out} held-out items)")

    def _abstention(self) -> str:
        if not self.held_out:
            return "none (no held-out items)"
        best = "none of 0.1..0.5 certified" if self.certified_risk is None else \
            f"smallest certified risk {self.certified_risk:g}"
        at = f"at --max-risk {self.max_risk:g}: " + (
            "none certified, every answer abstains" if not self.answered else f"answers {self.answered:.1%}")
        return f"{best}; {at} (certified at {1 - self.delta:.0%} confidence)"


# --- the checks ----------------------------------------------------------------------------------


def chance_margin(chance: float, n: int) -> float:
    """How far above chance an accuracy must be to count as better than guessing: two binomial
    standard errors of a guesser on ``n`` items, at least 5 points."""
    return max(0.05, 2 * math.sqrt(chance * (1 - chance) / max(n, 1)))


@functools.lru_cache(maxsize=64)
def held_out_needed(max_risk: float, delta: float = DELTA) -> int:
    """The fewest held-out items with which an all-correct set certifies ``max_risk`` at
    confidence ``1 - delta`` under :func:`tfb_core.conformal.risk_threshold` (its binary search
    and Bonferroni split included)."""
    import torch

    from .conformal import binomial_upper, risk_threshold

    n = 1
    while binomial_upper(0, n, delta) > max_risk:  # below this even accepting all cannot certify
        n += 1
    while risk_threshold(torch.arange(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool),
                         max_risk, delta).threshold is None:
        n += 1
    return n


def near_chance(r: FitReport) -> bool:
    """Whether the accuracy on the fitting items (at sigma, else at 0) is within the chance margin."""
    acc = r.accuracy_sigma if r.accuracy_sigma is not None else r.accuracy_0
    return acc is not None and r.chance is not None and acc <= r.chance + chance_margin(r.chance, r.fit_items)


def assess(r: FitReport) -> FitReport:
    """Fill ``r.warnings`` and ``r.verdict`` from its numbers; returns ``r``."""
    warnings: list[str] = []
    serious: list[str] = []
    if r.sigma == 0:
        serious.append("sigma = 0")
        warnings.append(_zero_sigma(r))
    elif r.edge == "top":
        warnings.append(f"sigma {r.sigma:.4g} is at the top edge of the searched grid: a larger sigma may fit better; "
                        f"extend it upwards, e.g. --sigma-grid {_grid_text(_extend(r.grid, up=True))}")
    elif r.edge == "bottom":
        warnings.append(f"sigma {r.sigma:.4g} is at the bottom edge of the grid (its smallest sigma > 0): a "
                        f"smaller one may fit better; extend it downwards, e.g. --sigma-grid "
                        f"{_grid_text(_extend(r.grid, up=False))}")
    if near_chance(r):
        serious.append("accuracy near chance")
        warnings.append(_near_chance(r, r.accuracy_sigma if r.accuracy_sigma is not None else r.accuracy_0))
    if r.held_out and r.held_out_needed is not None and r.held_out < r.held_out_needed:
        labelled = math.ceil(r.held_out_needed * r.calibration_items / r.held_out)
        warnings.append(f"{r.held_out} held-out items cannot certify an error rate of {r.max_risk:g} even if "
                        f"every answer were right: that takes {r.held_out_needed} (about {labelled} labelled "
                        f"items at this --holdout); until then every answer abstains at --max-risk "
                        f"{r.max_risk:g}: label more items"
                        + (f", or raise --max-risk to {r.certified_risk:g} (certified here)"
                           if r.certified_risk is not None and r.certified_risk > r.max_risk else ""))
    if r.calibration_items < RECOMMENDED_ITEMS:
        warnings.append(f"the calibration file has {r.calibration_items} items; {RECOMMENDED_ITEMS} or more "
                        f"labelled ones are recommended (README, 'How many calibration items'): with fewer, "
                        f"sigma and T are noisy and the held-out half certifies little; label more items")
    r.warnings = warnings
    if serious:
        r.verdict = f"NOT READY: {' and '.join(serious)}; the warnings above say what to do"
    elif warnings:
        r.verdict = (f"USABLE WITH CAVEATS ({len(warnings)} warning{'s' if len(warnings) > 1 else ''} above): "
                     f"sigma {r.sigma:.4g} adds uncertainty" + _accuracy_text(r))
    else:
        r.verdict = f"READY: sigma {r.sigma:.4g} inside the grid" + _accuracy_text(r)
    return r


def _zero_sigma(r: FitReport) -> str:
    text = (f"sigma = 0: the posterior adds no uncertainty: every answer's mutual information is 0 while the "
            f"server still runs K = {r.num_samples} weight samples. ")
    if r.criterion is None:
        return text + "Give a sigma > 0 with --sigma, or leave --sigma out to search one"
    if r.criterion == "cv-nll":
        smallest = min((s for s in r.grid if s > 0), default=1e-3)
        text += (f"Every sigma of the grid cost accuracy or NLL on the fitting items. Try smaller ones, e.g. "
                 f"--sigma-grid {_grid_text([0.0] + [smallest / 10 ** (i / 2) for i in range(4, 0, -1)])}, "
                 f"or allow some accuracy drop (--max-acc-drop 0.02)")
    else:
        text += "No sigma > 0 kept the criterion within --eps: raise --eps, or label the items (cv-nll)"
    return text + "; check the mode and the accuracy too (a model at chance has nothing to be unsure about)"


def _near_chance(r: FitReport, acc: float) -> str:
    margin = chance_margin(r.chance, r.fit_items)
    text = (f"accuracy {acc:.1%} in {r.mode} mode is near chance ({r.chance:.1%} with {r.choices} choices) on "
            f"the {r.fit_items} fitting items (within {margin:.0%} of it, two standard errors of a guesser): "
            f"the adapter may be guessing in this mode")
    better = [m for m in r.modes if (m.mode, m.length_normalize) != (r.mode, r.length_normalize)
              and m.accuracy > acc + chance_margin(r.chance, r.fit_items)]
    if better:
        best = max(better, key=lambda m: (m.accuracy, -m.nll))
        flags = f"--mode {best.mode}" + (" --length-normalize" if best.length_normalize else "")
        return text + (f"; {best.name} scores {best.accuracy:.1%} on them: pass {flags}, or leave --mode out "
                       f"and tfb chooses by measurement")
    return text + ("; check that the answers are right, that the prompts are what the adapter was trained "
                   "on (--chat, --mode), and that the adapter is the one you meant")


def _accuracy_text(r: FitReport) -> str:
    parts = []
    if r.accuracy_sigma is not None:
        parts.append(f"{r.mode} mode right on {r.accuracy_sigma:.1%} of the fitting items (chance {r.chance:.1%})")
    if r.certified_risk is not None:
        parts.append(f"risk {r.certified_risk:g} certified")
    return "; " + ", ".join(parts) if parts else ""


def _extend(grid: list[float], up: bool) -> list[float]:
    positive = sorted(s for s in grid if s > 0)
    if up:
        top = positive[-1]
        return [0.0] + positive + [top * 1.5 ** i for i in (1, 2, 3, 4)]
    low = positive[0]
    return [0.0] + [low / 1.5 ** i for i in (4, 3, 2, 1)] + positive


def _grid_text(grid: list[float]) -> str:
    return ",".join(f"{s:.3g}" for s in grid)
