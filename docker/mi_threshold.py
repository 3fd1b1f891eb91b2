#!/usr/bin/env python3
"""Suggest the MI-drift alert threshold from a calibration run against a live tfb server.

    python docker/mi_threshold.py --url http://localhost:8000 --calibration cal.jsonl

Sends every item of the calibration JSONL (the file the posterior was calibrated on, or any
held-out in-distribution file) through POST /v1/choices, with the server's own defaults (mode,
K, seed), collects each answer's mutual information (of the untempered weight samples: the
posterior's temperature changes only the served probabilities), and prints its quantiles as
measured and as Prometheus's histogram_quantile() will see them (interpolated in the server's
tfb_mutual_information buckets, read from /metrics). The suggested threshold is the smallest
bucket boundary at or above FACTOR x the calibration p90: put it in
docker/prometheus/alerts.yml (TfbMutualInformationDrift) and in the dashboard's threshold line.

Run it against a staging replica: its answers are counted in that server's histograms.
Only the standard library is used, so it runs anywhere Python 3.10+ does.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.error
import urllib.request

ITEM_KEYS = ("question", "prompt", "messages", "choices")


def call(url: str, api_key: str | None, body: dict | None = None, timeout: float = 600):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"mi_threshold: {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}")
    except urllib.error.URLError as e:
        raise SystemExit(f"mi_threshold: {url}: {e.reason}")
    return data if body is None and url.endswith("/metrics") else json.loads(data)


def mi_buckets(metrics_text: str) -> list[float]:
    """The finite upper bounds of tfb_mutual_information's buckets, from the exposition's samples."""
    les = {float(m) for m in re.findall(r'^tfb_mutual_information_bucket\{[^}]*le="([^"]+)"', metrics_text, re.M)
           if m != "+Inf"}
    return sorted(les)


def histogram_quantile(q: float, values: list[float], bounds: list[float]) -> float:
    """What Prometheus's histogram_quantile(q, ...) returns for these observations in these buckets."""
    cum = [sum(v <= b for v in values) for b in bounds] + [len(values)]
    rank = q * len(values)
    for i, c in enumerate(cum):
        if c >= rank:
            if i == len(bounds):  # the +Inf bucket: Prometheus answers the largest finite bound
                return bounds[-1]
            lower, below = (bounds[i - 1], cum[i - 1]) if i else (0.0, 0)
            inside = c - below
            return bounds[i] if inside == 0 else lower + (bounds[i] - lower) * (rank - below) / inside
    return math.nan


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def read_items(path: str, limit: int | None) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"mi_threshold: {path}:{n}: not JSON ({e})")
            item = {k: row[k] for k in ITEM_KEYS if k in row}
            if "choices" not in item or not any(k in item for k in ("question", "prompt", "messages")):
                raise SystemExit(f"mi_threshold: {path}:{n}: needs 'choices' and 'question', 'prompt' or 'messages'")
            items.append(item)
            if limit and len(items) >= limit:
                break
    if not items:
        raise SystemExit(f"mi_threshold: {path}: no items")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://localhost:8000", help="the tfb server (default %(default)s)")
    p.add_argument("--calibration", required=True, help="calibration JSONL (question/prompt/messages, choices)")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--factor", type=float, default=2.0, help="threshold >= FACTOR x calibration p90 (default 2)")
    p.add_argument("--quantile", type=float, default=0.9, help="the alerted quantile (default 0.9)")
    p.add_argument("--batch", type=int, default=16, help="items per request (default 16)")
    p.add_argument("--limit", type=int, default=None, help="use the first N items only")
    a = p.parse_args(argv)
    base = a.url.rstrip("/")

    post = call(f"{base}/v1/posterior", a.api_key)
    items = read_items(a.calibration, a.limit)
    mis: list[float] = []
    for i in range(0, len(items), a.batch):
        out = call(f"{base}/v1/choices", a.api_key, {"items": items[i:i + a.batch]})
        mis += [r["uncertainty"]["mutual_information"] for r in out["items"]]
        print(f"\r{len(mis)}/{len(items)} items", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    bounds = mi_buckets(call(f"{base}/metrics", a.api_key).decode())
    if not bounds:
        raise SystemExit("mi_threshold: the server's /metrics has no tfb_mutual_information buckets")

    q = a.quantile
    measured = {f"p{round(100 * x)}": quantile(mis, x) for x in (0.5, q, 0.99)}
    prom_q = histogram_quantile(q, mis, bounds)
    target = a.factor * measured[f"p{round(100 * q)}"]
    threshold = next((b for b in bounds if b >= target), bounds[-1])
    above = sum(v > threshold for v in mis) / len(mis)
    print(f"server: {post.get('model')}  sigma={post.get('sigma'):.6g}  K={post.get('num_samples')}  "
          f"mode={post.get('mode')}  criterion={post.get('criterion')}  eps={post.get('eps')}  "
          f"T={post.get('temperature', 1.0):.4g} (probabilities only; MI is untempered)")
    print(f"calibration: {len(mis)} answers from {a.calibration}")
    print("mutual information (nats): " + "  ".join(f"{k} {v:.3g}" for k, v in measured.items())
          + f"  max {max(mis):.3g}")
    print(f"histogram_quantile({q}) in the server's buckets: {prom_q:.3g}")
    print(f"suggested threshold: {threshold:g}  (smallest bucket bound >= {a.factor:g} x p{round(100 * q)}; "
          f"{100 * above:.1f}% of calibration answers are above it)")
    print("alert expression (docker/prometheus/alerts.yml, TfbMutualInformationDrift):")
    print(f'  tfb:mutual_information:p{round(100 * q)}_1h{{endpoint="/v1/choices"}} > {threshold:g}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
