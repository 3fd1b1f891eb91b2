"""The serving layer: a request becomes tfb_core calls, and their results an API response.

Event-loop side (:class:`ChoicesServing`): validate against the model (context length,
``num_samples`` limit), tokenize with ``tfb_core.scoring.encode_item`` (with the event loop's
own copy of the tokenizer: the worker decodes generated text with the posterior's), queue one
:class:`ChoiceWork` per item, await, answer.

Worker side (:class:`ModelRunner`): the only code that touches the model. ``step(batch)``
scores every item of the batch in ONE forward over items x choices x K rows
(``choice_probs``), then reduces each item's (K, C) probabilities to the model average and
its entropy split (``decompose``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from tfb_core import (COVERAGE, Encoded, LABELS, MCItem, Mode, PrefillEngine, TFBError, apply_chat,
                      choice_probs, decide, decompose, encode_item, max_context,
                      min_calibration_size, require_supported, use_static)

from .errors import BadRequest
from .limits import Tokenizing, check_chars, max_prompt_chars
from .loader import Loaded
from .metrics import Metrics, Timer
from .protocol import (ChoiceItem, ChoiceResult, ChoicesBatchRequest, ChoicesBatchResponse,
                       CalibrationInfo, PredictionSet, UncertaintyOut, Usage)
from .scheduler import Batch, Scheduler
from .settings import Settings

CHOICES_ENDPOINT = "/v1/choices"


@dataclass(eq=False)
class ChoiceWork:
    """One multiple-choice item, tokenized, waiting for its forward."""

    encoded: Encoded
    seed: int
    num_samples: int
    deadline: float
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "choice"

    @property
    def rows(self) -> int:
        return len(self.encoded.sequences) * self.num_samples

    @property
    def length(self) -> int:
        return max(len(s) for s in self.encoded.sequences)


@dataclass
class ChoiceOutput:
    """An item's per-sample probabilities and their reduction."""

    samples: torch.Tensor  # (K, C), untempered
    probs: torch.Tensor  # (C,) the tempered model average
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float


class ModelRunner:
    """Owns the posterior; ``step`` runs on the scheduler's worker thread only."""

    def __init__(self, loaded: Loaded, metrics: Metrics, engine: str = "auto"):
        from .generating import GenerationEngine

        self.post = loaded.post
        self.metrics = metrics
        static = use_static(self.post) if engine == "auto" else engine == "static"
        if static:
            try:
                require_supported(self.post.model)
            except ValueError as e:
                raise ValueError(f"--engine static: {e}; use auto or eager") from None
        # scoring forwards: fused kernels, CUDA graphs on CUDA (None: HF's eager forward)
        self.prefill = PrefillEngine(self.post) if static else None
        self.engine = GenerationEngine(self.post, metrics, static)  # the continuous decode loop's state
        # the posterior's temperature, applied to the model average only (TFB_SPEC §4b)
        self.temperature = float(getattr(self.post.config, "temperature", 1.0) or 1.0)

    def step(self, batch: Batch) -> list:
        if batch.kind == "generate":
            return self.engine.admit(batch.items)
        if batch.kind != "choice":
            raise ValueError(f"no step for work of kind {batch.kind!r}")
        return self.choices_step(batch.items)

    def choices_step(self, items: list[ChoiceWork]) -> list[ChoiceOutput | Exception]:
        with Timer() as t:
            per_item = choice_probs(self.post, [w.encoded for w in items],
                                    [(w.seed, w.num_samples) for w in items],
                                    engine=self.prefill)  # [(K_i, C_i)]
        self.metrics.observe_batch(len(items), sum(w.rows for w in items), t.seconds,
                                   sum(w.encoded.prompt_tokens for w in items))
        outputs = []
        for sample_probs in per_item:
            if not torch.isfinite(sample_probs).all():  # this item's forward went non-finite: it alone fails
                outputs.append(BadRequest("the model's choice probabilities for this item are not finite (NaN "
                                          "or infinite logits); it was stopped alone",
                                          code="non_finite_distribution"))
                continue
            u = decompose(sample_probs[None].double(), self.temperature)  # (1, K, C)
            outputs.append(ChoiceOutput(sample_probs, u.probs[0], u.predictive_entropy.item(),
                                        u.expected_entropy.item(), u.mutual_information.item()))
        return outputs


class ChoicesServing:
    """``POST /v1/choices``: validate, tokenize, queue, await, answer."""

    def __init__(self, loaded: Loaded, scheduler: Scheduler, settings: Settings, metrics: Metrics,
                 tokenizer=None, tokenizing: Tokenizing | None = None):
        self.post = loaded.post
        self.model_id = loaded.model_id
        self.tokenizer = tokenizer or loaded.post.tokenizer  # the event loop's (see server.app.ready)
        self.tokenizing = tokenizing or Tokenizing()  # the one thread that uses it
        self.scheduler = scheduler
        self.settings = settings
        self.metrics = metrics
        self.context = max_context(self.post.model)
        self.max_chars = max_prompt_chars(self.tokenizer, self.context or 2048)
        cfg = self.post.config
        self.default_chat = settings.chat if settings.chat is not None else bool(getattr(cfg, "chat", False))
        self.default_mode = cfg.mode or Mode.LETTER
        self.calibration = cfg.conformal  # prediction sets and abstention, when the posterior holds one
        self.risk = self.calibration.risk_threshold(settings.max_risk) if self.calibration else None
        self.default_coverage = settings.coverage or (self.calibration.coverage if self.calibration else COVERAGE)

    def calibration_info(self) -> CalibrationInfo | None:
        cal, risk = self.calibration, self.risk
        if cal is None:
            return None
        return CalibrationInfo(size=cal.n, score=cal.score, coverage=self.default_coverage,
                               abstain_on=cal.abstain_on, max_risk=risk.max_risk, delta=risk.delta,
                               threshold=risk.threshold, risk_bound=risk.risk_bound,
                               answered=risk.accepted / risk.n)

    def check_coverage(self, coverage: float, param: str) -> None:
        """400 when the held-out calibration is too small for ``coverage``."""
        need = min_calibration_size(coverage)
        if need > self.calibration.n:
            raise BadRequest(f"'{param}' {coverage:g} needs at least {need} held-out calibration items; this "
                             f"posterior has {self.calibration.n}: ask for a coverage of at most "
                             f"{self.calibration.n / (self.calibration.n + 1):.4g}", param=param,
                             code="invalid_value")

    async def create(self, request: ChoiceItem | ChoicesBatchRequest
                     ) -> ChoiceResult | ChoicesBatchResponse:
        batch = isinstance(request, ChoicesBatchRequest)
        items = request.items if batch else [request]
        if len(items) > self.settings.max_items:
            raise BadRequest(f"'items' has {len(items)} entries; at most {self.settings.max_items} "
                             f"are allowed in one request", param="items")
        for i, item in enumerate(items):
            self.check(item, f"items.{i}." if batch else "")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout
        work = await self.tokenizing.run(lambda: [self.prepare(item, f"items.{i}." if batch else "", loop, deadline)
                                                  for i, item in enumerate(items)])
        self.scheduler.submit(work)
        outputs = await self.scheduler.wait(work, self.settings.request_timeout)
        results = [self.result(i, item, w, out) for i, (item, w, out) in enumerate(zip(items, work, outputs))]
        if not batch:
            return results[0]
        usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in results),
                      total_tokens=sum(r.usage.total_tokens for r in results))
        return ChoicesBatchResponse(items=results, model=self.model_id, usage=usage)

    def check(self, item: ChoiceItem, where: str) -> None:
        """Counts and sizes, before any tokenizing: K, choices, characters."""
        K = item.num_samples or self.settings.samples
        if K > self.settings.max_samples:
            raise BadRequest(f"'{where}num_samples' is {K}; allowed: 1 to {self.settings.max_samples}",
                             param=f"{where}num_samples", code="invalid_value")
        if len(item.choices) > self.settings.max_choices:
            raise BadRequest(f"'{where}choices' has {len(item.choices)} entries; at most "
                             f"{self.settings.max_choices} are allowed per item", param=f"{where}choices")
        mode = item.mode or self.default_mode
        if mode is Mode.LETTER and len(item.choices) > len(LABELS):
            raise BadRequest(f"'{where}choices': letter mode allows at most {len(LABELS)} choices, got "
                             f"{len(item.choices)}; use mode 'sequence'", param=f"{where}choices")
        if item.coverage is not None:
            if self.calibration is None:
                raise BadRequest(f"'{where}coverage': this posterior has no held-out calibration, so it "
                                 f"gives no prediction sets; make one with tfb bayesianize on labelled "
                                 f"calibration items", param=f"{where}coverage", code="invalid_value")
            self.check_coverage(item.coverage, f"{where}coverage")
        text = item.prompt or item.question or "".join(m.content for m in item.messages or [])
        field = next(f for f in ("prompt", "question", "messages") if getattr(item, f) is not None)
        check_chars(len(text) + max(len(c) for c in item.choices), self.max_chars, f"{where}{field}",
                    self.context or 2048)

    def prepare(self, item: ChoiceItem, where: str, loop, deadline: float) -> ChoiceWork:
        """Tokenize the item (on the tokenizing thread, after :meth:`check`) and check its size."""
        K = item.num_samples or self.settings.samples
        chat = item.chat if item.chat is not None else self.default_chat
        mode = item.mode or self.default_mode
        mc = MCItem(choices=list(item.choices), question=item.question,
                    prompt=item.prompt if item.prompt is not None else ("(messages)" if item.messages else None))
        try:
            prompt_text = apply_chat(self.tokenizer, [m.model_dump() for m in item.messages]) \
                if item.messages else None
            encoded = encode_item(self.tokenizer, mc, mode, chat=chat and prompt_text is None,
                                  length_normalize=self.length_normalize(item), max_length=self.context,
                                  prompt_text=prompt_text)
        except TFBError as e:
            field = next((f for f in ("prompt", "question", "messages") if getattr(item, f) is not None), "prompt")
            raise BadRequest(f"'{where}{field}': {e}", param=f"{where}{field}", code="invalid_value") from None
        seed = self.post.config.seed if item.seed is None else item.seed
        work = ChoiceWork(encoded, seed, K, deadline, loop.create_future())
        self.check_size(work, where)
        return work

    def length_normalize(self, item: ChoiceItem) -> bool:
        if item.length_normalize is not None:
            return item.length_normalize
        return bool(self.post.config.length_normalize)

    def matches_calibration(self, item: ChoiceItem, work: ChoiceWork) -> bool:
        """The request is scored as the held-out calibration was (else its guarantee does not apply)."""
        cfg = self.post.config
        chat = item.chat if item.chat is not None else self.default_chat
        return (work.num_samples == cfg.num_samples and work.seed == cfg.seed
                and (item.mode or self.default_mode) is (cfg.mode or Mode.LETTER)
                and self.length_normalize(item) == bool(cfg.length_normalize) and chat == bool(cfg.chat))

    def decision(self, item: ChoiceItem, work: ChoiceWork, out: ChoiceOutput) -> dict:
        """``prediction_set``, ``abstain`` and ``abstain_reasons`` of an answer (calibrated posteriors)."""
        if self.calibration is None:
            return {}
        cal = self.calibration
        coverage = item.coverage or self.default_coverage
        d = decide(cal, out.probs, {"mutual_information": out.mutual_information,
                                    "predictive_entropy": out.predictive_entropy}, coverage, self.risk)
        kinds = [("set" if r.startswith("the ") else "uncertified" if r.startswith("no ") else "uncertainty")
                 for r in d.reasons]
        self.metrics.observe_decision(len(d.indices), kinds)
        matches = self.matches_calibration(item, work)
        guarantee = (f"P(answer in set) >= {coverage:g} over items exchangeable with the {cal.n} held-out "
                     f"calibration items (marginal, not per question; under a shift in the questions it "
                     f"can cover less)" if matches else
                     "none: this request's settings differ from the calibration's")
        labels = [LABELS[i] if i < len(LABELS) else str(i) for i in d.indices]
        return {"prediction_set": PredictionSet(indices=d.indices, labels=labels, coverage=coverage,
                                                score=cal.score, calibration_size=cal.n,
                                                matches_calibration=matches, guarantee=guarantee),
                "abstain": d.abstain, "abstain_reasons": d.reasons}

    def check_size(self, work: ChoiceWork, where: str) -> None:
        """An item's forward may pad at most ``item_token_limit`` tokens (rows x longest row)."""
        limit, cost = self.settings.item_token_limit, work.rows * work.length
        if cost <= limit:
            return
        what = f"'{where[:-1]}'" if where else "the item"
        raise BadRequest(f"{what} needs {work.rows} rows ({len(work.encoded.sequences)} sequence(s) x "
                         f"{work.num_samples} samples) of up to {work.length} tokens = {cost} padded tokens; "
                         f"at most {limit} are allowed per item: use fewer choices or samples, or a "
                         f"shorter prompt", param=where[:-1] or None, code="item_too_large")

    def result(self, index: int, item: ChoiceItem, work: ChoiceWork, out: ChoiceOutput) -> ChoiceResult:
        self.metrics.observe_uncertainty(CHOICES_ENDPOINT, out.predictive_entropy,
                                         out.expected_entropy, out.mutual_information)
        pred = int(out.probs.argmax())
        tokens = work.encoded.prompt_tokens
        return ChoiceResult(
            index=index, prediction=pred, label=LABELS[pred] if pred < len(LABELS) else str(pred),
            choice=item.choices[pred], probs=out.probs.tolist(), temperature=self.post.config.temperature,
            tempered=["probs"] if self.post.config.temperature != 1.0 else [],
            uncertainty=UncertaintyOut(predictive_entropy=out.predictive_entropy,
                                       expected_entropy=out.expected_entropy,
                                       mutual_information=out.mutual_information),
            samples=out.samples.tolist() if item.return_samples else None,
            num_samples=work.num_samples, seed=work.seed, sigma=self.post.sigma, model=self.model_id,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens * work.num_samples),
            **self.decision(item, work, out))
