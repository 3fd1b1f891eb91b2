"""tfb_core: a LoRA adapter as a Bayesian posterior (Training-Free Bayesianization).

The public face: one object for the posterior, one verb that makes it, one engine that runs
it, and the types their calls take::

    from tfb_core import Engine, Posterior, SamplingParams, bayesianize, generate

    post = bayesianize("smollm2-135m", "my-lora/", "cal.jsonl", out="post/")   # fit, save, load
    post = Posterior.load(load_base_model("smollm2-135m"), "post/")           # later
    engine = Engine(post)                                # static kernels on CUDA, else eager
    probs = engine.score([encoding.encode_item(post.tokenizer, item)], [(0, 10)])[0]  # (K, C)
    u = engine.uncertainty(probs)                        # tempered average, PE, EE, MI
    seqs = generate(post, prompts, SamplingParams(num_samples=10), engine.decoder())

Everything else lives in its module (``tfb_core.scoring``, ``tfb_core.conformal``, ...).
Names are imported on first use (PEP 562), so ``import tfb_core`` and the command line stay
quick; every module below stays importable on its own, and ``tfb_core.encoding`` (tokenizing)
imports no torch.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it (a module of its own: None)
_EXPORTS = {
    # the posterior, the verb that fits and caches it, where models come from
    "Posterior": "posterior", "bayesianize": "posterior", "load_base_model": "models", "cache_dir": "models",
    "DEMO_MODEL": "demo",
    # running it: the engine (scoring, prompt scoring, decoders) and generation
    "Engine": "engines", "Decoder": "generation", "generate": "generation", "SamplingParams": "generation",
    "GenSequence": "generation", "TokenInfo": "generation",
    # items, their tokens (encoding: Encoded, encode_item, apply_chat, labels; no torch) and options
    "MCItem": "data", "encoding": None, "ScoreOptions": "options", "SearchConfig": "options",
    "Mode": "options", "Criterion": "options", "Score": "options", "Metric": "options",
    "TFBError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfb_core' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f".{module or name}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
