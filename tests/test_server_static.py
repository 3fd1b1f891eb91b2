"""The server's CUDA engine (``--engine static``: :class:`StaticDecoder` for generation,
:class:`PrefillEngine` for scoring) behind the real HTTP API, run here on the CPU (eagerly: the
code a CUDA graph captures): concurrent requests with different K and sampling join and leave
one running batch, choice items with different K and modes share a forward, and every response
equals the eager engine's (``--engine eager``) for the same request."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

import tiny
from server_helpers import RunnerLog, ServerThread, bayesianized, metric, wait_for


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("srvstatic")
    base = tiny.make_llama(root / "base")
    return base, bayesianized(base, tiny.make_lora(base, root / "lora"), root / "post", sigma=0.5)


def requests():
    """(prompt, max_tokens, extra) per request: K and sampling differ."""
    out = []
    for i in range(6):
        extra = {"num_samples": 2 + i % 3}
        sampling = {"temperature": 0.8, "seed": 100 + i} if i % 3 == 1 else {"temperature": 0}
        out.append((f"Story number {i}: once", 3 + 3 * i, {**extra, **sampling}))
    return out


def run_all(url: str) -> list[dict]:
    """All requests at once (they join the running batch at different steps)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    results: dict[int, dict] = {}

    def one(i, prompt, n, extra):
        sampling = {k: extra.pop(k) for k in ("temperature", "seed") if k in extra}
        r = client.completions.create(model=model, prompt=prompt, max_tokens=n, logprobs=2,
                                      extra_body=extra, **sampling)
        c = r.choices[0]
        results[i] = {"text": c.text, "logprobs": c.logprobs.token_logprobs,
                      "mi": [t["mutual_information"] for t in c.model_extra["uncertainty"]["tokens"]]}

    threads = [threading.Thread(target=one, args=(i, p, n, dict(e))) for i, (p, n, e) in enumerate(requests())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [results[i] for i in range(len(threads))]


CHOICES = {"items": [{"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"]},
                     {"question": "2 + 2 =", "choices": ["4", "five", "22"], "mode": "sequence", "num_samples": 5},
                     {"prompt": "The sky is", "choices": ["blue", "green"], "mode": "sequence", "num_samples": 2}]}


def test_static_engine_serves_what_the_eager_engine_serves(dirs):
    base, post = dirs
    common = dict(model=str(base), adapter=post, samples=3, max_wait_ms=20)
    log = RunnerLog()
    with ServerThread(engine="eager", runner=log.runner, **common) as s:
        [runner] = log.runners
        assert runner.kind == "eager" and runner.model.prefill is None  # HF's forward
        eager = run_all(s.url)
        eager_choices = httpx.post(f"{s.url}/v1/choices", json=CHOICES, timeout=60).json()["items"]
    log = RunnerLog()
    with ServerThread(engine="static", runner=log.runner, **common) as s:
        static = run_all(s.url)
        static_choices = httpx.post(f"{s.url}/v1/choices", json=CHOICES, timeout=60).json()["items"]
        [runner] = log.runners
        assert runner.kind == "static" and runner.model.prefill.slot_of  # the scoring went through the prefill engine
        [decoder] = log.decoders  # one, kept
        assert decoder.rows_cap >= 4  # several sequences at once
        wait_for(lambda: metric(s, "tfb_kv_cache_rows") == 0, what="every row released")
        metrics = httpx.get(f"{s.url}/metrics").text
    for e, g in zip(eager, static, strict=True):
        assert g["text"] == e["text"]
        assert g["logprobs"] == pytest.approx(e["logprobs"], abs=1e-4)
        assert g["mi"] == pytest.approx(e["mi"], abs=1e-4)
    assert any(max(r["mi"]) > 1e-6 for r in static)
    for e, g in zip(eager_choices, static_choices, strict=True):
        assert g["probs"] == pytest.approx(e["probs"], abs=1e-5)
        assert g["uncertainty"] == pytest.approx(e["uncertainty"], abs=1e-5)
    assert "tfb_kv_cache_rows" in metrics


def test_static_engine_refused_for_an_unsupported_model(tmp_path):
    base = tiny.make_gpt2(tmp_path / "gpt2")
    post = bayesianized(base, tiny.make_lora(base, tmp_path / "lora", targets=("c_attn",)), tmp_path / "post")
    s = ServerThread(model=str(base), adapter=post, engine="static").start(wait=False)
    try:
        for _ in range(600):
            if s.state.status == "failed":
                break
            threading.Event().wait(0.05)
        assert s.state.status == "failed"
        assert "--engine static: model type 'gpt2' is not supported" in s.state.detail
        assert httpx.get(f"{s.url}/health").status_code == 503
    finally:
        s.stop()


def test_static_engine_recovers_from_a_failed_step_with_a_fresh_decoder(dirs, monkeypatch):
    """A decode step that runs out of memory is rerun one sequence at a time (answered as
    before when that fits); a sequence whose own step runs out of memory fails (503) and the
    decoder, restored, serves the next request; when even the rerun machinery fails, every
    running request fails (503), the decoder is dropped and the next request gets a fresh one."""
    import torch

    from tfb_core.cuda_decode import StaticDecoder

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    base, post = dirs
    log = RunnerLog()
    with ServerThread(model=str(base), adapter=post, samples=3, max_wait_ms=20, engine="static",
                      runner=log.runner) as s:
        body = {"model": httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"], "prompt": "Once upon",
                "max_tokens": 6, "temperature": 0}

        def text():
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
            return r.json()["choices"][0]["text"] if r.status_code == 200 else (r.status_code, r.json())

        before = text()
        [first] = log.decoders
        with monkeypatch.context() as m:  # the shared step fails, each sequence alone fits
            m.setattr(StaticDecoder, "step", oom)
            assert text() == before
        with monkeypatch.context() as m:  # its own step fails too
            m.setattr(StaticDecoder, "_forward", oom)
            status, err = text()
            assert status == 503 and err["error"]["code"] == "out_of_memory"
            assert s.state.engine.idle and metric(s, "tfb_kv_cache_rows") == 0 and log.decoders == [first]
        assert text() == before
        with monkeypatch.context() as m:  # the rerun itself fails: the decoder is dropped
            m.setattr(StaticDecoder, "step", oom)
            m.setattr(StaticDecoder, "step_each", oom)
            status, err = text()
            assert status == 503 and err["error"]["code"] == "out_of_memory"
            assert s.state.engine.idle and metric(s, "tfb_kv_cache_rows") == 0
        assert text() == before
        assert len(log.decoders) == 2 and log.decoders[1] is not first  # the failed one dropped, a fresh one made
