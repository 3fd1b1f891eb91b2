#!/usr/bin/env python3
"""Ray Serve scale-out: /v1/choices requests/s with N replicas at C concurrent clients.

Each configuration is a real ``tfb serve --ray --replicas N`` (its own local Ray cluster, started
and shut down per configuration), run in the order given (1 then 2 by default); with
``--plain`` also a plain ``tfb serve`` (no Ray) first. Clients: asyncio + httpx, C closed-loop
clients each sending its next /v1/choices request (K = --samples) when the last is answered;
a warm-up, then the completions inside a timed window are counted. The ratio to the 1-replica
row is printed and saved.

Presets:

- ``cpu`` (default): ``--device cpu`` (one CPU per replica: the CPU analogue of one replica per
  GPU); a tiny random Llama (2 layers, hidden 64, SmolLM2's tokenizer and vocabulary) with a
  random LoRA r 4 on q,v Bayesianized at sigma 0.05, built in a temp dir; every request is the
  same 3-choice question.
- ``gpu``: one replica per GPU (Ray gives each replica ``num_gpus=1``; more replicas than GPUs
  stops here before the model is built); the random-weight Llama of ``--shape`` (8B by default)
  that bench/serve.py builds (``build_random_model``: SmolLM2's tokenizer from ``--tokenizer`` or
  ``TFB_TOKENIZER``, a random LoRA r 8 on q,v, ``tfb bayesianize --sigma``) into ``--workdir``
  (reused when it already holds them; ``--build-only`` builds it and stops, without Ray);
  bench/serve.py's server flags (``SERVE_FLAGS``) and its long letter question, each request a
  distinct variant (no request repeats). ``--shape tiny --device cpu`` runs this path on a CPU.

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTION = {"question": "Which gas do plants absorb from the air?", "choices": ["Oxygen", "Carbon dioxide", "Helium"],
            "seed": 7}
PRESETS = {
    "cpu": dict(clients=16, warmup=10.0, duration=30.0, ready_timeout=300.0),
    # 2 configs x (Ray start + replicas loading 16 GB each + 8 + 15 s + shutdown) + the build
    # (~60-90 s) fit in the device's 600 s per command
    "gpu": dict(clients=64, warmup=8.0, duration=15.0, ready_timeout=400.0),
}
# NVLink multicast stays off (the device machines' rule); set here only where the environment
# does not already set them, and passed on to tfb serve, Ray and its replicas
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line with the wall clock and the seconds since the start (a timeout shows where)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def build_model(tmp: Path) -> tuple[Path, Path]:
    """A tiny random Llama + random LoRA (q, v), Bayesianized at sigma 0.05."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tfb_core.models import load_base_model, resolve_model_dir
    from tfb_core.posterior import Posterior

    torch.manual_seed(0)
    model_dir, lora_dir, post_dir = tmp / "model", tmp / "lora", tmp / "post"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"), local_files_only=True).save_pretrained(model_dir)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(lora_dir)
    post = Posterior.from_adapter(load_base_model(model_dir, "cpu", "float32"), lora_dir)
    post.sigma = 0.05
    post.save(post_dir)
    return model_dir, post_dir


def serve_bench():
    """bench/serve.py (its model builder, question and server flags: one implementation)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import serve

    return serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict, log_path: Path, timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "w") as f:  # a file, not a pipe: Ray's driver logs would fill a pipe and block it
        # its own process group: if it does not stop, it is killed with whatever Ray left in it
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tfb serve {' '.join(args)} exited {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(proc, 60)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s: {log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM: tfb drains (Ray: serve.shutdown, ray.shutdown) and exits; else SIGKILL to its group."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log(f"tfb serve did not stop in {timeout_s:.0f} s: killing its process group")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def load(url: str, clients: int, warmup: float, duration: float, body) -> dict:
    """``clients`` closed-loop clients sending ``body(i)`` (i counts requests) for warmup + duration."""
    done, errors, latencies = [], 0, []
    first_error = None
    replicas: collections.Counter = collections.Counter()
    counter = itertools.count()
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def client(http: httpx.AsyncClient):
        nonlocal errors, first_error
        while (t0 := time.monotonic()) < t_end:
            try:
                r = await http.post(url + "/v1/choices", json=body(next(counter)))
            except httpx.HTTPError as e:  # counted, as a non-200 answer is; the client goes on
                errors += 1
                first_error = first_error or repr(e)
                continue
            t1 = time.monotonic()
            if r.status_code != 200:
                errors += 1
                first_error = first_error or f"{r.status_code}: {r.text[:300]}"
            elif t_measure <= t1 <= t_end:  # completions inside the timed window
                done.append(t1)
                latencies.append(t1 - t0)
                replicas[r.headers.get("x-tfb-replica", "-")] += 1

    async def progress():
        await asyncio.sleep(warmup)
        log(f"warm-up done ({next(counter)} requests sent): measuring {duration:g} s")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=4.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        ticker = asyncio.ensure_future(progress())
        await asyncio.gather(*(client(http) for _ in range(clients)))
        ticker.cancel()
    latencies.sort()
    return {"requests": len(done), "rps": len(done) / duration, "errors": errors, "first_error": first_error,
            "p50_s": latencies[len(latencies) // 2] if latencies else None,
            "p95_s": latencies[int(len(latencies) * 0.95)] if latencies else None,
            "by_replica": dict(replicas)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="cpu: a tiny model, --device cpu; gpu: bench/serve.py's random model (--shape), one "
                   "replica per GPU")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts, run in this order")
    p.add_argument("--plain", action="store_true", help="also a plain tfb serve (no Ray), first")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients [cpu 16, gpu 64]")
    p.add_argument("--samples", type=int, default=10, help="K per request")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per configuration [cpu 10, gpu 8]")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per configuration [cpu 30, gpu 15]")
    p.add_argument("--ready-timeout", type=float, default=None,
                   help="seconds for tfb serve to answer /health [cpu 300, gpu 400]")
    p.add_argument("--shape", default="8b", choices=["8b", "1b", "tiny"], help="gpu preset: the Llama shape")
    p.add_argument("--tokenizer", default=None, help="gpu preset: SmolLM2's tokenizer directory "
                   "(default: env TFB_TOKENIZER)")
    p.add_argument("--sigma", type=float, default=0.01, help="gpu preset: tfb bayesianize --sigma")
    p.add_argument("--device", default=None, help="gpu preset: cuda or cpu (default: cuda when present)")
    p.add_argument("--workdir", default=None, help="gpu preset: where the model is built (kept and reused; "
                   "default: $TMPDIR/tfb-serve-bench-SHAPE, as bench/serve.py)")
    p.add_argument("--build-only", action="store_true", help="gpu preset: build (or find) the model in --workdir "
                   "and stop (needs no Ray: a device run before the one that carries Ray)")
    p.add_argument("--out", default=None, help="the JSON written (default: bench/results/replicas_PRESET.json, "
                   "or $OUT/replicas_PRESET.json when OUT is set)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.replica_counts = [int(n) for n in args.replicas.split(",")]
    if args.build_only and args.preset != "gpu":
        p.error("--build-only builds the gpu preset's model")
    if args.out is None:
        name = f"replicas_{args.preset}.json"
        args.out = str(Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "bench" / "results" / name)
    return args


def main(argv=None):
    args = parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}
    info = {"preset": args.preset, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "clients": args.clients, "samples": args.samples, "warmup_s": args.warmup, "duration_s": args.duration,
            "command": "python bench/replicas.py " + " ".join(argv), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = tempfile.TemporaryDirectory(prefix="tfb-replicas-bench-")
    work = Path(tmp.name)
    if args.preset == "cpu":
        log("building the tiny CPU model")
        model, post = build_model(work)
        common = ["--device", "cpu"]
        body = lambda i: {**QUESTION, "num_samples": args.samples}  # noqa: E731
    else:
        import torch

        sb = serve_bench()
        on_gpu = not (args.device or "").startswith("cpu")
        gpus = torch.cuda.device_count() if on_gpu else 0
        if on_gpu and max(args.replica_counts) > gpus:
            raise SystemExit(f"--replicas {args.replicas}: one replica per GPU, but this machine has {gpus} GPU(s)")
        for k, v in NO_MULTICAST.items():
            env.setdefault(k, v)
        # Ray's memory monitor kills workers past 95% of the memory it sees; on the device machines
        # MemTotal starts small and grows as memory is used, so two replicas loading 16 GB each
        # could be killed for memory that is there
        env.setdefault("RAY_memory_monitor_refresh_ms", "0")
        info.update(shape=args.shape, sigma=args.sigma, torch=torch.__version__, python=platform.python_version(),
                    gpus=[torch.cuda.get_device_name(i) for i in range(gpus)],
                    env={k: env.get(k) for k in [*NO_MULTICAST, "RAY_memory_monitor_refresh_ms",
                                                 "CUDA_VISIBLE_DEVICES"]},
                    serve_flags=sb.SERVE_FLAGS, question=sb.QUESTIONS["long"], choices=sb.CHOICES)
        log(f"{gpus} GPU(s): {info['gpus']}; building (or reusing) the {args.shape} model")
        t0 = time.monotonic()
        model, post = sb.build_random_model(args, Path(args.workdir or Path(tempfile.gettempdir())
                                                       / f"tfb-serve-bench-{args.shape}"))
        info["build_s"] = round(time.monotonic() - t0, 1)
        if args.build_only:
            log(f"built in {info['build_s']} s: {model}, {post}")
            return
        common = [*sb.SERVE_FLAGS, *(["--device", args.device] if args.device else [])]
        traffic, letter = sb.Traffic("long", 0), sb.WORKLOADS["choices-letter"]
        body = lambda i: traffic.body(letter, args.samples, i)  # noqa: E731  # distinct prompts: no cache hits
    log(f"model ready: {model}, {post}")
    common = ["--model", str(model), "--adapter", str(post), *common, "--samples", str(args.samples),
              "--log-level", "warning"]
    configs = [("tfb serve (no Ray)", common)] if args.plain else []
    configs += [(f"Ray Serve, {n} replica{'s' if n > 1 else ''}", ["--ray", "--replicas", str(n), *common])
                for n in args.replica_counts]
    info["serve_args"] = common
    rows = []

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    try:
        for i, (name, cli) in enumerate(configs):
            log_path = work / f"serve-{i}.log"
            log(f"{name}: starting tfb serve {' '.join(cli)}")
            t0 = time.monotonic()
            try:
                proc, url = start(cli, env, log_path, args.ready_timeout)
            except (RuntimeError, TimeoutError) as e:
                rows.append({"config": name, "failed": str(e)[-3000:]})
                save()
                raise SystemExit(f"{name}: {e}") from None
            ready_s = time.monotonic() - t0
            log(f"{name}: ready in {ready_s:.1f} s; {args.clients} clients, warm-up {args.warmup:g} s")
            try:
                result = asyncio.run(load(url, args.clients, args.warmup, args.duration, body))
            finally:
                log(f"{name}: load done, stopping")
                t0 = time.monotonic()
                stop(proc, 120)
                stop_s = time.monotonic() - t0
                log(f"{name}: stopped in {stop_s:.1f} s")
            rows.append({"config": name, "replicas": int(cli[2]) if cli[0] == "--ray" else None, **result,
                         "ready_s": round(ready_s, 1), "stop_s": round(stop_s, 1),
                         "serve_log_tail": log_path.read_text()[-2000:]})
            save()
            print(f"{name:24s} {result['rps']:7.1f} req/s  p50 {result['p50_s'] or 0:.3f} s  "
                  f"p95 {result['p95_s'] or 0:.3f} s  errors {result['errors']}  "
                  f"by replica {sorted(result['by_replica'].values())}", flush=True)
    finally:
        info["wall_s"] = round(time.monotonic() - T0, 1)
        base = next((r for r in rows if r.get("replicas") == 1 and r.get("rps")), None)
        for r in rows:
            if base and r.get("rps") is not None:
                r["x_vs_1_replica"] = round(r["rps"] / base["rps"], 3)
                print(f"{r['config']:24s} x{r['x_vs_1_replica']:.2f} vs 1 replica", flush=True)
        save()
        tmp.cleanup()
    log(f"done; wrote {args.out}")


if __name__ == "__main__":
    main()
