"""The HTTP API's request and response models (pydantic only; limits live in the field types).

Validation errors here become 400s naming the field (``server.errors``). Limits that depend on
the loaded model or the settings (``num_samples`` above the maximum, a prompt longer than the
context) are checked by the serving layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag,
                      ValidationInfo, field_validator, model_validator)

from tfb_core.data import LABELS

def valid_unicode(text: str) -> str:
    """Text a tokenizer can encode: JSON may carry a lone surrogate (\\ud800), UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text: a lone surrogate {text[e.start]!r} at "
                         f"position {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1, max_length=100_000, pattern=r"\S"),
                        AfterValidator(valid_unicode)]
NonBlank = Annotated[str, StringConstraints(min_length=1, pattern=r"\S"), AfterValidator(valid_unicode)]
SEED_MAX = 2**63 - 1


class _Strict(BaseModel):
    # strict: 16 is an integer, "16" and true are not
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

    mode: Literal["letter", "sequence"] | None = Field(
        None, description="letter: the next-token probability of each choice's label (A, B, ...); "
        "sequence: the likelihood of each choice's text (default: the posterior's mode, else letter)")
    prompt: NonBlank | None = Field(None, description="a pre-formatted prompt, used as it is")
    question: NonBlank | None = Field(None, description="a question; the server formats the prompt")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="chat turns")
    choices: list[NonEmptyStr] = Field(..., min_length=2, json_schema_extra={"uniqueItems": True},
                                       description="two or more distinct answers (at most 26 in letter "
                                       "mode, the server's --max-choices in sequence mode)")
    num_samples: int | None = Field(None, ge=1, description="K weight samples (default: the server's)")
    return_samples: bool = Field(False, description="include the per-sample probabilities")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="the draws' seed (default: the posterior's)")
    chat: bool | None = Field(None, description="wrap prompt/question in the chat template "
                              "(default: the server's --chat, else the posterior's)")
    length_normalize: bool = Field(False, description="sequence mode: divide a choice's log-likelihood by its length")

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
    def _distinct(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if any(not c.strip() for c in v):
            raise ValueError("every choice must be a non-empty string")
        seen: set[str] = set()  # linear in the number of choices
        dup = next((c for c in v if c in seen or seen.add(c)), None)
        if dup is not None:
            raise ValueError(f"choices must be distinct; {dup!r:.80} appears twice")
        if info.data.get("mode") == "letter" and len(v) > len(LABELS):
            raise ValueError(f"letter mode allows at most {len(LABELS)} choices (labels A-Z), got "
                             f"{len(v)}; use mode 'sequence'")
        return v

    @model_validator(mode="after")
    def _one_prompt(self) -> "ChoiceItem":
        given = [k for k in ("prompt", "question", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'prompt', 'question' or 'messages'"
                             + (f"; got {', '.join(given)}" if given else ""))
        return self


class ChoicesBatchRequest(_Strict):
    """Several questions in one call; they are scored together."""

    items: list[ChoiceItem] = Field(..., min_length=1)


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


class ChoiceResult(BaseModel):
    """The answer to one item."""

    object: Literal["choice"] = "choice"
    index: int = Field(..., description="the item's position in the request")
    prediction: int = Field(..., description="index of the most probable choice")
    label: str = Field(..., description="the predicted choice's label (A, B, ...)")
    choice: str = Field(..., description="the predicted choice's text")
    probs: list[float] = Field(..., description="model-averaged probability of each choice (sums to 1)")
    uncertainty: UncertaintyOut
    samples: list[list[float]] | None = Field(None, description="per weight sample, the choice "
                                              "probabilities (K x C), when return_samples")
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
    temperature: float = Field(1.0, description="choice logits of every sample are divided by this")
    search_trace: list[SearchPointOut]
    calibration_sha256: str | None
    source: str = Field(..., description="how the posterior was obtained: loaded, searched, "
                        "cached search, demo or placeholder")


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
