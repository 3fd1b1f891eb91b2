"""Timing for the benchmarks: the device clock (``Clock``, ``median``), the measured ceilings
(bf16 matmul rate, copy bandwidth), the FLOP / byte counts MFU and bandwidth use are stated
in, the matmul floor (``floor_graph``) and the workload runners of tfb's engine
(``prompts_for``, ``score_tfb``, ``decode_eager``, ``decode_engine``).

Used by bench/gpu.py, bench/cpu.py and bench/serve.py; the reference implementation it is
compared with is in bench/reference.py.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfb_core.generation import EagerDecoder, GenSequence, SamplingParams  # noqa: E402
from tfb_core.encoding import Encoded  # noqa: E402
from tfb_core.options import Mode  # noqa: E402
from tfb_core.scoring import choice_probs  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LABEL_IDS = [32, 33, 34, 35]  # four "label tokens" for letter scoring (any ids will do)


# --- timing ------------------------------------------------------------------------------


class Clock:
    """Device events on CUDA (synchronised before start), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        """Seconds for ``fn()`` on the device."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def bench(self, fn, min_reps=3, max_reps=20, budget_s=1.0, heavy_s=1.5) -> dict:
        """One warm-up call (its peak memory is recorded), then reps; the median is reported.
        A call slower than ``heavy_s`` gets one timed rep (the device budget is short; the
        warm-up time is kept beside it to show the spread)."""
        base = self.mem_reset()
        warm = self.time(fn)
        peak = self.mem_peak(base)
        reps = 1 if warm > heavy_s else None
        times = []
        while True:
            times.append(self.time(fn))
            n = len(times)
            if reps is not None and n >= reps:
                break
            if n >= max_reps or (n >= min_reps and sum(times) >= budget_s):
                break
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                "n": len(times), "warmup_s": warm, "peak_extra_bytes": peak}

    def mem_reset(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_peak(self, base: int) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def median(xs):
    return statistics.median(xs) if xs else None


# --- ceilings ----------------------------------------------------------------------------


def measure_ceilings(clock: Clock, device) -> dict:
    """bf16 matmul rate (8192^3, random data) and device copy bandwidth (read + write)."""
    if not clock.cuda:
        return {"matmul_flops": None, "copy_bytes_per_s": None}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    r = clock.bench(lambda: torch.matmul(a, b, out=c), min_reps=10, max_reps=20, budget_s=0.1)
    flops = 2 * n ** 3 / r["median_s"]
    x = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    r2 = clock.bench(lambda: y.copy_(x), min_reps=10, max_reps=20, budget_s=0.1)
    bw = 2 * x.numel() * 2 / r2["median_s"]
    del a, b, c, x, y
    torch.cuda.empty_cache()
    return {"matmul_flops": flops, "matmul_s": r["median_s"], "copy_bytes_per_s": bw,
            "copy_s": r2["median_s"], "copy_bytes": 2 * (1 << 30) * 2}



# --- counts ---------------------------------------------------------------------------------


def model_counts(model) -> dict:
    cfg = model.config
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    I = cfg.intermediate_size
    body = L * (d * H * hd + 2 * d * KVH * hd + H * hd * d + 3 * d * I)
    return dict(layers=L, hidden=d, vocab=V, heads=H, kv_heads=KVH, head_dim=hd, inter=I,
                body_params=body, lm_head_params=d * V,
                params=sum(p.numel() for p in model.parameters()))


def prefill_flops(c: dict, rows: int, T: int) -> float:
    """Matmul FLOPs of a prefill with last-position logits: 2 * body params per token, the
    causal attention (QK^T and PV over T(T+1)/2 pairs), lm_head on one position; LoRA left out."""
    lin = 2 * c["body_params"] * rows * T + 2 * c["lm_head_params"] * rows
    attn = c["layers"] * rows * 2 * 2 * c["heads"] * c["head_dim"] * T * (T + 1) / 2
    return lin + attn


def decode_bytes(c: dict, rows: int, ctx: int, elem=2) -> dict:
    """The fewest bytes a decode step reads: every weight once, each row's KV cache once."""
    weights = elem * (c["body_params"] + c["lm_head_params"])
    kv = elem * rows * c["layers"] * 2 * c["kv_heads"] * c["head_dim"] * ctx
    return {"weights": weights, "kv": kv, "total": weights + kv}


# --- workloads -----------------------------------------------------------------------------


def prompts_for(B, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * B + T)
    return torch.randint(100, vocab, (B, T), generator=g)


def score_tfb(post, prompts, K, engine=None):
    """``choice_probs`` as the server calls it: through ``engine`` (a PrefillEngine) or eagerly."""
    enc = [Encoded([p.tolist()], [LABEL_IDS], Mode.LETTER) for p in prompts]
    return lambda: choice_probs(post, enc, [(0, K)] * len(enc), engine=engine)


def decode_eager(clock, post, prompts, K, warm, steps):
    seqs = [GenSequence(p.tolist(), SamplingParams(max_tokens=warm + steps + 2, num_samples=K,
                                                     ignore_eos=True)) for p in prompts]
    base = clock.mem_reset()
    batch = EagerDecoder(post)
    t_prefill = clock.time(lambda: batch.admit(seqs))
    kv_measured = (torch.cuda.memory_allocated() - base) if clock.cuda else None
    for _ in range(warm):
        batch.step()
    times, walls = [], []
    for _ in range(steps):
        walls.append(0.0)
        times.append(clock.time(lambda: walls.__setitem__(-1, batch.step().seconds)))
    peak = clock.mem_peak(base)
    ctx = len(prompts[0]) + warm + steps
    del batch
    return {"step_s": median(times), "step_min_s": min(times), "step_wall_s": median(walls),
            "steps": steps, "warmup_steps": warm, "prefill_s": t_prefill,
            "peak_extra_bytes": peak, "after_prefill_bytes": kv_measured, "ctx_end": ctx,
            "tokens": [s.token_ids[:8] for s in seqs]}


def decode_engine(clock, post, prompts, K, warm, steps, compile=False):
    """The server's CUDA path: a StaticDecoder admits the prompts (its own prefill forward into
    its cache rows), then steps (one host sync per step)."""
    from tfb_core.cuda_decode import StaticDecoder

    seqs = [GenSequence(p.tolist(), SamplingParams(max_tokens=warm + steps + 2, num_samples=K,
                                                     ignore_eos=True)) for p in prompts]
    base = clock.mem_reset()
    dec = StaticDecoder(post, compile=compile)
    t_prefill = clock.time(lambda: dec.admit(seqs))
    after = (torch.cuda.memory_allocated() - base) if clock.cuda else None
    t_first = clock.time(dec.step)  # the CUDA graph is captured here
    for _ in range(warm - 1):
        dec.step()
    walls = []
    times = [clock.time(lambda: walls.append(dec.step().seconds)) for _ in range(steps)]
    peak = clock.mem_peak(base)
    out = {"step_s": median(times), "step_min_s": min(times), "step_wall_s": median(walls),
           "steps": steps, "warmup_steps": warm, "prefill_s": t_prefill, "first_step_s": t_first,
           "peak_extra_bytes": peak, "after_prefill_bytes": after, "graph": bool(dec.graphs),
           "capture_error": dec.capture_error, "compile_error": dec.compile_error,
           "cache_len": dec.length, "rows_cap": dec.rows_cap, "trunk_cap": dec.trunk_cap,
           "kv_layer_rows": dec.kv_layer_rows,
           "tokens": [s.token_ids[:8] for s in seqs]}
    del dec
    return out


def floor_graph(clock, model, rows_list, device) -> dict:
    """Every weight matmul of one decode step (7 per layer + lm_head) in one CUDA graph."""
    if not clock.cuda:
        return {}
    weights = []
    for layer in model.model.layers:
        for name in LINEARS:
            mod = layer.get_submodule(name)
            weights.append(getattr(mod, "base_layer", mod).weight)
    weights.append(model.lm_head.weight)
    out = {}
    for rows in rows_list:
        xs = {n: torch.randn(rows, n, device=device, dtype=weights[0].dtype)
              for n in {w.shape[1] for w in weights}}

        def run():
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        r = clock.bench(g.replay, min_reps=20, max_reps=50, budget_s=0.2)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        out[rows] = {"step_s": r["median_s"], "n": r["n"], "weight_bytes": nbytes}
        del g, xs
    torch.cuda.empty_cache()
    return out


def free(clock):
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
