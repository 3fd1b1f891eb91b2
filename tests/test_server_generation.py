"""OpenAI-compatible generation against a real uvicorn server, with the official openai client."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import openai
import pytest
import torch

import tiny
from server_helpers import Faults, ServerThread, bayesianized, faulty_runner, leave_stream, metric, wait_for
from tfb_core.errors import TFBError
from tfb_core.generation import SamplingParams, generate
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior

SIGMA = 0.5
K = 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("srvgen")
    base = tiny.make_llama(root / "base")
    lora = tiny.make_lora(base, root / "lora")
    return base, bayesianized(base, lora, root / "post", sigma=SIGMA)


@pytest.fixture(scope="module")
def srv(dirs):
    base, post = dirs
    with ServerThread(model=str(base), adapter=post, samples=K, max_wait_ms=20) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def core(dirs):
    base, post = dirs
    return Posterior.load(load_base_model(base, "cpu", "float32"), post)


def check_tokens(tokens):
    for t in tokens:
        assert t["mutual_information"] >= 0
        assert t["predictive_entropy"] == pytest.approx(t["expected_entropy"] + t["mutual_information"], abs=1e-5)
        assert t["logprob"] <= 0


def test_completion_matches_tfb_core_and_is_consistent(client, model_id, core):
    prompt = "The capital of France is"
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    choice = r.choices[0]
    unc = choice.model_extra["uncertainty"]
    ref = generate(core, [core.tokenizer(prompt).input_ids],
                   SamplingParams(max_tokens=6, num_samples=K, weight_seed=core.config.seed, top_logprobs=3))[0]
    assert choice.text == ref.text
    assert [t["token"] for t in unc["tokens"]] == [core.tokenizer.decode([t.token_id]) for t in ref.tokens]
    for got, exp in zip(unc["tokens"], ref.tokens):
        assert got["logprob"] == pytest.approx(exp.logprob, abs=1e-5)
        assert got["mutual_information"] == pytest.approx(exp.mutual_information, abs=1e-5)
    check_tokens(unc["tokens"])
    # the logprobs block and the uncertainty agree; greedy picks the most probable token
    assert choice.logprobs.token_logprobs == pytest.approx([t["logprob"] for t in unc["tokens"]])
    for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert lp == pytest.approx(max(top.values()), abs=1e-6)
    assert unc["num_samples"] == K and unc["sigma"] == pytest.approx(SIGMA)
    seq = unc["sequence"]
    assert seq["num_tokens"] == 6 == r.usage.completion_tokens
    assert seq["total_logprob"] == pytest.approx(sum(choice.logprobs.token_logprobs), abs=1e-5)
    assert seq["max_mutual_information"] == pytest.approx(max(t["mutual_information"] for t in unc["tokens"]))
    assert r.usage.prompt_tokens == len(core.tokenizer(prompt).input_ids)
    assert choice.finish_reason == "length"


def test_chat_plain_and_streaming_agree(client, model_id):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert len(c.logprobs.content) == 6 and len(c.logprobs.content[0].top_logprobs) == 2
    unc = c.model_extra["uncertainty"]
    check_tokens(unc["tokens"])
    assert [t.logprob for t in c.logprobs.content] == pytest.approx([t["logprob"] for t in unc["tokens"]])

    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    streamed = [t for ch in chunks if ch.choices
                for t in (ch.choices[0].model_extra.get("uncertainty") or {}).get("tokens", [])]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t["token"] for t in streamed] == [t["token"] for t in unc["tokens"]]
    usage, last = chunks[-1], chunks[-2]
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert usage.usage.total_tokens == r.usage.total_tokens
    assert last.choices[0].finish_reason == "length"
    assert last.choices[0].model_extra["uncertainty"]["sequence"]["num_tokens"] == 6


def test_stream_ends_with_done(srv, model_id):
    with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=60,
                      json={"model": model_id, "prompt": "Hello", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_string_and_seeded_sampling(client, model_id):
    free = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0)
    stop = free.choices[0].text[3:5]
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free.choices[0].text[: free.choices[0].text.find(stop)]
    a = client.completions.create(model=model_id, prompt="Hi", max_tokens=5, temperature=1.0, seed=9, n=2)
    b = client.completions.create(model=model_id, prompt="Hi", max_tokens=5, temperature=1.0, seed=9, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2


def test_eight_concurrent_streams_are_batched_and_get_their_own_tokens(srv, client, model_id):
    prompts = [f"Story number {i}: once" for i in range(8)]
    lengths = [3 + 2 * i for i in range(8)]
    expected = [client.completions.create(model=model_id, prompt=p, max_tokens=n, temperature=0).choices[0].text
                for p, n in zip(prompts, lengths)]
    steps_before = metric(srv, "tfb_decode_batch_size_count")
    multi_before = steps_before - metric(srv, "tfb_decode_batch_size_bucket", le="1.0")
    results: dict[int, tuple[str, int]] = {}

    def run(i: int) -> None:
        chunks = list(client.completions.create(model=model_id, prompt=prompts[i], max_tokens=lengths[i],
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        results[i] = (text, chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    srv.state.engine.pause()  # all eight queue, then start together (not one by one as they come)
    try:
        for t in threads:
            t.start()
        wait_for(lambda: srv.state.engine.depth == 8, what="the eight streams queued")
    finally:
        srv.state.engine.resume()
    for t in threads:
        t.join(120)
    assert [results[i][0] for i in range(8)] == expected
    assert [results[i][1] for i in range(8)] == lengths
    multi_after = metric(srv, "tfb_decode_batch_size_count") - metric(srv, "tfb_decode_batch_size_bucket", le="1.0")
    assert multi_after > multi_before  # decode steps advanced several sequences at once


def test_disconnect_mid_stream_frees_the_slot(srv, model_id):
    body = {"model": model_id, "prompt": "A very long story begins", "max_tokens": 400, "stream": True}
    leave_stream(f"{srv.url}/v1/completions", body)  # the client goes away after 3 events
    wait_for(lambda: metric(srv, "tfb_requests_running") == 0 and metric(srv, "tfb_kv_cache_rows") == 0,
             timeout=20, what="the abandoned stream's slot freed")
    # the server still answers
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": model_id, "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n"),
    ("/v1/completions", {"prompt": ["hi"] * 40, "n": 8}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 2}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": "x", "num_samples": 10**6}, 400, "num_samples"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, 400, None),
])
def test_bad_generation_input_gets_4xx(srv, model_id, path, body, status, param):
    body = {"model": model_id, **body}
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    ok = httpx.post(f"{srv.url}/v1/completions", json={"model": model_id, "prompt": "x", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200


def test_generation_metrics_move(srv, client, model_id):
    before = metric(srv, "tfb_generation_tokens_total")
    ttft = metric(srv, "tfb_time_to_first_token_seconds_count")
    client.completions.create(model=model_id, prompt="Count: 1 2", max_tokens=4, temperature=0)
    assert metric(srv, "tfb_generation_tokens_total") == before + 4
    assert metric(srv, "tfb_time_to_first_token_seconds_count") == ttft + 1
    text = httpx.get(f"{srv.url}/metrics").text
    assert 'tfb_mutual_information_count{endpoint="/v1/completions"' in text
    assert "tfb_inter_token_latency_seconds_count" in text
    assert not math.isnan(metric(srv, "tfb_inter_token_latency_seconds_sum"))


# --- failures, stream options, offsets, metrics of rejected requests ------------------------------

# a failed stream must end well before it: held to the timeout it would take minutes, at once
# it takes well under REQUEST_TIMEOUT / 2 even on a loaded machine
REQUEST_TIMEOUT = 120.0


FAULTS = Faults()  # what the small server's model does wrong (nothing, unless a test says)


@pytest.fixture(scope="module")
def small(dirs):
    """A server with a queue of two items and a request timeout of REQUEST_TIMEOUT, whose runner
    raises what FAULTS holds."""
    base, post = dirs
    with ServerThread(model=str(base), adapter=post, samples=K, max_wait_ms=20, max_queue=2,
                      request_timeout=REQUEST_TIMEOUT, runner=faulty_runner(FAULTS)) as s:
        yield s


@pytest.fixture
def faults():
    yield FAULTS
    FAULTS.clear()


def sse(url: str, body: dict) -> tuple[list[str], float]:
    """The stream's ``data:`` payloads and the seconds it took."""
    start = time.monotonic()
    with httpx.stream("POST", url, json=body, timeout=REQUEST_TIMEOUT + 30) as r:
        assert r.status_code == 200
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    return data, time.monotonic() - start


@pytest.mark.parametrize("error,status,type_", [
    (TFBError("the prompt cannot be prefilled"), 400, "invalid_request_error"),
    (RuntimeError("prefill exploded"), 500, "server_error"),
])
@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"prompt": "Hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
])
def test_failed_prefill_ends_the_stream_at_once(small, faults, error, status, type_, path, extra):
    faults.admit = error
    model = httpx.get(f"{small.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 4, **extra}
    data, seconds = sse(f"{small.url}{path}", {**body, "stream": True})
    assert seconds < REQUEST_TIMEOUT / 2  # not held to the request's timeout
    err = json.loads(data[-1])["error"]
    # a user error's text is the answer; an internal one's is sanitized like the HTTP 500 (its type only)
    expected = str(error) if status == 400 else f"internal error: {type(error).__name__}"
    assert err["message"] == expected and err["type"] == type_
    assert "[DONE]" not in data
    r = httpx.post(f"{small.url}{path}", json=body, timeout=REQUEST_TIMEOUT + 30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == type_
    faults.clear()
    assert httpx.post(f"{small.url}{path}", json=body, timeout=60).status_code == 200


def test_failed_decode_step_ends_the_stream_with_its_error(small, faults):
    faults.step = RuntimeError("decode step exploded")
    model = httpx.get(f"{small.url}/v1/models").json()["data"][0]["id"]
    data, seconds = sse(f"{small.url}/v1/completions",
                        {"model": model, "prompt": "Hello", "max_tokens": 4, "stream": True})
    assert seconds < REQUEST_TIMEOUT / 2  # not held to the request's timeout
    assert json.loads(data[0])["choices"][0]["text"] is not None  # the prefill's token was sent
    err = json.loads(data[-1])["error"]
    assert err["message"] == "internal error: RuntimeError" and err["type"] == "server_error"
    faults.clear()
    r = httpx.post(f"{small.url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_streamed_text_offsets_are_absolute(client, model_id):
    args = dict(model=model_id, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = list(client.completions.create(**args, stream=True))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    assert whole.text_offset[-1] > 0


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"prompt": ["Hello", "Good morning"], "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "n": 2}),
])
def test_usage_chunk_only_with_include_usage(srv, model_id, path, extra):
    body = {"model": model_id, "max_tokens": 3, "temperature": 0, **extra}
    usage = httpx.post(f"{srv.url}{path}", json=body, timeout=60).json()["usage"]
    for options in (None, {"include_usage": False}):
        data, _ = sse(f"{srv.url}{path}", {**body, "stream": True, "stream_options": options})
        assert data[-1] == "[DONE]"
        assert all("usage" not in json.loads(d) for d in data[:-1])
    data, _ = sse(f"{srv.url}{path}", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all("usage" not in c for c in chunks[:-1])
    r = httpx.post(f"{srv.url}{path}", json={**body, "stream_options": {"include_usage": True}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_rejected_request_counts_no_prompt_tokens(small):
    model = httpx.get(f"{small.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "Count the tokens of this prompt", "max_tokens": 1}
    before = metric(small, "tfb_prompt_tokens_total")
    r = httpx.post(f"{small.url}/v1/completions", json={**body, "n": 3}, timeout=60)  # 3 items > a queue of 2
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_items", r.text
    assert metric(small, "tfb_prompt_tokens_total") == before
    r = httpx.post(f"{small.url}/v1/completions", json={**body, "n": 2}, timeout=60)
    assert r.status_code == 200
    assert metric(small, "tfb_prompt_tokens_total") == before + r.json()["usage"]["prompt_tokens"]


def test_event_loop_and_worker_do_not_share_a_tokenizer(srv):
    """HF fast tokenizers can fail with 'Already borrowed' when two threads use one object: the
    event loop encodes with its own copy, the worker decodes generated text with the posterior's."""
    state = srv.state
    worker = state.engine.loaded.post.tokenizer  # the posterior the in-process engine loaded
    assert state.completions.tokenizer is not worker and state.choices.tokenizer is not worker
    assert state.completions.tokenizer is state.choices.tokenizer
    text = "The capital of France is"
    assert state.completions.tokenizer(text).input_ids == worker(text).input_ids


def test_out_of_accelerator_memory_is_a_503_and_the_server_goes_on(small, faults):
    """A forward that runs out of GPU memory (the KV cache, activations) answers 503 with
    Retry-After, for scoring, generation and streams; the next request is served."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    model = httpx.get(f"{small.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 4, "prompt": "Hello"}
    choice = {"question": "2 + 2 =", "choices": ["4", "5"]}
    faults.admit = faults.score = oom
    for r in (httpx.post(f"{small.url}/v1/completions", json=body, timeout=60),
              httpx.post(f"{small.url}/v1/choices", json=choice, timeout=60)):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == "out_of_memory"
        assert "out of accelerator memory" in err["message"]
    data, _ = sse(f"{small.url}/v1/completions", {**body, "stream": True})
    assert json.loads(data[-1])["error"]["code"] == "out_of_memory"
    faults.clear()
    assert httpx.post(f"{small.url}/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(f"{small.url}/v1/choices", json=choice, timeout=60).status_code == 200


def test_a_stream_past_its_deadline_ends_with_a_timeout_event_and_frees_its_work():
    """A stream whose sequences produce nothing before the request's deadline: an error event
    (504, code timeout) ends it, reported as 504, and its work is cancelled (dropped at the
    next step)."""
    import asyncio

    from server.engine.protocol import GenWork
    from server.generating import CompletionServing
    from server.openai_protocol import CompletionRequest

    async def main():
        loop = asyncio.get_running_loop()
        events, reported = asyncio.Queue(), []
        deadline = time.monotonic() + 0.3
        works = [GenWork([1, 2], SamplingParams(), "/v1/completions", deadline, index=i, streamed=True)
                 for i in range(2)]
        futures = [loop.create_future() for _ in works]
        serving = object.__new__(CompletionServing)  # the stream needs no model for this path

        async def collect():
            request = CompletionRequest(model="post", prompt="x", stream=True)
            return [c async for c in serving.stream(request, works, futures, events, [[1, 2]], reported.append)]

        return await asyncio.wait_for(collect(), 30), reported, futures

    chunks, reported, futures = asyncio.run(main())
    [event] = chunks
    body = json.loads(event.removeprefix("data: "))
    assert body["error"]["code"] == "timeout" and reported[-1] == "504"
    assert all(f.cancelled() for f in futures)


class ScriptedDecoder:
    """An eager decoder whose ``admit`` and ``filter`` a test scripts (``on_admit(seqs)`` runs first
    and may raise; ``fail_filter`` makes the next ``filter`` raise once)."""

    def __init__(self, decoder, on_admit=lambda seqs: None):
        self._decoder, self.on_admit = decoder, on_admit
        self.admitted: list = []
        self.fail_filter = False

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def admit(self, seqs):
        self.on_admit(seqs)
        self.admitted.extend(seqs)
        return self._decoder.admit(seqs)

    def filter(self):
        if self.fail_filter:
            self.fail_filter = False
            raise RuntimeError("out of memory while packing the rows")
        return self._decoder.filter()


def engine_core(post, decoder: ScriptedDecoder):
    """The server's engine core (eager) over ``post`` with a scripted decoder; stepped by the test."""
    from server.engine.core import EngineCore, ModelRunner
    from server.engine.plan import PlanConfig
    from server.loader import Loaded
    from server.metrics import Metrics

    class Runner(ModelRunner):
        def decoder(self):
            decoder._decoder = super().decoder()
            return decoder

    metrics = Metrics("m")
    runner = Runner(Loaded(post, "m", None, "loaded"), metrics, "eager")
    return EngineCore(runner, metrics, PlanConfig(8, 16384, 0.0, None, 0.0, 0.0))


def gen_works(post, texts: list[str], params: SamplingParams, first_id: int = 0) -> list:
    from server.engine.protocol import GenWork

    return [GenWork(post.tokenizer(t).input_ids, params, "/v1/completions", time.monotonic() + 60, id=first_id + i)
            for i, t in enumerate(texts)]


def run_until_answered(core, ids: set[int], steps: int = 50) -> dict:
    """Step the core until every id in ``ids`` has its Finished or Failed; id -> that output."""
    from server.engine.protocol import Failed, Finished

    answers = {}
    for _ in range(steps):
        for out in core.step():
            if isinstance(out, (Finished, Failed)):
                assert out.id not in answers, f"work {out.id} answered twice"
                answers[out.id] = out
        if ids <= answers.keys():
            return answers
    raise AssertionError(f"not answered after {steps} steps: {ids - answers.keys()}")


def test_a_request_aborted_after_its_failed_batch_was_rerun_leaves_the_others_their_own_outcomes(core):
    """Three requests' joint prefill fails; rerun one by one, the first is aborted (its client
    left), the second decodes its own tokens and the third gets its own error: every work has its
    own outcome, none takes its neighbour's, and the aborted one is not answered."""
    from server.engine.protocol import Failed, Finished

    params = SamplingParams(max_tokens=4, num_samples=2, ignore_eos=True)
    texts = ["Once upon a time", "The capital of France is", "1 2 3"]
    alone = generate(core, [core.tokenizer(texts[1]).input_ids], params)[0]
    a, b, c = works = gen_works(core, texts, params)
    third = c.prompt_ids

    def on_admit(seqs):
        if len(seqs) > 1:
            raise RuntimeError("the joint prefill failed")
        if seqs[0].prompt_ids == third:
            raise ValueError("this request's own failure")

    engine = engine_core(core, ScriptedDecoder(None, on_admit))
    engine.add(works)
    first = engine.step()  # the joint prefill fails; each alone: a and b join, c fails, one decode step
    engine.abort([a.id])
    answers = {o.id: o for o in first if isinstance(o, (Finished, Failed))}
    answers.update(run_until_answered(engine, {b.id, c.id} - answers.keys()))
    assert a.id not in answers
    assert isinstance(answers[b.id], Finished) and [t.token_id for t in answers[b.id].result.tokens] == \
        alone.token_ids
    assert isinstance(answers[c.id], Failed) and isinstance(answers[c.id].error, ValueError)
    assert str(answers[c.id].error) == "this request's own failure"
    assert engine.active == 0 and engine.kv_rows == 0


def test_bookkeeping_that_fails_after_a_join_fails_the_running_requests_once_and_the_engine_goes_on(core):
    """When dropping finished sequences raises right after new ones joined, the joined ones are
    not admitted again (the item-by-item rerun is for a failed prefill): every running request
    gets the error once, the engine starts afresh, and the next request decodes as alone."""
    params = SamplingParams(max_tokens=4, num_samples=2, ignore_eos=True)
    texts = ["Once upon a time", "The capital of France is"]
    alone = generate(core, [core.tokenizer(texts[0]).input_ids], params)[0]
    decoder = ScriptedDecoder(None)
    decoder.fail_filter = True
    engine = engine_core(core, decoder)
    works = gen_works(core, texts, params)
    engine.add(works)
    first = run_until_answered(engine, {w.id for w in works})
    assert len(decoder.admitted) == 2  # each joined once
    assert all(str(first[w.id].error) == "out of memory while packing the rows" for w in works), first
    [again] = gen_works(core, texts[:1], params, first_id=10)
    engine.add([again])
    second = run_until_answered(engine, {again.id})[again.id]
    assert [t.token_id for t in second.result.tokens] == alone.token_ids
