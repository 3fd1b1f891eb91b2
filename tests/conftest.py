"""Shared fixtures: tiny random models and LoRAs, built once per session in a temp dir.

Everything here is an independent reference for tfb_core: adapters are read straight from
their files, SVDs are float64, and "explicit weight" models merge ``W0 + s * B'(A' + E_k)``
into a plain copy of the base model (no TFB layer, no batching).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # the CPU is shared; tiny models gain nothing from threads

import tiny  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj", "lm_head")
ROOT = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")


def in_triton_interpreter(code: str) -> None:
    """Run ``code`` in a Python whose Triton kernels run in Triton's CPU interpreter (chosen at
    import, hence a subprocess); tests/ is importable. Fails with its output unless it exits 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(autouse=True)
def _kernels_stay_on():
    """A Triton kernel that fails turns every kernel off for the process (tfb_core.fused.guarded):
    no test may leave it so, or the kernel tests after it would compare the plain path with itself."""
    from tfb_core import fused

    yield
    broken, fused.BROKEN, fused.FUSED = fused.BROKEN, None, True
    assert broken is None, f"a Triton kernel failed, and every kernel was turned off: {broken}"


# --- models and adapters (built once) ----------------------------------------------------------


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return tiny.make_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, llama_dir) -> Path:
    """r=4 on q, v, down_proj and lm_head; alpha 8 (s = 2)."""
    return tiny.make_lora(llama_dir, tmp_path_factory.mktemp("lora") / "adapter", targets=LLAMA_TARGETS)


@pytest.fixture(scope="module")
def post(llama_dir, lora_dir):
    """The tiny Llama + its LoRA as a float32 CPU Posterior, shared by a module's tests (sigma 0
    unless a test passes its own)."""
    from tfb_core.posterior import Posterior

    return Posterior.from_adapter(fresh_base(llama_dir), lora_dir)


@pytest.fixture()
def llama_post(llama_dir, lora_dir):
    """A fresh float32 Posterior of the tiny Llama + its LoRA (a test may set its sigma)."""
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior

    return Posterior.from_adapter(load_base_model(llama_dir, dtype="float32"), lora_dir)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny.make_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="session")
def gpt2_lora_dir(tmp_path_factory, gpt2_dir) -> Path:
    return tiny.make_lora(gpt2_dir, tmp_path_factory.mktemp("gpt2lora") / "adapter",
                          targets=("c_attn", "c_fc"), fan_in_fan_out=True)


@pytest.fixture(scope="session")
def tok(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir, local_files_only=True)


# --- helpers ----------------------------------------------------------------------------------


def fresh_base(model_dir):
    """A new float32 CPU base model (Posterior installs its layers into the model in place)."""
    from tfb_core.models import load_base_model

    return load_base_model(model_dir, device="cpu", dtype="float32")


@functools.lru_cache(maxsize=16)
def read_lora(adapter_dir) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {module name: (A, B)}) read straight from the adapter's files, float64."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (adapter_dir / "adapter_model.safetensors").is_file():
        state = load_file(adapter_dir / "adapter_model.safetensors")
    else:
        state = torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            which = "A" if ".lora_A." in key else "B"
            pairs.setdefault(module, {})[which] = t.double()
    return config, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def peft_scaling(config: dict, module: str, r: int) -> float:
    """s for one module, written from peft's documented rules (alpha_pattern, rsLoRA)."""
    import re

    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def svd64(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, d) of B in float64 via numpy (independent of torch's SVD)."""
    import numpy as np

    U, d, _ = np.linalg.svd(B.double().numpy(), full_matrices=False)
    return torch.from_numpy(U), torch.from_numpy(d)


def module_order(model, names) -> list[str]:
    """The adapted module names in the base model's module order (their draw index)."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=order.__getitem__)


def explicit_model(model_dir, post, seed: int, k: int, sigma: float, adapter_dir=None):
    """A plain base model whose weights are ``W0 + s * B'(A' + E_k)`` for every module.

    ``E_k = (sigma / d) * Z_k`` with ``d`` the singular values of the ORIGINAL ``B`` (numpy,
    float64) when ``adapter_dir`` is given, else the column norms of the layer's ``B'``;
    ``Z_k = standard_normal(seed, k, module index)``, module index = position in the base
    model's module order. No TFB layer runs in this model.
    """
    from transformers import AutoModelForCausalLM

    from tfb_core.sampling import standard_normal

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.eval().requires_grad_(False)
    names = module_order(model, [layer.name for layer in post.layers])
    layers = {layer.name: layer for layer in post.layers}
    with torch.no_grad():
        for index, name in enumerate(names):
            layer = layers[name]
            A1, B1 = layer.lora_A.double(), layer.lora_B.double()
            d = B1.norm(dim=0)  # B' = U diag(d): its column norms are d
            if adapter_dir is not None:
                d = svd64(read_lora(adapter_dir)[1][name][1])[1]
            omega = torch.where(d > 1e-6 * d.max(), sigma / d.clamp_min(1e-30), torch.zeros_like(d))
            Z = standard_normal(seed, k, index, A1.shape).double()
            delta = layer.scaling * B1 @ (A1 + omega[:, None] * Z)  # (out, in)
            target = model.get_submodule(name)
            if isinstance(target, torch.nn.Linear):
                target.weight += delta.float()
            else:  # transformers Conv1D: weight (in, out)
                target.weight += delta.T.float()
    return model


def peft_model(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids for a left-padded batch."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s)
        mask[b, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def mc_items(n: int, choices: int = 4, seed: int = 0, answers: bool = True):
    """n small multiple-choice items of varied lengths."""
    import random

    from tfb_core.data import MCItem

    rng = random.Random(seed)
    words = "red green blue stone river cloud apple seven north light quiet sharp".split()
    items = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + "?"
        opts = []
        while len(opts) < choices:
            c = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            if c not in opts:
                opts.append(c)
        items.append(MCItem(choices=opts, question=q, answer=rng.randrange(choices) if answers else None))
    return items


# --- multiple-choice references: one prompt at a time, no padding ---------------------------------

PAPER_PROMPT = ("Return the label of the correct answer for the question below.\n\nQuestion: {q}\n"
                "Choices:\n{choices}\nAnswer:")


def paper_prompt(item: MCItem) -> str:
    return PAPER_PROMPT.format(q=item.question, choices="\n".join(
        f"{'ABCDEFGH'[i]}) {c}" for i, c in enumerate(item.choices)))


@torch.no_grad()
def ref_letter(model, tok, item: MCItem) -> torch.Tensor:
    """Softmax over the label tokens " A", " B", ... of the last-position logits, one prompt alone."""
    text = paper_prompt(item)
    ids = tok(text).input_ids
    labels = []
    for i in range(len(item.choices)):
        full = tok(text + " " + "ABCDEFGH"[i]).input_ids
        assert full[:-1] == ids  # " A" is one token after this prompt
        labels.append(full[-1])
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.softmax(logits[labels], -1)


@torch.no_grad()
def ref_sequence(model, tok, item: MCItem, normalize=False) -> torch.Tensor:
    """softmax_c sum_t log p(choice_c token t | prompt, earlier tokens), one sequence at a time."""
    prompt = tok(f"Question: {item.question}\nAnswer:").input_ids
    scores = []
    for choice in item.choices:
        cont = tok(" " + choice, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + cont])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        total = sum(logp[len(prompt) - 1 + t, tok_id] for t, tok_id in enumerate(cont))
        scores.append(total / len(cont) if normalize else total)
    return torch.softmax(torch.stack(scores), -1)
