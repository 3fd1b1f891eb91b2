"""Serving ``/v1/choices``: a request becomes work for the worker, and its results an API response.

:class:`ChoicesServing` (event-loop side) validates against the model (context length,
``num_samples`` limit), tokenizes with ``tfb_core.encoding`` (with the event loop's own
copy of the tokenizer: the worker decodes generated text with the posterior's), queues one
:class:`~server.engine.protocol.ChoiceWork` per item, awaits, answers. The engine side
(:class:`~server.engine.core.ModelRunner`, the only code that touches the model) is in
server/engine/core.py.
"""

from __future__ import annotations

import time

from tfb_core import MCItem, Metric, Mode, ScoreOptions, SearchConfig, TFBError, encoding

from .engine.client import EngineClient, check_room
from .engine.protocol import ChoiceOutput, ChoiceWork
from .errors import BadRequest
from .limits import Tokenizing, check_chars, check_samples
from .loader import ServedModel
from .metrics import Metrics
from .protocol import (ChoiceItem, ChoiceResult, ChoicesBatchRequest, ChoicesBatchResponse,
                       CalibrationInfo, PredictionSet, UncertaintyOut, Usage)
from .settings import Settings

CHOICES_ENDPOINT = "/v1/choices"


class ChoicesServing:
    """``POST /v1/choices``: validate, tokenize, queue, await, answer."""

    def __init__(self, model: ServedModel, engine: EngineClient, settings: Settings, metrics: Metrics,
                 tokenizing: Tokenizing | None = None):
        self.model = model
        self.model_id = model.model_id
        self.tokenizer = model.tokenizer
        self.tokenizing = tokenizing or Tokenizing()  # the one thread that uses it
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.context = model.context
        self.bound = model.token_bound
        cfg = model.config
        self.calibrated = cfg.score_options  # how the calibration scored its items
        self.defaults = self.calibrated.resolve(chat=settings.chat, num_samples=settings.samples)  # the server's
        self.calibration = cfg.conformal  # prediction sets and abstention, when the posterior holds one
        self.confidence = cfg.confidence_model  # the learned P(right), or the tempered max p
        for flag, given in (("--max-risk", settings.max_risk is not None), ("--abstain-on-set", settings.abstain_on_set),
                            ("--coverage", settings.coverage is not None)):
            if given and self.calibration is None:
                raise TFBError(f"{flag} needs a posterior with a held-out labelled calibration, and this one has "
                               f"none: run tfb bayesianize with an 'answer' on every calibration item")
        self.risk = self.calibration.risk_threshold(settings.max_risk) if self.calibration else None
        self.abstain_on_set = settings.abstain_on_set or bool(self.calibration and self.calibration.abstain_on_set)
        self.default_coverage = settings.coverage or (self.calibration.coverage if self.calibration
                                                        else SearchConfig.default("coverage"))

    def calibration_info(self) -> CalibrationInfo | None:
        cal, risk = self.calibration, self.risk
        if cal is None:
            return None
        threshold = risk.threshold
        if threshold is not None and cal.abstain_on == Metric.CONFIDENCE.value:
            threshold = 1.0 - threshold  # the lowest confidence answered
        return CalibrationInfo(size=cal.n, score=cal.score, coverage=self.default_coverage,
                               abstain_on=cal.abstain_on, max_risk=risk.max_risk, delta=risk.delta,
                               threshold=threshold, risk_bound=risk.risk_bound,
                               answered=risk.accepted / risk.n, abstain_on_set=self.abstain_on_set)

    def check_coverage(self, coverage: float, param: str) -> None:
        """400 when the held-out calibration is too small for ``coverage`` (O(1), whatever the coverage)."""
        n = self.calibration.n
        if not self.calibration.covers(coverage):
            raise BadRequest(f"'{param}' {coverage!r} needs at least {self.calibration.min_size(coverage)} held-out "
                             f"calibration items; this posterior has {n}: ask for a coverage of at most "
                             f"{self.calibration.max_coverage()!r}", param=param, code="invalid_value")

    async def create(self, request: ChoiceItem | ChoicesBatchRequest
                     ) -> ChoiceResult | ChoicesBatchResponse:
        batch = isinstance(request, ChoicesBatchRequest)
        items = request.items if batch else [request]
        if len(items) > self.settings.max_items:
            raise BadRequest(f"'items' has {len(items)} entries; at most {self.settings.max_items} "
                             f"are allowed in one request", param="items")
        options = [item.to_score_options(self.defaults) for item in items]
        for i, (item, opts) in enumerate(zip(items, options)):
            self.check(item, opts, f"items.{i}." if batch else "")
        # before tokenizing (submit checks again)
        check_room(True, self.engine.depth, len(items), self.settings.max_queue)
        deadline = time.monotonic() + self.settings.request_timeout
        work = await self.tokenizing.run(lambda: [self.prepare(item, opts, f"items.{i}." if batch else "", deadline)
                                                  for i, (item, opts) in enumerate(zip(items, options))])
        outputs = await self.engine.wait(self.engine.submit(work), self.settings.request_timeout)
        results = [self.result(i, item, opts, w, out)
                   for i, (item, opts, w, out) in enumerate(zip(items, options, work, outputs))]
        if not batch:
            return results[0]
        usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in results),
                      total_tokens=sum(r.usage.total_tokens for r in results))
        return ChoicesBatchResponse(items=results, model=self.model_id, usage=usage)

    def check(self, item: ChoiceItem, options: ScoreOptions, where: str) -> None:
        """Counts and sizes, before any tokenizing: K, choices, characters."""
        check_samples(options.num_samples, self.settings.max_samples, f"{where}num_samples")
        if len(item.choices) > self.settings.max_choices:
            raise BadRequest(f"'{where}choices' has {len(item.choices)} entries; at most "
                             f"{self.settings.max_choices} are allowed per item", param=f"{where}choices")
        problem = encoding.letter_limit(len(item.choices)) if options.mode is Mode.LETTER else None
        if problem:
            raise BadRequest(f"'{where}choices': {problem}; use mode 'sequence'", param=f"{where}choices")
        if item.coverage is not None:
            if self.calibration is None:
                raise BadRequest(f"'{where}coverage': this posterior has no held-out calibration, so it "
                                 f"gives no prediction sets; make one with tfb bayesianize on labelled "
                                 f"calibration items", param=f"{where}coverage", code="invalid_value")
            self.check_coverage(item.coverage, f"{where}coverage")
        self.check_chars(item, where, options)

    def check_chars(self, item: ChoiceItem, where: str, options: ScoreOptions) -> None:
        """The item's size from its characters, before tokenizing (linear in its text): its longest
        row (the prompt, which in letter mode lists every choice of a question; in sequence mode
        the prompt and a choice) must fit the context, and its rows x that row the item's budget."""
        field = next(f for f in ("prompt", "question", "messages") if getattr(item, f) is not None)
        chars = len(item.prompt or item.question or "") + sum(len(m.content) for m in item.messages or [])
        sequences = 1
        if options.mode is Mode.SEQUENCE:  # a row per choice: the prompt, then the choice (tokenized apart)
            chars, sequences = chars + max(len(c) for c in item.choices), len(item.choices)
        elif item.question is not None:  # one row, listing every choice
            chars += sum(len(c) for c in item.choices)
        what = " with its choices" if options.mode is Mode.SEQUENCE or item.question is not None else ""
        check_chars(chars, self.bound, f"{where}{field}", self.model.context_limit, what)
        K = options.num_samples
        tokens, limit = self.bound.min_tokens(chars), self.settings.item_token_limit
        if sequences * K * tokens > limit:
            what = f"'{where[:-1]}'" if where else "the item"
            raise BadRequest(f"{what} needs {sequences * K} rows ({sequences} sequence(s) x {K} samples) of at "
                             f"least {tokens} tokens ({chars} characters) = at least {sequences * K * tokens} "
                             f"padded tokens; at most {limit} are allowed per item: use fewer choices or "
                             f"samples, or a shorter prompt", param=where[:-1] or None, code="item_too_large")

    def prepare(self, item: ChoiceItem, options: ScoreOptions, where: str, deadline: float) -> ChoiceWork:
        """Tokenize the item (on the tokenizing thread, after :meth:`check`) and check its size."""
        mc = MCItem(choices=list(item.choices), question=item.question,
                    prompt=item.prompt if item.prompt is not None else ("(messages)" if item.messages else None))
        try:
            prompt_text = encoding.apply_chat(self.tokenizer, [m.model_dump() for m in item.messages]) \
                if item.messages else None
            encoded = encoding.encode_item(self.tokenizer, mc, options.mode, chat=options.chat and prompt_text is None,
                                  length_normalize=options.length_normalize, max_length=self.context,
                                  prompt_text=prompt_text)
        except TFBError as e:
            field = next((f for f in ("prompt", "question", "messages") if getattr(item, f) is not None), "prompt")
            raise BadRequest(f"'{where}{field}': {e}", param=f"{where}{field}", code="invalid_value") from None
        work = ChoiceWork(encoded, options.seed, options.num_samples, deadline)
        self.check_size(work, where)
        return work

    def matches_calibration(self, item: ChoiceItem, options: ScoreOptions) -> bool:
        """The request is scored as the held-out calibration was (else its guarantee does not
        apply): a question (rendered with the calibration's template; a raw prompt or chat
        messages are not), with the calibration's score options, every one of them."""
        return item.question is not None and options == self.calibrated

    def decision(self, item: ChoiceItem, options: ScoreOptions, out: ChoiceOutput, confidence: float) -> dict:
        """``prediction_set``, ``abstain`` and ``abstain_reasons`` of an answer (calibrated posteriors)."""
        if self.calibration is None:
            return {}
        cal = self.calibration
        coverage = item.coverage or self.default_coverage
        d = cal.decide(out.probs, {"mutual_information": out.mutual_information,
                                    "predictive_entropy": out.predictive_entropy, "confidence": confidence},
                   coverage, self.risk, self.abstain_on_set)
        self.metrics.observe_decision(len(d.indices), d.kinds)
        matches = self.matches_calibration(item, options)
        guarantee = (f"P(answer in set) >= {coverage!r} over items exchangeable with the {cal.n} held-out "
                     f"calibration items (marginal, not per question; under a shift in the questions it "
                     f"can cover less)" if matches else
                     "none: this request's settings differ from the calibration's")
        labels = [encoding.label(i) for i in d.indices]
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

    def result(self, index: int, item: ChoiceItem, options: ScoreOptions, work: ChoiceWork,
               out: ChoiceOutput) -> ChoiceResult:
        self.metrics.observe_uncertainty(CHOICES_ENDPOINT, out.predictive_entropy,
                                         out.expected_entropy, out.mutual_information)
        pred = int(out.probs.argmax())
        tokens = work.encoded.prompt_tokens
        confidence = float(self.confidence.of(out.samples[None], self.model.config.temperature)[0])
        return ChoiceResult(
            index=index, prediction=pred, label=encoding.label(pred),
            choice=item.choices[pred], probs=out.probs.tolist(), temperature=self.model.config.temperature,
            tempered=["probs"] if self.model.config.temperature != 1.0 else [],
            uncertainty=UncertaintyOut(predictive_entropy=out.predictive_entropy,
                                       expected_entropy=out.expected_entropy,
                                       mutual_information=out.mutual_information),
            confidence=confidence, confidence_model=self.confidence.model,
            samples=out.samples.tolist() if item.return_samples else None,
            num_samples=work.num_samples, seed=work.seed, sigma=self.model.sigma, model=self.model_id,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens * work.num_samples),
            **self.decision(item, options, out, confidence))
