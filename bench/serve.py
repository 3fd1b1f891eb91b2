#!/usr/bin/env python3
"""The whole server over HTTP against its engine alone, same shapes, same run.

1. The engine alone (in this process): the posterior the server will serve is loaded with the
   server's own loader and wrapped in the server's own ``ModelRunner``; then, for every cell of
   the grid, the worker-side calls the server makes are timed on the shapes that cell produces:
   ``ModelRunner.choices_step`` (``tfb_core.scoring.choice_probs`` through the server's
   ``PrefillEngine`` on CUDA, the eager forward elsewhere) on the batch the scheduler would form,
   and ``EngineCore.run_planned`` / ``.decode`` (prefill and join in the plan's groups, one decode
   step of every stream with the server's per-token host work) plus the decoder's bare ``step()``. Requests are
   tokenized by the server's serving classes (``ChoicesServing.prepare``,
   ``CompletionServing.prepare``, ``ChatServing.prepare``), so the engine sees the server's token ids.
2. The server: ``tfb serve`` in a subprocess (or a running one with ``--url``), driven by
   ``concurrency`` closed-loop clients on one asyncio loop (one ``httpx.AsyncClient``): each sends
   its next request when the last one is answered; after a warm-up, each cell measures a window
   of ``--cell-s`` seconds of the steady state, opened once every client has had one answer.
   Streams are parsed without JSON (token events are counted by a byte marker), so the client
   stays cheap; its CPU time is reported per cell.

Per cell: req/s, generated tok/s, latency p50/p95, for streams TTFT and inter-token latency
from the arrival times of the server-sent events, and the server/engine ratio.

Presets: ``cpu`` serves the built-in demo (``tfb serve`` with no model arguments), a small grid;
``gpu`` builds a random-weight Llama (8B shape; SmolLM2's tokenizer from ``--tokenizer`` or
``TFB_TOKENIZER``) with a random LoRA r 8 on q,v, Bayesianizes it with
``tfb bayesianize --sigma 0.01`` and serves it. See bench/README.md for the commands and results.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# --- what the clients send ------------------------------------------------------------------

QUESTIONS = {  # the letter prompt: ~120 tokens (long), ~60 (short: a 2-core CPU scores 40 rows of it)
    "long": ("A student pours 50 mL of water into a beaker and heats it on a hot plate for ten minutes. "
             "Some of the water is gone after heating. Which process best explains where the water went, "
             "given that the room was at normal pressure and no lid covered the beaker?"),
    "short": "Water in an open beaker is heated and some of it is gone. Where did it go?",
}
CHOICES = ["It evaporated into the air", "It condensed on the hot plate", "It froze into ice",
           "It melted the beaker"]
CHAT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
        "Describe the sea, the weather and every step of the day.")
COMPLETION = ("The lighthouse keeper woke before dawn, as he had every morning for thirty years. "
              "Outside, the sea")


@dataclass(frozen=True)
class Workload:
    """One kind of request: an endpoint and how its body and response are read."""

    name: str
    endpoint: str  # /v1/choices, /v1/chat/completions, /v1/completions
    mode: str | None = None  # choices: letter or sequence
    stream: bool = False

    @property
    def generates(self) -> bool:
        return self.mode is None

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


WORKLOADS = {w.name: w for w in [
    Workload("choices-letter", "/v1/choices", mode="letter"),
    Workload("choices-sequence", "/v1/choices", mode="sequence"),
    Workload("chat-stream", "/v1/chat/completions", stream=True),
    Workload("chat", "/v1/chat/completions"),
    Workload("completions-stream", "/v1/completions", stream=True),
    Workload("completions", "/v1/completions"),
]}

PRESETS = {
    # the built-in demo on a small CPU: a few minutes
    # the built-in demo on a small CPU: a few minutes; one torch thread in the server and the
    # engine (on 2 cores shared with other jobs, two threads stall each other)
    "cpu": dict(concurrency=[1, 4], ks=[1, 10], max_tokens=16, cell_s=4.0, warmup_s=3.0,
                engine_steps=4, deadline_s=900.0, threads=1, question="short"),
    # the 8B shape on one H200: under 9 minutes with the build, the engine phase and the
    # server's start (the device allows 10 per command); the deadline cuts the last cells if not
    "gpu": dict(concurrency=[1, 16, 64], ks=[1, 10], max_tokens=64, cell_s=6.0, warmup_s=3.0,
                engine_steps=8, deadline_s=480.0, threads=None, question="long"),
}
SERVE_FLAGS = ["--max-batch-size", "64", "--max-queue", "1024"]


@dataclass(frozen=True)
class Traffic:
    """What the clients send: the question (a key of QUESTIONS), new tokens per generation
    request (greedy; the server stops earlier at EOS), the served model's id."""

    question: str
    max_tokens: int
    model: str = ""

    def body(self, w: Workload, K: int, variant: int) -> dict:
        """A request body; ``variant`` makes each prompt distinct (as real traffic is)."""
        if not w.generates:
            return {"question": f"{QUESTIONS[self.question]} (v{variant})", "choices": CHOICES,
                    "num_samples": K, "mode": w.mode}
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "num_samples": K,
                "stream": w.stream}
        if w.chat:
            body["messages"] = [{"role": "user", "content": f"{CHAT} ({variant})"}]
        else:
            body["prompt"] = f"({variant}) {COMPLETION}"
        return body


# --- statistics ---------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(1e3 * x, 2)


# --- the client ---------------------------------------------------------------------------------

TOKEN_MARK = b'"tokens":[{'  # a server-sent event that carries a token (not the role or last chunk)
ERROR_MARK = b'data: {"error"'  # the error event (server.generating._sse_error)
USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')
APP_TIMING = re.compile(r"\bapp;dur=([0-9.]+)")  # the server's own time (server.app.ServerTimingMiddleware)


@dataclass
class Cell:
    """What one grid cell's clients saw; every time is ``time.perf_counter()``."""

    workload: Workload
    K: int
    concurrency: int
    done: list[tuple[float, float, int]] = field(default_factory=list)  # answered: (sent, ended, new tokens)
    app_ms: list[tuple[float, float]] = field(default_factory=list)  # (ended, the server's Server-Timing app;dur)
    token_times: list[float] = field(default_factory=list)  # arrival of every streamed token
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (sent, time to its first token)
    itl: list[tuple[float, float]] = field(default_factory=list)  # (arrival, gap since the token before)
    errors: int = 0
    codes: dict = field(default_factory=dict)
    cancelled: int = 0  # in flight when the window closed
    first_error: str | None = None

    def fail(self, status, text: str) -> None:
        self.errors += 1
        self.codes[str(status)] = self.codes.get(str(status), 0) + 1
        self.first_error = self.first_error or f"{status}: {text[:300]}"


async def one_request(client, url: str, w: Workload, body: dict, cell: Cell) -> None:
    t0 = time.perf_counter()
    if not w.stream:
        r = await client.post(url + w.endpoint, json=body)
        if r.status_code != 200:
            return cell.fail(r.status_code, r.text)
        m = USAGE.search(r.content) if w.generates else None
        t1 = time.perf_counter()
        cell.done.append((t0, t1, int(m.group(1)) if m else 0))
        timing = APP_TIMING.search(r.headers.get("server-timing", ""))
        if timing:
            cell.app_ms.append((t1, float(timing.group(1))))
        return
    times: list[float] = []
    try:
        async with client.stream("POST", url + w.endpoint, json=body) as r:
            if r.status_code != 200:
                return cell.fail(r.status_code, (await r.aread()).decode(errors="replace"))
            buf = b""
            async for chunk in r.aiter_raw():
                now = time.perf_counter()
                buf += chunk
                end = buf.rfind(b"\n\n")
                if end < 0:
                    continue
                events, buf = buf[:end], buf[end + 2:]
                times.extend([now] * events.count(TOKEN_MARK))  # one read may hold several events
                if ERROR_MARK in events:
                    return cell.fail("stream", events.decode(errors="replace"))
        cell.done.append((t0, time.perf_counter(), len(times)))
    finally:  # a stream cut when the window closes keeps the tokens it got
        cell.token_times.extend(times)
        if times:
            cell.ttft.append((t0, times[0] - t0))
            cell.itl.extend((b, b - a) for a, b in zip(times, times[1:]))


async def drive(client, url: str, traffic: Traffic, w: Workload, K: int, conc: int, seconds: float,
                rng: random.Random, grace_s: float) -> dict:
    """``conc`` closed-loop clients, each sending its next request when the last is answered;
    measured in the steady state. The window of ``seconds`` opens once every client has had one
    answer (the first requests come as one burst, unlike later ones: waited for at most
    ``grace_s``), and counts what happens inside it: requests answered (their latency and new
    tokens), streamed tokens arriving, the time to first token of requests sent, inter-token
    gaps ending. It stays open past ``seconds`` until a request sent inside it has ended (on a
    slow or loaded machine a window of ``seconds`` may otherwise see no whole request: no
    latency, no time to first token). Requests in flight when it closes are cut."""
    cell = Cell(w, K, conc)
    ramp = min(1.0, seconds / 8)  # start the clients spread out, not as one burst
    answered = [asyncio.Event() for _ in range(conc)]
    window: list[float] = []  # its start, once open
    one_inside = asyncio.Event()  # a request sent inside the window has ended
    inflight = [0]

    async def client_loop(i: int) -> None:
        await asyncio.sleep(ramp * i / conc)
        while True:
            inflight[0] += 1
            sent = time.perf_counter()
            try:
                await one_request(client, url, w, traffic.body(w, K, rng.randrange(10**9)), cell)
            finally:
                inflight[0] -= 1
            answered[i].set()
            if window and sent >= window[0]:
                one_inside.set()

    cpu0 = time.process_time()
    tasks = [asyncio.ensure_future(client_loop(i)) for i in range(conc)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in answered)), grace_s)
    except asyncio.TimeoutError:
        pass
    start = time.perf_counter()
    window.append(start)
    await asyncio.sleep(seconds)
    # every request ends (answered, failed, or at the client's timeout); a client that died ends it too
    inside = asyncio.ensure_future(one_inside.wait())
    await asyncio.wait([inside, *tasks], return_when=asyncio.FIRST_COMPLETED)
    inside.cancel()
    end = time.perf_counter()
    cell.cancelled = inflight[0]
    for t in tasks:
        t.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if not isinstance(result, asyncio.CancelledError):
            cell.fail("client", repr(result))
    return summarize(cell, start, end, time.process_time() - cpu0)


def summarize(cell: Cell, start: float, end: float, client_cpu_s: float) -> dict:
    """The cell's figures over the window ``[start, end]`` (see :func:`drive`)."""
    w, wall = cell.workload, end - start
    inside = lambda t: start <= t <= end  # noqa: E731
    done = [(t0, t1, n) for t0, t1, n in cell.done if inside(t1)]
    lat = [t1 - t0 for t0, t1, _ in done]
    tokens = sum(map(inside, cell.token_times)) if w.stream else sum(n for *_, n in done)
    ttft = [x for t0, x in cell.ttft if inside(t0)]
    itl = [x for t, x in cell.itl if inside(t)]
    app = [x / 1000 for t, x in cell.app_ms if inside(t)]
    return {
        "workload": w.name, "endpoint": w.endpoint, "mode": w.mode, "stream": w.stream, "K": cell.K,
        "concurrency": cell.concurrency, "requests": len(lat), "errors": cell.errors, "codes": cell.codes,
        "first_error": cell.first_error, "cut_at_end": cell.cancelled, "wall_s": round(wall, 3),
        "req_s": round(len(lat) / wall, 3),
        "tok_s": round(tokens / wall, 2) if w.generates else None,
        "tokens": tokens if w.generates else None,
        "tokens_per_request": round(sum(n for *_, n in done) / len(done), 1) if done and w.generates else None,
        "p50_ms": ms(pct(lat, .5)), "p95_ms": ms(pct(lat, .95)),
        "app_p50_ms": ms(pct(app, .5)),  # in the server: from the request reaching the app to its response
        "ttft_p50_ms": ms(pct(ttft, .5)), "ttft_p95_ms": ms(pct(ttft, .95)),
        "itl_p50_ms": ms(pct(itl, .5)), "itl_p95_ms": ms(pct(itl, .95)),
        "itl_n": len(itl),
        "client_cpu_s": round(client_cpu_s, 3), "client_cpu_frac": round(client_cpu_s / wall, 3),
    }


# --- the engine alone ------------------------------------------------------------------------------


def items_per_batch(conc: int, rows: int, length: int, settings) -> int:
    """How many equal items the scheduler puts in one forward when ``conc`` are waiting
    (``server.engine.plan``: max_batch_size items, rows x longest <= max_batch_tokens)."""
    b = 1
    while b < min(conc, settings.max_batch_size) and (b + 1) * rows * length <= settings.max_batch_tokens:
        b += 1
    return b


class EngineBench:
    """The server's engine side, in this process: its loader, ModelRunner, EngineCore and serving classes."""

    def __init__(self, settings, clock, steps: int, traffic: Traffic):
        from dataclasses import replace

        from server.engine.core import EngineCore, load_engine
        from server.engine.plan import PlanConfig
        from server.generating import ChatServing, CompletionServing
        from server.loader import ServedModel, model_id
        from server.metrics import Metrics
        from server.serving import ChoicesServing

        t0 = time.perf_counter()
        self.clock, self.steps = clock, steps
        self.loaded, settings, self.runner = load_engine(settings, Metrics(model_id(settings)))
        self.settings = settings
        # stepped by the bench: admissions coalesce as the server's plan says, without waiting for more
        self.core = EngineCore(self.runner, self.runner.metrics, replace(PlanConfig.of_settings(settings), max_wait=0.0))
        self.ids = itertools.count()
        self.traffic = Traffic(traffic.question, traffic.max_tokens, self.loaded.model_id)
        model = ServedModel.of(self.loaded, settings.max_samples)  # as the in-process engine client does
        self.choices = ChoicesServing(model, None, settings, self.runner.metrics)
        self.completions, self.chat = (cls(model, None, settings, self.runner.metrics)
                                       for cls in (CompletionServing, ChatServing))
        self.loop = asyncio.new_event_loop()  # never run: futures and events only need one to exist
        self.load_s = time.perf_counter() - t0
        self.static = self.runner.kind == "static"

    def close(self) -> None:
        self.loop.close()
        del self.runner, self.loaded, self.choices, self.completions, self.chat

    def choices_cell(self, w: Workload, K: int, conc: int) -> dict:
        """``choices_step`` on the batch the scheduler forms from ``conc`` waiting items."""
        from server.protocol import ChoiceItem

        item = ChoiceItem(**self.traffic.body(w, K, 0))
        work = self.choices.prepare(item, item.to_score_options(self.choices.defaults), "", math.inf)
        b = items_per_batch(conc, work.rows, work.length, self.settings)
        fn = lambda: self.runner.choices_step([work] * b)  # noqa: E731
        if self.clock.cuda:
            fn()  # PrefillEngine graphs a shape from its second forward: one more warm-up
            r = self.clock.bench(fn, min_reps=3, max_reps=10, budget_s=1.0, heavy_s=2.0)
        else:  # no graphs, no warm-up needed: a slow first call is the measurement
            first = self.clock.time(fn)
            r = self.clock.bench(fn, min_reps=2, max_reps=5, budget_s=1.0) if first < 1.0 else \
                {"median_s": first, "min_s": first, "n": 1}
        return {"items_per_forward": b, "rows": b * work.rows, "tokens_per_row": work.length,
                "forward_ms": ms(r["median_s"]), "forward_min_ms": ms(r["min_s"]), "reps": r["n"],
                "req_s": round(b / r["median_s"], 3),
                "latency_ms": ms(r["median_s"])}  # one client: its item alone

    def generation_cell(self, w: Workload, K: int, conc: int) -> dict:
        """Prefill + join of one stream (the time to its first token), then ``conc`` streams
        admitted as the scheduler would, and decode steps of all of them."""
        core = self.core
        warm, steps, new_tokens = 3, self.steps, self.traffic.max_tokens
        # no stream may finish while timed
        traffic = Traffic(self.traffic.question, max(new_tokens, 2 + warm + 2 * steps), self.traffic.model)

        def works(n: int) -> list:
            from server.openai_protocol import ChatCompletionRequest, CompletionRequest

            out = []
            for v in range(n):
                body = traffic.body(w, K, v)
                body.pop("stream")
                req = (ChatCompletionRequest if w.chat else CompletionRequest)(**body)
                ws, _ = (self.chat if w.chat else self.completions).prepare(req)
                for x in ws:
                    x.params.ignore_eos = True  # fixed lengths: the server's own requests may stop at EOS
                    x.id = next(self.ids)
                out += ws
            return out

        def clear(ws) -> None:  # as a client going away: retired at the next step
            core.abort([x.id for x in ws])
            core.decode()
            assert core.active == 0, "the engine kept a stream after all were cancelled"

        def admit(ws) -> None:  # every group the plan makes, each one forward
            core.add(ws)
            while core.depth:
                core.run_planned()

        first = []
        for _ in range(3 if steps >= 4 else 1):
            one = works(1)
            first.append(self.clock.time(lambda: admit(one)))
            clear(one)
        many = works(conc)
        per = items_per_batch(conc, K, len(many[0].prompt_ids), self.settings)
        admit_s = self.clock.time(lambda: admit(many))
        for _ in range(warm):  # a new row count is captured (CUDA graph) at its first step
            core.decode()
        worker = [self.clock.time(core.decode) for _ in range(steps)]
        bare = [self.clock.time(core.decoder.step) for _ in range(steps)]  # no per-token host work
        clear(many)
        step = _median(worker)
        # the engine serving the cell's requests in lock-step: all admitted, then decoded to the end
        per_round = admit_s + (new_tokens - 1) * step
        return {"prompt_tokens": len(many[0].prompt_ids), "rows": conc * K,
                "first_token_ms": ms(_median(first)), "admit_all_ms": ms(admit_s), "admit_batch": per,
                "step_ms": ms(step), "step_min_ms": ms(min(worker)), "bare_step_ms": ms(_median(bare)),
                "steps": steps, "decode_tok_s": round(conc / step, 2),
                "new_tokens": new_tokens, "tok_s": round(conc * new_tokens / per_round, 2),
                "latency_ms": ms(per_round)}


def _median(xs):
    import statistics

    return statistics.median(xs)


def engine_phase(args, settings, grid, res) -> None:
    """Time every cell's shapes on the engine; then free the model (the server loads its own)."""
    import torch

    import timing  # bench/timing.py: the same timers as bench/gpu.py (CUDA events on the GPU)

    torch.set_grad_enabled(False)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = EngineBench(settings, timing.Clock(device), args.engine_steps, Traffic(args.question, args.max_tokens))
    res["engine_meta"] = {"load_s": round(bench.load_s, 2), "static": bench.static,
                          "prefill_engine": bench.runner.model.prefill is not None, "torch_threads": torch.get_num_threads(),
                          "device": str(device), "dtype": str(next(bench.loaded.post.model.parameters()).dtype)}
    log(f"engine: loaded in {bench.load_s:.1f} s ({res['engine_meta']})")
    done = {}
    try:
        for w, K, conc in grid:
            key = ("gen", w.chat, K, conc) if w.generates else (w.mode, K, conc)
            if key not in done:
                t0 = time.perf_counter()
                done[key] = (bench.generation_cell(w, K, conc) if w.generates
                             else bench.choices_cell(w, K, conc))
                log(f"engine {w.name:18s} K={K:2d} c={conc:2d}: {json.dumps(done[key])} "
                    f"({time.perf_counter() - t0:.1f} s)")
            res["engine"][cell_key(w, K, conc)] = done[key]
            save(args, res)
    finally:
        bench.close()
        del bench
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cell_key(w: Workload, K: int, conc: int) -> str:
    return f"{w.name}/K{K}/c{conc}"


# --- the model (gpu preset) and the server ------------------------------------------------------


def build_random_model(args, work: Path) -> tuple[Path, Path]:
    """A random-weight Llama of ``args.shape`` with SmolLM2's tokenizer, a random LoRA r 8 on
    q,v, Bayesianized by ``tfb bayesianize --sigma``; reused when ``work`` already holds them."""
    layers = "" if args.stochastic_layers == "all" else f"-L{args.stochastic_layers}"
    model_dir, lora_dir, post_dir = work / "model", work / "lora", work / f"post-{args.shape}{layers}"  # served id
    if (post_dir / "tfb_config.json").is_file() and (model_dir / "config.json").is_file():
        log(f"reusing {model_dir} and {post_dir}")
        return model_dir, post_dir
    if (model_dir / "config.json").is_file() and (lora_dir / "adapter_config.json").is_file():
        log(f"reusing {model_dir}; Bayesianizing for stochastic layers {args.stochastic_layers}")
        return model_dir, bayesianize(args, model_dir, lora_dir, post_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    import reference

    tok_dir = args.tokenizer or os.environ.get("TFB_TOKENIZER")
    if not tok_dir:
        raise SystemExit("--preset gpu builds a random model: give SmolLM2's tokenizer directory with "
                         "--tokenizer DIR or TFB_TOKENIZER (bench/prepare_gpu.sh saves one)")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    shape = dict(reference.SHAPES[args.shape], vocab_size=len(tok))
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pm = reference.make_adapter(model, reference.TARGETS["qv"], 8, lora_dir)  # random A and B, saved
    cfg_path = lora_dir / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(c))
    del pm, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"built {args.shape} (vocab {len(tok)}) in {time.perf_counter() - t0:.1f} s")
    return model_dir, bayesianize(args, model_dir, lora_dir, post_dir)


def bayesianize(args, model_dir: Path, lora_dir: Path, post_dir: Path) -> Path:
    """``tfb bayesianize --sigma`` of the random LoRA, noise in the last ``--stochastic-layers``."""
    t0 = time.perf_counter()
    r = subprocess.run(tfb_command("bayesianize", "--model", str(model_dir), "--adapter", str(lora_dir),
                                   "--sigma", str(args.sigma), "--stochastic-layers", str(args.stochastic_layers),
                                   "--out", str(post_dir), *(["--device", args.device] if args.device else [])),
                       env=child_env(), cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"tfb bayesianize failed ({r.returncode}):\n{r.stderr[-3000:]}")
    log(f"bayesianized (sigma {args.sigma}, stochastic layers {args.stochastic_layers}) "
        f"in {time.perf_counter() - t0:.1f} s")
    return post_dir


def tfb_command(*argv: str) -> list[str]:
    """``tfb ...`` from this checkout (python -m: no installed console script needed)."""
    return [sys.executable, "-m", "server.cli", *argv]


def child_env() -> dict:
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if THREADS is not None:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


THREADS: int | None = None  # --threads, for the subprocesses too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], port: int, log_path: Path, timeout_s: float) -> subprocess.Popen:
    import httpx

    cmd = tfb_command("serve", *serve_args, "--port", str(port))
    log("starting: " + " ".join(cmd[1:]))
    srv = subprocess.Popen(cmd, env=child_env(), cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if srv.poll() is not None:
            raise SystemExit(f"tfb serve exited ({srv.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    srv.terminate()
    raise SystemExit(f"tfb serve not ready after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


SERVER_PID: int | None = None  # the started server's, for --profile


def start_profile(args, key: str) -> list[subprocess.Popen]:
    """py-spy on the server for one cell (``--profile DIR``): every thread's stacks while it runs,
    and only the thread holding the GIL (``--gil``), as collapsed stacks, DIR/KEY.all.txt and
    DIR/KEY.gil.txt; ``python bench/profile_report.py DIR`` summarises them."""
    if not args.profile or SERVER_PID is None:
        return []
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
    return [subprocess.Popen([spy, "record", "--pid", str(SERVER_PID), "--duration", str(max(1, int(args.cell_s))),
                              "--rate", "200", "--format", "raw", "--threads", "--nonblocking", "--subprocesses", *extra,
                              "-o", str(Path(args.profile) / f"{name}.{kind}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for kind, extra in (("all", []), ("gil", ["--gil"]))]


def stop_profile(spies: list[subprocess.Popen]) -> None:
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()


def stop_server(srv: subprocess.Popen) -> None:
    srv.terminate()  # SIGTERM drains: in-flight work finishes
    try:
        srv.wait(30)
    except subprocess.TimeoutExpired:
        srv.kill()
        srv.wait()


# --- the run ----------------------------------------------------------------------------------------


def log(*a) -> None:
    print(*a, flush=True)


def save(args, res) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))


def make_grid(args) -> list[tuple[Workload, int, int]]:
    """Cells in the order they run: the targets' workloads first (a deadline cuts the end)."""
    return [(WORKLOADS[name], K, c) for name in args.workloads for K in args.ks for c in args.concurrency]


async def http_phase(args, url: str, grid, res, deadline: float) -> None:
    import httpx

    # idle connections dropped after 4 s, before uvicorn closes them (5 s): a request on a
    # connection the server is closing at that moment fails with a ReadError
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8,
                          max_keepalive_connections=max(args.concurrency) + 8, keepalive_expiry=4.0)
    rng = random.Random(0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        res["meta"]["served_model"] = model
        traffic = Traffic(args.question, args.max_tokens, model)
        # warm-up: each workload family at the largest concurrency and every K (CUDA graphs of
        # the shapes the grid meets are captured here, not in a timed cell)
        if args.warmup_s > 0:
            t0 = time.perf_counter()
            families = {"choices-letter", "choices-sequence", "chat-stream"} & set(args.workloads) or \
                {args.workloads[0]}
            for name in sorted(families):
                for K in args.ks:
                    r = await drive(client, url, traffic, WORKLOADS[name], K, max(args.concurrency), args.warmup_s,
                                    rng, grace_s=args.cell_s)
                    if r["errors"]:
                        log(f"warm-up {name} K={K}: {r['errors']} errors, first: {r['first_error']}")
                    await settle(client, url)
            res["meta"]["warmup_s"] = round(time.perf_counter() - t0, 1)
            log(f"warm-up: {res['meta']['warmup_s']} s")
        for w, K, conc in grid:
            key = cell_key(w, K, conc)
            if time.time() + args.cell_s > deadline:
                res["skipped"].append(key)
                log(f"skipped (deadline): {key}")
                continue
            spies = start_profile(args, key)
            row = await drive(client, url, traffic, w, K, conc, args.cell_s, rng, grace_s=2 * args.cell_s)
            stop_profile(spies)
            row["engine"] = res["engine"].get(key)
            row.update(ratios(row))
            res["cells"].append(row)
            save(args, res)
            log(format_row(row))
            await settle(client, url)  # cut streams: the server finishes the step or prefill they are in
        try:
            text = (await client.get(url + "/metrics")).text
            res["server_metrics"] = [line for line in text.splitlines()
                                     if line.startswith("tfb_") and "_bucket" not in line]
        except httpx.HTTPError:
            pass


async def settle(client, url: str, timeout_s: float = 60.0) -> None:
    """Wait until the server has nothing queued or running (its /metrics gauges)."""
    import httpx

    gauges = re.compile(r"^tfb_(?:queue_depth|requests_running)\{[^}]*\} (\S+)$", re.M)
    until = time.perf_counter() + timeout_s
    while time.perf_counter() < until:
        try:
            text = (await client.get(url + "/metrics")).text
        except httpx.HTTPError:
            return
        values = [float(v) for v in gauges.findall(text)]
        if not values or not any(values):
            return
        await asyncio.sleep(0.1)


def ratios(row: dict) -> dict:
    """How far the server is from its engine on the same shape (1.0 = the engine's speed).

    x_engine: the engine's throughput over the server's: req/s for choices (the batch the
    scheduler forms), tok/s for text (the cell's streams admitted together, then decoded to
    max_tokens: ``EngineBench.generation_cell``); latency_x (one client): the server's p50 over
    the engine's time for one request, and over_ms / app_over_ms the milliseconds over it, of the
    client's p50 and of the server's own (Server-Timing) p50; itl_x: the server's inter-token p50
    over the engine's worker step at that many streams; ttft_x: the server's TTFT p50 over the
    engine's prefill + join of one stream.
    """
    e = row.get("engine")
    out = {"x_engine": None, "latency_x": None, "over_ms": None, "app_over_ms": None, "itl_x": None,
           "ttft_x": None}
    if not e:
        return out
    if row["tok_s"] is not None:
        out["x_engine"] = _div(e["tok_s"], row["tok_s"])
        out["itl_x"] = _div(row["itl_p50_ms"], e["step_ms"])
        out["ttft_x"] = _div(row["ttft_p50_ms"], e["first_token_ms"])
    else:
        out["x_engine"] = _div(e["req_s"], row["req_s"])
    if row["concurrency"] == 1:
        out["latency_x"] = _div(row["p50_ms"], e["latency_ms"])
        if row["tok_s"] is None:
            out["over_ms"] = _minus(row["p50_ms"], e["latency_ms"])
            out["app_over_ms"] = _minus(row.get("app_p50_ms"), e["latency_ms"])
    return out


def _div(a, b):
    return round(a / b, 2) if a and b else None


def _minus(a, b):
    return round(a - b, 2) if a is not None and b is not None else None


def _f(x, nd=1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


HEADER = ("| workload | K | conc | req/s | tok/s | p50 ms | p95 ms | TTFT p50 / p95 ms | ITL p50 / p95 ms "
          "| engine | server/engine | client CPU |")


def format_row(r: dict) -> str:
    e = r.get("engine") or {}
    if r["tok_s"] is not None and e:
        eng = (f"{e['step_ms']:.1f} ms/step ({e['rows']} rows), 1st token {e['first_token_ms']:,.0f} ms: "
               f"{e['tok_s']:,.0f} tok/s")
        ratio = f"{_f(r['x_engine'], 2)}x tok/s" + (f", ITL {_f(r['itl_x'], 2)}x" if r["itl_x"] else "")
    elif e:
        eng = f"{e['forward_ms']:.1f} ms / {e['items_per_forward']} items = {e['req_s']:,.1f} req/s"
        ratio = f"{_f(r['x_engine'], 2)}x req/s" + (f", p50 {_f(r['latency_x'], 2)}x" if r["latency_x"] else "")
        if r.get("over_ms") is not None:
            ratio += f", {r['over_ms']:+.1f} ms" + (f" (in the server {r['app_over_ms']:+.1f})"
                                                   if r.get("app_over_ms") is not None else "")
    else:
        eng, ratio = "-", "-"
    ttft = f"{_f(r['ttft_p50_ms'], 0)} / {_f(r['ttft_p95_ms'], 0)}" if r["stream"] else "-"
    itl = f"{_f(r['itl_p50_ms'], 1)} / {_f(r['itl_p95_ms'], 1)}" if r["stream"] else "-"
    err = f" ({r['errors']} errors)" if r["errors"] else ""
    return (f"| {r['workload']}{err} | {r['K']} | {r['concurrency']} | {_f(r['req_s'], 2)} | {_f(r['tok_s'], 0)} "
            f"| {_f(r['p50_ms'], 0)} | {_f(r['p95_ms'], 0)} | {ttft} | {itl} | {eng} | {ratio} "
            f"| {100 * r['client_cpu_frac']:.0f}% |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets (cell values can be overridden by the flags):\n" + "\n".join(
                                    f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="cpu: the built-in demo, small grid; gpu: a random-weight 8B-shaped Llama it builds")
    p.add_argument("--smoke", action="store_true", help="two tiny cells on the cpu preset (< 60 s): a check")
    p.add_argument("--url", default=None, help="drive this running server instead of starting one (the "
                   "engine phase still loads the model given by --model/--adapter, default the demo; "
                   "--no-engine skips it)")
    p.add_argument("--model", default=None, help="serve this base model (with --adapter) instead of the preset's")
    p.add_argument("--adapter", default=None, help="a Bayesianized adapter directory")
    p.add_argument("--tokenizer", default=None, help="gpu preset: SmolLM2's tokenizer directory "
                   "(default: env TFB_TOKENIZER)")
    p.add_argument("--shape", default="8b", choices=["8b", "1b", "tiny"], help="gpu preset: the Llama shape")
    p.add_argument("--sigma", type=float, default=0.01, help="gpu preset: tfb bayesianize --sigma")
    p.add_argument("--stochastic-layers", default="all", help="gpu preset: tfb bayesianize --stochastic-layers "
                   "(the noise in the last L decoder layers only; all: every layer); the posterior of each L "
                   "is built once beside the model in --workdir")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--workdir", default=None, help="gpu preset: where the model is built (kept and reused; "
                   "default: $TMPDIR/tfb-serve-bench-SHAPE)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--concurrency", nargs="+", type=int, default=None)
    p.add_argument("--ks", nargs="+", type=int, default=None, help="num_samples values")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per generation request")
    p.add_argument("--question", choices=list(QUESTIONS), default=None, help="the /v1/choices question")
    p.add_argument("--cell-s", type=float, default=None, help="seconds of traffic per cell")
    p.add_argument("--warmup-s", type=float, default=None, help="seconds of warm-up per workload family and K")
    p.add_argument("--engine-steps", type=int, default=None, help="timed decode steps per engine shape")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip the cells that would start later than this after the script's start")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server and the engine "
                   "(OMP_NUM_THREADS; default: the preset's, gpu: torch's own)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine phase")
    p.add_argument("--serve-flags", nargs="+", default=[], metavar="FLAG",
                   help="more `tfb serve` flags, after the preset's (e.g. --serve-flags=--admit-ratio=0)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="record the server with py-spy during each cell into DIR (py-spy on PATH; see bench/README.md)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--out", default=None, help="the JSON written (default: bench/results/serve_PRESET.json, "
                   "or $OUT/serve_PRESET.json when OUT is set)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.smoke:
        if args.preset != "cpu":
            p.error("--smoke runs the cpu preset")
        preset.update(concurrency=[2], ks=[2], max_tokens=4, cell_s=4.0, warmup_s=0.0, engine_steps=2)
        if args.workloads == list(WORKLOADS):
            args.workloads = ["choices-letter", "chat-stream"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if (args.model is None) != (args.adapter is None):
        p.error("--model and --adapter go together")
    if args.out is None:
        name = f"serve_{'smoke' if args.smoke else args.preset}.json"
        args.out = str(Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "bench" / "results" / name)
    return args


def main(argv=None) -> dict:
    global THREADS
    args = parse_args(argv)
    started = time.time()
    import torch

    THREADS = args.threads
    if THREADS is not None:
        torch.set_num_threads(THREADS)

    res = {"meta": {"command": " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                    "preset": args.preset, "smoke": args.smoke, "shape": args.shape if args.preset == "gpu" else None,
                    "stochastic_layers": args.stochastic_layers if args.preset == "gpu" else None,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
                    else f"{platform.machine()} CPU, {os.cpu_count()} cores",
                    "cell_s": args.cell_s, "max_tokens": args.max_tokens, "serve_flags": SERVE_FLAGS + args.serve_flags,
                    "question": QUESTIONS[args.question], "choices": CHOICES,
                    "threads": args.threads, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S")},
           "engine": {}, "cells": [], "skipped": []}
    model_args: list[str] = []
    if args.model:
        model_args = ["--model", args.model, "--adapter", args.adapter]
    elif args.preset == "gpu" and not args.url:
        work = Path(args.workdir or Path(tempfile.gettempdir()) / f"tfb-serve-bench-{args.shape}")
        t0 = time.perf_counter()
        model_dir, post_dir = build_random_model(args, work)
        res["meta"]["build_s"] = round(time.perf_counter() - t0, 1)
        model_args = ["--model", str(model_dir), "--adapter", str(post_dir)]
    serve_args = model_args + SERVE_FLAGS + (["--device", args.device] if args.device else []) + args.serve_flags
    res["meta"]["serve_args"] = serve_args
    grid = make_grid(args)
    if not args.no_engine:
        from server.cli import add_serve_arguments
        from server.settings import settings_from_args

        p = argparse.ArgumentParser()
        add_serve_arguments(p)
        settings = settings_from_args(p.parse_args(serve_args))  # exactly what `tfb serve` reads
        t0 = time.perf_counter()
        engine_phase(args, settings, grid, res)
        res["meta"]["engine_phase_s"] = round(time.perf_counter() - t0, 1)
    srv, url = None, args.url
    log_path = Path(tempfile.gettempdir()) / f"tfb-serve-bench-{os.getpid()}.log"
    try:
        if url is None:
            port = free_port()
            t0 = time.perf_counter()
            srv = start_server(serve_args, port, log_path, args.ready_timeout_s)
            global SERVER_PID
            SERVER_PID = srv.pid
            res["meta"]["server_ready_s"] = round(time.perf_counter() - t0, 1)
            url = f"http://127.0.0.1:{port}"
            log(f"server ready in {res['meta']['server_ready_s']} s at {url}")
        res["meta"]["url"] = url
        asyncio.run(http_phase(args, url.rstrip("/"), grid, res, started + args.deadline_s))
    finally:
        if srv is not None:
            stop_server(srv)
            res["server_log_tail"] = log_path.read_text()[-4000:]
        res["meta"]["wall_s"] = round(time.time() - started, 1)
        save(args, res)
    print_table(res)
    return res


def print_table(res) -> None:
    m = res["meta"]
    log(f"\n{m['device']}; preset {m['preset']}; {m['cell_s']} s per cell; {m['max_tokens']} new tokens; "
        f"engine {res.get('engine_meta', {})}; wall {m['wall_s']} s")
    log(HEADER)
    log("|" + "---|" * (HEADER.count("|") - 1))
    for r in res["cells"]:
        log(format_row(r))
    if res["skipped"]:
        log(f"skipped (deadline): {', '.join(res['skipped'])}")
    cpu = sum(r["client_cpu_s"] for r in res["cells"])
    wall = sum(r["wall_s"] for r in res["cells"])
    if wall:
        log(f"client CPU: {cpu:.1f} s over {wall:.1f} s of cells ({100 * cpu / wall:.0f}% of one core)")


if __name__ == "__main__":
    main()
