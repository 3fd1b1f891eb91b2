"""The grammar libraries for ``response_format``, side by side: llguidance and xgrammar.

For a nested JSON schema on a tokenizer (default: the demo's, SmolLM2, 49,152 tokens): the
time to wrap the tokenizer (once per server), to compile the schema (once per request), and to
compute each step's mask of allowed tokens while a matching document is consumed token by token
(median and max over its tokens, ``--repeats`` passes). Needs both libraries (xgrammar is not a
tfb dependency: ``pip install xgrammar==0.2.8 llguidance==1.9.1`` in a scratch venv with torch).

    python bench/grammar.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "address", "tags"], "additionalProperties": False}
DOC = json.dumps({"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "zip": "W1"},
                  "tags": ["math", "poetry"]})


def llguidance_run(tok, vocab: int, ids: list[int]) -> tuple[float, float, list[float]]:
    from llguidance import LLMatcher
    from llguidance.hf import from_tokenizer

    t0 = time.perf_counter()
    lltok = from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    matcher = LLMatcher(lltok, LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}))
    t2 = time.perf_counter()
    steps = []
    for i in ids:
        a = time.perf_counter()
        matcher.compute_bitmask()
        steps.append(time.perf_counter() - a)
        assert matcher.consume_token(i), matcher.get_error()
    return t1 - t0, t2 - t1, steps


def xgrammar_run(tok, vocab: int, ids: list[int]) -> tuple[float, float, list[float]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    t1 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    t2 = time.perf_counter()
    mask = xgr.allocate_token_bitmask(1, vocab)
    steps = []
    for i in ids:
        a = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        steps.append(time.perf_counter() - a)
        assert matcher.accept_token(i)
    return t1 - t0, t2 - t1, steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the demo's)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from tfb_core.models import resolve_model_dir

        args.tokenizer = resolve_model_dir("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(tok)
    ids = tok(DOC, add_special_tokens=False).input_ids
    out = {"tokens": len(ids), "vocab": vocab}
    for name, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run)):
        wrap, compiles, steps = [], [], []
        for _ in range(args.repeats):
            w, c, s = run(tok, vocab, ids)
            wrap.append(w)
            compiles.append(c)
            steps += s
        out[name] = {"tokenizer_ms": 1e3 * statistics.median(wrap), "compile_ms": 1e3 * statistics.median(compiles),
                     "mask_us_median": 1e6 * statistics.median(steps), "mask_us_max": 1e6 * max(steps)}
        print(f"{name:>10}: tokenizer {out[name]['tokenizer_ms']:.0f} ms, compile {out[name]['compile_ms']:.1f} ms, "
              f"mask per token {out[name]['mask_us_median']:.1f} us median, {out[name]['mask_us_max']:.0f} us max",
              flush=True)
    return out


if __name__ == "__main__":
    main()
