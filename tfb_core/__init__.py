"""tfb_core: a LoRA adapter as a Bayesian posterior (Training-Free Bayesianization).

The public face: the server, the benchmarks and user code need these names only::

    from tfb_core import load_base_model, load_posterior, fit_posterior, score_items, generate

    base = load_base_model("smollm2-135m")              # a base model and its tokenizer
    post = load_posterior(base, "my-lora/")             # Bayesianized, or a plain LoRA at sigma 0
    fit_posterior(post, read_jsonl("cal.jsonl"))        # sigma, temperature, held-out calibration
    probs = score_items(post, items, num_samples=10)    # (N, K, C) per-sample choice probabilities
    seqs = generate(post, prompts, params, make_decoder(post))  # the engine picked from model, device
    u = decompose(probs, post.config.temperature)       # probs, PE, EE, MI per item

Names are imported on first use (PEP 562), so ``import tfb_core`` and the command line stay
quick; every module below stays importable on its own.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_EXPORTS = {
    # models and the posterior, where they come from and are cached
    "BaseModel": "models", "load_base_model": "models", "resolve_model_dir": "models", "cache_dir": "models",
    "check_model": "models",
    "default_device": "models", "check_adapter_dir": "adapter", "sha256_file": "posterior",
    "DEMO_MODEL": "demo", "DEMO_POSTERIOR": "demo", "DEMO_ADAPTER": "demo",
    "Posterior": "posterior", "TFBConfig": "posterior", "load_posterior": "posterior",
    "is_bayesianized": "posterior",
    # where outputs are written: one rule for every output directory and report file
    "check_output_dir": "artifacts", "write_output_dir": "artifacts",
    # data
    "MCItem": "data", "read_jsonl": "data", "write_jsonl": "data", "LABELS": "data", "letter_limit": "data",
    # options: enums, defaults, the search's config
    "Mode": "options", "Criterion": "options", "Score": "options", "Metric": "options",
    "SearchConfig": "options", "ScoreOptions": "options", "NUM_SAMPLES": "options", "SEED": "options", "COVERAGE": "options",
    "MAX_RISK": "options",
    # scoring (multiple choice) and generation
    "score_items": "scoring", "predict": "scoring", "choice_probs": "scoring", "choice_scores": "scoring",
    "encode_item": "encoding", "Encoded": "encoding", "apply_chat": "encoding", "max_context": "models",
    "score_prompts": "scoring",
    # structured output: a JSON schema the generated text matches
    "json_grammar": "structured", "field_uncertainty": "structured",
    "generate": "generation", "SamplingParams": "generation", "GenSequence": "generation",
    "TokenInfo": "generation", "DecodeBatch": "generation", "safe_text": "generation", "summarize": "generation",
    # engines: one decoder protocol, the engine picked from the model and device
    "Decoder": "generation", "EagerDecoder": "generation", "make_decoder": "engines",
    "make_prefill": "engines", "resolve_engine": "engines", "ENGINES": "engines",
    "StaticDecoder": "cuda_decode", "require_supported": "cuda_llama", "PrefillEngine": "cuda_prefill",
    # uncertainty
    "Uncertainty": "uncertainty", "decompose": "uncertainty", "temper": "uncertainty",
    "fit_temperature": "uncertainty",
    # fitting a posterior and its conformal calibration
    "bayesianize": "fit", "check_bayesianize": "fit",
    "fit_posterior": "fit", "resolve_criterion": "fit", "unlabelled": "fit",
    "Calibration": "conformal", "calibrate": "conformal", "decide": "conformal",
    "min_calibration_size": "conformal", "covers": "conformal", "max_coverage": "conformal",
    "FitReport": "report",
    "TFBError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tfb_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
