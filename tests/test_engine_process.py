"""``--engine-process``: the model, scheduler and decode loop in a process of their own.

A real server of each kind on the same posterior: the engine process answers as the engine in
the server's own process does (scoring, generation, streams, metrics); a client that leaves
frees its rows in the engine process; the engine process exiting fails open requests and the
server; a start-up failure there is the server's; ``tfb serve`` stops it on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

from server_helpers import ServerThread, leave_stream, metric, start_cli, tiny_posterior, wait_for, wait_ready

K = 3
MODEL = "base+post"  # the served id: the base model's name plus the adapter's (tiny_posterior's dirs)
QUESTION = {"question": "Which gas do plants absorb from the air?", "choices": ["Oxygen", "Carbon dioxide", "Helium"],
            "return_samples": True}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tiny_posterior(tmp_path_factory.mktemp("engine_process"))


@pytest.fixture(scope="module")
def servers(dirs):
    """(the engine in the server's process, the engine in its own), same posterior and settings."""
    base, post = dirs
    settings = dict(model=str(base), adapter=post, samples=K, device="cpu", max_wait_ms=5)
    with ServerThread(**settings) as here, ServerThread(engine_process=True, **settings) as apart:
        yield here, apart


def children(pid: int) -> dict[int, str]:
    """The child processes of ``pid`` and their command lines (Linux)."""
    kids = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for kid in (task / "children").read_text().split():
            kids[int(kid)] = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return kids


def gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_scoring_and_the_model_description_are_the_same(servers):
    here, apart = servers
    from server.engine.client import InprocClient, ProcClient

    assert isinstance(apart.state.engine, ProcClient) and isinstance(here.state.engine, InprocClient)
    assert httpx.get(apart.url + "/v1/posterior").json() == httpx.get(here.url + "/v1/posterior").json()
    card, expected = (httpx.get(x.url + "/v1/models").json()["data"][0] for x in (apart, here))
    assert {**card, "created": 0} == {**expected, "created": 0}
    batch = {"items": [QUESTION, {**QUESTION, "mode": "sequence", "num_samples": 5},
                       {"prompt": "2 + 2 =", "choices": ["3", "4", "5", "22"], "seed": 7}]}
    a, b = (httpx.post(s.url + "/v1/choices", json=batch, timeout=60).json() for s in (here, apart))
    assert len(b["items"]) == 3 and b["usage"] == a["usage"]
    for x, y in zip(a["items"], b["items"]):
        assert y["probs"] == pytest.approx(x["probs"], abs=1e-6)
        assert y["uncertainty"] == pytest.approx(x["uncertainty"], abs=1e-6)
        assert y["prediction"] == x["prediction"] and y["num_samples"] == x["num_samples"]
    flat = [[p for row in item["samples"] for p in row] for item in (a["items"][0], b["items"][0])]
    assert len(flat[1]) == K * 3 and flat[1] == pytest.approx(flat[0], abs=1e-6)


def test_generation_plain_and_streamed_is_the_same(servers):
    here, apart = servers
    body = dict(model=MODEL, prompt=["The capital of France is", "Once upon"], max_tokens=7, n=2,
                temperature=0.8, seed=3, logprobs=2)
    clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0) for s in servers]
    a, b = (c.completions.create(**body) for c in clients)
    assert [c.text for c in b.choices] == [c.text for c in a.choices]
    assert b.usage == a.usage and b.usage.completion_tokens == 4 * 7
    for x, y in zip(a.choices, b.choices):
        ux, uy = x.model_extra["uncertainty"], y.model_extra["uncertainty"]
        assert uy["sequence"] == pytest.approx(ux["sequence"], abs=1e-5)
        assert [t["token"] for t in uy["tokens"]] == [t["token"] for t in ux["tokens"]]
        assert y.logprobs.token_logprobs == pytest.approx(x.logprobs.token_logprobs, abs=1e-5)

    messages = [{"role": "user", "content": "Name a colour."}]
    plain = clients[0].chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    chunks = list(clients[1].chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    streamed = [t for ch in chunks if ch.choices
                for t in (ch.choices[0].model_extra.get("uncertainty") or {}).get("tokens", [])]
    assert text == plain.choices[0].message.content
    expected = plain.choices[0].model_extra["uncertainty"]["tokens"]
    assert [t["token"] for t in streamed] == [t["token"] for t in expected]
    assert [t["mutual_information"] for t in streamed] == pytest.approx(
        [t["mutual_information"] for t in expected], abs=1e-5)
    assert chunks[-1].usage.completion_tokens == 6 == chunks[-2].choices[0].model_extra[
        "uncertainty"]["sequence"]["num_tokens"]


def test_the_engine_process_metrics_reach_the_servers_metrics(servers):
    _, apart = servers
    before = metric(apart, "tfb_generation_tokens_total")
    steps = metric(apart, "tfb_decode_batch_size_count")
    r = httpx.post(apart.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200
    # recorded in the engine process, served by the API process's /metrics
    wait_for(lambda: metric(apart, "tfb_generation_tokens_total") == before + 5, what="5 tokens counted")
    assert metric(apart, "tfb_decode_batch_size_count") >= steps + 4  # 1 token from the prefill, 4 steps
    assert metric(apart, "tfb_time_to_first_token_seconds_count") >= 1
    assert metric(apart, "tfb_forward_duration_seconds_count") > 0 and metric(apart, "tfb_queue_wait_seconds_count") > 0
    wait_for(lambda: metric(apart, "tfb_kv_cache_rows") == 0 and metric(apart, "tfb_requests_running") == 0,
             what="the work gauges back to 0")
    assert metric(apart, "tfb_ready") == 1 and metric(apart, "tfb_posterior_sigma") == pytest.approx(0.5)


def test_a_client_that_leaves_frees_its_rows_in_the_engine_process(servers):
    _, apart = servers
    body = {"model": MODEL, "prompt": "A very long story begins", "max_tokens": 400, "stream": True}
    leave_stream(f"{apart.url}/v1/completions", body)  # the client goes away after 3 events
    wait_for(lambda: metric(apart, "tfb_kv_cache_rows") == 0 and metric(apart, "tfb_requests_running") == 0,
             timeout=20, what="the abandoned stream's rows freed in the engine process")
    assert apart.state.engine.idle
    assert metric(apart, "tfb_generation_tokens_total") < 400 + 100  # it stopped, not ran to 400
    r = httpx.post(f"{apart.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_concurrent_streams_each_get_their_own_tokens(servers):
    here, apart = servers
    prompts = [f"Story number {i}:" for i in range(6)]

    def text(url: str, prompt: str) -> str:
        out = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": prompt, "max_tokens": 5 + len(prompt) % 4, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    out += [c["text"] for c in json.loads(line[6:])["choices"]]
        return "".join(out)

    expected = [text(here.url, p) for p in prompts]
    got = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, text(apart.url, prompts[i])))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


def test_the_engine_process_exiting_fails_open_requests_and_the_server(dirs):
    base, post = dirs
    with ServerThread(model=str(base), adapter=post, samples=K, device="cpu", engine_process=True) as s:
        engine = s.state.engine.process
        results = {}
        body = {"model": MODEL, "prompt": "A very long story begins", "max_tokens": 500, "n": 4}

        def long_request():
            results["r"] = httpx.post(s.url + "/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=long_request)
        t.start()
        wait_for(lambda: metric(s, "tfb_kv_cache_rows") > 0, what="the long request decoding")
        os.kill(engine.pid, signal.SIGKILL)
        t.join(60)
        r = results["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_exited", r.text
        assert "engine process exited" in r.json()["error"]["message"]
        health = wait_for(lambda: (h := httpx.get(s.url + "/health")).json()["status"] == "failed" and h)
        assert health.status_code == 503 and "engine process exited" in health.json()["detail"]


def test_a_start_up_failure_in_the_engine_process_is_the_servers(tmp_path, dirs):
    base, _ = dirs
    bad = tmp_path / "not_an_adapter"
    bad.mkdir()
    s = ServerThread(model=str(base), adapter=bad, device="cpu", engine_process=True)
    try:
        with pytest.raises(RuntimeError, match="start-up failed: .*not_an_adapter"):
            s.start()  # waits for /health: 200, or the failure and its reason
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
    finally:
        s.stop()


def test_tfb_serve_runs_the_engine_process_by_default_and_stops_it_on_sigterm(dirs):
    base, post = dirs
    proc, url = start_cli("--model", str(base), "--adapter", str(post), "--device", "cpu", "--samples", "2")
    try:
        wait_ready(url, timeout=240, proc=proc)
        kids = children(proc.pid)
        engines = [pid for pid, cmd in kids.items() if "spawn_main" in cmd]
        assert len(engines) == 1, kids  # the engine process (besides multiprocessing's resource tracker)
        r = httpx.post(url + "/v1/choices", json=QUESTION, timeout=60)
        assert r.status_code == 200 and r.json()["num_samples"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_for(lambda: all(gone(pid) for pid in kids), what="the engine process gone with the server")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_engine_process_is_refused_with_ray():
    proc, _ = start_cli("--ray", "--engine-process")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("tfb serve: error: --engine-process / TFB_ENGINE_PROCESS does not apply with --ray")


def test_a_signal_to_the_engine_process_alone_does_not_cut_its_requests(dirs):
    """Ctrl-C or a supervisor's SIGTERM reaches the whole process group: only the API process
    acts on it (it drains, then stops the engine process)."""
    base, post = dirs
    with ServerThread(model=str(base), adapter=post, samples=K, device="cpu", engine_process=True) as s:
        engine = s.state.engine.process
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(engine.pid, sig)
        r = httpx.post(s.url + "/v1/choices", json=QUESTION, timeout=60)
        assert r.status_code == 200 and engine.is_alive()
    assert not engine.is_alive()  # stopped with the server


def test_stopping_while_the_engine_process_loads_stops_it(dirs, tmp_path, monkeypatch):
    import tempfile

    base, post = dirs
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the socket's directory is made
    s = ServerThread(model=str(base), adapter=post, samples=K, device="cpu", engine_process=True).start(wait=False)
    # the socket's directory is removed once the engine process has connected
    engine = wait_for(lambda: s.state.engine is not None and s.state.engine.process is not None
                      and not any(tmp_path.iterdir()) and s.state.engine, what="the engine process connected")
    s.stop()  # while it loads (or just after): it stops itself, it is not killed
    assert not s.thread.is_alive()
    assert engine.process.exitcode == 0
    assert not any(tmp_path.iterdir())  # no socket directory left behind


def test_a_full_queue_is_a_429_from_the_api_process(dirs):
    """The API process answers 429 from the engine's queue depth plus what it sent since: with
    the engine paused, two requests wait in its queue (max 2) and a third is refused; resumed,
    the two run."""
    base, post = dirs
    with ServerThread(model=str(base), adapter=post, samples=K, device="cpu", engine_process=True,
                      max_queue=2) as s:
        short = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        done = []

        def post_short():
            done.append(httpx.post(f"{s.url}/v1/completions", json=short, timeout=600).status_code)

        s.state.engine.pause()  # sent before the requests: the engine takes none of them
        threads = [threading.Thread(target=post_short) for _ in range(2)]
        try:
            for t in threads:
                t.start()
            # queued in the engine process (its gauge), not only counted as sent by the API process
            wait_for(lambda: metric(s, "tfb_queue_depth") == 2, what="two requests queued in the engine")
            assert s.state.engine.depth == 2
            # streamed: the 429 comes before the stream starts (the API process checks), not as an event
            r = httpx.post(f"{s.url}/v1/completions", json={**short, "stream": True}, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
            assert r.headers["retry-after"] == "1"
            assert done == []  # held: nothing ran
        finally:
            s.state.engine.resume()
            for t in threads:
                t.join(600)  # the queued requests are all that runs: a safety net, not a margin
        assert done == [200, 200]  # the queued ones ran once resumed
        wait_for(lambda: s.state.engine.depth == 0, what="the queue empty again")


def test_a_load_function_of_the_callers_runs_in_process_and_an_explicit_engine_process_is_refused(monkeypatch):
    """``build_app(settings, load)``: only ``server.loader.load`` can run in the engine process."""
    from server.app import build_app, in_engine_process
    from server.loader import load
    from server.settings import Settings

    monkeypatch.delenv("TFB_ENGINE_PROCESS", raising=False)
    mine = lambda settings, set_status: None  # noqa: E731
    assert in_engine_process(Settings(), load) and not in_engine_process(Settings(engine_process=False), load)
    assert not in_engine_process(Settings(), mine)  # the default: in-process
    with pytest.raises(ValueError, match="cannot run there"):
        build_app(Settings(engine_process=True), mine)


def test_messages_carry_tensors_exactly():
    """Tensors cross between the processes as numpy arrays where numpy holds their dtype (a view
    carries only itself), else as torch pickles them: the same values, dtype and shape."""
    import pickle

    import torch

    from server.engine.protocol import Finished, dumps

    whole = torch.randn(64, 4, dtype=torch.float64)
    tensors = [whole[3:5], torch.rand(10, 4), torch.arange(6).reshape(2, 3).t(), torch.randn(3).bfloat16(),
               torch.randn(4)._neg_view(), torch.tensor(2.5), torch.zeros(0, 4), torch.ones(3, requires_grad=True)]
    back = pickle.loads(dumps([Finished(i, t) for i, t in enumerate(tensors)]))
    for b, t in zip((f.result for f in back), tensors):
        assert b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t.detach()) and not b.requires_grad
    assert len(dumps(whole[3:5])) < len(dumps(whole)) < len(pickle.dumps(whole[3:5]))  # torch: all its storage


def test_the_sockets_directory_is_private_and_short_enough(tmp_path, monkeypatch):
    """In $TMPDIR, mode 0700; where $TMPDIR's path is too long for a Unix socket, in /tmp; where
    there is none to be had, a message that says what to do."""
    import tempfile

    from server.engine.proc import MAX_SOCKET_PATH, SOCKET, socket_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    here = socket_dir()
    assert Path(here).parent == tmp_path and Path(here).stat().st_mode & 0o777 == 0o700
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    short = socket_dir()
    assert Path(short).parent == Path("/tmp") and len(str(Path(short) / SOCKET)) <= MAX_SOCKET_PATH
    Path(short).rmdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(OSError, match="set TMPDIR to a writable directory, or serve with --no-engine-process"):
        socket_dir()


def test_an_output_that_does_not_pickle_fails_its_own_item_only():
    """The engine process's outbox: a turn's outputs and metric calls go as one EngineOutputs; an
    output that does not pickle becomes its item's error, and the rest of the turn still goes."""
    import asyncio
    import pickle

    from server.engine.proc import Merge, unpicklable
    from server.engine.protocol import HEADER, EngineOutputs, EngineStats, Failed, Finished, MetricCall, Outbox

    class Writer:
        def __init__(self):
            self.data = b""

        def is_closing(self):
            return False

        def write(self, data):
            self.data += data

    async def main():
        writer = Writer()
        out = Outbox(asyncio.get_running_loop(), writer, Merge(), unpicklable)
        out.put(EngineOutputs([Finished(1, "fine")], EngineStats(depth=3, seen=2)))
        out.put(MetricCall("set_work", (), {"running": 1}))
        out.put(EngineOutputs([Finished(2, lambda: None)], EngineStats(depth=2, seen=2)))  # a lambda: no pickle
        out.flush()
        return writer.data

    data = asyncio.run(main())
    [message] = pickle.loads(data[HEADER.size:])
    assert message.stats.depth == 2 and message.stats.metrics == [MetricCall("set_work", (), {"running": 1})]
    good, bad = message.outputs
    assert good == Finished(1, "fine")
    assert isinstance(bad, Failed) and bad.id == 2 and bad.error.status == 500
