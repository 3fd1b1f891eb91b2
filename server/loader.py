"""Start-up: what ``tfb serve`` loads.

- no ``--adapter``: the built-in demo (``tfb_core.demo``: SmolLM2-135M-Instruct and the
  posterior shipped with tfb).
- a Bayesianized directory: loaded (checksums verified by tfb_core).
- a plain LoRA directory plus ``--calibration``: :func:`tfb_core.bayesianize` with the
  server's search settings and tfb's cache directory: it fits in float32 whatever ``--dtype``
  is (docs/method.md §4), saves the result to ``--posterior-out`` or into the cache, keyed by
  every input the fit depends on, and loads it in the serving dtype; a restart with the same
  inputs loads it instead of fitting again, and servers sharing the cache directory (Ray Serve
  replicas, Kubernetes pods on one volume) fit one at a time under its file lock.
  ``--posterior-out`` follows the rule of every tfb output directory (``tfb_core.artifacts``).
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tfb_core import DEMO_MODEL
from tfb_core import TFBError

from .settings import Settings

log = logging.getLogger(__name__)
ASSUMED_CONTEXT = 2048  # tokens, for a model whose config gives no context length


@dataclass
class Loaded:
    """The posterior to serve and where it came from."""

    post: object  # tfb_core.posterior.Posterior
    model_id: str
    adapter: str | None
    source: str  # loaded | searched | cached search | demo


@dataclass
class ServedModel:
    """What the API side serves of a loaded posterior: its description and a tokenizer of its
    own, never the weights (the engine holds those, in this process or in its own: the
    engine process sends this one over)."""

    model_id: str
    adapter: str | None
    source: str
    tokenizer: object  # the event loop's copy: the engine decodes with the posterior's own
    config: object  # tfb_core.TFBConfig
    sigma: float
    context: int | None  # the model's context length in tokens
    base_name: str
    device: str
    dtype: str
    kv_rows_by_k: tuple[int, ...]  # [K - 1]: the KV cache rows a sequence of K samples holds

    @classmethod
    def of(cls, loaded: Loaded, max_samples: int, copy_tokenizer: bool = True) -> "ServedModel":
        """``max_samples``: the largest K a request may ask for. ``copy_tokenizer``: a copy of the
        posterior's (one fast tokenizer used from two threads at once fails, "Already
        borrowed"); False when this one is sent to another process anyway."""
        post = loaded.post
        weight = next(post.model.parameters())
        tokenizer = copy.deepcopy(post.tokenizer) if copy_tokenizer else post.tokenizer
        return cls(loaded.model_id, loaded.adapter, loaded.source, tokenizer, post.config,
                   post.sigma, post.context, post.base.name, str(weight.device),
                   str(weight.dtype).removeprefix("torch."),
                   tuple(post.kv_rows(K) for K in range(1, max_samples + 1)))

    def kv_rows(self, num_samples: int) -> int:
        """The KV cache rows one sequence of ``num_samples`` samples holds (``--max-kv-rows``'s
        unit): K, or fewer with the noise in the last L layers only (``Posterior.kv_rows``)."""
        return self.kv_rows_by_k[num_samples - 1]

    @property
    def temperature(self) -> float:
        return temperature(self.config)

    @property
    def context_limit(self) -> int:
        """The context prompts are checked against: the model's, else :data:`ASSUMED_CONTEXT`."""
        return self.context or ASSUMED_CONTEXT

    @functools.cached_property
    def token_bound(self):
        """The fewest tokens a text's characters can take (:class:`server.limits.TokenBound`), worked out once."""
        from .limits import TokenBound

        return TokenBound.of(self.tokenizer)


def temperature(config) -> float:
    """The posterior's temperature, applied to the model average only (docs/method.md §5)."""
    return float(getattr(config, "temperature", 1.0) or 1.0)


def model_id(settings: Settings) -> str:
    """The id the API reports (``/v1/models``) and the metrics' ``model`` label: ``--served-model-name``,
    else ``tfb-demo`` for the built-in demo, else the base model's name plus the adapter's
    (``smollm2-135m+post``: the directories' last parts)."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.is_demo:
        return "tfb-demo"
    return f"{_name(settings.model or DEMO_MODEL)}+{_name(settings.adapter)}"


def _name(value) -> str:
    """A built-in model's name, or a directory's last part (``.`` and a trailing slash resolved)."""
    return Path(value).expanduser().resolve().name or "tfb"


def public_name(value: str | None, show_paths: bool = False) -> str | None:
    """What public endpoints show of a local path: its last part only, unless ``--show-paths``
    (a built-in model name is not a path and is shown as it is)."""
    if value is None or show_paths or not any(c in value for c in "/\\~"):
        return value
    return Path(value).name


def preflight(settings: Settings) -> None:
    """Cheap checks before binding the port: bad paths, an unknown model, a calibration file that
    the search settings cannot use fail at once with one clear line, before the engine starts."""
    if settings.adapter is None:
        return
    _bayesianize(settings, adapter_dir(settings), check_only=True)


def adapter_dir(settings: Settings) -> Path:
    """``--adapter`` as a path; a TFBError when it is not a directory."""
    adapter = Path(settings.adapter).expanduser()
    if not adapter.is_dir():
        raise TFBError(f"--adapter {adapter}: no such directory")
    return adapter


def load(settings: Settings, set_status: Callable[[str], None] = lambda s: None) -> Loaded:
    """Load (or search, then save) the posterior that ``settings`` describe."""
    from tfb_core import Posterior, load_base_model

    if settings.is_demo:
        post = Posterior.demo(device=settings.device, dtype=settings.dtype)
        log.info("serving the built-in demo: %s + %s", post.base.name, post.adapter_path)
        check_fitted_setting(settings, post, "the built-in demo")
        return Loaded(post, model_id(settings), str(post.adapter_path), "demo")
    adapter = adapter_dir(settings)
    if Posterior.is_bayesianized(adapter):
        preflight(settings)  # the model and the adapter (a plain one's inputs are checked by its fit, once)
        log.info("loading the Bayesianized adapter %s", adapter)
        base = load_base_model(settings.model or DEMO_MODEL, device=settings.device, dtype=settings.dtype)
        post = Posterior.load(base, adapter)
        check_fitted_setting(settings, post, f"--adapter {adapter}")
        return Loaded(post, model_id(settings), str(adapter), "loaded")
    searched = []

    def on_fit(what: str) -> None:
        searched.append(True)
        set_status("searching")
        log.info("start-up search: %s", what)

    post = _bayesianize(settings, adapter, on_fit=on_fit)
    if searched and post.config.report is not None:
        report = post.config.report
        log.log(logging.WARNING if report.warnings else logging.INFO, "start-up search:\n%s", report.table())
    return Loaded(post, model_id(settings), str(adapter), "searched" if searched else "cached search")


def check_fitted_setting(settings: Settings, post, what: str) -> None:
    """``--stochastic-layers`` given for a posterior already Bayesianized with another L: its sigma
    was searched for its own noisy set, so the flag cannot change it at serving time."""
    if "stochastic_layers" not in settings.model_fields_set or settings.stochastic_layers == post.stochastic_layers:
        return
    raise TFBError(f"--stochastic-layers {settings.stochastic_layers}: {what} was Bayesianized with "
                   f"stochastic_layers {post.stochastic_layers} (its sigma was searched for those layers); serve it "
                   f"without the flag, or Bayesianize the plain LoRA again with tfb bayesianize --stochastic-layers "
                   f"{settings.stochastic_layers}")


def _bayesianize(settings: Settings, adapter: Path, **kwargs):
    """:func:`tfb_core.bayesianize` with the server's settings: the start-up search, or its result
    for these inputs from tfb's cache (or ``--posterior-out``)."""
    from tfb_core import bayesianize, cache_dir

    calibration = Path(settings.calibration).expanduser() if settings.calibration is not None else None
    return bayesianize(settings.model, adapter, calibration, settings.search_config(), out=settings.posterior_out,
                       cache=cache_dir(), force=settings.force, device=settings.device, dtype=settings.dtype,
                       progress=False, flag="--posterior-out", **kwargs)


def resolve_settings(settings: Settings, post) -> Settings:
    """``settings`` with what the loaded posterior decides filled in (K), checked against it."""
    samples = settings.samples or post.config.num_samples
    if samples > settings.max_samples:
        raise TFBError(f"the posterior's K ({samples}) is above --max-samples ({settings.max_samples}); "
                       f"pass --samples or a larger --max-samples")
    cal = post.config.conformal
    if settings.coverage is not None and cal is not None and not cal.covers(settings.coverage):
        raise TFBError(f"--coverage {settings.coverage!r} needs at least "
                       f"{cal.min_size(settings.coverage)} held-out calibration items; the "
                       f"posterior has {cal.n}")
    return settings.model_copy(update={"samples": samples})
