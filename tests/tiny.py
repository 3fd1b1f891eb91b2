"""Tiny random models and LoRA adapters, built and saved the way a user would (save_pretrained).

The tokenizer is the real SmolLM2 one (from the built-in model, converted once into the cache),
so prompts, labels and chat templates behave as they do with the demo.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tfb_core.models import resolve_model_dir

VOCAB = 49152


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"), local_files_only=True)


def make_llama(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    cfg = LlamaConfig(**{**kwargs, **overrides})  # overrides may change any default (tied embeddings)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def make_gpt2(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                     tie_word_embeddings=False)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def make_lora(base_dir: Path, path: Path, seed: int = 1, r: int = 4, alpha: int = 8,
              targets=("q_proj", "v_proj", "down_proj", "lm_head"), scale: float = 0.5, **config) -> Path:
    """A LoRA with random A and B (B is zero at a real init; random here so it does something)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, scale / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return path


def save_peft_adapter(base_dir: Path, path: Path, peft_config, seed: int = 1, scale: float = 0.5,
                      safe_serialization: bool = True) -> Path:
    """Any peft adapter (LoRA, IA3, ...) with random weights, saved with save_pretrained.

    ``safe_serialization=False`` writes ``adapter_model.bin`` (a pickle) as older peft did.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, scale / p.shape[-1] ** 0.5)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def prompts(tok) -> list[list[int]]:
    """Three prompts of different lengths (token ids), for the decoding tests."""
    return [tok("The capital of France is").input_ids,
            tok("Once upon a time, in a land far away, there lived").input_ids,
            tok("1 2 3").input_ids]
