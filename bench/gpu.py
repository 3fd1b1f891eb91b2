#!/usr/bin/env python3
"""GPU benchmark: K weight samples in one forward (tfb) against K sequential peft passes.

One script, one run per model shape; see bench/README.md for the command and the results.

Variants (per row of the table):
  a      tfb's engine as the server runs it on CUDA: ``choice_probs`` (scoring) /
         ``StaticDecoder`` (decoding: static KV cache, the step's forward in a CUDA graph,
         the engine's token choice with one host sync per step), K batched
  eager  the eager decode engine (``DecodeBatch``, HF ``DynamicCache``): what CPUs run
  b      the reference: K sequential forwards through peft, noise ``A' + E_k`` copied into
         lora_A before each pass; decoding keeps K KV caches and runs K passes per step
  c      the deterministic adapter through peft, one pass (no uncertainty)
  d      the floor: every weight matmul of one decode step in one CUDA graph

``--attention dense`` runs the decode step with the attention that reads every column of the
static cache (``attend_decode_dense``) instead of the default kernel that reads each row's live
columns; ``--step`` times and profiles the decode step with both, side by side, and with
``--stochastic-layers`` for posteriors whose noise is in the last L layers only (the decoder
shares the layers below N - L across a sequence's K samples).

Models are random-weight Llama shapes built with ``from_config`` on the device (speed does
not depend on weight values). Ceilings (bf16 matmul rate, device copy bandwidth) are
measured in the same run; MFU and bandwidth use are against them.

The reference implementation and model building are in bench/reference.py, the timers,
ceilings, counts and tfb's workload runners in bench/timing.py; this file holds the run, its
grids, the table and the command line.
"""

from __future__ import annotations

import argparse
import gc
import json
from contextlib import contextmanager
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from reference import (  # noqa: E402  (timing, imported by reference, puts the root on sys.path)
    SHAPES, TARGETS, Reference, build_model, decode_peft, install_posterior, make_adapter,
    score_peft, uninstall_posterior)
from timing import (  # noqa: E402
    LABEL_IDS, Clock, decode_bytes, decode_eager, decode_engine, floor_graph, free,
    measure_ceilings, model_counts, prefill_flops, prompts_for, score_tfb)

import tfb_core.cuda_decode as cuda_decode  # noqa: E402
import tfb_core.cuda_llama as cuda_llama  # noqa: E402
from tfb_core.cuda_llama import attend_decode, attend_decode_dense  # noqa: E402
from tfb_core.cuda_prefill import PrefillEngine  # noqa: E402
from tfb_core.engines import make_decoder, make_prefill  # noqa: E402
from tfb_core.generation import GenSequence, SamplingParams  # noqa: E402
from tfb_core.encoding import Encoded  # noqa: E402
from tfb_core.options import Mode  # noqa: E402
from tfb_core.scoring import choice_probs  # noqa: E402

ATTENTION = ("kernel", "dense")
PROMPT_ATTENTIONS = {"tfb": list(cuda_llama.PROMPT_ATTENTION),
                     "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}


@contextmanager
def attention(kind: str):
    """The StaticDecoder's step attends with ``kind``: "kernel" (``attend_decode``: each row's
    live columns) or "dense" (``attend_decode_dense``: every column of the cache)."""
    if kind not in ATTENTION:
        raise ValueError(f"attention {kind!r}: expected one of {', '.join(ATTENTION)}")
    if kind == "dense":
        cuda_decode.attend_decode = lambda q, kc, vc, bias, last, scaling: attend_decode_dense(q, kc, vc, bias, scaling)
    try:
        yield
    finally:
        cuda_decode.attend_decode = attend_decode


@contextmanager
def fusions(on: str):
    """The CUDA engines' elementwise work fused into single Triton kernels ("on":
    ``tfb_core.fused``) or run as plain torch ops ("off")."""
    from tfb_core import fused

    before, fused.FUSED = fused.FUSED, on == "on"
    try:
        yield
    finally:
        fused.FUSED = before


# --- the run -------------------------------------------------------------------------------


def run(args) -> dict:
    torch.set_grad_enabled(False)  # peft marks its LoRA weights trainable: no autograd graphs
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    import peft
    import transformers

    res = {"meta": {"command": " ".join([Path(sys.executable).name] + sys.argv),
                    "device": torch.cuda.get_device_name() if clock.cuda else platform.processor(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__, "dtype": str(dtype), "sigma": args.sigma,
                    "rank": args.rank, "attention": args.attention, "decode_warmup_steps": args.warm,
                    "decode_steps": args.steps, "ref_decode_steps": args.ref_steps,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S")},
           "ceilings": measure_ceilings(clock, device), "models": {}, "scoring": [], "decode": [],
           "floor": {}}
    print("ceilings:", json.dumps(res["ceilings"]), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(res, indent=1, default=str))

    start = time.time()

    def late(what):
        if time.time() - start > args.deadline_s:
            res.setdefault("skipped", []).append(what)
            print("  skipped (deadline):", what, flush=True)
            return True
        return False

    for shape in args.models:
        t0 = time.time()
        model = build_model(shape, device, dtype)
        counts = model_counts(model)
        w = model.model.layers[0].mlp.down_proj.weight.float()
        counts["weight_std"] = float(w.std())  # random N(0, 0.02) weights, not zeros
        res["models"][shape] = counts
        print(f"[{shape}] built in {time.time() - t0:.1f}s: {counts['params'] / 1e9:.2f}B params",
              flush=True)
        if "d" in args.variants:
            res["floor"][shape] = floor_graph(clock, model, args.floor_rows, device)
            print(f"[{shape}] floor:", {k: round(v["step_s"] * 1e3, 3)
                                         for k, v in res["floor"][shape].items()}, flush=True)
            save()
        for adapter in args.adapters:
            tmp = Path(tempfile.mkdtemp(prefix=f"tfb-bench-{shape}-{adapter}-"))
            model = make_adapter(model, TARGETS[adapter], args.rank, tmp).unload()
            grid = [] if args.no_scoring else scoring_grid(args, adapter)
            # (a) and eager through tfb: decoding first (the targets), then scoring
            post = install_posterior(model, tmp, args.sigma)
            for B, K in decode_grid(args, adapter):
                prompts = prompts_for(B, args.ctx, counts["vocab"], seed=7)
                if late(f"decode {shape} {adapter} a/eager B={B} K={K}"):
                    continue
                if "a" in args.variants:
                    try:
                        r = decode_engine(clock, post, prompts, K, args.warm, args.steps)
                        add_decode(res, shape, adapter, "a", B, K, r, counts, args.ctx)
                        if not r["graph"]:
                            print("   not graphed:", r["capture_error"], flush=True)
                    except Exception as e:  # keep the rest of the run
                        res.setdefault("errors", []).append(f"a {shape} {adapter} B={B} K={K}: {e!r}")
                        print("   a failed:", repr(e), flush=True)
                if "compiled" in args.variants:
                    r = decode_engine(clock, post, prompts, K, args.warm, args.steps, compile=True)
                    add_decode(res, shape, adapter, "compiled", B, K, r, counts, args.ctx)
                    if r["compile_error"]:
                        print("   compile failed:", r["compile_error"][:500], flush=True)
                if "eager" in args.variants:
                    r = decode_eager(clock, post, prompts, K, args.warm, args.steps)
                    add_decode(res, shape, adapter, "eager", B, K, r, counts, args.ctx)
                save()
            if "a" in args.variants or "eager" in args.variants:
                engine = make_prefill(post)  # the server's choice
                for B, T, Ks in grid:
                    prompts = prompts_for(B, T, counts["vocab"])
                    for K in Ks:
                        if late(f"score {shape} {adapter} a B={B} T={T} K={K}"):
                            continue
                        if "a" in args.variants:
                            fn = score_tfb(post, prompts, K, engine)
                            fn()  # a shape is graphed from its second forward: bench warms up once more
                            r = clock.bench(fn)
                            add_score(res, shape, adapter, "a", B, T, K, r, counts)
                        if "eager" in args.variants and B == 1:  # HF's forward: what CPUs run
                            r = clock.bench(score_tfb(post, prompts, K))
                            add_score(res, shape, adapter, "eager", B, T, K, r, counts)
                    save()
                if engine is not None:
                    res.setdefault("prefill_graphs", {})[f"{shape}/{adapter}"] = {
                        "graphed_shapes": [list(k) for k in engine.graphs], "capture_error": engine.capture_error}
                del engine
            uninstall_posterior(post)
            del post
            free(clock)
            # (b) and (c) through peft, the same adapter file
            if "b" in args.variants or "c" in args.variants:
                from peft import PeftModel

                pm = PeftModel.from_pretrained(model, tmp, autocast_adapter_dtype=False)
                pm.requires_grad_(False)
                ref = Reference(pm, args.sigma, max(args.ks), seed=0)
                for B, K in decode_grid(args, adapter):
                    prompts = prompts_for(B, args.ctx, counts["vocab"], seed=7)
                    if late(f"decode {shape} {adapter} b/c B={B} K={K}"):
                        continue
                    if "c" in args.variants and K == args.ks[0]:
                        r = decode_peft(clock, pm, None, prompts, 1, args.warm, args.steps, device)
                        add_decode(res, shape, adapter, "c", B, 1, r, counts, args.ctx)
                    if "b" in args.variants and want_ref_decode(args, adapter, B, K):
                        r = decode_peft(clock, pm, ref, prompts, K, 2, args.ref_steps, device)
                        add_decode(res, shape, adapter, "b", B, K, r, counts, args.ctx)
                    save()
                for B, T, Ks in grid:
                    prompts = prompts_for(B, T, counts["vocab"])
                    if late(f"score {shape} {adapter} b/c B={B} T={T}"):
                        continue
                    if "c" in args.variants:
                        r = clock.bench(score_peft(pm, None, prompts, 1, device))
                        add_score(res, shape, adapter, "c", B, T, 1, r, counts)
                    for K in Ks:
                        if "b" in args.variants and want_ref_score(args, adapter, B, K):
                            r = clock.bench(score_peft(pm, ref, prompts, K, device), heavy_s=1.0)
                            add_score(res, shape, adapter, "b", B, T, K, r, counts)
                    save()
                model = pm.unload()
                del pm, ref
                free(clock)
        del model
        gc.collect()
        if clock.cuda:
            torch.cuda.empty_cache()
    summarise(res)
    save()
    return res


def scoring_grid(args, adapter):
    """(B, T, Ks): the full grid for the paper's q,v adapter; a subset for all-linear."""
    if adapter == "qv" or args.full_all:
        return [(B, T, args.ks) for T in args.lengths for B in args.batches]
    ks = [k for k in args.ks if k in (1, 10)] or args.ks[:2]
    return [(B, T, ks) for T in args.lengths for B in (args.batches[0], args.batches[-1])]


def want_ref_score(args, adapter, B, K):
    """(b) scoring: every K at the smaller batches; K = 10 alone at the largest (it costs K x)."""
    if B == args.batches[-1] and len(args.batches) > 1:
        return K == 10
    return adapter == "qv" or K in (1, 10)


def decode_grid(args, adapter):
    if adapter == "qv" or args.full_all:
        return [(B, K) for B in args.decode_batches for K in args.ks]
    return [(args.decode_batches[0], K) for K in args.ks if K in (1, 10)]


def want_ref_decode(args, adapter, B, K):
    return B == args.decode_batches[0] or K == 10


def add_score(res, shape, adapter, variant, B, T, K, r, counts):
    rows = B * K
    flops = prefill_flops(counts, rows, T)
    rate = res["ceilings"].get("matmul_flops")
    row = {"model": shape, "adapter": adapter, "variant": variant, "batch": B, "T": T, "K": K,
           **r, "prompts_per_s": B / r["median_s"], "tokens_per_s": rows * T / r["median_s"],
           "flops": flops, "mfu": flops / r["median_s"] / rate if rate else None}
    res["scoring"].append(row)
    print(f"  score {shape} {adapter:3s} {variant:4s} B={B:2d} T={T:3d} K={K:2d}: "
          f"{r['median_s'] * 1e3:9.2f} ms (n={r['n']})"
          + (f" MFU {row['mfu'] * 100:5.1f}%" if row["mfu"] else ""), flush=True)


def add_decode(res, shape, adapter, variant, B, K, r, counts, ctx):
    rows = B * K
    nb = decode_bytes(counts, rows, ctx + r["warmup_steps"] + r["steps"] // 2)
    bw = res["ceilings"].get("copy_bytes_per_s")
    row = {"model": shape, "adapter": adapter, "variant": variant, "batch": B, "K": K, "ctx": ctx,
           **r, "tokens_per_s": B / r["step_s"], "bytes": nb,
           "bw_use": nb["total"] / r["step_s"] / bw if bw else None}
    res["decode"].append(row)
    print(f"  decode {shape} {adapter:3s} {variant:4s} B={B:2d} K={K:2d}: "
          f"{r['step_s'] * 1e3:9.2f} ms/step (prefill {r['prefill_s'] * 1e3:.1f} ms)"
          + (f" BW {row['bw_use'] * 100:5.1f}%" if row["bw_use"] else ""), flush=True)


def summarise(res):
    """Ratios the targets are stated in."""
    s = {}

    def get(kind, **kw):
        for r in res[kind]:
            if all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    for shape in res["models"]:
        for adapter in ("qv", "all"):
            out = {}
            for v in ("a", "compiled", "eager"):
                k1 = get("decode", model=shape, adapter=adapter, variant=v, batch=1, K=1)
                k10 = get("decode", model=shape, adapter=adapter, variant=v, batch=1, K=10)
                fl = res["floor"].get(shape, {}).get(1)
                if k1 and k10:
                    out[f"decode_{v}_K10_over_K1"] = k10["step_s"] / k1["step_s"]
                if k10 and fl:
                    out[f"decode_{v}_K10_over_floor"] = k10["step_s"] / fl["step_s"]
            a = get("scoring", model=shape, adapter=adapter, variant="a", batch=1, T=128, K=10)
            b = get("scoring", model=shape, adapter=adapter, variant="b", batch=1, T=128, K=10)
            if a and b:
                out["score_B1_T128_K10_b_over_a"] = b["median_s"] / a["median_s"]
            for B in (1, 32):
                a = get("scoring", model=shape, adapter=adapter, variant="a", batch=B, T=512, K=10)
                if a and a["mfu"]:
                    out[f"score_B{B}_T512_K10_mfu"] = a["mfu"]
            agree = []
            for r in res["decode"]:
                if r["model"] == shape and r["adapter"] == adapter and r["variant"] == "a":
                    a = get("decode", model=shape, adapter=adapter, variant="eager",
                            batch=r["batch"], K=r["K"])
                    if a:
                        pairs = [(x, y) for ta, tf in zip(a["tokens"], r["tokens"])
                                 for x, y in zip(ta, tf)]
                        agree.append(sum(x == y for x, y in pairs) / max(len(pairs), 1))
            if agree:
                out["a_vs_eager_first8_token_agreement"] = min(agree)
            if out:
                s[f"{shape}/{adapter}"] = out
    res["summary"] = s


def table(res) -> str:
    lines = []
    cz = res["ceilings"]
    if cz.get("matmul_flops"):
        lines.append(f"ceilings: bf16 matmul {cz['matmul_flops'] / 1e12:.0f} TFLOP/s, "
                     f"copy {cz['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write)")
    for shape, fl in res["floor"].items():
        lines.append(f"floor (d) {shape}: " + ", ".join(
            f"{rows} rows {v['step_s'] * 1e3:.2f} ms" for rows, v in fl.items()))
    lines.append("scoring: model adapter B T K | a ms (MFU) | eager ms | b ms | c ms | b/a | peak extra GB (a)")
    idx = {}
    for r in res["scoring"]:
        idx[(r["model"], r["adapter"], r["variant"], r["batch"], r["T"], r["K"])] = r
    for r in res["scoring"]:
        if r["variant"] != "a":
            continue
        key = (r["model"], r["adapter"])
        b = idx.get(key + ("b", r["batch"], r["T"], r["K"]))
        c = idx.get(key + ("c", r["batch"], r["T"], 1))
        e = idx.get(key + ("eager", r["batch"], r["T"], r["K"]))
        mfu = f"({r['mfu'] * 100:.0f}%)" if r["mfu"] else ""
        pk = f"{r['peak_extra_bytes'] / 2**30:.2f}" if r["peak_extra_bytes"] is not None else "-"
        lines.append(f"  {r['model']:4s} {r['adapter']:3s} {r['batch']:2d} {r['T']:3d} {r['K']:2d} | "
                     f"{r['median_s'] * 1e3:8.1f} {mfu:6s} | "
                     f"{(e['median_s'] * 1e3) if e else float('nan'):8.1f} | "
                     f"{(b['median_s'] * 1e3) if b else float('nan'):8.1f} | "
                     f"{(c['median_s'] * 1e3) if c else float('nan'):7.1f} | "
                     f"{(b['median_s'] / r['median_s']) if b else float('nan'):5.1f} | {pk}")
    lines.append("decode ms/step: model adapter B K | a | compiled | eager | b | c | a BW use | KV GB")
    didx = {}
    for r in res["decode"]:
        didx[(r["model"], r["adapter"], r["variant"], r["batch"], r["K"])] = r
    seen = set()
    for r in res["decode"]:
        key = (r["model"], r["adapter"], r["batch"], r["K"])
        if key in seen or r["variant"] == "c":
            continue
        seen.add(key)
        m, ad, B, K = key

        def ms(v, KK=K):
            x = didx.get((m, ad, v, B, KK))
            return f"{x['step_s'] * 1e3:7.2f}" if x else "      -"

        f = didx.get((m, ad, "a", B, K))
        bw = f"{f['bw_use'] * 100:4.0f}%" if f and f["bw_use"] else "   -"
        kv = (f or r)["bytes"]["kv"] / 2**30
        lines.append(f"  {m:4s} {ad:3s} {B:2d} {K:2d} | {ms('a')} | {ms('compiled')} | {ms('eager')} | {ms('b')} | "
                     f"{ms('c', 1)} | {bw} | {kv:.3f}")
    for k, v in res.get("summary", {}).items():
        lines.append(f"summary {k}: " + ", ".join(f"{a}={b:.3g}" for a, b in v.items()))
    return "\n".join(lines)


# --- where the time goes (--profile) and a float32 check of the graphed path (--check) ---------


def kernel_breakdown(prof) -> dict:
    """Device time of the profiled kernels, by kind (matmul / attention / other), and counts."""
    cats = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    counts = {"matmul": 0, "attention": 0, "other": 0}
    names: dict[str, float] = {}  # kernel name -> seconds
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        n = e.name.lower()
        if any(x in n for x in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk", "matmul")):
            c = "matmul"
        elif any(x in n for x in ("flash", "fmha", "attention", "attn", "_decode_split", "_decode_merge")):
            c = "attention"
        else:
            c = "other"
        cats[c] += e.time_range.elapsed_us() / 1e6
        counts[c] += 1
        names[e.name] = names.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
    top = sorted(names.items(), key=lambda kv: -kv[1])[:10]
    return {"seconds": cats, "kernels": counts, "top": [[n[:120], round(t * 1e3, 3)] for n, t in top]}


def op_breakdown(prof, top: int = 15) -> list:
    """The operators with the most device time (their own kernels), by input shapes: which
    matmul is a weight, a noise term or the attention's."""
    ops = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_device_time_total)
    return [[e.key, str(e.input_shapes)[:160], e.count, round(e.self_device_time_total / 1e3, 3)]
            for e in ops[:top] if e.self_device_time_total > 0]


def step_run(args) -> dict:
    """The decode step of ``--step-cells`` (B streams x K samples after a ``--ctx``-token
    prompt), graphed, for each ``--stochastic-layers`` L and each of ``--attentions`` in turn
    (twice, the second round in reverse order), then one eager step of the largest cell profiled
    with each; the matmul floor (d) and the ceilings of the same run."""
    torch.set_grad_enabled(False)
    device = torch.device(args.device or "cuda")  # a CPU runs it too (no floor, no ceilings): a smoke test
    clock = Clock(device)
    res = {"ceilings": measure_ceilings(clock, device), "steps": [], "profile": {}}
    print("ceilings:", json.dumps(res["ceilings"]), flush=True)
    model = build_model(args.models[0], device, torch.bfloat16 if clock.cuda else torch.float32)
    counts = res["counts"] = model_counts(model)
    cells = [tuple(int(x) for x in c.split("x")) for c in args.step_cells]
    res["floor"] = floor_graph(clock, model, sorted({B * K for B, K in cells}), device)
    for rows, f in res["floor"].items():
        rate = res["ceilings"]["matmul_flops"]
        f["analytic_s"] = 2 * (counts["body_params"] + counts["lm_head_params"]) * rows / rate
        print(f"floor (d) {rows} rows: {f['step_s'] * 1e3:.2f} ms measured, "
              f"{f['analytic_s'] * 1e3:.2f} ms = 2 x params x rows / the matmul rate", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="tfb-step-"))
    model = make_adapter(model, TARGETS["qv"], args.rank, tmp).unload()
    N = counts["layers"]
    layer_sets = [L if L == "all" else int(L) for L in args.stochastic_layers]
    posts = {}
    for L in layer_sets:  # one posterior at a time on the model: its TFB layers wrap the base layers
        post = posts[L] = install_posterior(model, tmp, args.sigma, stochastic_layers=L)
        for rnd in range(2):
            variants = [(kind, fus) for kind in args.attentions for fus in args.fusions]
            for kind, fus in variants[::-1] if rnd else variants:
                with attention(kind), fusions(fus):
                    for B, K in cells[::-1] if rnd else cells:
                        r = decode_engine(clock, post, prompts_for(B, args.ctx, counts["vocab"], seed=7), K,
                                          args.warm, args.steps)
                        r.pop("tokens")
                        top = N if L == "all" else L  # layers with K rows per sequence
                        rate = res["ceilings"]["matmul_flops"] or float("nan")  # None on a CPU
                        r["analytic_s"] = 2 * (counts["body_params"] * (B * (N - top) + B * K * top) / N
                                               + counts["lm_head_params"] * B * K) / rate
                        res["steps"].append({"stochastic_layers": L, "attention": kind, "fused": fus, "round": rnd,
                                             "batch": B, "K": K, "ctx": args.ctx, **r})
                        print(f"step L={L} {kind:6s} fused {fus:3s} B={B:3d} K={K:2d} ({B * K:4d} rows, cache {r['cache_len']} "
                              f"columns, {r['kv_layer_rows']} KV layer-rows): {r['step_s'] * 1e3:7.2f} ms "
                              f"(graphed: {r['graph']}; 2 x params x layer-rows / rate {r['analytic_s'] * 1e3:.2f} ms)",
                              flush=True)
                        free(clock)
        if not args.no_profile:
            step_profile(clock, post, cells, counts, args, res["profile"], "" if L == "all" else f"L{L}_")
        uninstall_posterior(post)
        free(clock)
    return res


def step_profile(clock, post, cells, counts, args, out: dict, prefix: str) -> None:
    """One eager step of the largest cell under torch.profiler, with each attention."""
    from torch.profiler import ProfilerActivity, profile

    from tfb_core.cuda_decode import StaticDecoder

    B, K = max(cells, key=lambda c: c[0] * c[1])
    for kind, fus in [(kind, fus) for kind in args.attentions for fus in args.fusions][::-1]:
        with attention(kind), fusions(fus):
            seqs = [GenSequence(p.tolist(), SamplingParams(max_tokens=40, num_samples=K, ignore_eos=True))
                    for p in prompts_for(B, args.ctx, counts["vocab"], seed=7)]
            dec = StaticDecoder(post, graph=False)
            dec.admit(seqs)
            for _ in range(16):  # the context at mid-run of the timed steps
                dec.step()
            eager = clock.time(dec.step)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                dec.step()
                clock.sync()
            bd = kernel_breakdown(prof)
            bd["eager_wall_s"], bd["ops"] = eager, op_breakdown(prof)
            out[f"{prefix}{kind}_{'fused' if fus == 'on' else 'unfused'}_B{B}_K{K}"] = bd
            print(f"profile {prefix}{kind} fused {fus} B={B} K={K} (one eager step): kernels " + ", ".join(
                f"{k} {v * 1e3:.2f} ms ({bd['kernels'][k]})" for k, v in bd["seconds"].items()), flush=True)
            for name, t in bd["top"]:
                print(f"    {t:8.3f} ms  {name}", flush=True)
            for key, shapes, n, ms in bd["ops"]:
                print(f"    {ms:8.3f} ms  {n:4d} x {key} {shapes}", flush=True)
            del dec
            free(clock)


def admit_run(args) -> dict:
    """A join into a running batch, as the server's engine makes it (``Engine(post).decoder()``:
    the static decoder with the scoring engine's graphed prefill): ``--admit-base`` streams of
    K samples decode; groups of G new streams (``--admit-groups``) of a ``--ctx``-token prompt
    join, each group timed three times (its first join captures graphs) and dropped again
    (one new token each); then one join of the largest group profiled: device time by kernel
    kind against the join's wall time (the rest is host work), and the top operators by host
    time and by device time. For each ``--stochastic-layers`` L and K of ``--admit-ks``."""
    from torch.profiler import ProfilerActivity, profile

    from tfb_core.engines import Engine

    torch.set_grad_enabled(False)
    device = torch.device(args.device or "cuda")
    clock = Clock(device)
    res = {"ceilings": measure_ceilings(clock, device), "admits": [], "profile": {}}
    model = build_model(args.models[0], device, torch.bfloat16 if clock.cuda else torch.float32)
    counts = res["counts"] = model_counts(model)
    tmp = Path(tempfile.mkdtemp(prefix="tfb-admit-"))
    model = make_adapter(model, TARGETS["qv"], args.rank, tmp).unload()
    N = counts["layers"]

    def streams(n, K, max_tokens, seed):
        return [GenSequence(p.tolist(), SamplingParams(max_tokens=max_tokens, num_samples=K, ignore_eos=True))
                for p in prompts_for(n, args.ctx, counts["vocab"], seed=seed)]

    for L in [L if L == "all" else int(L) for L in args.stochastic_layers]:
        post = install_posterior(model, tmp, args.sigma, stochastic_layers=L)
        for K, backends in [(K, b) for K in args.admit_ks for b in args.prompt_attentions]:
            cuda_llama.PROMPT_ATTENTION = PROMPT_ATTENTIONS[backends]
            dec = Engine(post).decoder()
            dec.admit(streams(args.admit_base, K, 64, seed=1))
            for G in args.admit_groups:
                walls = []
                for rep in range(3):
                    new = streams(G, K, 1, seed=10 + rep)
                    walls.append(clock.time(lambda: dec.admit(new)))
                    dec.filter()
                top = N if L == "all" else L
                tokens = G * args.ctx * (N - top + K * top) / N  # full-depth token rows
                floor = 2 * counts["body_params"] * tokens / res["ceilings"]["matmul_flops"] if clock.cuda else None
                row = {"stochastic_layers": L, "K": K, "prompt_attention": backends, "base": args.admit_base,
                       "group": G, "ctx": args.ctx,
                       "first_s": walls[0], "join_s": min(walls[1:]), "matmul_floor_s": floor}
                res["admits"].append(row)
                print(f"join L={L} K={K:2d} ({backends}): {G:3d} new streams into {args.admit_base}: first {walls[0] * 1e3:.1f} ms, "
                      f"then {row['join_s'] * 1e3:.1f} ms ({row['join_s'] / G * 1e3:.2f} ms a stream; "
                      f"body matmuls at the run's rate: {(floor or float('nan')) * 1e3:.1f} ms)", flush=True)
            G = max(args.admit_groups)
            new = streams(G, K, 1, seed=10)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
            with profile(activities=acts, record_shapes=True) as prof:
                t0 = time.perf_counter()
                dec.admit(new)
                clock.sync()
                wall = time.perf_counter() - t0
            dec.filter()
            bd = kernel_breakdown(prof)
            bd["wall_s"], bd["ops"] = wall, op_breakdown(prof)
            host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
            bd["host_ops"] = [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)] for e in host]
            res["profile"][f"L{L}_K{K}_G{G}_{backends}"] = bd
            print(f"profile join L={L} K={K} ({backends}) G={G}: wall {wall * 1e3:.1f} ms (profiled); kernels " + ", ".join(
                f"{k} {v * 1e3:.2f} ms ({bd['kernels'][k]})" for k, v in bd["seconds"].items()), flush=True)
            for key, shapes, n, ms in bd["ops"][:10]:
                print(f"    device {ms:8.3f} ms  {n:4d} x {key} {shapes}", flush=True)
            for key, n, ms in bd["host_ops"][:12]:
                print(f"    host   {ms:8.3f} ms  {n:4d} x {key}", flush=True)
            del dec
            free(clock)
        uninstall_posterior(post)
        free(clock)
    return res


def profile_run(args) -> dict:
    """8B shape, q,v adapter: the engine's scoring forward (PrefillEngine, not graphed) and one
    StaticDecoder step run eagerly (B=1, K=1 and K=10) under torch.profiler: kernel time by kind."""
    from torch.profiler import ProfilerActivity, profile

    from tfb_core.cuda_decode import StaticDecoder

    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    clock = Clock(device)
    out = {}
    model = build_model(args.models[0], device, torch.bfloat16)
    counts = model_counts(model)
    tmp = Path(tempfile.mkdtemp(prefix="tfb-prof-"))
    model = make_adapter(model, TARGETS["qv"], args.rank, tmp).unload()
    post = install_posterior(model, tmp, args.sigma)
    engine = PrefillEngine(post, graph=False)  # the server's scoring forward, not graphed
    for B, T, K in ((1, 128, 10), (1, 512, 10), (32, 512, 1), (16, 64, 10)):
        fn = score_tfb(post, prompts_for(B, T, counts["vocab"]), K, engine)
        fn()
        wall = clock.time(fn)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        bd = kernel_breakdown(prof)
        bd["wall_s"] = wall
        bd["flops"] = prefill_flops(counts, B * K, T)
        out[f"score_B{B}_T{T}_K{K}"] = bd
        print(f"score B={B} T={T} K={K} (engine, not graphed): wall {wall * 1e3:.1f} ms; kernels " + ", ".join(
            f"{k} {v * 1e3:.1f} ms ({bd['kernels'][k]})" for k, v in bd["seconds"].items()), flush=True)
        for name, t in bd["top"]:
            print(f"    {t:8.3f} ms  {name}", flush=True)
    for B, T, K in ((1, 512, 1), (1, 512, 10), (64, 128, 1), (64, 128, 10)):
        seqs = [GenSequence(p.tolist(), SamplingParams(max_tokens=40, num_samples=K, ignore_eos=True))
                for p in prompts_for(B, T, counts["vocab"], seed=7)]
        dec = StaticDecoder(post, graph=False)
        dec.admit(seqs)
        for _ in range(2):
            dec.step()
        eager = clock.time(dec.step)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.step()
            torch.cuda.synchronize()
        bd = kernel_breakdown(prof)
        bd["eager_wall_s"] = eager
        bd["flops"] = prefill_flops(counts, B * K, 1)
        out[f"static_step_B{B}_T{T}_K{K}_eager"] = bd
        print(f"static step B={B} T={T} K={K} (eager, not graphed): wall {eager * 1e3:.1f} ms; kernels " + ", ".join(
            f"{k} {v * 1e3:.2f} ms ({bd['kernels'][k]})" for k, v in bd["seconds"].items()), flush=True)
        for name, t in bd["top"]:
            print(f"    {t:8.3f} ms  {name}", flush=True)
        del dec
    return out


def check_run(args) -> dict:
    """The graphed StaticDecoder against generate on the GPU in float32 (1B shape, mixed K and
    weight seeds, padding)."""
    from tfb_core.generation import generate

    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    model = build_model("1b", device, torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix="tfb-check-"))
    model = make_adapter(model, TARGETS["all"], args.rank, tmp).unload()
    post = install_posterior(model, tmp, 0.05)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 128000, (n,), generator=g).tolist() for n in (37, 64, 50)]
    params = [SamplingParams(max_tokens=16, num_samples=4, ignore_eos=True, weight_seed=2),
              SamplingParams(max_tokens=12, num_samples=2, ignore_eos=True, weight_seed=5),
              SamplingParams(max_tokens=16, num_samples=4, ignore_eos=True, weight_seed=2)]
    ref = generate(post, prompts, params)
    out = {}
    for name, compile in (("graphed", False), ("compiled_graphed", True))[:2 if "compiled" in args.variants else 1]:
        fast = generate(post, prompts, params, make_decoder(post, "static", compile=compile))
        same = sum(a == b for r, f in zip(ref, fast) for a, b in zip(r.token_ids, f.token_ids))
        pairs = [(a, b) for r, f in zip(ref, fast) for a, b in zip(r.tokens, f.tokens)]
        out[name] = {"tokens_equal": same, "tokens": sum(len(r.tokens) for r in ref),
                     "max_abs_d_pe": max(abs(a.predictive_entropy - b.predictive_entropy) for a, b in pairs),
                     "max_abs_d_mi": max(abs(a.mutual_information - b.mutual_information) for a, b in pairs),
                     "max_mi": max(a.mutual_information for a, _ in pairs), "dtype": "float32"}
        print(f"check (float32, {name} StaticDecoder vs generate):", json.dumps(out[name]), flush=True)
    # scoring: the graphed PrefillEngine against HF's eager forward, padded rows, mixed K and seeds
    engine = PrefillEngine(post)
    enc = [Encoded([p], [LABEL_IDS], Mode.LETTER) for p in prompts]
    samples = [(0, 4), (3, 2), (0, 4)]
    ref = choice_probs(post, enc, samples)
    got = choice_probs(post, enc, samples, engine=engine)
    out["prefill"] = {"max_abs_d_prob": max(float((a - b).abs().max()) for a, b in zip(ref, got)),
                      "graphed": bool(engine.graphs), "capture_error": engine.capture_error,
                      "max_prob_std_over_samples": max(float(p.std(0).max()) for p in ref)}
    print("check (float32, graphed PrefillEngine vs eager choice_probs):", json.dumps(out["prefill"]), flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["8b"], choices=list(SHAPES))
    p.add_argument("--adapters", nargs="+", default=["qv", "all"], choices=list(TARGETS))
    p.add_argument("--variants", default="a,b,c,d", help="comma list of a,eager,b,c,d")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4, 10, 16])
    p.add_argument("--decode-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--ctx", type=int, default=512, help="decode prompt length")
    p.add_argument("--warm", type=int, default=4, help="decode warm-up steps")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--ref-steps", type=int, default=6, help="timed decode steps of (b)")
    p.add_argument("--floor-rows", nargs="+", type=int, default=[1, 10, 80])
    p.add_argument("--no-scoring", action="store_true", help="decoding only")
    p.add_argument("--full-all", action="store_true", help="the full grid for the all-linear adapter too")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--device", default=None)
    p.add_argument("--profile", action="store_true", help="kernel-time breakdown instead of the table")
    p.add_argument("--check", action="store_true", help="float32 check of the graphed StaticDecoder")
    p.add_argument("--step", action="store_true",
                   help="the decode step with each attention, side by side: timed (graphed) and profiled")
    p.add_argument("--step-cells", nargs="+", default=["1x10", "64x1", "64x10"],
                   help="--step's cells, BxK (B streams of K samples)")
    p.add_argument("--attentions", nargs="+", default=list(ATTENTION), choices=ATTENTION,
                   help="--step's attentions, each in turn")
    p.add_argument("--fusions", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="--step's elementwise kernels: fused (tfb_core.fused) or plain torch, each in turn")
    p.add_argument("--stochastic-layers", nargs="+", default=["all"],
                   help="--step's posteriors: 'all' or L, the noise in the last L decoder layers only")
    p.add_argument("--no-profile", action="store_true", help="--step without its profiled eager steps")
    p.add_argument("--admit", action="store_true",
                   help="joins into a running batch as the server makes them: timed, and the largest profiled")
    p.add_argument("--admit-base", type=int, default=48, help="--admit: streams decoding when a group joins")
    p.add_argument("--admit-groups", nargs="+", type=int, default=[1, 4, 16], help="--admit: new streams per join")
    p.add_argument("--admit-ks", nargs="+", type=int, default=[1, 10], help="--admit: samples per stream")
    p.add_argument("--prompt-attentions", nargs="+", default=["tfb"], choices=list(PROMPT_ATTENTIONS),
                   help="--admit: the prompt attention's SDPA backends, each in turn: tfb's (no cuDNN) or "
                        "torch's default order (cuDNN first on Hopper)")
    p.add_argument("--attention", default="kernel", choices=ATTENTION,
                   help="the decode step's attention: kernel (each row's live columns) or dense (every column)")
    p.add_argument("--deadline-s", type=float, default=1e9,
                   help="skip the remaining configurations after this many seconds")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu.json"))
    args = p.parse_args(argv)
    args.variants = set(args.variants.split(","))
    return args


if __name__ == "__main__":
    args = parse_args()
    with attention(args.attention):
        if args.profile or args.check or args.step or args.admit:
            res = {"command": " ".join([Path(sys.executable).name] + sys.argv), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}
            if args.check:
                res["check"] = check_run(args)
                free(Clock(torch.device("cuda")))
            if args.profile:
                res["profile"] = profile_run(args)
            if args.step:
                res["step"] = step_run(args)
            if args.admit:
                res["admit"] = admit_run(args)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        else:
            res = run(args)
            print(table(res))
