"""The TFB transform, the posterior object, and the Bayesianized adapter directory.

Per LoRA module (docs/method.md §1): thin SVD ``B = U diag(d) V^T``, then ``B' = U diag(d)``,
``A' = V^T A`` (so ``B'A' = BA``), and ``q(A'_ij) = N(A'_ij, (sigma / d_i)^2)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .adapter import CONFIG_NAME, WEIGHTS_NAME, LoRAAdapter, load_adapter, read_json
from .artifacts import POSTERIOR_NAME, TFB_CONFIG_NAME, Inputs, write_output_dir
from .conformal import Calibration
from .confidence import Confidence
from .errors import TFBError
from .generation import kv_rows
from .trunk import trunk_split
from .models import BaseModel
from .options import (ALL_LAYERS, NUM_SAMPLES, SEED, Criterion, Mode, ScoreOptions, SearchConfig, parse_criterion,
                      parse_mode, parse_stochastic_layers)
from .sampling import DrawCache, TFBLoRALayer, weight_samples

log = logging.getLogger(__name__)

#: 2: the temperature divides the log of the model average (v1: every sample's logits);
#: length_normalize and the held-out calibration (conformal sets, abstention) are recorded
#: 3: the learned confidence (a version-2 directory loads without it)
FORMAT_VERSION = 4  # 4: stochastic_layers (an older directory loads as "all")
READABLE_VERSIONS = (1, 2, 3, 4)


def bayesianize_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A', B', d)`` with ``B'A' = BA``: the SVD rotation of docs/method.md §1.

    A : (r, n), B : (m, r). Returns A' (r, n), B' (m, r), d (r,), all float32.
    """
    small = B.numel() <= 4_000_000
    dtype = torch.float64 if small else torch.float32
    U, d, Vh = torch.linalg.svd(B.to(dtype), full_matrices=False)  # U (m, r), d (r,), Vh (r, r)
    B_new = U * d[None, :]
    A_new = Vh @ A.to(dtype)
    return A_new.float(), B_new.float(), d.float()


@dataclass
class TFBConfig:
    """What ``tfb_config.json`` records about a posterior."""

    sigma: float = 0.0
    criterion: Criterion | None = None  # how sigma was chosen; None: set by hand
    eps: float | None = None
    num_samples: int = NUM_SAMPLES
    seed: int = SEED
    mode: Mode | None = None  # None: not recorded (letter)
    chat: bool = False  # prompts are wrapped in the tokenizer's chat template
    temperature: float = 1.0  # the model average is served as softmax(log(mean_k p_k) / T)
    length_normalize: bool = False  # sequence mode: a choice's score is its mean log-prob per token
    stochastic_layers: int | str = ALL_LAYERS  # L: the noise in the last L decoder layers (and the head)
    search_trace: list[dict] = field(default_factory=list)
    calibration_sha256: str | None = None
    base_model: dict = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    noise: str = "weight noise s * B' E with E_ij ~ N(0, (sigma / d_i)^2); s from the adapter config"
    files_sha256: dict = field(default_factory=dict)
    calibration: dict | None = None  # conformal.Calibration of held-out labelled items
    confidence: dict | None = None  # confidence.Confidence fitted on the labelled fitting items
    fit_report: dict | None = None  # report.FitReport of tfb bayesianize / a start-up search (optional)

    def __post_init__(self):
        self.criterion = None if self.criterion is None else parse_criterion(self.criterion)
        self.mode = None if self.mode is None else parse_mode(self.mode)
        self.stochastic_layers = parse_stochastic_layers(self.stochastic_layers)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise TFBError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TFBError(f"seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "TFBConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def report(self):
        """The fitting report (:class:`tfb_core.report.FitReport`: ``table()``, ``warnings``), or None."""
        from .report import FitReport

        return FitReport.from_dict(self.fit_report) if self.fit_report else None

    @property
    def score_options(self) -> ScoreOptions:
        """How the calibration scored its items (and how requests are scored by default)."""
        return ScoreOptions().resolve(**{f.name: getattr(self, f.name) for f in fields(ScoreOptions)})  # None: the default

    @property
    def conformal(self) -> Calibration | None:
        """The held-out calibration (prediction sets, abstention), or None."""
        return Calibration.from_dict(self.calibration) if self.calibration is not None else None

    @property
    def confidence_model(self) -> Confidence:
        """The learned confidence, or the tempered maximum probability when none was fitted."""
        return Confidence.from_dict(self.confidence) if self.confidence is not None else Confidence()


class Posterior:
    """A base model with a Bayesianized LoRA adapter installed: the TFB posterior.

    Build it with :meth:`from_adapter` (a plain peft LoRA directory) or :meth:`load` (a
    Bayesianized directory). ``sigma`` is the one global scale of the posterior; 0 is the
    deterministic adapter. ``stochastic_layers`` (L) puts the noise in the LoRA modules of the
    last L decoder layers only (and in an adapted LM head, which is above them); the modules below
    are the mean adapter in every weight sample. ``layers`` holds every TFB layer,
    ``noisy_layers`` those that get the noise.

    >>> post = Posterior.from_adapter(load_base_model("smollm2-135m"), "my-lora/")
    >>> result = post.fit(calibration_items, SearchConfig(num_samples=10))
    >>> with post.samples(num_samples=10, seed=0):
    ...     logits = post.model(input_ids.repeat_interleave(10, 0)).logits
    """

    def __init__(self, base: BaseModel, adapter: LoRAAdapter, d: Sequence[torch.Tensor],
                 config: TFBConfig | None = None):
        self.base = base
        self.adapter_config = adapter.config
        self.adapter_path = adapter.path
        self.config = config or TFBConfig()
        self.config.modules = [m.name for m in adapter.modules]
        self.config.base_model = base_model_identity(base)
        self.layers: list[TFBLoRALayer] = []
        for index, (module, dm) in enumerate(zip(adapter.modules, d)):
            parent_name, _, child = module.name.rpartition(".")
            parent = base.model.get_submodule(parent_name) if parent_name else base.model
            layer = TFBLoRALayer(getattr(parent, child), module.A, module.B, dm,
                                 module.scaling, index, module.name)
            setattr(parent, child, layer)
            self.layers.append(layer)
        self.stochastic_layers = self.config.stochastic_layers

    # construction -----------------------------------------------------------------------

    @classmethod
    def from_adapter(cls, base: BaseModel, adapter_dir: str | Path, **config) -> "Posterior":
        """Bayesianize a plain peft LoRA adapter (SVD per module) and install it."""
        adapter = load_adapter(adapter_dir, base.model)
        ds = []
        for module in adapter.modules:
            module.A, module.B, d = bayesianize_factors(module.A, module.B)
            ds.append(d)
        return cls(base, adapter, ds, TFBConfig(**config))

    @classmethod
    def load(cls, base: BaseModel, directory: str | Path) -> "Posterior":
        """Load a Bayesianized adapter directory; checksums are verified first."""
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        config = read_tfb_config(directory)
        verify_checksums(directory, config)
        _check_base_identity(config.base_model, base_model_identity(base), directory)
        adapter = load_adapter(directory, base.model)
        stored = load_file(directory / POSTERIOR_NAME)
        missing = [m.name for m in adapter.modules if f"{m.name}.d" not in stored]
        if missing:
            raise TFBError(f"{directory / POSTERIOR_NAME} lacks the singular values of {missing[0]}")
        try:
            return cls(base, adapter, [stored[f"{m.name}.d"] for m in adapter.modules], config)
        except TFBError as e:  # stochastic_layers does not fit this model
            raise TFBError(f"{directory / TFB_CONFIG_NAME}: {e}") from None

    @staticmethod
    def is_bayesianized(directory: str | Path) -> bool:
        """Whether ``directory`` holds a Bayesianized adapter (its ``tfb_config.json``), not a plain LoRA."""
        return (Path(directory).expanduser() / TFB_CONFIG_NAME).is_file()

    @classmethod
    def demo(cls, device=None, dtype=None) -> "Posterior":
        """The built-in demo: SmolLM2-135M-Instruct with the posterior shipped in ``tfb_core/demo``."""
        from .demo import DEMO_MODEL, DEMO_POSTERIOR
        from .models import load_base_model

        return cls.load(load_base_model(DEMO_MODEL, device=device, dtype=dtype), DEMO_POSTERIOR)

    # the posterior --------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.base.model

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def context(self) -> int | None:
        """The model's context length in tokens (None when its config does not say)."""
        from .models import max_context

        return max_context(self.model)

    @property
    def sigma(self) -> float:
        return self.config.sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        if not value >= 0:
            raise TFBError(f"sigma must be >= 0, got {value}")
        self.config.sigma = float(value)

    @property
    def num_layers(self) -> int:
        """N, the decoder layers of the base model."""
        return len(_decoder_layers(self.model))

    @property
    def stochastic_layers(self) -> int | str:
        """L, the top decoder layers whose LoRA modules get the noise, or ``"all"``."""
        return self.config.stochastic_layers

    @stochastic_layers.setter
    def stochastic_layers(self, value: int | str) -> None:
        value = parse_stochastic_layers(value)
        n = None if value == ALL_LAYERS else self.num_layers
        if n is not None and value > n:
            raise TFBError(f"stochastic_layers must be 'all' or 1..{n} (the model has {n} decoder layers), "
                           f"got {value}")
        noisy = [layer for layer in self.layers if self._is_noisy(layer, value)]
        if n is not None and not noisy:
            raise TFBError(f"stochastic_layers {value}: no LoRA module of the adapter is in the last {value} "
                           f"decoder layers (or the LM head); allowed: a larger L, up to {n}, or all")
        self.config.stochastic_layers = value
        self.noisy_layers: list[TFBLoRALayer] = noisy
        self.draws = DrawCache(noisy)  # module indices seed the draws: E_k of a module is the same for any L

    @property
    def first_stochastic_layer(self) -> int:
        """N - L: the decoder layer where the weight samples part (0 with "all")."""
        L = self.stochastic_layers
        return 0 if L == ALL_LAYERS else self.num_layers - L

    def kv_rows(self, num_samples: int) -> int:
        """The KV cache a sequence of ``num_samples`` weight samples holds when decoded, in rows
        of every layer (a server's KV budget): K, or fewer where the engines share the trunk below
        the last L layers (:func:`~tfb_core.generation.kv_rows`; the Llama family's layout)."""
        return kv_rows(num_samples, self.num_layers, trunk_split(self))

    def _is_noisy(self, layer: TFBLoRALayer, stochastic_layers: int | str) -> bool:
        if stochastic_layers == ALL_LAYERS:
            return True
        index = decoder_layer_index(self.model, layer.name)
        if index is None:  # outside the decoder stack: the LM head is above it, anything else is not
            return layer is self.model.get_output_embeddings()
        return index >= self.num_layers - stochastic_layers

    @contextmanager
    def samples(self, num_samples: int, seed: int | None = None, sigma: float | None = None
                ) -> Iterator[None]:
        """Forwards inside the block run ``num_samples`` weight samples over rows laid out
        ``b * K + k`` (``input_ids.repeat_interleave(K, 0)``)."""
        seed = self.config.seed if seed is None else seed
        sigma = self.sigma if sigma is None else sigma
        with weight_samples(self.noisy_layers, self.draws, sigma, [(seed, k) for k in range(num_samples)]):
            yield

    @contextmanager
    def mixed_samples(self, samples: Sequence[tuple[int, int]], slots: torch.Tensor,
                      sigma: float | None = None) -> Iterator[None]:
        """Like :meth:`samples`, for any row -> (seed, k) map (requests with their own seeds)."""
        sigma = self.sigma if sigma is None else sigma
        with weight_samples(self.noisy_layers, self.draws, sigma, samples, slots):
            yield

    def fit(self, items, config=None, *, sigma: float | None = None, **options):
        """Fit the posterior on calibration items and record it in ``config``: sigma by the
        criterion (or ``sigma`` as given), the scoring mode, the temperature, the learned
        confidence, the held-out calibration and the fitting report (docs/method.md §4).

        Parameters
        ----------
        items : sequence of MCItem
        config : SearchConfig, default=None
            What to fit and how (its defaults when None).
        sigma : float, default=None
            Use this sigma instead of searching one; the rest is fitted as usual.
        **options
            Fields of :class:`~tfb_core.options.SearchConfig` overriding ``config``
            (``criterion="nll"``, ``num_samples=4``, ...), the keyword arguments of
            :func:`tfb_core.search.search_sigma` (``rtol``, ``folds``, ...), ``delta`` and
            ``progress``.

        Returns
        -------
        SearchResult
            The search (its trace, and the fitting report as ``report``).
        """
        from .fit import fit_posterior

        return fit_posterior(self, items, config, sigma=sigma, **options)

    def _search(self, items, **kwargs):
        """Run the variance search (docs/method.md §4) and set ``sigma``; see :func:`tfb_core.search.search_sigma`."""
        from .search import search_sigma

        result = search_sigma(self, items, **kwargs)
        self.sigma = result.sigma
        self.config.criterion = parse_criterion(result.criterion)
        self.config.eps = result.eps
        self.config.num_samples = result.num_samples
        self.config.seed = result.seed
        self.config.mode = parse_mode(result.mode)
        self.config.search_trace = [asdict(p) for p in result.trace]
        if result.temperature is not None:
            self.config.temperature = result.temperature
        return result

    # the artifact -------------------------------------------------------------------------

    def save(self, directory: str | Path, calibration_file: str | Path | None = None, *, force: bool = False,
             inputs: Inputs = (), flag: str = "output directory") -> Path:
        """Write the Bayesianized adapter directory atomically (temp dir, then rename).

        Parameters
        ----------
        directory : path
            New or empty; one holding a previous tfb output only with ``force`` (the rule of
            :mod:`tfb_core.artifacts`).
        calibration_file : path, default=None
            Its sha256 is recorded; it is an input, never overwritten.
        force : bool, default=False
            Replace a previous tfb output (never a directory holding anything else).
        inputs : iterable of (flag, path), default=()
            The command's other inputs (the adapter, the base model), never overwritten.
        flag : str, default="output directory"
            What error messages call ``directory`` (``--out``).
        """
        inputs = [("--calibration", calibration_file), *inputs]
        return write_output_dir(directory, lambda tmp: self.write_files(tmp, calibration_file),
                                force=force, inputs=inputs, flag=flag)

    def write_files(self, directory: Path, calibration_file: str | Path | None = None) -> None:
        """The artifact's files, into the existing directory ``directory`` (no checks: :meth:`save`
        calls it on a temporary directory)."""
        from safetensors.torch import save_file

        weights, stds = {}, {}
        for layer in self.layers:
            weights[f"base_model.model.{layer.name}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
            weights[f"base_model.model.{layer.name}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous()
            stds[f"{layer.name}.d"] = layer.d.detach().float().cpu().contiguous()
        save_file(weights, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        save_file(stds, directory / POSTERIOR_NAME, metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.adapter_config, indent=2))
        if calibration_file is not None:
            self.config.calibration_sha256 = sha256_file(calibration_file)
        self.config.files_sha256 = {name: sha256_file(directory / name)
                                    for name in (CONFIG_NAME, WEIGHTS_NAME, POSTERIOR_NAME)}
        (directory / TFB_CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList of ``num_hidden_layers`` blocks."""
    cfg = model.config
    n = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TFBError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def decoder_layer_index(model: nn.Module, name: str) -> int | None:
    """The decoder layer that holds module ``name`` (``model.layers.3.self_attn.q_proj`` -> 3), or
    None for a module outside the decoder stack (the LM head)."""
    stack = _decoder_layers(model)
    blocks = {id(block): i for i, block in enumerate(stack)}
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        index = blocks.get(id(model.get_submodule(".".join(parts[:end]))))
        if index is not None:
            return index
    return None


def load_posterior(base: BaseModel, adapter_dir: str | Path) -> Posterior:
    """A Bayesianized directory is loaded; a plain LoRA directory is Bayesianized (sigma = 0)."""
    if Posterior.is_bayesianized(adapter_dir):
        return Posterior.load(base, adapter_dir)
    return Posterior.from_adapter(base, adapter_dir)


def base_model_identity(base: BaseModel) -> dict:
    cfg = base.model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {
        "name": base.name,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "num_hidden_layers": getattr(text_cfg, "num_hidden_layers", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
    }


def _check_base_identity(recorded: dict, actual: dict, directory: Path) -> None:
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if recorded.get(key) is not None and recorded.get(key) != actual.get(key):
            raise TFBError(
                f"{directory} was Bayesianized for another base model: {key} is "
                f"{recorded.get(key)!r} there and {actual.get(key)!r} in {actual.get('name')!r}")


def read_tfb_config(directory: Path) -> TFBConfig:
    path = directory / TFB_CONFIG_NAME
    if not path.is_file():
        raise TFBError(f"{directory} is not a Bayesianized adapter directory: {TFB_CONFIG_NAME} is missing")
    data = read_json(path)
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise TFBError(f"{path}: format_version {version!r} is not supported "
                       f"(this tfb reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    sigma = data.get("sigma", 0.0)  # not covered by the checksums: a hand edit must still be valid
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
        raise TFBError(f"{path}: sigma must be a finite number >= 0, got {sigma!r}")
    temperature = data.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 < temperature < float("inf"):
        raise TFBError(f"{path}: temperature must be a finite number > 0, got {temperature!r}")
    _check_types(path, data)
    if not isinstance(data.get("length_normalize", False), bool):
        raise TFBError(f"{path}: 'length_normalize' must be true or false, got {data['length_normalize']!r}")
    if data.get("calibration") is not None:
        Calibration.from_dict(data["calibration"], str(path))
    if data.get("confidence") is not None:
        Confidence.from_dict(data["confidence"], str(path))
    if data.get("fit_report") is not None:
        from .report import FitReport

        FitReport.from_dict(data["fit_report"], str(path))
    if version == 1:
        log.warning("%s: format version 1 divided every weight sample's logits by its temperature "
                    "%.4g; tfb now applies it to the model average, softmax(log(mean_k p_k) / T), and "
                    "reports MI of the untempered samples (answers equal within ~1e-3); run tfb "
                    "bayesianize again to record version %d", path, temperature, FORMAT_VERSION)
    try:
        config = TFBConfig.from_dict(data)
    except TFBError as e:
        raise TFBError(f"{path}: {e}") from None
    config.format_version = FORMAT_VERSION  # read as, and saved as, the current version
    return config


def _check_types(path: Path, data: dict) -> None:
    """A field of the wrong JSON type names the file and the field, not an AttributeError later."""
    shapes = {"base_model": (dict, "an object"), "files_sha256": (dict, "an object"),
              "search_trace": (list, "a list")}
    for name, (kind, what) in shapes.items():
        if name in data and not isinstance(data[name], kind):
            raise TFBError(f"{path}: '{name}' must be {what}, got {type(data[name]).__name__} {data[name]!r:.80}")
    if not all(isinstance(v, str) for v in data.get("files_sha256", {}).values()):
        raise TFBError(f"{path}: 'files_sha256' must map file names to sha256 strings")
    if not all(isinstance(p, dict) for p in data.get("search_trace", [])):
        raise TFBError(f"{path}: 'search_trace' must be a list of objects")


def verify_checksums(directory: Path, config: TFBConfig) -> None:
    for name in (CONFIG_NAME, WEIGHTS_NAME, POSTERIOR_NAME):
        path = directory / name
        if not path.is_file():
            raise TFBError(f"{directory}: {name} is missing")
        expected = config.files_sha256.get(name)
        if expected is None:
            raise TFBError(f"{directory / TFB_CONFIG_NAME} records no checksum for {name}")
        if sha256_file(path) != expected:
            raise TFBError(f"{path}: checksum mismatch (sha256 differs from {TFB_CONFIG_NAME}); "
                           f"the directory was modified or is corrupt: Bayesianize again")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- bayesianize: fit, save, cache ------------------------------------------------------------------

FIT_DTYPE = "float32"  # docs/method.md §4: in bf16 rounding alone moves the criterion


def bayesianize(model: str | os.PathLike, adapter: str | os.PathLike,
                calibration: str | os.PathLike | None = None, config: SearchConfig | None = None, *,
                sigma: float | None = None, out: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, force: bool = False, device=None, dtype=None,
                fit_dtype: str = FIT_DTYPE, progress: bool = True, on_fit: Callable[[str], None] | None = None,
                flag: str = "--out", check_only: bool = False):
    """Bayesianize a plain peft LoRA adapter: fit its posterior on a calibration file, save it, load it.

    Every input is checked before a model loads (:func:`check_bayesianize`). The posterior is
    fitted in ``fit_dtype`` (float32: in bf16 rounding alone moves the criterion,
    docs/method.md §4), saved, and returned in ``dtype`` (loaded again from what was saved when
    that differs, so a fit and a later load serve the same model).

    Parameters
    ----------
    model : str or path
        A built-in base model name or a local Hugging Face model directory; None: the demo's base.
    adapter : path
        A plain peft LoRA adapter directory.
    calibration : path, default=None
        Calibration JSONL; None only with ``sigma`` (then nothing is fitted but sigma).
    config : SearchConfig, default=None
        What to fit and how (:class:`SearchConfig`'s defaults when None).
    sigma : float, default=None
        Use this sigma instead of searching one (T, the confidence and the held-out calibration
        are still fitted on a labelled ``calibration``).
    out : path, default=None
        The directory to write (the rule of :mod:`tfb_core.artifacts`; ``force`` replaces a
        previous tfb output). None and no ``cache``: nothing is written.
    cache : path, default=None
        A directory that keeps fits by the key of their inputs (:func:`fit_key`): in
        ``<cache>/posteriors/<key>`` unless ``out`` is given; a fit whose result is there (or in
        ``out``, for the same key) is loaded, not fitted again. Processes sharing ``cache`` fit
        one at a time under a file lock in ``<cache>/locks``: the first fits, the others wait
        and load its result.
    device, dtype : default=None
        Where the returned posterior runs and its dtype (:func:`tfb_core.models.load_base_model`'s
        defaults: CUDA when present, bf16 on CUDA, float32 on CPU).
    on_fit : callable, default=None
        Called with a line saying what is fitted (the items, the criterion, K, the dtype) once a
        fit starts; not when a cached result is loaded.
    flag : str, default="--out"
        What error messages call ``out``.
    check_only : bool, default=False
        Only check the inputs (before a server binds its port) and return None; an adapter that
        is already Bayesianized then needs no calibration (it is served as it is).
    """
    from .artifacts import file_lock, lock_for, stored_key, write_key, write_output_dir
    from .models import default_device, default_dtype, load_base_model, parse_dtype

    from .demo import DEMO_MODEL

    config, model = config or SearchConfig(), model or DEMO_MODEL
    if check_only:
        check_bayesianize(model, adapter, calibration, config, sigma=sigma, out=out, cache=cache, force=force,
                          device=device, fit_dtype=fit_dtype, flag=flag, plain_only=True)
        return None
    items, out, key = check_bayesianize(model, adapter, calibration, config, sigma=sigma, out=out, cache=cache,
                                        force=force, device=device, fit_dtype=fit_dtype, flag=flag)
    what = describe(items, calibration, config, sigma, fit_dtype) + (f" (key {key[:12]})" if key else "")
    if out is None:
        log.info("bayesianize: %s", what)
        return _fit(model, adapter, items, config, sigma, device, fit_dtype, progress)
    fitted = None
    with file_lock(lock_for(cache, out)) if cache is not None else nullcontext():
        if key is not None and Posterior.is_bayesianized(out) and stored_key(out) == key:
            log.info("bayesianize: found the fit of these inputs in %s; not fitting again", out)
        else:
            log.info("bayesianize: %s", what)
            if on_fit is not None:
                on_fit(what)
            fitted = _fit(model, adapter, items, config, sigma, device, fit_dtype, progress)

            def write(tmp: Path) -> None:  # the key with the result, in one rename
                fitted.write_files(tmp, calibration_file=calibration)
                if key is not None:
                    write_key(tmp, key)

            in_cache = cache is not None and out == Path(cache).expanduser() / "posteriors" / key[:32]
            write_output_dir(out, write, force=force or in_cache, inputs=_inputs(model, adapter, calibration),
                             flag="the fit cache directory" if in_cache else flag)
            log.info("bayesianize: saved to %s", out)
    dev = default_device() if device is None else torch.device(device)
    if fitted is not None and (parse_dtype(dtype) or default_dtype(dev)) == parse_dtype(fit_dtype):
        return fitted
    del fitted  # loaded as a later start loads it: a float32 model cast with .to() would also cast
    # buffers that loading in the serving dtype keeps in float32 (e.g. the rotary inv_freq)
    return Posterior.load(load_base_model(model, device=device, dtype=dtype), out)


def check_bayesianize(model, adapter, calibration, config: SearchConfig, *, sigma: float | None = None,
                      out=None, cache=None, force: bool = False, device=None, fit_dtype: str = FIT_DTYPE,
                      flag: str = "--out", plain_only: bool = False):
    """What :func:`bayesianize` checks before any model loads, each failure one line naming the
    flag: the base model, the adapter directory, the calibration file and its labels
    (:func:`check_calibration`), the output directory (``plain_only``: of these, only the model
    and the adapter when the adapter is already Bayesianized). Returns the calibration items (None
    without a file), the directory to write (None: nothing is written) and the fit's key (None
    without ``cache``)."""
    from .adapter import check_adapter_dir
    from .artifacts import check_output_dir, stored_key
    from .data import read_jsonl
    from .fit import check_calibration
    from .models import check_model

    if sigma is not None and not sigma >= 0:
        raise TFBError(f"--sigma must be >= 0, got {sigma}")
    try:
        check_model(model)
    except TFBError as e:
        raise TFBError(f"--model: {e}") from None
    check_adapter_dir(adapter, "--adapter")
    if plain_only and Posterior.is_bayesianized(adapter):
        if calibration is not None:
            log.warning("%s is already Bayesianized: --calibration is ignored", adapter)
        return None, None, None
    if sigma is None and calibration is None:
        if plain_only:  # a server: no --sigma there
            raise TFBError(f"--adapter {adapter} is a plain LoRA adapter (no tfb_config.json): pass --calibration "
                           f"FILE to run the variance search at start-up, or Bayesianize it first with "
                           f"'tfb bayesianize'")
        raise TFBError("--calibration FILE is required unless --sigma is given")
    if calibration is not None and not Path(calibration).expanduser().is_file():
        raise TFBError(f"--calibration {calibration}: no such file")
    key = None if cache is None else fit_key(model, adapter, calibration, config, sigma=sigma, device=device,
                                             fit_dtype=fit_dtype)
    if out is None and cache is not None:
        out = Path(cache).expanduser() / "posteriors" / key[:32]  # tfb's own: replaced at will
    elif out is not None:
        out = Path(out).expanduser()
        if key is None or not (out.is_dir() and stored_key(out) == key):  # a result for these inputs is loaded
            check_output_dir(out, force=force, inputs=_inputs(model, adapter, calibration), flag=flag)
    items = None
    if calibration is not None:
        items = read_jsonl(Path(calibration).expanduser())
        check_calibration(items, calibration, config, sigma=sigma)
    return items, out, key


def _inputs(model, adapter, calibration) -> list[tuple[str, object]]:
    """What bayesianize reads, never written over."""
    return [("--adapter", adapter), ("--calibration", calibration), ("--model", model)]


def describe(items, calibration, config: SearchConfig, sigma, fit_dtype: str) -> str:
    """One line on what a fit fits: the items and their file, the criterion (its tolerance when it
    has one) or the given sigma, K and the dtype."""
    from .fit import resolve_criterion

    if items is None:
        return f"sigma {sigma:g} as given, no calibration items, in {fit_dtype}"
    crit = resolve_criterion(config.criterion, items)
    how = f"sigma {sigma:g} as given" if sigma is not None else f"criterion {crit.value}" + (
        f" <= {config.eps:g}" if crit in (Criterion.NLL, Criterion.ACCURACY) else "")
    return f"{len(items)} calibration items from {calibration}, {how}, K={config.num_samples}, in {fit_dtype}"


def _fit(model, adapter, items, config: SearchConfig, sigma, device, fit_dtype: str, progress: bool):
    from .models import load_base_model

    base = load_base_model(model, device=device, dtype=fit_dtype)
    post = Posterior.from_adapter(base, adapter, num_samples=config.num_samples, seed=config.seed, mode=config.mode,
                                  chat=config.chat, length_normalize=bool(config.length_normalize),
                                  stochastic_layers=config.stochastic_layers)
    if items is None:
        post.sigma = sigma
    else:  # with a given sigma too: the mode, T, the confidence and the held-out calibration are fitted
        result = post.fit(items, config, sigma=sigma, progress=progress)
        log.info("bayesianize: sigma = %.6g after %d evaluations", result.sigma, len(result.trace))
    return post


def fit_key(model, adapter, calibration, config: SearchConfig, *, sigma: float | None = None, device=None,
            fit_dtype: str = FIT_DTYPE) -> str:
    """sha256 over everything a fit's result depends on: the base model, the adapter files, the
    calibration file, every :class:`SearchConfig` field (``asdict``: a new field is in the key
    without anyone listing it), a given sigma, and where the fit runs (``fit_dtype``, the device
    type). The dtype the result is served in is not in it.

    The base model is hashed by its config and, per weight file, its name, size and the sha256 of
    its first and last MiB (a full hash of a multi-GB model would slow every start-up).
    """
    from .artifacts import sha256_head_tail
    from .models import default_device, resolve_model_dir

    model_dir, adapter = resolve_model_dir(model), Path(adapter).expanduser()
    h = hashlib.sha256()
    config_file = model_dir / "config.json"
    h.update(b"model\0" + (config_file.read_bytes() if config_file.is_file() else b""))
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode() + sha256_head_tail(f))
    for f in sorted(p for p in adapter.iterdir() if p.is_file() and p.name.startswith("adapter_")):
        h.update(f"adapter\0{f.name}\0".encode() + sha256_file(f).encode())
    if calibration is not None:
        h.update(b"calibration\0" + sha256_file(Path(calibration).expanduser()).encode())
    where_ = torch.device(device).type if device is not None else default_device().type
    fit = {"config": asdict(config), "sigma": sigma, "dtype": str(fit_dtype), "device": where_}
    h.update(json.dumps(fit, sort_keys=True, default=str).encode())
    return h.hexdigest()
