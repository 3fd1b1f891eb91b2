"""Read a peft LoRA adapter directory and check it against a base model.

Only what tfb needs is read: the config (type, ranks, alphas, rsLoRA) and the ``lora_A`` /
``lora_B`` weights per module. Weights come from safetensors, or from a ``.bin`` through
``torch.load(weights_only=True)``: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import TFBError
from .sampling import SUPPORTED_LAYERS, is_supported_layer, layer_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAModule:
    """One adapted module: ``h = W0 x + scaling * B A x``."""

    name: str  # path inside the base model, e.g. "model.layers.0.self_attn.q_proj"
    A: torch.Tensor  # (r, n_in)
    B: torch.Tensor  # (n_out, r)
    scaling: float


@dataclass
class LoRAAdapter:
    path: Path
    config: dict
    modules: list[LoRAModule]  # in the base model's module order


def read_json(path: Path) -> dict:
    """A JSON object from a file; a bad file is a TFBError naming it and the line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TFBError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise TFBError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise TFBError(f"{path}: expected a JSON object")
    return data


def check_adapter_dir(path: str | Path, what: str = "adapter directory") -> Path:
    """``path`` exists, is a readable directory and holds an adapter config (peft's or tfb's).

    Each failure has its own message: missing, not a directory, unreadable, empty, or holding
    other files (listed).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TFBError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise TFBError(f"{what} {path} is a file, not a directory")
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise TFBError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not names:
        raise TFBError(f"{what} {path} is empty: expected a peft LoRA adapter ({CONFIG_NAME} and "
                       f"{WEIGHTS_NAME}, as save_pretrained writes them) or a Bayesianized adapter "
                       f"(tfb bayesianize)")
    if CONFIG_NAME not in names and "tfb_config.json" not in names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} files)" if len(names) > 8 else "")
        raise TFBError(f"{what} {path} is not an adapter: it has no {CONFIG_NAME} (peft LoRA) or "
                       f"tfb_config.json (Bayesianized); it holds {shown}")
    return path


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and its raw state dict."""
    path = check_adapter_dir(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise TFBError(f"{path} has no {CONFIG_NAME}: expected a peft adapter directory (save_pretrained)")
    config = read_json(config_file)
    _check_config(config, config_file)
    if (path / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        weights = path / WEIGHTS_NAME
        try:
            state = load_file(weights)
        except Exception as e:
            raise TFBError(f"{weights}: not a readable safetensors file ({e})") from e
    elif (path / BIN_WEIGHTS_NAME).is_file():
        weights = path / BIN_WEIGHTS_NAME
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TFBError(f"{weights}: not a plain tensor file ({e})") from e
    else:
        raise TFBError(f"{path} has neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME}")
    # weights_only still lets plain Python values through: only tensors are weights
    if not isinstance(state, dict):
        raise TFBError(f"{weights}: expected a dict of tensors, got a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TFBError(f"{weights}: {key!r} is not a tensor but a {type(value).__name__}; "
                           f"an adapter file holds tensors only")
    return config, state


def _check_config(config: dict, where: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise TFBError(f"{where}: adapter type {config.get('peft_type')!r} is not supported; "
                       f"tfb Bayesianizes LoRA adapters only (peft_type 'LORA')")
    unsupported = {
        "use_dora": "DoRA", "modules_to_save": "modules_to_save (full copies of layers)",
        "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise TFBError(f"{where}: {what} is not supported; use a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise TFBError(f"{where}: bias={config['bias']!r} is not supported; allowed: 'none'")


def load_adapter(path: str | Path, model: nn.Module) -> LoRAAdapter:
    """Read a LoRA adapter and check every module against ``model``.

    Raises TFBError naming the module for: a module the base model lacks, a layer kind the
    sampler does not support, shapes that do not fit the base layer.
    """
    path = Path(path).expanduser()
    config, state = read_adapter(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    # remove_duplicate=False: a tied lm_head.weight is listed too (peft saves it as lm_head.base_layer.weight)
    base_params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None and _is_unchanged_base_weight(key, tensor, base_params):
            continue  # peft saves tied embeddings alongside the LoRA: copies of the base
        if m is None:
            kind = "an embedding LoRA" if "lora_embedding" in key else "an unknown weight"
            raise TFBError(f"{path}: {key!r} is {kind}; the sampler supports LoRA on "
                           f"{', '.join(SUPPORTED_LAYERS)} only")
        pairs.setdefault(m["module"], {})[m["which"]] = tensor
    if not pairs:
        raise TFBError(f"{path}: the adapter holds no LoRA weights")

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules = []
    for name in sorted(pairs, key=lambda n: order.get(n, -1)):
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise TFBError(f"{path}: module {name} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        A, B = ab["A"].float(), ab["B"].float()
        _check_module(model, name, A, B, path)
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules.append(LoRAModule(name=name, A=A, B=B, scaling=float(scaling)))
    return LoRAAdapter(path=path, config=config, modules=modules)


def _is_unchanged_base_weight(key: str, tensor: torch.Tensor, base_params: dict) -> bool:
    name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    param = base_params.get(name)
    if param is None or param.shape != tensor.shape:
        return False
    # compare in the coarser of the two dtypes: a bf16 base holds the saved fp32 copy rounded
    coarse = max((param.dtype, tensor.dtype), key=lambda t: torch.finfo(t).eps if t.is_floating_point else 0)
    a = param.detach().cpu().to(coarse).float()
    return torch.allclose(a, tensor.to(coarse).float(), rtol=1e-3, atol=1e-5)


def _check_module(model: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, path: Path) -> None:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise TFBError(f"{path}: the adapter was made for another base model: module {name} "
                       f"does not exist in this one") from None
    if not is_supported_layer(layer):
        raise TFBError(f"{path}: module {name} is a {type(layer).__name__}; the sampler supports "
                       f"LoRA on {', '.join(SUPPORTED_LAYERS)}")
    n_in, n_out = layer_features(layer)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != n_in or B.shape[0] != n_out or A.shape[0] != B.shape[1]:
        raise TFBError(
            f"{path}: the adapter was made for another base model: module {name} has "
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but the base layer maps "
            f"{n_in} -> {n_out} (expected lora_A (r, {n_in}) and lora_B ({n_out}, r))")


def _pattern_value(pattern: dict, name: str, default):
    """peft's rule: the first key that matches a suffix of the module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
