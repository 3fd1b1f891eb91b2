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

from tfb_core.cuda_decode import require_supported, use_static
from tfb_core.cuda_prefill import PrefillEngine
from tfb_core.data import LABELS, MCItem
from tfb_core.errors import TFBError
from tfb_core.scoring import Encoded, apply_chat, choice_probs, encode_item, max_context
from tfb_core.uncertainty import decompose
from tfb_core.evaluate import temper

from .errors import BadRequest
from .limits import Tokenizing, check_chars, max_prompt_chars
from .loader import Loaded
from .metrics import Metrics, Timer
from .protocol import (ChoiceItem, ChoiceResult, ChoicesBatchRequest, ChoicesBatchResponse,
                       UncertaintyOut, Usage)
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

    samples: torch.Tensor  # (K, C)
    probs: torch.Tensor  # (C,)
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
        # a posterior may record a temperature fitted on held-out data (tfb eval)
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
            sample_probs = temper(sample_probs, self.temperature)
            u = decompose(sample_probs[None].double())  # (1, K, C)
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
        self.default_mode = cfg.mode or "letter"

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
        if mode == "letter" and len(item.choices) > len(LABELS):
            raise BadRequest(f"'{where}choices': letter mode allows at most {len(LABELS)} choices, got "
                             f"{len(item.choices)}; use mode 'sequence'", param=f"{where}choices")
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
                                  length_normalize=item.length_normalize, max_length=self.context,
                                  prompt_text=prompt_text)
        except TFBError as e:
            field = next((f for f in ("prompt", "question", "messages") if getattr(item, f) is not None), "prompt")
            raise BadRequest(f"'{where}{field}': {e}", param=f"{where}{field}", code="invalid_value") from None
        seed = self.post.config.seed if item.seed is None else item.seed
        work = ChoiceWork(encoded, seed, K, deadline, loop.create_future())
        self.check_size(work, where)
        return work

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
            choice=item.choices[pred], probs=out.probs.tolist(),
            uncertainty=UncertaintyOut(predictive_entropy=out.predictive_entropy,
                                       expected_entropy=out.expected_entropy,
                                       mutual_information=out.mutual_information),
            samples=out.samples.tolist() if item.return_samples else None,
            num_samples=work.num_samples, seed=work.seed, sigma=self.post.sigma, model=self.model_id,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens * work.num_samples))
