"""The HTTP server on a tiny random Llama: answers, batching, errors, auth, metrics, OpenAPI.

One real uvicorn server (in a thread, on a free port) serves a Bayesianized tiny adapter for
the whole module; answers are checked against tfb_core's direct call.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from server_helpers import ServerThread, bayesianized, metric, scrape

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def post_dir(tmp_path_factory, llama_dir, lora_dir):
    return bayesianized(llama_dir, lora_dir, tmp_path_factory.mktemp("srv") / "post", sigma=0.05)


@pytest.fixture(scope="module")
def srv(llama_dir, post_dir):
    with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", api_key=KEY,
                      max_wait_ms=30, max_samples=16, samples=4, max_choices=8, max_item_tokens=4096) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def core_post(llama_dir, post_dir):
    """The same posterior, loaded directly (the reference for the server's answers)."""
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior

    return Posterior.load(load_base_model(llama_dir, "cpu", "float32"), post_dir)


def item(i: int) -> dict:
    """A varied request: letter/sequence, 2-4 choices, its own seed and K for some."""
    body = {"question": f"Question number {i}: which one is right?" + " really" * (i % 5),
            "choices": [f"answer {c}{i}" for c in "abcd"[: 2 + i % 3]],
            "mode": "sequence" if i % 4 == 3 else "letter"}
    if i % 3 == 1:
        body["seed"] = i
    if i % 5 == 2:
        body["num_samples"] = 2 + i % 7
    return body


def check_answer(a: dict, n_choices: int) -> None:
    probs = torch.tensor(a["probs"], dtype=torch.float64)
    assert len(probs) == n_choices
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    u = a["uncertainty"]
    assert u["mutual_information"] >= 0
    assert u["predictive_entropy"] == pytest.approx(u["expected_entropy"] + u["mutual_information"], abs=1e-9)
    assert a["prediction"] == int(probs.argmax()) and a["label"] == "ABCD"[a["prediction"]]


# --- answers ---------------------------------------------------------------------------------


def test_answer_properties_and_equal_to_tfb_core(client, core_post):
    from tfb_core.data import MCItem
    from tfb_core.encoding import encode_item
    from tfb_core.scoring import choice_probs, max_context
    from tfb_core.uncertainty import decompose

    for i in (0, 1, 3):
        body = {**item(i), "return_samples": True, "num_samples": 5, "seed": 7}
        r = client.post("/v1/choices", json=body)
        assert r.status_code == 200, r.text
        a = r.json()
        check_answer(a, len(body["choices"]))
        assert a["num_samples"] == 5 and a["seed"] == 7 and a["sigma"] == pytest.approx(0.05)
        assert len(a["samples"]) == 5
        enc = encode_item(core_post.tokenizer, MCItem(choices=body["choices"], question=body["question"]),
                          body["mode"], max_length=max_context(core_post.model))
        ref = choice_probs(core_post, [enc], [(7, 5)])[0]
        u = decompose(ref[None].double())
        assert torch.allclose(torch.tensor(a["samples"]), ref, atol=1e-5)
        assert torch.allclose(torch.tensor(a["probs"]), u.probs[0].float(), atol=1e-5)
        assert a["uncertainty"]["mutual_information"] == pytest.approx(u.mutual_information.item(), abs=1e-5)
        assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] * 5 == enc.prompt_tokens * 5


def test_items_batch_and_messages(client):
    bodies = [item(i) for i in range(3)] + [{"messages": [{"role": "user", "content": "Pick: A) x B) y"}],
                                             "choices": ["x", "y"]}]
    r = client.post("/v1/choices", json={"items": bodies})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and [a["index"] for a in out["items"]] == [0, 1, 2, 3]
    for a, body in zip(out["items"], bodies):
        check_answer(a, len(body["choices"]))
        assert "samples" not in a
    # each item equals the same item asked alone
    for a, body in zip(out["items"], bodies):
        alone = client.post("/v1/choices", json=body).json()
        assert alone["probs"] == pytest.approx(a["probs"], abs=1e-5)


def test_32_concurrent_requests_are_batched_and_equal_sequential(client):
    bodies = [item(i) for i in range(32)]
    sequential = [client.post("/v1/choices", json=b).json() for b in bodies]
    before = batch_histogram(client)
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/choices", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * 32
    for r, seq, body in zip(responses, sequential, bodies):
        a = r.json()
        check_answer(a, len(body["choices"]))
        assert a["probs"] == pytest.approx(seq["probs"], abs=1e-5)
        assert a["uncertainty"]["mutual_information"] == pytest.approx(
            seq["uncertainty"]["mutual_information"], abs=1e-5)
    after = batch_histogram(client)
    batches = after["count"] - before["count"]
    items = after["sum"] - before["sum"]
    singles = after["le_1"] - before["le_1"]
    assert items == 32 and batches < 32 and batches - singles >= 1, (before, after)


def batch_histogram(client) -> dict:
    samples = scrape(client)
    return {"count": metric(samples, "tfb_batch_size_count"), "sum": metric(samples, "tfb_batch_size_sum"),
            "le_1": metric(samples, "tfb_batch_size_bucket", le="1.0")}


# --- errors ------------------------------------------------------------------------------------

LONG = "word " * 700  # past the tiny model's 512 positions
OK = {"question": "q?", "choices": ["a", "b"]}

BAD = [
    # (id, body (dict, or raw bytes), status, param)
    ("invalid-json", b'{"question": "q", "choices": [', 400, None),
    ("not-an-object", [1, 2], 400, None),
    ("question-type", {"question": 5, "choices": ["a", "b"]}, 400, "question"),
    ("choices-type", {"question": "q", "choices": "ab"}, 400, "choices"),
    ("choice-type", {"question": "q", "choices": ["a", 1]}, 400, "choices.1"),
    ("missing-choices", {"question": "q"}, 400, "choices"),
    ("empty-choices", {"question": "q", "choices": []}, 400, "choices"),
    ("one-choice", {"question": "q", "choices": ["a"]}, 400, "choices"),
    ("empty-choice", {"question": "q", "choices": ["a", ""]}, 400, "choices.1"),
    ("too-many-letters", {"question": "q", "choices": [f"c{i}" for i in range(27)]}, 400, "choices"),
    ("duplicate-choices", {"question": "q", "choices": ["a", "b", "a"]}, 400, "choices"),
    ("empty-prompt", {"prompt": "  ", "choices": ["a", "b"]}, 400, "prompt"),
    ("no-prompt", {"choices": ["a", "b"]}, 400, None),
    ("two-prompts", {"prompt": "p", "question": "q", "choices": ["a", "b"]}, 400, None),
    ("prompt-too-long", {"question": LONG, "choices": ["a", "b"]}, 400, "question"),
    ("num-samples-0", {**OK, "num_samples": 0}, 400, "num_samples"),
    ("num-samples-over-max", {**OK, "num_samples": 17}, 400, "num_samples"),
    ("bad-mode", {**OK, "mode": "logits"}, 400, "mode"),
    ("unknown-field", {**OK, "temperature": 1}, 400, "temperature"),
    ("negative-seed", {**OK, "seed": -1}, 400, "seed"),
    ("empty-items", {"items": []}, 400, "items"),
    ("bad-item", {"items": [OK, {"question": "q", "choices": ["a"]}]}, 400, "items.1.choices"),
    ("item-over-max-samples", {"items": [OK, {**OK, "num_samples": 99}]}, 400, "items.1.num_samples"),
    ("over-max-choices", {"question": "q", "mode": "sequence", "choices": [f"c{i}" for i in range(9)]},
     400, "choices"),
    ("item-over-max-choices", {"items": [OK, {"question": "q", "mode": "sequence",
                                              "choices": [f"c{i}" for i in range(9)]}]}, 400, "items.1.choices"),
    ("item-over-max-tokens", {"prompt": "word " * 300, "choices": ["a", "b"], "num_samples": 16}, 400, None),
    ("batch-item-over-max-tokens", {"items": [OK, {"question": "word " * 60, "mode": "sequence", "num_samples": 16,
                                                   "choices": [f"c{i}" for i in range(8)]}]}, 400, "items.1"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_and_server_keeps_serving(client, body, status, param):
    if isinstance(body, bytes):
        r = client.post("/v1/choices", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/choices", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    if param:
        assert param in err["message"]
    assert client.post("/v1/choices", json=OK).status_code == 200


def test_item_size_limit_says_what_is_needed_and_allowed(client):
    r = client.post("/v1/choices", json={"prompt": "word " * 300, "choices": ["a", "b"], "num_samples": 16})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "item_too_large", err
    assert "16 rows (1 sequence(s) x 16 samples)" in err["message"] and "at most 4096" in err["message"]
    # the same prompt with fewer samples fits
    assert client.post("/v1/choices", json={"prompt": "word " * 300, "choices": ["a", "b"],
                                            "num_samples": 4}).status_code == 200


def test_body_too_large_is_413(client):
    r = client.post("/v1/choices", json={**OK, "question": "x" * (2 << 20)})
    assert r.status_code == 413
    assert "bytes" in r.json()["error"]["message"]
    assert client.post("/v1/choices", json=OK).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required_except_health(srv, headers):
    for method, path in (("POST", "/v1/choices"), ("GET", "/v1/models"), ("GET", "/v1/posterior"),
                         ("GET", "/metrics")):
        r = httpx.request(method, srv.url + path, headers=headers, json=OK if method == "POST" else None)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(srv.url + "/health").status_code == 200


@pytest.mark.parametrize("send", ["curl -d", "form fields"])
def test_a_body_without_a_json_content_type_is_a_400_saying_to_send_json(client, send):
    """``curl -d '{...}'`` sends application/x-www-form-urlencoded: the 400 says what to send
    (issue 25: "Input should be a valid dictionary or object to extract fields from")."""
    if send == "curl -d":
        r = client.post("/v1/choices", content=json.dumps(OK),
                        headers={"content-type": "application/x-www-form-urlencoded"})
    else:
        r = client.post("/v1/choices", data={"question": "q", "choices": "a"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_content_type"
    assert "'Content-Type: application/json'" in err["message"]
    assert "application/x-www-form-urlencoded" in err["message"]
    ok = client.post("/v1/choices", content=json.dumps(OK), headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_head_health_answers_like_get(srv):
    """Load balancers that probe with HEAD (issue 25: 405)."""
    r = httpx.head(srv.url + "/health")
    assert r.status_code == 200 and r.content == b""


def test_unknown_path_is_shaped_404(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# --- other endpoints ---------------------------------------------------------------------------


def test_models_posterior_health(client, srv, post_dir, llama_dir):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == f"{llama_dir.name}+post"  # base + adapter
    assert models["data"][0]["object"] == "model"
    p = client.get("/v1/posterior").json()
    assert p["sigma"] == pytest.approx(0.05) and p["num_samples"] == 4 and p["max_samples"] == 16
    assert p["source"] == "loaded" and p["adapter"] == post_dir.name  # a name, not a local path (--show-paths)
    assert p["base_model"]["model_type"] == "llama"
    assert httpx.get(srv.url + "/health").json() == {"status": "ready"}


def test_metrics_move_with_traffic(client, llama_dir):
    model = f"{llama_dir.name}+post"  # the model id: the base model's name plus the adapter's
    before = scrape(client)
    for i in range(3):
        assert client.post("/v1/choices", json=item(i)).status_code == 200
    client.post("/v1/choices", json={"question": "q"})  # a 400
    after = scrape(client)

    def delta(name, **labels):
        key = (name, tuple(sorted({"model": model, **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("tfb_requests_total", endpoint="/v1/choices", status="200") == 3
    assert delta("tfb_requests_total", endpoint="/v1/choices", status="400") == 1
    assert delta("tfb_request_duration_seconds_count", endpoint="/v1/choices", status="200") == 3
    for name in ("tfb_predictive_entropy", "tfb_expected_entropy", "tfb_mutual_information"):
        assert delta(f"{name}_count", endpoint="/v1/choices") == 3
        assert delta(f"{name}_sum", endpoint="/v1/choices") > 0
    assert delta("tfb_prompt_tokens_total") > 0
    assert delta("tfb_forward_duration_seconds_count") >= 1
    assert after[("tfb_posterior_sigma", (("model", model),))] == pytest.approx(0.05)
    assert after[("tfb_weight_samples", (("model", model),))] == 4
    assert after[("tfb_queue_depth", (("model", model),))] == 0
    assert any(k[0] == "tfb_model_info" for k in after)


def test_server_timing_is_the_apps_time_forward_included(client, srv, llama_dir):
    """``Server-Timing: app;dur=MS`` on answers, errors and streams: at least the request's own
    forward (from /metrics), at most what the client waited."""
    def timed(send) -> tuple[httpx.Response, float, float]:
        before = scrape(client)
        t0 = time.perf_counter()
        r = send()
        waited = (time.perf_counter() - t0) * 1000
        forward = metric(client, "tfb_forward_duration_seconds_sum") - metric(before, "tfb_forward_duration_seconds_sum")
        return r, forward * 1000, waited

    for send in (lambda: client.post("/v1/choices", json={**OK, "num_samples": 16}),
                 lambda: client.post("/v1/choices", json={"question": "q"}),  # 400
                 lambda: httpx.post(srv.url + "/v1/choices", json=OK)):  # 401, no key
        r, forward_ms, waited_ms = timed(send)
        name, dur = r.headers["server-timing"].split(";dur=")
        assert name == "app" and forward_ms <= float(dur) <= waited_ms, (r.status_code, forward_ms, dur, waited_ms)
        assert (forward_ms > 0) == (r.status_code == 200)
    with client.stream("POST", "/v1/completions", json={"model": f"{llama_dir.name}+post", "prompt": "Hi",
                                                       "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["server-timing"].startswith("app;dur=")


def test_openapi_documents_requests_responses_errors(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/choices"]["post"]
    body = json.dumps(post["requestBody"])
    assert "ChoiceItem" in body and "ChoicesBatchRequest" in body
    for code in ("200", "400", "401", "413", "429", "503", "504"):
        assert code in post["responses"], code
    assert "ErrorResponse" in json.dumps(post["responses"]["400"])
    assert "ChoiceResult" in json.dumps(post["responses"]["200"])
    for path in ("/v1/models", "/v1/posterior", "/health", "/metrics"):
        assert path in spec["paths"]


def test_posterior_chat_and_temperature_are_honoured(llama_dir, lora_dir, tmp_path, core_post):
    """A posterior recording chat=True and a temperature: requests default to both; the
    temperature tempers the model average, never the samples."""
    from tfb_core.data import MCItem
    from tfb_core.evaluate import temper
    from tfb_core.encoding import encode_item
    from tfb_core.scoring import choice_probs

    post = bayesianized(llama_dir, lora_dir, tmp_path / "post", sigma=0.05)
    cfg = json.loads((post / "tfb_config.json").read_text())
    (post / "tfb_config.json").write_text(json.dumps({**cfg, "chat": True, "temperature": 2.0}))
    body = {**OK, "num_samples": 3, "return_samples": True}
    with ServerThread(model=str(llama_dir), adapter=post, device="cpu") as s:
        info = httpx.get(s.url + "/v1/posterior").json()
        a = httpx.post(s.url + "/v1/choices", json=body, timeout=60).json()
    assert info["chat"] is True and info["temperature"] == 2.0
    enc = encode_item(core_post.tokenizer, MCItem(choices=OK["choices"], question=OK["question"]),
                      "letter", chat=True)
    samples = choice_probs(core_post, [enc], [(0, 3)])[0].double()
    assert torch.allclose(torch.tensor(a["samples"], dtype=torch.float64), samples, atol=1e-5)  # untempered
    assert torch.allclose(torch.tensor(a["probs"], dtype=torch.float64), temper(samples.mean(0), 2.0), atol=1e-5)
    assert a["temperature"] == 2.0 and a["tempered"] == ["probs"]
    assert a["usage"]["prompt_tokens"] == enc.prompt_tokens


def test_one_access_log_line_per_request_and_the_flag_turns_it_off(llama_dir, post_dir, caplog):
    with caplog.at_level("INFO", logger="tfb.access"):
        with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", samples=3) as s:
            caplog.clear()
            body = {"items": [item(0), {**item(1), "num_samples": 5}]}
            assert httpx.post(s.url + "/v1/choices", json=body, timeout=60).status_code == 200
            assert httpx.get(s.url + "/v1/nope").status_code == 404
            lines = [r.getMessage() for r in caplog.records if r.name == "tfb.access"]
        assert len(lines) == 2, lines
        method, path, status, latency, items, k = lines[0].split()
        assert (method, path, status, items, k) == ("POST", "/v1/choices", "200", "items=2", "K=5")
        assert latency.endswith("ms") and float(latency[:-2]) > 0
        assert lines[1].split()[:3] == ["GET", "/v1/nope", "404"] and lines[1].endswith("items=- K=-")
        caplog.clear()
        with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", access_log=False) as s:
            assert httpx.post(s.url + "/v1/choices", json=item(0), timeout=60).status_code == 200
        assert not [r for r in caplog.records if r.name == "tfb.access"]


def test_freeze_heap_puts_the_objects_alive_now_out_of_the_collectors_scans():
    import gc
    import weakref

    from server.lifecycle import freeze_heap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    try:
        before = Node()
        before.self = before  # a cycle alive at start-up: frozen, so never collected
        frozen_ref = weakref.ref(before)
        freeze_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # torch, transformers, the model: all there is now
        after = Node()
        after.self = after  # a cycle made later: still tracked and collected
        later_ref = weakref.ref(after)
        del before, after
        gc.collect()
        assert later_ref() is None and frozen_ref() is not None
        # Frozen objects freed by reference counting (other threads') leave; none join.
        assert gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
