"""Prometheus metrics (prefix ``tfb_``, label ``model``), one registry per app.

The uncertainty histograms (predictive entropy, expected entropy, mutual information per
endpoint) let an operator watch epistemic uncertainty drift in production.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# nats: entropies of C choices are at most log C (log 26 = 3.26)
ENTROPY_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.3)
MI_BUCKETS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.03, 0.06, 0.1, 0.3, 1.0)
SET_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 16, 26)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric of one server; ``model`` is fixed per app (its served model id)."""

    def __init__(self, model: str):
        self.model = model
        self.registry = r = CollectorRegistry(auto_describe=True)
        ns = "tfb"
        self.requests = Counter("requests", "HTTP requests by endpoint and status", ["model", "endpoint", "status"],
                                namespace=ns, registry=r)
        self.request_duration = Histogram("request_duration_seconds", "HTTP request latency",
                                          ["model", "endpoint", "status"], namespace=ns, registry=r,
                                          buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("queue_depth", "items waiting for a batch", ["model"], namespace=ns, registry=r)
        self.running = Gauge("requests_running", "items in the forward now", ["model"], namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "items per forward", ["model"], namespace=ns, registry=r,
                                    buckets=BATCH_BUCKETS)
        self.batch_rows = Histogram("batch_rows", "sequence rows per forward (items x choices x K)", ["model"],
                                    namespace=ns, registry=r, buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096))
        self.forward_duration = Histogram("forward_duration_seconds", "one batched forward", ["model"],
                                          namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.queue_wait = Histogram("queue_wait_seconds", "time from arrival to the forward", ["model"],
                                    namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "prompt tokens scored (once per item, not x K)",
                                     ["model"], namespace=ns, registry=r)
        self.dropped = Counter("dropped_items", "items dropped before their forward (timeout)", ["model"],
                               namespace=ns, registry=r)
        self.predictive_entropy = Histogram("predictive_entropy", "entropy of the model average (nats)",
                                            ["model", "endpoint"], namespace=ns, registry=r,
                                            buckets=ENTROPY_BUCKETS)
        self.expected_entropy = Histogram("expected_entropy", "mean entropy of the samples (nats)",
                                          ["model", "endpoint"], namespace=ns, registry=r,
                                          buckets=ENTROPY_BUCKETS)
        self.mutual_information = Histogram("mutual_information", "epistemic uncertainty PE - EE (nats)",
                                            ["model", "endpoint"], namespace=ns, registry=r, buckets=MI_BUCKETS)
        self.abstentions = Counter("abstentions", "/v1/choices answers marked abstain, by reason (an answer "
                                   "may have both)", ["model", "reason"], namespace=ns, registry=r)
        self.answers = Counter("calibrated_answers", "/v1/choices answers with a prediction set",
                               ["model"], namespace=ns, registry=r)
        self.prediction_set_size = Histogram("prediction_set_size", "choices in a /v1/choices prediction set",
                                             ["model"], namespace=ns, registry=r, buckets=SET_BUCKETS)
        self.time_to_first_token = Histogram("time_to_first_token_seconds", "arrival to the first generated token",
                                             ["model"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.inter_token_latency = Histogram("inter_token_latency_seconds", "time between generated tokens",
                                             ["model"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.generation_tokens = Counter("generation_tokens", "tokens generated (once per token, not x K)",
                                         ["model"], namespace=ns, registry=r)
        self.decode_batch_size = Histogram("decode_batch_size", "sequences per decode step", ["model"],
                                           namespace=ns, registry=r, buckets=BATCH_BUCKETS)
        self.kv_rows = Gauge("kv_cache_rows", "KV cache rows held by active sequences, in rows of every "
                             "layer (sequences x K; fewer with --stochastic-layers)",
                             ["model"], namespace=ns, registry=r)
        self.kv_rows_max = Gauge("kv_cache_rows_max", "the most KV cache rows held at once since the server "
                                 "started (bounded by --max-kv-rows)", ["model"], namespace=ns, registry=r)
        self.sigma = Gauge("posterior_sigma", "the posterior's sigma", ["model"], namespace=ns, registry=r)
        self.weight_samples = Gauge("weight_samples", "the default K", ["model"], namespace=ns, registry=r)
        self.info = Info("model", "the served model", ["model"], namespace=ns, registry=r)
        self.ready = Gauge("ready", "1 when the model is loaded and serving", ["model"], namespace=ns, registry=r)
        self.ready.labels(model).set(0)
        self.queue_depth.labels(model).set(0)
        self.running.labels(model).set(0)
        self.kv_rows.labels(model).set(0)
        self.kv_rows_max.labels(model).set(0)
        self._kv_rows_max = 0
        self.generation_tokens.labels(model)
        self.answers.labels(model)
        self.prediction_set_size.labels(model)
        for reason in ("set", "uncertainty", "uncertified"):
            self.abstentions.labels(model, reason)

    # --- recording -------------------------------------------------------------------------------

    def observe_request(self, endpoint: str, status: int | str, seconds: float) -> None:
        """``status``: the HTTP status, or "client_closed" for a client that went away first."""
        self.requests.labels(self.model, endpoint, str(status)).inc()
        self.request_duration.labels(self.model, endpoint, str(status)).observe(seconds)

    def observe_uncertainty(self, endpoint: str, pe: float, ee: float, mi: float) -> None:
        self.predictive_entropy.labels(self.model, endpoint).observe(pe)
        self.expected_entropy.labels(self.model, endpoint).observe(ee)
        self.mutual_information.labels(self.model, endpoint).observe(mi)

    def observe_decision(self, set_size: int, reasons: list[str]) -> None:
        """A calibrated answer: its prediction set's size and why it abstains (kinds: ``set``,
        ``uncertainty``, ``uncertified``)."""
        self.answers.labels(self.model).inc()
        self.prediction_set_size.labels(self.model).observe(set_size)
        for reason in reasons:
            self.abstentions.labels(self.model, reason).inc()

    def observe_tokens(self, first: list[float], gaps: list[float], tokens: list) -> None:
        """A decode step's new tokens: times to first token, inter-token gaps (seconds), and
        (endpoint, :class:`tfb_core.TokenInfo`) per token for the uncertainty histograms."""
        if first:
            observe = self.time_to_first_token.labels(self.model).observe
            for x in first:
                observe(x)
        if gaps:
            observe = self.inter_token_latency.labels(self.model).observe
            for x in gaps:
                observe(x)
        if tokens:
            self.generation_tokens.labels(self.model).inc(len(tokens))
        by_endpoint: dict[str, tuple] = {}
        for endpoint, t in tokens:
            if endpoint not in by_endpoint:
                by_endpoint[endpoint] = (self.predictive_entropy.labels(self.model, endpoint).observe,
                                         self.expected_entropy.labels(self.model, endpoint).observe,
                                         self.mutual_information.labels(self.model, endpoint).observe)
            pe, ee, mi = by_endpoint[endpoint]
            pe(t.predictive_entropy)
            ee(t.expected_entropy)
            mi(t.mutual_information)

    def observe_batch(self, size: int, rows: int, seconds: float, prompt_tokens: int) -> None:
        self.batch_size.labels(self.model).observe(size)
        self.batch_rows.labels(self.model).observe(rows)
        self.forward_duration.labels(self.model).observe(seconds)
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)

    def observe_decode(self, sequences: int, rows: int, seconds: float) -> None:
        self.decode_batch_size.labels(self.model).observe(sequences)
        self.forward_duration.labels(self.model).observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.labels(self.model).observe(seconds)

    def observe_dropped(self) -> None:
        self.dropped.labels(self.model).inc()

    def set_work(self, queued: int | None = None, running: int | None = None, kv_rows: int | None = None) -> None:
        """The work gauges: items queued, items in the forward, KV cache rows held (None: unchanged)."""
        for gauge, value in ((self.queue_depth, queued), (self.running, running), (self.kv_rows, kv_rows)):
            if value is not None:
                gauge.labels(self.model).set(value)
        if kv_rows is not None and kv_rows > self._kv_rows_max:
            self._kv_rows_max = kv_rows
            self.kv_rows_max.labels(self.model).set(kv_rows)

    def set_posterior(self, sigma: float, num_samples: int, info: dict[str, str]) -> None:
        self.sigma.labels(self.model).set(sigma)
        self.weight_samples.labels(self.model).set(num_samples)
        self.info.labels(self.model).info({k: str(v) for k, v in info.items()})
        self.ready.labels(self.model).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
