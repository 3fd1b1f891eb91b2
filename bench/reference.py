"""The reference implementation tfb is compared with, and the models and adapters the
benchmarks build: random-weight Llama shapes (``SHAPES``, ``build_model``), a random peft
LoRA (``TARGETS``, ``make_adapter``), tfb's posterior installed on it (``install_posterior``),
and K sequential peft forwards with the noise ``A' + E_k`` copied into lora_A before each
pass (``Reference``, ``score_peft``, ``decode_peft``).

Used by bench/gpu.py, bench/cpu.py and bench/serve.py; the timers are in bench/timing.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from timing import LABEL_IDS, median  # also puts the repository root on sys.path

from tfb_core.models import BaseModel, cache_kwarg  # noqa: E402
from tfb_core.posterior import Posterior, bayesianize_factors  # noqa: E402
from tfb_core.sampling import row_std  # noqa: E402

# Llama shapes (the rope scaling of the real models is left out: it does not change speed)
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=False),
}
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class StubTokenizer:
    """The engine needs a pad id and ``decode``; no tokenizer files exist on the device.
    ``decode`` returns "" (the engine decodes each sequence's growing text per token with a
    real tokenizer: host work not counted here)."""

    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


# --- model and adapters -------------------------------------------------------------------


def build_model(shape: str, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def make_adapter(model, targets, r, out_dir: Path, seed=1):
    """A random LoRA (peft, bf16 adapter weights), saved; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                          lora_dropout=0.0, init_lora_weights=False),
                        autocast_adapter_dtype=False)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 0.5)
    pm.save_pretrained(out_dir)
    pm.requires_grad_(False)
    return pm


class Reference:
    """The reference approach on a peft model: per pass, lora_A <- A' + E_k (fixed per k)."""

    def __init__(self, pm, sigma: float, kmax: int, seed=0):
        from peft.tuners.lora import LoraLayer

        self.pm = pm
        self.mods = [m for m in pm.modules() if isinstance(m, LoraLayer)]
        self.mean, self.samples = [], []
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for m in self.mods:
                A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                A2, B2, d = bayesianize_factors(A.float().cpu(), B.float().cpu())
                omega = row_std(d, sigma)
                B.copy_(B2.to(B))
                A.copy_(A2.to(A))
                self.mean.append(A2.to(A))
                self.samples.append(torch.stack([
                    (A2 + omega[:, None] * torch.randn(A2.shape, generator=g)).to(A)
                    for _ in range(kmax)]))

    def inject(self, k: int | None):
        """k = None: the mean adapter (the deterministic one)."""
        with torch.no_grad():
            for m, mean, s in zip(self.mods, self.mean, self.samples):
                m.lora_A["default"].weight.copy_(mean if k is None else s[k])


def install_posterior(model, adapter_dir, sigma, stochastic_layers="all") -> Posterior:
    base = BaseModel(model=model, tokenizer=StubTokenizer(), name="random", path=Path(adapter_dir))
    post = Posterior.from_adapter(base, adapter_dir, stochastic_layers=stochastic_layers)
    post.sigma = sigma
    return post


def uninstall_posterior(post: Posterior):
    for layer in post.layers:
        parent_name, _, child = layer.name.rpartition(".")
        setattr(post.model.get_submodule(parent_name), child, layer.base_layer)


# --- the reference: K sequential peft forwards ---------------------------------------------


def score_peft(pm, ref: Reference | None, prompts, K, device):
    """K passes (ref, noise per pass) or one deterministic pass (ref None): the model
    average of the label probabilities, computed on the device."""
    ids = prompts.to(device)
    labels = torch.tensor(LABEL_IDS, device=device)

    def run():
        acc = 0
        for k in range(K if ref is not None else 1):
            if ref is not None:
                ref.inject(k)
            logits = pm(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
            acc = acc + torch.softmax(logits.float()[:, labels], -1)
        out = acc / K
        if ref is not None:
            ref.inject(None)
        return out

    return run


def decode_peft(clock, pm, ref: Reference | None, prompts, K, warm, steps, device):
    """Deterministic (ref None, one cache) or reference (K caches, K passes per step,
    noise injected per pass); greedy on the model average, on the device."""
    from transformers import DynamicCache

    hf = pm.get_base_model()
    key = cache_kwarg(hf)
    ids = prompts.to(device)
    nk = K if ref is not None else 1
    base = clock.mem_reset()
    caches = [DynamicCache() for _ in range(nk)]
    state = {}

    def forward(inp, first):
        acc = 0
        for k in range(nk):
            if ref is not None:
                ref.inject(k)
            out = pm(input_ids=inp, use_cache=True, logits_to_keep=1, **{key: caches[k]})
            acc = acc + torch.softmax(out.logits[:, -1].float(), -1)
        if ref is not None:
            ref.inject(None)
        state["tok"] = (acc / nk).argmax(-1)[:, None]

    t_prefill = clock.time(lambda: forward(ids, True))
    for _ in range(warm):
        forward(state["tok"], False)
    times = [clock.time(lambda: forward(state["tok"], False)) for _ in range(steps)]
    peak = clock.mem_peak(base)
    del caches, state
    return {"step_s": median(times), "step_min_s": min(times), "steps": steps,
            "warmup_steps": warm, "prefill_s": t_prefill, "peak_extra_bytes": peak}
