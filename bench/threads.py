"""One short completion's latency against torch's CPU threads, on an idle and a loaded CPU.

For each server variant (``--threads`` values; ``default``: no flag) and each load (``--load``
busy processes, ``python -c 'while 1: pass'``, pinned like the server), starts ``tfb serve`` (the
built-in demo unless ``--model``/``--adapter``), sends one warm-up request, then times
``--requests`` completions of ``--max-tokens`` tokens one after another; the busy processes are
killed after each cell. ``--baseline DIR`` also runs the server from another checkout (e.g. the
commit before ``--threads``: ``git archive COMMIT | tar -x -C DIR``) as the variant ``before``.
``--cpus 0,1`` pins every process to those cores (``taskset``): a 2-core machine on a bigger one.

    python bench/threads.py --cpus 0,1 --threads default 1 2 --load 0 2 --baseline /tmp/before

Prints a table and writes every timing as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def start_server(root: Path, threads: str | None, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--device", "cpu", "--no-access-log"]
    if args.model:
        cmd += ["--model", args.model, "--adapter", args.adapter]
    if args.samples:
        cmd += ["--samples", str(args.samples)]
    if threads is not None:
        cmd += ["--threads", threads]
    path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(pinned(cmd, args.cpus), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not get ready")


def completion(url: str, model: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return time.perf_counter() - t0


def cell(url: str, load: int, args) -> list[float]:
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    completion(url, model, args.max_tokens)  # warm-up
    busy = [subprocess.Popen(pinned([sys.executable, "-c", "while 1: pass"], args.cpus)) for _ in range(load)]
    try:
        time.sleep(1.0 if load else 0.0)  # the busy loops are running
        return [completion(url, model, args.max_tokens) for _ in range(args.requests)]
    finally:
        for p in busy:  # ours, by pid
            p.kill()
            p.wait()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", nargs="+", default=["default", "1"], help="--threads values; default: no flag")
    p.add_argument("--load", nargs="+", type=int, default=[0, 2], help="busy processes during the timed requests")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--cpus", default=None, help="pin everything to these cores (taskset -c)")
    p.add_argument("--baseline", default=None, help="another checkout to run as the variant 'before'")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = [("before", Path(args.baseline), None)] if args.baseline else []
    variants += [(t, ROOT, None if t == "default" else t) for t in args.threads]
    rows = []
    for name, root, threads in variants:
        proc, url = start_server(root, threads, args)
        try:
            for load in args.load:
                before = os.getloadavg()[0]
                seconds = cell(url, load, args)
                rows.append({"server": name, "load": load, "seconds": seconds, "median": statistics.median(seconds),
                             "load_average_1m": [before, os.getloadavg()[0]]})
                print(f"{name:>8} load {load}: median {rows[-1]['median']:.3f} s  "
                      f"({', '.join(f'{s:.3f}' for s in seconds)}; load average {before:.1f})", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]), "cpus": args.cpus,
              "affinity": sorted(os.sched_getaffinity(0)), "max_tokens": args.max_tokens, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
