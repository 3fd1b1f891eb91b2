"""Server settings: every ``tfb serve`` flag, also read from ``TFB_<NAME>`` environment variables.

Read once at start-up (``Settings()`` in the CLI, or passed to :func:`server.app.build_app`);
nothing reads the environment later. A command-line flag wins over its environment variable.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tfb_core import Criterion, Mode, SearchConfig, TFBError


def _search(name: str, **constraints):
    """A start-up search setting: its default and help are :class:`SearchConfig`'s."""
    return Field(SearchConfig.default(name), description="start-up search: " + SearchConfig.help(name),
                 **constraints)


class Settings(BaseSettings):
    """What the server loads and how it batches, limits and protects requests."""

    # populate_by_name: a field with a public name (its flag and variable) is also set by its own name
    model_config = SettingsConfigDict(env_prefix="TFB_", extra="ignore", frozen=True, populate_by_name=True)

    # what to serve ---------------------------------------------------------------------------
    model: str | None = Field(None, description="base model: a Hugging Face directory or a built-in "
                              "name; default: the built-in demo's (smollm2-135m)")
    adapter: Path | None = Field(None, description="a Bayesianized adapter directory (loaded) or a plain "
                                 "LoRA directory (needs --calibration); default: the built-in demo")
    calibration: Path | None = Field(None, description="calibration JSONL: run the variance search at "
                                     "start-up for a plain LoRA adapter")
    served_model_name: str | None = Field(None, min_length=1, max_length=256, pattern=r"^\S+$",
                                          description="the model id the API reports (/v1/models, each "
                                          "response's model, the metrics' model label) and requests must "
                                          "name (vLLM's flag); default: the base model's name plus the "
                                          "adapter's, e.g. smollm2-135m+post; the built-in demo: tfb-demo")
    posterior_out: Path | None = Field(None, description="where the start-up search saves its result: a "
                                       "new or empty directory, or one holding that search's result for these "
                                       "inputs, loaded instead of searching again (default: a cache directory "
                                       "keyed by the inputs' hashes)")
    force: bool = Field(False, description="let the start-up search replace a --posterior-out that holds "
                        "another tfb output (never a directory holding anything else, an input, or the "
                        "current directory)")
    samples: int | None = Field(None, ge=1, description="K weight samples per answer unless a request asks "
                                "otherwise (default: the posterior's, 10 unless tfb bayesianize was told "
                                "otherwise; prediction sets are calibrated at that K)")
    max_samples: int = Field(64, ge=1, description="the largest num_samples a request may ask for")
    device: str | None = Field(None, description="cuda, cuda:1, cpu (default: cuda when present)")
    dtype: str | None = Field(None, description="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    # the kind of kernels; users name it --engine and TFB_ENGINE (an alias's variable takes no
    # prefix: "tfb_engine"); "engine" in the code is server/engine/
    engine_kind: Literal["auto", "static", "eager"] = Field(
        "auto", validation_alias=AliasChoices("engine", "tfb_engine"), description="how forwards run: static (Llama family: fused kernels "
        "and CUDA graphs on CUDA for scoring; a static KV cache for generation), eager (HF transformers as is), "
        "auto (static on CUDA when the model supports it, else eager)")
    chat: bool | None = Field(None, description="wrap 'question'/'prompt' in the chat template (default: "
                              "what the posterior records; requests may override)")

    # the start-up search (plain adapter + calibration) ----------------------------------------
    criterion: Criterion = _search("criterion")
    eps: float = _search("eps", gt=0)
    max_acc_drop: float = _search("max_acc_drop", ge=0, lt=1)
    seed: int = _search("seed", ge=0)
    mode: Mode | None = _search("mode")
    length_normalize: bool | None = _search("length_normalize")
    gold_labels: bool = _search("gold_labels")
    holdout: float | None = _search("holdout", ge=0, lt=1)
    stochastic_layers: str | int = _search("stochastic_layers")

    # prediction sets and abstention (a posterior with a held-out calibration) ------------------
    coverage: float | None = Field(None, gt=0, lt=1, description="/v1/choices prediction sets' default "
                                   "coverage (default: the posterior's, 0.9)")
    max_risk: float | None = Field(None, gt=0, lt=1, description="abstain unless the confidence is above "
                                   "the threshold certified for this error rate (default: the posterior's)")
    abstain_on_set: bool = Field(False, description="also abstain when the default-coverage prediction set "
                                 "holds more than one choice (default: what the posterior records)")

    # HTTP ------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on every endpoint but "
                                "/health; prefer TFB_API_KEY or --api-key-file: other local users can read a "
                                "flag's value (ps, /proc/PID/cmdline)")
    api_key_file: Path | None = Field(None, description="read the API key from this file (surrounding "
                                      "whitespace stripped; a missing or empty file is a start-up error)")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (none by default)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="the largest request body (413 above it)")
    read_timeout: float = Field(30.0, gt=0, description="seconds a client has to send a whole request (head and "
                                "body) from its connection or its previous response; a slower one gets 408 and "
                                "its connection is closed")
    stream_stall_timeout: float = Field(30.0, gt=0, description="seconds a response (a stream's included) may "
                                        "wait on a client that reads nothing (its connection's buffers full); "
                                        "then it is cut, its work dropped (a stream's KV rows freed), counted as "
                                        "status stalled in tfb_requests_total")
    max_items: int = Field(64, ge=1, description="the most items in one /v1/choices request")
    max_choices: int = Field(64, ge=2, description="the most choices of one /v1/choices item (sequence "
                             "mode runs one row per choice x K)")
    max_item_tokens: int | None = Field(None, ge=1, description="the most padded tokens one /v1/choices "
                                        "item may need: rows (choices x K in sequence mode, K in letter "
                                        "mode) x its longest row; a larger item gets 400 (default: "
                                        "max_batch_tokens, so no forward exceeds that budget; set it "
                                        "higher to let bigger items run alone)")
    max_kv_rows: int = Field(2048, ge=1, description="the most KV cache rows (sequences x K, in rows of every "
                             "layer: with --stochastic-layers L of N a sequence counts (N - L + L x K) / N) "
                             "generation holds at once; a request needing more gets 400, one that fits later "
                             "waits in the queue")
    show_paths: bool = Field(False, description="show the adapter's and base model's local paths in "
                             "/v1/models, /v1/posterior and tfb_model_info (default: names and hashes only)")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="log level")
    access_log: bool = Field(True, description="log one INFO line per request: method, path, status, "
                             "latency, items and K")

    # batching --------------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, description="the most items in one forward")
    max_batch_tokens: int = Field(16384, ge=1, description="the most padded token rows x length in one "
                                  "forward (prompt tokens x K); an item larger than this (allowed by "
                                  "max_item_tokens) runs alone")
    max_wait_ms: float = Field(0.0, ge=0, description="how long the scheduler waits for more work before it runs "
                               "a batch (0: at once; work that arrives during a forward joins the next batch)")
    admit_ratio: float = Field(0.0, ge=0, description="while sequences are being generated, new generation "
                               "requests join them in groups: once this many times the running sequences wait "
                               "(a prefill forward costs about one decode step however few prompts it runs), "
                               "or --admit-wait-ms passed; 0 (default): each joins at the next step")
    admit_wait_ms: float = Field(100.0, ge=0, description="the longest a generation request waits to join "
                                 "running sequences in a group (see --admit-ratio)")
    max_queue: int = Field(256, ge=1, description="the most items waiting; more get 429")
    engine_process: bool = Field(True, description="run the model, its scheduler and its decode loop in a "
                                 "process of their own, apart from HTTP, tokenizing and streaming (each then "
                                 "has a Python interpreter lock of its own); --no-engine-process: all in one "
                                 "process. Ray Serve replicas always run their engine in-process")
    request_timeout: float = Field(300.0, gt=0, description="seconds before a request fails (504) "
                                   "and its work is dropped")
    threads: int | None = Field(None, ge=1, description="torch's CPU threads where the model runs (default: the "
                                "cores this process may run on, os.sched_getaffinity; with --engine-process "
                                "the API process keeps 1); docs/operations.md has timings on an idle and a "
                                "loaded CPU")

    @classmethod
    def public_name(cls, name: str) -> str:
        """The name users type for field ``name``: its flag is ``--`` and this with dashes, its
        variable ``TFB_`` and this in capitals."""
        alias = cls.model_fields[name].validation_alias
        return alias.choices[0] if isinstance(alias, AliasChoices) else name

    def given(self, name: str) -> bool:
        """Whether ``name`` was set (a flag, a ``TFB_*`` variable, an argument), not defaulted."""
        return name in self.model_fields_set

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_key", "model", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @field_validator("stochastic_layers")
    @classmethod
    def _layers(cls, v):
        try:  # "all" or an int >= 1 ("4" from a flag or TFB_STOCHASTIC_LAYERS): SearchConfig's check
            return SearchConfig(stochastic_layers=v).stochastic_layers
        except TFBError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="before")
    @classmethod
    def _read_api_key_file(cls, data):
        """--api-key-file: the key is read here, once; ``api_key`` then holds it."""
        path = data.get("api_key_file") if isinstance(data, dict) else None
        if path in (None, ""):
            return data
        if data.get("api_key") not in (None, ""):
            raise ValueError("give the API key once: --api-key / TFB_API_KEY or --api-key-file / "
                             "TFB_API_KEY_FILE, not both")
        try:
            key = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file {path}: cannot read it: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--api-key-file {path}: not a text file") from None
        if not key:
            raise ValueError(f"--api-key-file {path} is empty: write the key into it")
        return {**data, "api_key": key}

    @model_validator(mode="after")
    def _check(self):
        if self.samples is not None and self.samples > self.max_samples:
            raise ValueError(f"samples ({self.samples}) must be <= max_samples ({self.max_samples})")
        if self.model is not None and self.adapter is None:
            raise ValueError("--model needs --adapter (a Bayesianized or LoRA adapter directory)")
        return self

    def search_config(self) -> SearchConfig:
        """The start-up search's :class:`SearchConfig` (the rest at its defaults)."""
        return SearchConfig(criterion=self.criterion, eps=self.eps, max_acc_drop=self.max_acc_drop,
                            num_samples=self.samples or SearchConfig.default("num_samples"), seed=self.seed, mode=self.mode,
                            length_normalize=self.length_normalize, gold_labels=self.gold_labels,
                            chat=bool(self.chat), holdout=self.holdout,
                            coverage=self.coverage or SearchConfig.default("coverage"),
                            max_risk=self.max_risk or SearchConfig.default("max_risk"),
                            abstain_on_set=self.abstain_on_set, stochastic_layers=self.stochastic_layers)

    @property
    def torch_threads(self) -> int:
        """torch's intra-op threads for the process that runs the model: ``--threads``, else the cores
        this process may run on (a container's or ``taskset``'s share, not the machine's count)."""
        if self.threads is not None:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # no affinity masks (macOS)
            return max(1, os.cpu_count() or 1)

    @property
    def is_demo(self) -> bool:
        return self.adapter is None

    @property
    def item_token_limit(self) -> int:
        """The most padded tokens (rows x longest row) one /v1/choices item may need."""
        return self.max_item_tokens or self.max_batch_tokens


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given (``tfb serve``'s), then ``TFB_*`` variables, then defaults; read once."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and k != "log_level"}
    if hasattr(args, "serve_log_level"):
        given["log_level"] = args.serve_log_level
    try:
        return Settings(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        where = f"--{field.replace('_', '-')} / TFB_{field.upper()}: " if field else ""
        raise TFBError(where + err["msg"].removeprefix("Value error, ")) from None
