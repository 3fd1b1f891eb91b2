"""Stress: many clients on a real ``tfb serve`` process, a hostile one among them, then SIGTERM.

The server is ``tfb serve`` with faults in its model (tests/poisoned_serve.py: a token whose
embedding is NaN, one whose embedding raises, a decode step that raises at position 300).
Well-behaved clients mix every endpoint (/v1/choices single and items, completions, chat,
streamed and not; greedy or seeded, so each has one right answer: the one it gets alone). A
hostile client sends valid-but-nasty requests (temperature 1e-4, n x K at the KV-row limit),
requests that hit the faults (NaN, a raising prefill, a raising decode step mid-stream),
invalid ones (oversized, malformed, a lone surrogate, too many choices or rows, a wrong model)
and leaves mid-stream and mid-answer. Mid-way the server gets SIGTERM. Then: every
well-behaved answer equals its answer alone; nothing accepted is lost (each request is answered,
or refused with 503 draining, or finds the server gone only when sent after the SIGTERM); the
hostile requests get their clean 4xx; the process exits 0 with its gauges at 0.

The figures of docs/reliability.md come from this test (``pytest -q -s tests/test_stress.py``
prints them).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

import tiny
from poisoned_serve import NAN_WORD, POISON_POSITION, RAISE_WORD
from server_helpers import ROOT, bayesianized, metric, post_and_leave, scrape, start_cli, wait_for, wait_ready

K = 3
CLIENTS = 16  # well-behaved
ROUNDS = 10  # requests each well-behaved client completes before the SIGTERM
MAX_KV_ROWS = 24
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def post_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stress")
    base = tiny.make_llama(root / "base")
    return base, bayesianized(base, tiny.make_lora(base, root / "lora"), root / "post", sigma=0.5)


# --- the requests ------------------------------------------------------------------------------


def good_requests(model: str) -> list[tuple[str, dict]]:
    """Deterministic requests (greedy or seeded) over every endpoint and mode."""
    q = [("/v1/choices", {"question": f"Which colour is number {i}?", "choices": ["red", "green", "blue"],
                          "num_samples": 2 + i % 2}) for i in range(3)]
    q.append(("/v1/choices", {"question": "Pick one.", "choices": ["a stone", "a river", "a cloud"],
                              "mode": "sequence"}))
    q.append(("/v1/choices", {"items": [{"question": f"Item {i}?", "choices": ["yes", "no"], "seed": i}
                                        for i in range(3)]}))
    q.append(("/v1/choices", {"messages": [{"role": "user", "content": "Is water wet?"}],
                              "choices": ["yes", "no", "maybe"], "return_samples": True}))
    for i in range(3):
        q.append(("/v1/completions", {"model": model, "prompt": f"Story {i}: once upon", "max_tokens": 8 + 2 * i,
                                      "temperature": 0, "num_samples": 2 + i % 2}))
    q.append(("/v1/completions", {"model": model, "prompt": ["Seeded A", "Seeded B"], "max_tokens": 10,
                                  "temperature": 0.8, "top_p": 0.9, "seed": 11, "n": 2, "logprobs": 2}))
    q.append(("/v1/chat/completions", {"model": model, "max_tokens": 10, "temperature": 0,
                                       "messages": [{"role": "user", "content": "Say hello."}]}))
    q.append(("/v1/chat/completions", {"model": model, "max_tokens": 10, "temperature": 1.0, "seed": 5,
                                       "top_k": 20, "messages": [{"role": "user", "content": "Name a fruit."}]}))
    for chat in (False, True):
        for i in range(2):
            body = {"model": model, "max_tokens": 12, "stream": True, "num_samples": 2 + i,
                    **({"temperature": 0.7, "seed": 3 + i} if i else {"temperature": 0})}
            if chat:
                q.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"Count {i}"}]}))
            else:
                q.append(("/v1/completions", {**body, "prompt": f"Streaming {i}:", "stop": ["zz"],
                                              "stream_options": {"include_usage": True}}))
    return q


def long_stream(model: str) -> tuple[str, dict]:
    """In flight when the SIGTERM comes: it must still finish, with its answer alone."""
    return "/v1/completions", {"model": model, "prompt": "A very long story:", "max_tokens": 60,
                               "temperature": 0, "stream": True}


def answer(client: httpx.Client, url: str, path: str, body: dict):
    """(status, what must not change): generated texts and finish reasons, choice probabilities,
    or the error object; streams are read to their end and rebuilt per choice."""
    if body.get("stream"):
        with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.json()
            texts: dict[int, list] = {}
            done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return "stream-error", event
                for c in event["choices"]:
                    text = c.get("text", c.get("delta", {}).get("content")) or ""
                    entry = texts.setdefault(c["index"], ["", None])
                    entry[0] += text
                    entry[1] = c.get("finish_reason") or entry[1]
            return (200 if done else "stream-cut"), sorted(texts.items())
    r = client.post(url + path, json=body)
    data = r.json()
    if r.status_code != 200:
        return r.status_code, data
    if "items" in data:
        return 200, [item["probs"] for item in data["items"]]
    if "probs" in data:
        return 200, data["probs"]
    return 200, [(c.get("text", c.get("message", {}).get("content")), c["finish_reason"]) for c in data["choices"]]


def same(got, want) -> bool:
    """Equal texts; probabilities to 1e-4 (the batch pads differently from the request alone)."""
    if isinstance(want, list) and want and isinstance(want[0], float):
        return len(got) == len(want) and all(abs(a - b) <= 1e-4 for a, b in zip(got, want))
    if isinstance(want, list) and want and isinstance(want[0], list) and isinstance(want[0][0], float):
        return len(got) == len(want) and all(same(a, b) for a, b in zip(got, want))
    return got == want


# --- the load ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    client: str
    what: str
    started: float
    ended: float
    status: object
    body: object = None
    error: str | None = None


@dataclass
class Load:
    url: str
    references: dict[int, tuple]
    requests: list[tuple[str, dict]]
    sigterm_at: float | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)

    def done(self, client: str) -> int:
        with self.lock:
            return sum(o.client == client and o.status == 200 for o in self.outcomes)


def gone(status) -> bool:
    """An answer that ends a client's run: 503 draining, or the server no longer there."""
    return status == 503 or status == "transport"


def well_behaved(load: Load, c: int) -> None:
    with httpx.Client(timeout=120) as client:
        i = c
        while True:
            idx = i % len(load.requests)
            path, body = load.requests[idx]
            t0 = time.monotonic()
            try:
                status, got = answer(client, load.url, path, body)
                error = None
            except httpx.TransportError as e:
                status, got, error = "transport", None, f"{type(e).__name__}: {e}"
            load.record(Outcome(f"good{c}", str(idx), t0, time.monotonic(), status, got, error))
            if gone(status):
                return
            i += 1


def hostile_cases(model: str) -> list[tuple[str, object]]:
    """(name, what to send): a (path, body, expected status) or a callable doing the nasty thing."""
    chat = [{"role": "user", "content": "Write a random word."}]
    big = {"question": "x" * (MAX_BODY + 10), "choices": ["a", "b"]}
    return [
        ("tiny temperature", ("/v1/chat/completions", {"model": model, "max_tokens": 8, "temperature": 1e-4,
                                                       "seed": 1, "messages": chat}, 200)),
        ("kv rows at the limit", ("/v1/completions", {"model": model, "prompt": ["a", "b"], "n": 4,
                                                      "num_samples": 3, "max_tokens": 4}, 200)),
        ("oversized body", ("/v1/choices", big, 413)),
        ("malformed JSON", ("/v1/choices", b'{"question": "q", "choices": ["a",', 400)),
        ("lone surrogate", ("/v1/completions", '{"model": "%s", "prompt": "\\ud800"}' % model, 400)),
        ("too many choices", ("/v1/choices", {"question": "q", "choices": [str(i) for i in range(65)],
                                              "mode": "sequence"}, 400)),
        ("too many KV rows", ("/v1/completions", {"model": model, "prompt": "a", "n": 9,
                                                  "num_samples": 3}, 400)),
        ("string integer", ("/v1/completions", {"model": model, "prompt": "a", "max_tokens": "16"}, 400)),
        ("wrong model", ("/v1/chat/completions", {"model": "gpt-4", "messages": chat}, 404)),
        ("num_samples 0", ("/v1/choices", {"question": "q", "choices": ["a", "b"], "num_samples": 0}, 400)),
        ("NaN forward", ("/v1/completions", {"model": model, "prompt": f"The{NAN_WORD}", "max_tokens": 5,
                                             "temperature": 0}, 400)),
        ("raising prefill", ("/v1/choices", {"question": f"The{RAISE_WORD}?", "choices": ["a", "b"]}, 500)),
        ("raising decode step", "decode fault"),
        ("leaves mid-stream", "stream"),
        ("leaves mid-answer", "answer"),
    ]


def hostile(load: Load, model: str, greedy: dict, stats: dict) -> None:
    """Loops over the hostile cases until the server drains or goes."""
    cases = hostile_cases(model)
    with httpx.Client(timeout=60) as client:
        i = 0
        while True:
            name, case = cases[i % len(cases)]
            t0 = time.monotonic()
            try:
                if case == "decode fault":  # its 4th decode step raises: 4 tokens, then one error event
                    body = {"model": model, "prompt": poison_prompt(), "max_tokens": 10, "temperature": 0,
                            "stream": True}
                    status, got = answer(client, load.url, "/v1/completions", body)
                    if status == "stream-error" and got["error"]["message"] == "internal error: RuntimeError":
                        status = 500
                    elif not gone(status):
                        status = f"unexpected {status}: {got}"
                elif case == "stream":  # read the first token, then hang up
                    body = {"model": model, "prompt": "Leave me", "max_tokens": 200, "stream": True}
                    with httpx.stream("POST", load.url + "/v1/completions", json=body, timeout=60) as r:
                        status = r.status_code
                        if status == 200:
                            next(line for line in r.iter_lines() if line.startswith("data: "))
                            stats["left_streams"] += 1
                elif case == "answer":  # give up once the server generates (this answer or another's)
                    body = {"model": model, "messages": [{"role": "user", "content": "Everything."}],
                            "max_tokens": 200, "n": 2}
                    tokens = metric(load.url, "tfb_generation_tokens_total")
                    post_and_leave(load.url + "/v1/chat/completions", body,
                                   until=lambda: metric(load.url, "tfb_generation_tokens_total") > tokens)
                    status = "left"
                    stats["left_answers"] += 1
                else:
                    path, body, expected = case
                    if isinstance(body, (bytes, str)):
                        r = client.post(load.url + path, content=body, headers={"content-type": "application/json"})
                    else:
                        r = client.post(load.url + path, json=body)
                    status = r.status_code
                    ok = status == expected
                    if ok and name == "tiny temperature":  # T = 1e-4 is greedy in all but name
                        ok = r.json()["choices"][0]["message"]["content"] == greedy["content"]
                    if ok and name == "NaN forward":
                        ok = r.json()["error"]["code"] == "non_finite_distribution"
                    if ok and name == "raising prefill":  # the fault's text (a local path) stays in the log
                        ok = r.json()["error"]["message"] == "internal error: ValueError"
                    if not ok and not gone(status):
                        status = f"unexpected {status}: {r.text[:300]}"
            except httpx.TransportError as e:
                status = "transport"
                error = f"{type(e).__name__}: {e}"
            else:
                error = None
            load.record(Outcome("hostile", name, t0, time.monotonic(), status, error=error))
            if gone(status):
                return
            i += 1


def poison_prompt() -> str:
    """A prompt of POISON_POSITION - 3 tokens: its 4th decode step feeds that position."""
    tok = tiny.tokenizer()
    text = tok.decode(tok(" ".join(["go"] * POISON_POSITION)).input_ids[:POISON_POSITION - 3])
    assert len(tok(text).input_ids) == POISON_POSITION - 3
    return text


def test_many_clients_a_hostile_one_and_a_sigterm_midway(post_dirs):
    base, post = post_dirs
    proc, url = start_cli("--model", str(base), "--adapter", str(post), "--device", "cpu", "--samples", str(K),
                          "--max-wait-ms", "5", "--max-kv-rows", str(MAX_KV_ROWS), "--max-body-bytes",
                          str(MAX_BODY), "--max-queue", "128", "--request-timeout", "120",
                          script=ROOT / "tests" / "poisoned_serve.py",
                          # one intra-op thread: the clients share the CI machine's two cores with it
                          env={"OMP_NUM_THREADS": "1"})
    # read the server's log as it comes: a full pipe (64 KiB: each 500 logs a traceback) would
    # block the server's next log line, and with it the event loop
    log_lines: list[str] = []
    reader = threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True)
    try:
        wait_ready(url, timeout=120, proc=proc)
        reader.start()
        t_start = time.monotonic()
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        requests = good_requests(model)
        long_path, long_body = long_stream(model)
        # each request alone, one at a time: its one right answer
        with httpx.Client(timeout=120) as client:
            references = {i: answer(client, url, p, b) for i, (p, b) in enumerate(requests)}
            long_ref = answer(client, url, long_path, long_body)
            greedy = client.post(url + "/v1/chat/completions", json={
                "model": model, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a random word."}]}).json()["choices"][0]["message"]
        assert all(r[0] == 200 for r in references.values()), references
        assert long_ref[0] == 200

        t_refs = time.monotonic()
        load = Load(url, references, requests)
        stats = {"left_streams": 0, "left_answers": 0}
        t_load = time.monotonic()
        threads = [threading.Thread(target=well_behaved, args=(load, c), daemon=True) for c in range(CLIENTS)]
        threads.append(threading.Thread(target=hostile, args=(load, model, greedy, stats), daemon=True))
        for t in threads:
            t.start()
        # mid-way: every client has its rounds answered and the hostile client has left a stream and an answer
        def failed():  # before the SIGTERM, every well-behaved request is answered
            with load.lock:
                return [(o.what, o.status, o.body, o.error) for o in load.outcomes
                        if o.client != "hostile" and o.status != 200]

        # (the server counts a client that left once it notices: waited for, not assumed)
        wait_for(lambda: all(load.done(f"good{c}") >= ROUNDS for c in range(CLIENTS))
                 and stats["left_streams"] >= 1 and stats["left_answers"] >= 1
                 and metric(url, "tfb_requests_total", status="client_closed") >= 1 or failed(),
                 timeout=300, what="the load's first half")
        assert not failed(), failed()[:5]
        t_mid = time.monotonic()
        before = scrape(url)
        t_before = time.monotonic()
        # a long stream in flight (its first token seen), then SIGTERM
        in_flight: dict = {}

        def long_client():
            with httpx.Client(timeout=120) as client, client.stream("POST", url + long_path, json=long_body) as r:
                if r.status_code != 200:
                    in_flight["refused"] = (r.status_code, r.read().decode())
                    return
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                in_flight["first"] = time.monotonic()
                text = json.loads(first[6:])["choices"][0]["text"]
                for line in lines:
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            in_flight["error"] = event
                        else:
                            text += event["choices"][0]["text"] or ""
                    in_flight["done"] = in_flight.get("done") or line == "data: [DONE]"
                in_flight["text"] = text

        lc = threading.Thread(target=long_client, daemon=True)
        lc.start()
        wait_for(lambda: "first" in in_flight or "refused" in in_flight, timeout=300,
                 what="the long stream's first token")
        assert "refused" not in in_flight, in_flight
        load.sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads + [lc]:
            t.join(120)
            assert not t.is_alive()
        code = proc.wait(60)
        t_end = time.monotonic()
        reader.join(30)
        stderr = "".join(log_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    # --- the server ---
    assert code == 0, stderr[-3000:]
    assert "drained: 0 running, 0 queued, 0 KV rows" in stderr, stderr[-3000:]
    # --- the in-flight stream finished, with its answer alone ---
    assert in_flight.get("done") and "error" not in in_flight, in_flight
    assert in_flight["text"] == long_ref[1][0][1][0]
    # --- every well-behaved answer right; nothing accepted lost ---
    good = [o for o in load.outcomes if o.client != "hostile"]
    wrong = [o for o in good if o.status == 200 and not same(o.body, load.references[int(o.what)][1])]
    assert not wrong, [(o.what, o.body, load.references[int(o.what)][1]) for o in wrong]
    lost = [o for o in good if o.status not in (200, 503, "transport")
            or (o.status == 503 and o.body["error"]["code"] != "draining")
            or (o.status == "transport" and o.started < load.sigterm_at)]
    assert not lost, [(o.what, o.status, o.body, o.error) for o in lost]
    assert all(o.started >= load.sigterm_at or o.ended >= load.sigterm_at for o in good if o.status != 200)
    # --- every hostile request its clean answer ---
    bad = [o for o in load.outcomes if o.client == "hostile" and isinstance(o.status, str)
           and o.status not in ("left", "transport")]
    assert not bad, [(o.what, o.status) for o in bad]
    assert all(o.started >= load.sigterm_at for o in load.outcomes if o.client == "hostile" and o.status == "transport")
    # --- the metrics at mid-way: 5xx only for the requests that hit a raising fault, the clients
    # that left counted apart ---
    five = sum(v for (n, ls), v in before.items() if n == "tfb_requests_total"
               and dict(ls)["endpoint"] != "/health" and dict(ls)["status"].startswith("5"))  # /health: 503 loading
    raising = [o for o in load.outcomes if o.what in ("raising prefill", "raising decode step") and o.status == 500]
    assert sum(o.ended < t_mid for o in raising) <= five <= sum(o.started < t_before for o in raising)
    assert metric(before, "tfb_requests_total", status="client_closed") >= 1

    answered = sum(o.status == 200 for o in load.outcomes)
    hostile_n = sum(o.client == "hostile" for o in load.outcomes)
    print(f"\nphases: references {t_refs - t_start:.1f} s, first half {t_mid - t_load:.1f} s, "
          f"drain and exit {t_end - load.sigterm_at:.1f} s")
    print(f"stress: {CLIENTS} well-behaved clients + 1 hostile, {t_end - t_load:.1f} s of load "
          f"(whole test {t_end - t_start:.1f} s after ready): {len(load.outcomes)} requests, {answered} answered 200 "
          f"(all equal to their answers alone), {hostile_n} hostile ({stats['left_streams']} streams and "
          f"{stats['left_answers']} answers left mid-way), "
          f"{sum(o.status == 503 for o in load.outcomes)} x 503 draining, "
          f"{sum(o.status == 'transport' for o in load.outcomes)} x server gone after SIGTERM, 0 lost, "
          f"{len(raising)} x 500 for the requests that hit a raising fault (their own); exit 0, gauges 0")
