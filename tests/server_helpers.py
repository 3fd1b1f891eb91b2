"""Helpers for the server tests: a real uvicorn server on a free port, in a thread or a process;
waiting on a condition; the one /metrics parser."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30.0, what: str = "condition", poll: float = 0.02):
    """Poll ``condition()`` until it is true (returns its value); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not met after {timeout:g} s"
        time.sleep(poll)


# --- /metrics: the one parser ---------------------------------------------------------------------


def metrics_text(source) -> str:
    """The exposition text of ``source``: a server (``.url``), a client (``.get``), a base url or the text."""
    if hasattr(source, "get") and not isinstance(source, str):
        return source.get("/metrics").text
    if hasattr(source, "url") and isinstance(source.url, str):
        source = source.url
    if source.startswith("http://") or source.startswith("https://"):
        return httpx.get(f"{source}/metrics", timeout=30).text
    return source


def scrape(source) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics exposition: ``{(sample name, sorted label items): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(metrics_text(source)) for s in fam.samples}


def metric(source, name: str, **labels) -> float:
    """The sum of the samples named ``name`` (``tfb_x_count``, ``tfb_x_bucket``, ...) whose labels
    include ``labels`` (a histogram bucket: ``le="1.0"``); 0 when there are none. ``source``
    is what :func:`metrics_text` takes, or the dict :func:`scrape` returns."""
    samples = source if isinstance(source, dict) else scrape(source)
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == str(v2) for k, v2 in labels.items()))


def wait_ready(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Poll /health until 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise RuntimeError(f"start-up failed: {r.json().get('detail')}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


class Faults:
    """What a :class:`FaultyRunner` does wrong, switched on and off by a test while its server runs:
    each field, when set, is raised by that part of the model's work (``admit``: a prefill;
    ``step``: a decode step and its per-sequence rerun; ``score``: a scoring forward)."""

    def __init__(self):
        self.admit: BaseException | None = None
        self.step: BaseException | None = None
        self.score: BaseException | None = None
        self.gate: threading.Event | None = None  # set: each scoring forward waits for it
        self.steps: threading.Semaphore | None = None  # set: each decode step takes one (the test releases them)
        self.entered = threading.Event()  # a scoring forward has started (and waits at the gate)

    def clear(self) -> None:
        self.admit = self.step = self.score = self.gate = None
        if self.steps is not None:  # let a held decode step go
            self.steps.release(1_000_000)
            self.steps = None
        self.entered.clear()

    def hold(self) -> threading.Event:
        """Make every scoring forward wait until the returned event is set."""
        self.entered.clear()
        self.gate = threading.Event()
        return self.gate


def faulty_runner(faults: Faults):
    """``build_app(..., runner=faulty_runner(faults))``: the server's own ModelRunner, whose
    forwards and decoder raise what ``faults`` holds at the time."""
    from server.engine.core import ModelRunner

    class FaultyDecoder:
        def __init__(self, decoder):
            self._decoder = decoder

        def __getattr__(self, name):
            return getattr(self._decoder, name)

        def admit(self, seqs):
            if faults.admit is not None:
                raise faults.admit
            return self._decoder.admit(seqs)

        def step(self):
            steps = faults.steps
            if steps is not None:
                assert steps.acquire(timeout=60), "the test never let the decode step go"
            if faults.step is not None:
                raise faults.step
            return self._decoder.step()

        def step_each(self):
            if faults.step is not None:
                raise faults.step
            return self._decoder.step_each()

    class FaultyRunner(ModelRunner):
        def score(self, kind, items):
            gate = faults.gate
            if gate is not None:
                faults.entered.set()
                assert gate.wait(60), "the test never let the forward go"
            if faults.score is not None:
                raise faults.score
            return super().score(kind, items)

        def decoder(self):
            return FaultyDecoder(super().decoder())

    return FaultyRunner


class RunnerLog:
    """``build_app(..., runner=log.runner)``: the server's own ModelRunner, recorded with every decoder
    it makes (``runners``, ``decoders``), for tests that check which engine served."""

    def __init__(self):
        self.runners: list = []
        self.decoders: list = []

    def runner(self, loaded, metrics, kind):
        from server.engine.core import ModelRunner

        log = self

        class Recorded(ModelRunner):
            def decoder(self):
                log.decoders.append(super().decoder())
                return log.decoders[-1]

        self.runners.append(Recorded(loaded, metrics, kind))
        return self.runners[-1]


class ServerThread:
    """``build_app(settings)`` under a real uvicorn.Server in a thread. Its engine runs in this
    process (on a thread; the test's CPU is shared) unless ``engine_process=True``;
    tests/test_engine_process.py checks that the two layouts answer the same."""

    def __init__(self, settings=None, load=None, runner=None, **overrides):
        import uvicorn

        from server.app import build_app
        from server.connections import uvicorn_config
        from server.settings import Settings

        self.port = free_port()
        overrides.setdefault("engine_process", False)
        overrides.setdefault("threads", 1)  # the engine here runs in the test's process: the CPU is shared
        settings = settings or Settings(port=self.port, **overrides)
        if not settings.given("engine_process"):
            settings = settings.model_copy(update={"engine_process": False})
        if not settings.given("threads"):
            settings = settings.model_copy(update={"threads": 1})
        kwargs = {k: v for k, v in (("load", load), ("runner", runner)) if v is not None}
        self.app = build_app(settings, **kwargs)
        settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, log_level="warning", lifespan="on"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.tfb

    @property
    def loop(self):
        """The server's event loop (once started)."""
        return self.server.servers[0].get_loop()

    def start(self, wait: bool = True) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if wait:
            wait_ready(self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_cli(*args: str, env: dict | None = None, script: Path | None = None,
              **popen) -> tuple[subprocess.Popen, str]:
    """``tfb serve ARGS --port P`` as a real subprocess (through ``script`` instead of
    ``python -m server.cli`` when given; ``popen``: more arguments of subprocess.Popen);
    returns (process, base url)."""
    port = free_port()
    entry = [str(script)] if script is not None else ["-m", "server.cli"]
    cmd = [sys.executable, *entry, "serve", "--port", str(port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, **popen)
    return proc, f"http://127.0.0.1:{port}"


def bayesianized(model_dir: Path, adapter_dir: Path, out: Path, sigma: float = 0.05) -> Path:
    """A Bayesianized directory at a fixed sigma (no search)."""
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior

    post = Posterior.from_adapter(load_base_model(model_dir, "cpu", "float32"), adapter_dir)
    post.sigma = sigma
    return post.save(out)


def tiny_posterior(root: Path, sigma: float = 0.5) -> tuple[Path, Path]:
    """(base model, Bayesianized adapter): a tiny random Llama and LoRA at a fixed sigma, in ``root``."""
    import tiny

    base = tiny.make_llama(root / "base")
    return base, bayesianized(base, tiny.make_lora(base, root / "lora"), root / "post", sigma=sigma)


def post_and_leave(url: str, body: dict, until) -> None:
    """POST ``body`` as JSON to ``url`` on a socket of its own, and close that socket (the client
    goes away before its answer) once ``until()`` holds (waited for with :func:`wait_for`)."""
    import json
    from urllib.parse import urlsplit

    where = urlsplit(url)
    data = json.dumps(body).encode()
    with socket.create_connection((where.hostname, where.port)) as sock:
        sock.sendall(f"POST {where.path} HTTP/1.1\r\nHost: {where.hostname}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        wait_for(until, what="the request at the point where its client leaves")


def leave_stream(url: str, body: dict, events: int = 3) -> None:
    """Stream ``body`` to ``url`` and go away after ``events`` server-sent events."""
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= events:
                return
