"""OpenAI-shaped text generation: ``/v1/completions`` and ``/v1/chat/completions`` (pydantic only).

The shapes are OpenAI's; every choice carries an extra ``uncertainty`` object. Parameters:
- supported: model, prompt / messages, max_tokens (max_completion_tokens for chat),
  temperature, top_p, n, stop, seed, logprobs / top_logprobs, stream, stream_options (with
  stream only), user (accepted, not stored); tfb's own: num_samples, top_k; vLLM's: ignore_eos,
  min_tokens, stream_options.continuous_usage_stats.
- completions only: echo (the prompt scored token by token; max_tokens 0 scores it alone), and
  prompts given as token ids.
- chat only: response_format text, json_object or json_schema (tfb_core.structured).
- accepted only at their neutral value: presence_penalty = 0, frequency_penalty = 0,
  best_of = n (completions).
- anything else (logit_bias, suffix, tools, functions, ...) is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from .protocol import SEED_MAX, FieldError, Text, _Strict, valid_unicode

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP_CHARS = 256  # each generated token is checked against every stop string's prefixes


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(valid_unicode)]


NonEmpty = Annotated[str, StringConstraints(min_length=1), AfterValidator(valid_unicode)]


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="a last chunk with no choices and the request's usage")
    continuous_usage_stats: bool = Field(False, description="vLLM's: every chunk carries the request's usage "
                                         "so far (benchmark clients count tokens with it)")


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: Text = Field(..., description="the served model's id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate (default 16, at most the context); "
                                   "0 only with echo (completions): score the prompt alone")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy from the model average")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="tfb: keep the k most probable tokens (0 = off)")
    n: int = Field(1, ge=1, le=MAX_N, description=f"choices per prompt (at most {MAX_N})")
    stop: StopString | Annotated[list[StopString], Field(max_length=4, fail_fast=True)] | None = Field(
        None, description=f"up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters; generation "
        "ends before them")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="token sampling seed")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, description="accepted and ignored")
    presence_penalty: float = Field(0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, description="only 0 is supported")
    num_samples: int | None = Field(None, ge=1, description="tfb: K weight samples (default: the server's)")
    ignore_eos: bool = Field(False, description="vLLM's: an end-of-sequence token does not end the text "
                             "(benchmarks ask for exact lengths)")
    min_tokens: int = Field(0, ge=0, description="vLLM's: no end-of-sequence token and no stop string before "
                            "this many tokens (at most max_tokens)")

    @field_validator("stream_options")
    @classmethod
    def _stream_only(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed with 'stream': true")
        return v

    @model_validator(mode="after")
    def _check_common(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise FieldError(name, f"'{name}' is not supported; allowed: 0")
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise FieldError("max_tokens", "'max_tokens' 0 generates nothing: it is allowed only with 'echo': true on "
                             "/v1/completions (to score the prompt); allowed here: 1 or more")
        stops = self.stop_list
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' must be up to 4 non-empty strings")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def max_new_tokens(self) -> int | None:
        """The tokens asked for (None: the server's default)."""
        return self.max_tokens

    @property
    def top_alternatives(self) -> int:
        """Alternatives to report per token."""
        return 0

    def to_sampling_params(self, max_tokens: int, num_samples: int, weight_seed: int,
                           choice: int = 0, grammar: str | None = None):
        """The engine's :class:`tfb_core.SamplingParams` for choice ``choice`` of a prompt (its
        token seed is ``seed + choice``); ``grammar``: the output's (response_format)."""
        from tfb_core import SamplingParams  # torch: imported when a request is served

        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=self.stop_list,
                              seed=None if self.seed is None else self.seed + choice, num_samples=num_samples,
                              weight_seed=weight_seed, top_logprobs=self.top_alternatives,
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, grammar=grammar)


TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, fail_fast=True)] | TokenIds \
        | Annotated[list[TokenIds], Field(min_length=1, fail_fast=True)] = Field(
            ..., description="a prompt, a non-empty list of them, a prompt's token ids, or a list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=5, description="the top alternatives per token (0-5)")
    echo: bool = Field(False, description="return the prompt before the completion, scored token by token under "
                       "the model average (logprobs and uncertainty; the first token has none); with max_tokens "
                       "0, the prompt alone. Not with stream")
    best_of: int | None = Field(None, ge=1, description="only equal to n is supported")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """One clear message for a prompt of no known shape (not a union's four)."""
        def ids(x) -> bool:
            return isinstance(x, list) and len(x) > 0 and all(type(i) is int for i in x)

        if isinstance(v, str) or ids(v) or (isinstance(v, list) and v and (
                all(isinstance(x, str) for x in v) or all(ids(x) for x in v))):
            return v
        raise ValueError("must be a non-empty string, a non-empty list of strings, a non-empty list of token ids "
                         "(integers), or a non-empty list of such lists")

    @model_validator(mode="after")
    def _check(self):
        if self.echo and self.stream:
            raise FieldError("echo", "'echo' is not supported with 'stream': true; allowed: echo without stream")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "'best_of' is not supported; allowed: equal to n")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: its text, or its token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)

    @property
    def top_alternatives(self) -> int:
        return self.logprobs or 0


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(fail_fast=True)]
    name: Text | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JSONSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``."""

    name: Text = Field(..., description="the schema's name (OpenAI's; not used)")
    description: Text | None = None
    schema_: dict[str, Any] = Field(..., alias="schema", description="the JSON schema the output must match")
    strict: bool | None = Field(None, description="accepted: the output always matches the schema")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(..., description="text, any JSON object, or "
                                                                  "JSON matching json_schema.schema")
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise FieldError("json_schema", "'response_format.json_schema' is required with type 'json_schema' and "
                             "allowed only with it")
        return self

    @property
    def target_schema(self) -> dict | None:
        """The JSON schema to enforce (None: any JSON object)."""
        return self.json_schema.schema_ if self.json_schema is not None else None

    @property
    def is_json(self) -> bool:
        return self.type != "text"


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(..., min_length=1, fail_fast=True)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the reply is "
                                                   "valid JSON (matching the schema) by construction")

    @model_validator(mode="after")
    def _check(self):
        if self.response_format is not None and self.response_format.is_json:
            for name in ("ignore_eos", "min_tokens"):
                if getattr(self, name):
                    raise FieldError(name, f"'{name}' is not supported with a JSON 'response_format': the "
                                     f"schema decides where the text ends")
        if not any(m.text.strip() for m in self.messages):
            raise ValueError("'messages' must hold some non-empty content")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_alternatives(self) -> int:
        return self.top_logprobs or 0


# --- responses -------------------------------------------------------------------------------


class TokenUncertainty(BaseModel):
    """A token's uncertainty; an echoed prompt's first token has only its text (nothing predicts it)."""

    token: str
    logprob: float | None = Field(..., description="log p(token) under the model average")
    predictive_entropy: float | None
    expected_entropy: float | None
    mutual_information: float | None


class SequenceUncertainty(BaseModel):
    num_tokens: int
    total_logprob: float
    mean_predictive_entropy: float
    max_predictive_entropy: float
    mean_expected_entropy: float
    max_expected_entropy: float
    mean_mutual_information: float
    max_mutual_information: float
    sequence_mutual_information: float = Field(..., description="the K weight samples' disagreement about "
                                               "the whole text: log(mean_k p_k(text)) - mean_k log p_k(text), "
                                               "in nats (0 at K = 1)")


class FieldUncertainty(BaseModel):
    """A top-level field of a JSON reply: the uncertainty of the tokens of its value."""

    num_tokens: int
    mean_mutual_information: float
    max_mutual_information: float
    mean_predictive_entropy: float
    max_predictive_entropy: float


class GenerationUncertainty(BaseModel):
    """tfb's addition to every choice: where the model is epistemically unsure, token by token."""

    tokens: list[TokenUncertainty]
    sequence: SequenceUncertainty | None = Field(None, description="the summary (in a stream: the last chunk)")
    fields: dict[str, FieldUncertainty] | None = Field(None, description="a JSON response_format's reply (not "
                                                       "streamed): per top-level field, its value's tokens")
    num_samples: int
    sigma: float


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(..., description="an echoed prompt's first token: null")
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]
    # tfb: each token's uncertainty, parallel to tokens (where clients that keep only logprobs look)
    predictive_entropy: list[float | None]
    expected_entropy: list[float | None]
    mutual_information: list[float | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None
    uncertainty: GenerationUncertainty


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    # tfb: the token's uncertainty (where clients that keep only logprobs look)
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None
    uncertainty: GenerationUncertainty


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None
    uncertainty: GenerationUncertainty | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None



# --- vLLM's tokenizer endpoints (lm-eval's remote tokenizer, vLLM clients) ------------------------


class TokenizeRequest(_Strict):
    """``POST /tokenize``: a text (``prompt``) or chat turns (``messages``, rendered with the chat template)."""

    model: Text | None = Field(None, description="the served model's id (optional)")
    prompt: Text | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="the tokenizer's special tokens (default: true "
                                            "for a prompt, false for messages: the template has its own)")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant's turn opening")
    return_token_strs: bool = Field(False, description="also each token's text")

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of 'prompt' (a text) or 'messages' (chat turns)")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: Text | None = Field(None, description="the served model's id (optional)")
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """``GET /tokenizer_info``: the tokenizer's configuration (as vLLM answers it)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int
