"""The HTTP API's request and response models (pydantic only; limits live in the field types).

Validation errors here become 400s naming the field (``server.errors``). Limits that depend on
the loaded model or the settings (``num_samples`` above the maximum, a prompt longer than the
context) are checked by the serving layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag,
                      field_validator, model_validator)

from tfb_core import Mode, Score, ScoreOptions, encoding


def valid_unicode(text: str) -> str:
    """Text a tokenizer can encode: JSON may carry a lone surrogate (\\ud800), UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text: a lone surrogate {text[e.start]!r} at "
                         f"position {e.start}") from None
    return text


class FieldError(ValueError):
    """A check across fields that blames one of them: the 400 names ``param`` (server.errors)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


Text = Annotated[str, AfterValidator(valid_unicode)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1, max_length=100_000, pattern=r"\S"),
                        AfterValidator(valid_unicode)]
NonBlank = Annotated[str, StringConstraints(min_length=1, pattern=r"\S"), AfterValidator(valid_unicode)]
SEED_MAX = 2**63 - 1


class _Strict(BaseModel):
    # strict: 16 is an integer, "16" and true are not. Every list of a request fails fast: one
    # error, not one per entry (300,000 bad entries in a 1 MB body made 300,000 errors, 2-3 s
    # of the event loop's time to build).
    model_config = ConfigDict(extra="forbid", strict=True)


# --- requests ------------------------------------------------------------------------------------


class ChatMessage(_Strict):
    """One chat turn; the list is rendered with the tokenizer's chat template."""

    role: Literal["system", "user", "assistant"]
    content: Text


class ChoiceItem(_Strict):
    """One multiple-choice question.

    Exactly one of ``prompt`` (used as it is), ``question`` (the server lists the choices with
    labels in letter mode) or ``messages`` (rendered with the chat template, used as it is).
    """

    mode: Mode | None = Field(  # not strict: the enum's plain strings are its values
        None, strict=False, description="letter: the next-token probability of each choice's label (A, B, ...); "
        "sequence: the likelihood of each choice's text (default: the posterior's mode, else letter)")
    prompt: NonBlank | None = Field(None, description="a pre-formatted prompt, used as it is")
    question: NonBlank | None = Field(None, description="a question; the server formats the prompt")
    messages: list[ChatMessage] | None = Field(None, min_length=1, fail_fast=True, description="chat turns")
    choices: list[NonEmptyStr] = Field(..., min_length=2, fail_fast=True, json_schema_extra={"uniqueItems": True},
                                       description=f"two or more distinct answers (at most {len(encoding.LABELS)} in "
                                       f"letter mode, the server's --max-choices in sequence mode)")
    num_samples: int | None = Field(None, ge=1, description="K weight samples (default: the server's)")
    return_samples: bool = Field(False, description="include the per-sample probabilities")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="the draws' seed (default: the posterior's)")
    chat: bool | None = Field(None, description="wrap prompt/question in the chat template "
                              "(default: the server's --chat, else the posterior's)")
    length_normalize: bool | None = Field(None, description="sequence mode: score a choice by its mean "
                                          "log-probability per token (default: the posterior's)")
    coverage: float | None = Field(None, gt=0, lt=1, description="the prediction set's coverage (default: "
                                   "the server's --coverage, else the posterior's, 0.9); needs a posterior "
                                   "with a held-out calibration")

    @field_validator("prompt", "question")
    @classmethod
    def _non_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("messages")
    @classmethod
    def _some_content(cls, v: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if v is not None and not any(m.content.strip() for m in v):
            raise ValueError("must hold some non-empty content")
        return v

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v):
            raise ValueError("every choice must be a non-empty string")
        seen: set[str] = set()  # linear in the number of choices
        dup = next((c for c in v if c in seen or seen.add(c)), None)
        if dup is not None:
            raise ValueError(f"choices must be distinct; {dup!r:.80} appears twice")
        return v

    @model_validator(mode="after")
    def _one_prompt(self) -> "ChoiceItem":
        given = [k for k in ("prompt", "question", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'prompt', 'question' or 'messages'"
                             + (f"; got {', '.join(given)}" if given else ""))
        return self

    def to_score_options(self, defaults: ScoreOptions) -> ScoreOptions:
        """How this item is scored: each option it gives, else ``defaults`` (the server's, which
        fall back to the posterior's: ``server.serving.ChoicesServing``)."""
        return defaults.resolve(mode=self.mode, chat=self.chat, length_normalize=self.length_normalize,
                                num_samples=self.num_samples, seed=self.seed)


class ChoicesBatchRequest(_Strict):
    """Several questions in one call; they are scored together."""

    items: list[ChoiceItem] = Field(..., min_length=1, fail_fast=True)


def _request_kind(value: Any) -> str:
    return "batch" if isinstance(value, dict) and "items" in value else "single"


# POST /v1/choices takes one item or {"items": [...]}
ChoicesRequest = Annotated[
    Union[Annotated[ChoiceItem, Tag("single")], Annotated[ChoicesBatchRequest, Tag("batch")]],
    Discriminator(_request_kind),
]


# --- responses -----------------------------------------------------------------------------------


class UncertaintyOut(BaseModel):
    """The entropy of the model average and its split, in nats: PE = EE + MI."""

    predictive_entropy: float = Field(..., description="H[mean_k p_k]: total uncertainty")
    expected_entropy: float = Field(..., description="mean_k H[p_k]: aleatoric part")
    mutual_information: float = Field(..., description="PE - EE >= 0: epistemic part")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="tokens in the prompt(s), once (not x K)")
    total_tokens: int = Field(..., description="tokens run through the model: prompt tokens x K")


class PredictionSet(BaseModel):
    """The choices a split-conformal prediction set keeps, and what it guarantees."""

    indices: list[int] = Field(..., description="the choices in the set, most probable first")
    labels: list[str] = Field(..., description="their labels (A, B, ...)")
    coverage: float = Field(..., description="the target: P(answer in set) >= coverage")
    score: Score = Field(..., strict=False, description="nonconformity score (lac: 1 - p; aps: cumulative p)")
    calibration_size: int = Field(..., description="held-out calibration items behind the threshold")
    matches_calibration: bool = Field(..., description="false when this request's settings (num_samples, "
                                      "seed, mode, length_normalize, chat) differ from the calibration's: "
                                      "the guarantee then does not apply")
    guarantee: str = Field(..., description="what the set guarantees, in words")


class ChoiceResult(BaseModel):
    """The answer to one item."""

    object: Literal["choice"] = "choice"
    index: int = Field(..., description="the item's position in the request")
    prediction: int = Field(..., description="index of the most probable choice")
    label: str = Field(..., description="the predicted choice's label (A, B, ...)")
    choice: str = Field(..., description="the predicted choice's text")
    probs: list[float] = Field(..., description="model-averaged probability of each choice (sums to 1), "
                               "tempered: softmax(log(mean_k p_k) / temperature)")
    temperature: float = Field(..., description="the posterior's temperature, applied to the model "
                               "average only")
    tempered: list[str] = Field(..., description="which fields the temperature changed: ['probs'] or []; "
                                "uncertainty and samples are always the untempered weight samples'")
    uncertainty: UncertaintyOut
    confidence: float = Field(..., ge=0, le=1, description="the probability that the prediction is right: "
                              "the posterior's learned confidence model (fitted on labelled calibration "
                              "items), or the tempered maximum probability without one")
    confidence_model: str = Field(..., description="what 'confidence' is: 'logistic' (learned from "
                                  "labelled calibration items, see /v1/posterior), or 'max_prob' (the tempered "
                                  "maximum probability: no labelled calibration, or it predicted no better)")
    samples: list[list[float]] | None = Field(None, description="per weight sample, the untempered choice "
                                              "probabilities (K x C), when return_samples")
    prediction_set: PredictionSet | None = Field(None, description="the choices that hold the answer with "
                                                 "probability >= coverage (a posterior with a held-out "
                                                 "calibration only)")
    abstain: bool | None = Field(None, description="true: do not act on this answer (a posterior with a "
                                 "held-out calibration only)")
    abstain_reasons: list[str] | None = Field(None, description="why: the confidence is below (or the "
                                              "uncertainty above) the threshold certified for the server's "
                                              "error-rate target, or none is certified; with "
                                              "--abstain-on-set, the prediction set is not one choice")
    num_samples: int
    seed: int
    sigma: float
    model: str
    usage: Usage


class ChoicesBatchResponse(BaseModel):
    object: Literal["list"] = "list"
    items: list[ChoiceResult]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tfb"
    root: str = Field(..., description="the base model (a local directory's name only, unless --show-paths)")
    adapter: str | None = Field(None, description="the adapter (a local directory's name only, unless --show-paths)")
    files_sha256: dict[str, str] | None = Field(None, description="the served posterior's files and their sha256")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SearchPointOut(BaseModel):
    sigma: float
    value: float
    feasible: bool
    temperature: float | None = Field(None, description="cv-nll: the temperature fitted at this sigma")
    accuracy: float | None = Field(None, description="cv-nll: the model average's accuracy at this sigma")


class CalibrationInfo(BaseModel):
    """The held-out calibration behind prediction sets and abstention."""

    size: int = Field(..., description="held-out labelled items (not used to fit sigma or T)")
    score: str
    coverage: float = Field(..., description="the prediction sets' default coverage")
    abstain_on: str
    max_risk: float = Field(..., description="the error rate answered items may have")
    delta: float = Field(..., description="the certificate's confidence is 1 - delta")
    threshold: float | None = Field(..., description="abstain above this uncertainty (for abstain_on "
                                    "'confidence': below this confidence); null: none is certified for "
                                    "max_risk, so every answer abstains")
    abstain_on_set: bool = Field(False, description="also abstain when the default-coverage prediction set "
                                 "holds more than one choice")
    risk_bound: float = Field(..., description="upper confidence bound on the answered calibration items' "
                              "error rate at the threshold")
    answered: float = Field(..., description="fraction of the calibration items the threshold answers")


class PosteriorInfo(BaseModel):
    """The served posterior: its scale, the default K and how sigma was found."""

    model: str
    base_model: dict
    adapter: str | None
    files_sha256: dict[str, str] = Field(default_factory=dict, description="the posterior's files and their sha256")
    sigma: float
    num_samples: int = Field(..., description="the default K")
    max_samples: int
    criterion: str | None
    eps: float | None
    seed: int
    mode: str | None = Field(..., description="the default scoring mode of requests")
    chat: bool = Field(..., description="whether prompts are wrapped in the chat template by default")
    temperature: float = Field(1.0, description="the model average is served as softmax(log(mean_k p_k) / T)")
    length_normalize: bool = Field(False, description="sequence mode: choices scored by mean log-prob per token")
    stochastic_layers: int | Literal["all"] = Field("all", description="L: only the LoRA modules of the last L "
                                                    "decoder layers (and an adapted LM head) get the noise; the "
                                                    "layers below are the mean adapter in every weight sample")
    calibration: CalibrationInfo | None = Field(None, description="prediction sets and abstention (null: "
                                                "no held-out calibration)")
    confidence: dict = Field(..., description="the model behind each answer's 'confidence': 'model' "
                             "(max_prob or logistic), its 'features', standardisation and coefficients, and "
                             "each candidate's cross-fitted log loss on the labelled fitting items")
    search_trace: list[SearchPointOut]
    fit_report: dict[str, Any] | None = Field(None, description="what tfb bayesianize or the start-up search "
                                              "measured: sigma's place in its grid, T, cross-fitted NLL and "
                                              "accuracy, the held-out sets' coverage and size, the certified "
                                              "risk, warnings and a verdict (tfb_core/report.py); null: not "
                                              "recorded")
    calibration_sha256: str | None
    source: str = Field(..., description="how the posterior was obtained: loaded, searched, "
                        "cached search or demo")


class Health(BaseModel):
    status: Literal["loading", "searching", "ready", "draining", "failed"]
    detail: str | None = None


class ErrorDetail(BaseModel):
    message: str = Field(..., description="what was wrong and what is allowed")
    type: str
    param: str | None = Field(None, description="the offending field, e.g. items.0.choices")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
