"""Start-up: what ``tfb serve`` loads, and the cache of start-up variance searches.

- no ``--adapter``: the built-in demo (``tfb_core.demo``: SmolLM2-135M-Instruct and the
  posterior shipped with tfb).
- a Bayesianized directory: loaded (checksums verified by tfb_core).
- a plain LoRA directory plus ``--calibration``: the variance search runs in float32 whatever
  ``--dtype`` is (docs/method.md §4: in bf16 rounding alone moves the criterion); its result is saved
  to ``--posterior-out`` or ``<cache>/posteriors/<key>``, where the key hashes the base model,
  the adapter, the calibration file, the search settings and where the search ran (float32, the
  device type); a restart with the same inputs loads it instead of searching again. Either way
  the result is then loaded in the serving dtype, so a search and a restart serve the same
  model. The serving dtype is not in the key: the saved posterior is the same for every dtype.
  ``--posterior-out`` follows the rule of every tfb output directory (``tfb_core.artifacts``):
  new or empty, or holding a previous tfb output with ``--force``; never an input or the current
  directory; a directory holding this search's result for the same inputs is loaded. Servers
  that share the cache directory (Ray Serve replicas, Kubernetes pods on one volume) search one
  at a time under a file lock in ``<cache>/locks``: the first searches, the
  others wait and then load its result.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tfb_core import DEMO_MODEL
from tfb_core import SERVE_KEY_NAME
from tfb_core import TFBError

from .settings import Settings

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 10  # K of a start-up search when --samples is not given
SEARCH_DTYPE = "float32"  # docs/method.md §4


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

    @classmethod
    def of(cls, loaded: Loaded, copy_tokenizer: bool = True) -> "ServedModel":
        """``copy_tokenizer``: a copy of the posterior's (one fast tokenizer used from two threads at
        once fails, "Already borrowed"); False when this one is sent to another process anyway."""
        from tfb_core import max_context

        post = loaded.post
        weight = next(post.model.parameters())
        tokenizer = copy.deepcopy(post.tokenizer) if copy_tokenizer else post.tokenizer
        return cls(loaded.model_id, loaded.adapter, loaded.source, tokenizer, post.config,
                   post.sigma, max_context(post.model), post.base.name, str(weight.device),
                   str(weight.dtype).removeprefix("torch."))

    @property
    def temperature(self) -> float:
        return temperature(self.config)

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
    """Cheap checks before binding the port: bad paths and an unknown model fail at once with one
    clear line, before the engine starts."""
    from tfb_core import check_adapter_dir
    from tfb_core import check_model
    from tfb_core import is_bayesianized

    if settings.adapter is None:
        return
    if settings.model is not None:
        try:
            check_model(settings.model)
        except TFBError as e:
            raise TFBError(f"--model: {e}") from None
    adapter = Path(settings.adapter).expanduser()
    if not adapter.is_dir():
        raise TFBError(f"--adapter {adapter}: no such directory")
    check_adapter_dir(adapter, "--adapter")
    if is_bayesianized(adapter):
        if settings.calibration is not None:
            log.warning("%s is already Bayesianized: --calibration is ignored", adapter)
        return
    if settings.calibration is None:
        raise TFBError(f"--adapter {adapter} is a plain LoRA adapter (no tfb_config.json): pass "
                       f"--calibration FILE to run the variance search at start-up, or Bayesianize it "
                       f"first with 'tfb bayesianize'")
    if not Path(settings.calibration).expanduser().is_file():
        raise TFBError(f"--calibration {settings.calibration}: no such file")
    if settings.posterior_out is not None:
        _check_posterior_out(settings, adapter)


def _check_posterior_out(settings: Settings, adapter: Path) -> None:
    """``--posterior-out`` holds the result for these very inputs (it is loaded), or the start-up
    search may write it (``tfb_core.artifacts``' rule)."""
    from tfb_core import check_output_dir

    out = Path(settings.posterior_out).expanduser()
    stored = _stored_key(out) if out.is_dir() else None
    if stored is not None and stored == _key(settings, adapter):
        return
    check_output_dir(out, force=settings.force, inputs=_inputs(settings), flag="--posterior-out")


def _inputs(settings: Settings) -> list[tuple[str, Path | str | None]]:
    """What ``tfb serve`` reads, never written over."""
    return [("--adapter", settings.adapter), ("--calibration", settings.calibration), ("--model", settings.model)]


def load(settings: Settings, set_status: Callable[[str], None] = lambda s: None) -> Loaded:
    """Load (or search, then save) the posterior that ``settings`` describe."""
    from tfb_core import load_base_model

    preflight(settings)
    if settings.is_demo:
        return _load_demo(settings)
    from tfb_core import Posterior, is_bayesianized

    adapter = Path(settings.adapter).expanduser()
    if not is_bayesianized(adapter):
        return _search_or_cached(settings, adapter, set_status)
    log.info("loading the Bayesianized adapter %s", adapter)
    base = load_base_model(settings.model or DEMO_MODEL, device=settings.device, dtype=settings.dtype)
    return Loaded(Posterior.load(base, adapter), model_id(settings), str(adapter), "loaded")


def _search_or_cached(settings: Settings, adapter: Path, set_status) -> Loaded:
    from tfb_core import cache_dir, load_base_model
    from tfb_core import Posterior, is_bayesianized

    key = _key(settings, adapter)
    out = Path(settings.posterior_out).expanduser() if settings.posterior_out else \
        cache_dir() / "posteriors" / key[:32]
    # tfb's own cache may be replaced (a result without its key: a search that died half-way)
    force, flag = (settings.force, "--posterior-out") if settings.posterior_out else \
        (True, "the start-up search's cache directory")
    # servers sharing the cache directory (Ray replicas, Kubernetes pods) search one at a time:
    # the first searches and saves, the next find its result here
    with _lock(cache_dir() / "locks" / (hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:32] + ".lock")):
        if is_bayesianized(out) and _stored_key(out) == key:
            log.info("start-up search: found its result for these inputs in %s; not searching again", out)
            source = "cached search"
        else:
            set_status("searching")
            _search(settings, adapter, out, key, force, flag)
            source = "searched"
    # served exactly as a restart serves it: a float32 model cast with .to() would also cast
    # buffers that loading in the serving dtype keeps in float32 (e.g. the rotary inv_freq)
    base = load_base_model(settings.model or DEMO_MODEL, device=settings.device, dtype=settings.dtype)
    return Loaded(Posterior.load(base, out), model_id(settings), str(adapter), source)


@contextmanager
def _lock(path: Path):
    """An exclusive file lock (flock), released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _search(settings: Settings, adapter: Path, out: Path, key: str, force: bool, flag: str) -> None:
    """Run the variance search in float32 (docs/method.md §4) and save its result to ``out``."""
    from tfb_core import Criterion, Posterior, check_calibration, fit_posterior, load_base_model, read_jsonl
    from tfb_core import resolve_criterion, write_output_dir

    calibration = Path(settings.calibration).expanduser()
    items = read_jsonl(calibration)
    check_calibration(items, calibration, settings.search_config())
    criterion = resolve_criterion(settings.criterion, items)
    tolerance = f" <= {settings.eps:g}" if criterion in (Criterion.NLL, Criterion.ACCURACY) else ""
    log.info("start-up search: %d calibration items from %s, criterion %s%s, K=%d, in %s (key %s)",
             len(items), calibration, criterion.value, tolerance, settings.samples or DEFAULT_SAMPLES,
             SEARCH_DTYPE, key[:12])
    base = load_base_model(settings.model or DEMO_MODEL, device=settings.device, dtype=SEARCH_DTYPE)
    post = Posterior.from_adapter(base, adapter, num_samples=settings.samples or DEFAULT_SAMPLES, seed=settings.seed,
                                  mode=settings.mode, length_normalize=bool(settings.length_normalize))
    result = fit_posterior(post, items, settings.search_config(), progress=False)
    post.config.chat = bool(settings.chat)
    log.info("start-up search: sigma = %.6g after %d evaluations", result.sigma, len(result.trace))
    log_report(post.config.fit_report)

    def write(tmp: Path) -> None:  # the key with the result, in one rename
        post.write_files(tmp, calibration_file=calibration)
        (tmp / SERVE_KEY_NAME).write_text(json.dumps({"key": key}))

    write_output_dir(out, write, force=force, inputs=_inputs(settings), flag=flag)
    log.info("start-up search: saved to %s (a restart with the same inputs loads it)", out)


def log_report(report: dict | None) -> None:
    """The fitting report's table in the log: a warning when it warns, else info."""
    from tfb_core import FitReport

    if report:
        report = FitReport.from_dict(report)
        log.log(logging.WARNING if report.warnings else logging.INFO, "start-up search:\n%s", report.table())


def resolve_settings(settings: Settings, post) -> Settings:
    """``settings`` with what the loaded posterior decides filled in (K), checked against it."""
    from tfb_core import covers, min_calibration_size

    samples = settings.samples or post.config.num_samples
    if samples > settings.max_samples:
        raise TFBError(f"the posterior's K ({samples}) is above --max-samples ({settings.max_samples}); "
                       f"pass --samples or a larger --max-samples")
    cal = post.config.conformal
    if settings.coverage is not None and cal is not None and not covers(cal.n, settings.coverage):
        raise TFBError(f"--coverage {settings.coverage!r} needs at least "
                       f"{min_calibration_size(settings.coverage)} held-out calibration items; the "
                       f"posterior has {cal.n}")
    return settings.model_copy(update={"samples": samples})


def _key(settings: Settings, adapter: Path) -> str:
    from tfb_core import resolve_model_dir

    return search_key(resolve_model_dir(settings.model or DEMO_MODEL), adapter,
                      Path(settings.calibration).expanduser(), settings)


def search_key(model_dir: Path, adapter: Path, calibration: Path, settings: Settings) -> str:
    """sha256 over the base model, the adapter files, the calibration file, the search settings
    and where the search runs (float32 on the device type).

    The base model is hashed by its config and, per weight file, its name, size and the sha256 of
    its first and last MiB (a full hash of a multi-GB model would slow every start-up). The
    serving dtype is left out: the search runs in float32 whatever it is.
    """
    import torch

    from tfb_core import default_device

    h = hashlib.sha256()
    model_dir = Path(model_dir)
    h.update(b"model\0" + _read(model_dir / "config.json"))
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode() + _ends(f))
    for f in sorted(p for p in adapter.iterdir() if p.is_file() and p.name.startswith("adapter_")):
        h.update(f"adapter\0{f.name}\0".encode() + _sha(f).encode())
    h.update(b"calibration\0" + _sha(calibration).encode())
    search = {k: getattr(settings, k) for k in ("criterion", "eps", "samples", "seed", "mode",
                                                 "gold_labels", "chat", "max_acc_drop", "length_normalize",
                                                 "holdout")}
    config = settings.search_config()
    search["calibration_defaults"] = [config.coverage, config.max_risk]
    search["dtype"] = SEARCH_DTYPE
    search["device"] = torch.device(settings.device).type if settings.device else default_device().type
    h.update(json.dumps(search, sort_keys=True).encode())
    return h.hexdigest()


def _stored_key(directory: Path) -> str | None:
    try:
        return json.loads((directory / SERVE_KEY_NAME).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _sha(path: Path) -> str:
    from tfb_core import sha256_file

    return sha256_file(path)


def _ends(path: Path, n: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        head = f.read(n)
        f.seek(max(0, path.stat().st_size - n))
        tail = f.read(n)
    return hashlib.sha256(head + tail).digest()


# --- the built-in demo ------------------------------------------------------------------------


def _load_demo(settings: Settings) -> Loaded:
    from tfb_core import DEMO_POSTERIOR
    from tfb_core import load_base_model
    from tfb_core import Posterior

    base = load_base_model(DEMO_MODEL, device=settings.device, dtype=settings.dtype)
    log.info("serving the built-in demo: %s + %s", DEMO_MODEL, DEMO_POSTERIOR)
    return Loaded(Posterior.load(base, DEMO_POSTERIOR), model_id(settings), str(DEMO_POSTERIOR), "demo")
