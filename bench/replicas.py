#!/usr/bin/env python3
"""Ray Serve scale-out: /v1/choices requests/s with N replicas at C concurrent clients.

Each configuration is a real ``tfb serve --ray --replicas N --device cpu`` (its own local Ray
cluster, one CPU per replica: the CPU analogue of one replica per GPU), or with ``--plain`` also
a plain ``tfb serve`` (no Ray, torch's default threads) for the proxy's overhead. The model
is a tiny random Llama (2 layers, hidden 64, SmolLM2's tokenizer and vocabulary) with a random
LoRA Bayesianized at a fixed sigma, built in a temp dir. Clients: asyncio + httpx, each sending
the same /v1/choices request (3 choices, K = --samples) back to back; warm-up, then a timed
window. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as f:  # a file, not a pipe: Ray's driver logs would fill a pipe and block it
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tfb serve {' '.join(args)} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


async def load(url: str, clients: int, warmup: float, duration: float, samples: int) -> dict:
    body = {**QUESTION, "num_samples": samples}
    done, errors, latencies = [], 0, []
    replicas: collections.Counter = collections.Counter()
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        while (t0 := time.monotonic()) < t_end:
            r = await http.post(url + "/v1/choices", json=body)
            t1 = time.monotonic()
            if r.status_code != 200:
                errors += 1
            elif t_measure <= t1 <= t_end:  # completions inside the timed window
                done.append(t1)
                latencies.append(t1 - t0)
                replicas[r.headers.get("x-tfb-replica", "-")] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    counted = done
    latencies.sort()
    return {"requests": len(counted), "rps": len(counted) / duration, "errors": errors,
            "p50_s": latencies[len(latencies) // 2] if latencies else None,
            "p95_s": latencies[int(len(latencies) * 0.95)] if latencies else None,
            "by_replica": dict(replicas)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    p.add_argument("--plain", action="store_true", help="also a plain tfb serve (no Ray)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--samples", type=int, default=10, help="K per request")
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas_cpu.json"))
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfb-replicas-bench-") as tmp:
        model, post = build_model(Path(tmp))
        common = ["--model", str(model), "--adapter", str(post), "--device", "cpu", "--samples", str(args.samples),
                  "--log-level", "warning"]
        configs = [("tfb serve (no Ray)", common)] if args.plain else []
        configs += [(f"Ray Serve, {n} replica{'s' if n > 1 else ''}", ["--ray", "--replicas", n, *common])
                    for n in map(int, args.replicas.split(","))]
        for name, cli in configs:
            proc, url = start([str(a) for a in cli], env, Path(tmp) / "serve.log")
            try:
                result = asyncio.run(load(url, args.clients, args.warmup, args.duration, args.samples))
            finally:
                proc.terminate()  # SIGTERM: tfb drains (Ray: serve.shutdown) and exits
                proc.wait(120)
            rows.append({"config": name, **result})
            print(f"{name:24s} {result['rps']:7.1f} req/s  p50 {result['p50_s']:.3f} s  p95 {result['p95_s']:.3f} s  "
                  f"errors {result['errors']}  by replica {sorted(result['by_replica'].values())}", flush=True)
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "clients": args.clients,
            "samples": args.samples, "warmup_s": args.warmup, "duration_s": args.duration,
            "command": "python bench/replicas.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    base = next((r for r in rows if r["config"].startswith("Ray Serve, 1 ")), None)
    if base:
        for r in rows:
            print(f"{r['config']:24s} x{r['rps'] / base['rps']:.2f} vs 1 replica")


if __name__ == "__main__":
    main()
