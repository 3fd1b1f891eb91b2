"""tfb on Ray Serve: the same FastAPI app (``build_app``), one replica per GPU, behind Ray's proxy.

Start it with ``tfb serve --ray --replicas N`` (or ``--autoscale MIN:MAX``), or with

    serve run server.ray_serve:app replicas=2          # settings from TFB_* as for tfb serve

How tfb's semantics map onto Ray's:

- start-up: the model loads in the replica's constructor, so Ray routes nothing to a replica
  until it has loaded (or searched); a failed load raises with tfb's one-line reason, which Ray
  reports as the deployment's status message.
- the start-up variance search runs once: the loader takes a file lock in the cache
  directory; the first replica searches and saves, the others wait and
  then load its result (the search cache). Across nodes the cache directory must be shared
  (or Bayesianize first with ``tfb bayesianize`` and serve the result).
- health: Ray's replica health check (``check_health``) is tfb's readiness (status ready).
- shutdown: Ray stops routing to the replica and waits for its ongoing requests (streams
  included) up to ``graceful_shutdown_timeout_s`` (tfb's request timeout + 30 s); then the
  app's lifespan drains tfb's engine (status draining, in-flight work finished) and stops.
- autoscaling on ongoing requests per replica: ``target_ongoing_requests`` is tfb's
  ``max_batch_size`` (one full batch per replica is where batching pays off) and
  ``max_ongoing_requests`` is twice that (one batch in the forward, one forming); requests
  beyond it wait in Ray's router, not in tfb's queue, so they can go to a new replica.
- metrics: each replica serves its own ``tfb_*`` registry on a port of its own (the
  ``metrics_port`` base + the replica's rank on its node, or any free port with base 0) and
  writes a Prometheus ``file_sd`` target file with a ``replica`` label into
  ``<TFB_CACHE_DIR>/prometheus_targets/`` (removed at shutdown). Why not Ray's metrics
  export: it renames every metric (``ray_`` prefix), exports counters also as gauges and needs
  each histogram re-declared through ``ray.util.metrics``; a per-replica scrape target keeps
  the exact exposition that ``tfb serve`` has, so the dashboard, alerts and KEDA queries are
  the same for one server and for N replicas (on Kubernetes a PodMonitor scrapes the port).
- determinism: the weight samples depend on (seed, k, module) only, so any replica gives the
  same probabilities for the same request and seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import ray
from ray import serve

from tfb_core import TFBError

from . import loader
from .settings import Settings

log = logging.getLogger(__name__)

DEPLOYMENT = "tfb"
REPLICA_HEADER = "x-tfb-replica"
TARGETS_DIR = "prometheus_targets"
# environment variables the replicas need to see as the driver does (a remote cluster's workers
# do not inherit the driver's environment)
FORWARDED_ENV = ("TFB_", "HF_", "TRANSFORMERS_")


# --- the deployment -----------------------------------------------------------------------------


@serve.ingress()  # the FastAPI app is built in the replica (__serve_build_asgi_app__)
class TFBReplica:
    """One tfb server (model, engine, metrics) in one Ray Serve replica."""

    async def __init__(self, settings: Settings, metrics_port: int = 0):
        from .app import build_app
        from .lifecycle import freeze_heap

        logging.getLogger().setLevel(settings.log_level.upper())
        ctx = serve.get_replica_context()
        self.tfb_name = ctx.replica_tag
        loaded = await asyncio.to_thread(load_or_raise, settings)  # raises with tfb's one-line reason
        # the replica loaded the model here: its engine runs in this process
        self.tfb_app = build_app(settings.model_copy(update={"engine_process": False}),
                                 load=lambda s, set_status: loaded)
        self.tfb_state = self.tfb_app.state.tfb
        self.tfb_state.on_ready = freeze_heap  # one model for the replica's life
        router = self.tfb_app.router
        router.lifespan_context = _ready_and_drain(router.lifespan_context, self.tfb_state)
        self.tfb_app.add_middleware(ReplicaHeader, name=self.tfb_name)
        self.tfb_metrics = MetricsTarget(self.tfb_state.metrics.registry, self.tfb_name, metrics_port,
                                         getattr(ctx.rank, "local_rank", 0))

    def __serve_build_asgi_app__(self):
        return self.tfb_app

    async def check_health(self) -> None:
        """Ray's health check is tfb's readiness: failing it makes Ray replace the replica."""
        if self.tfb_state.status not in ("ready", "draining"):
            raise RuntimeError(f"tfb replica {self.tfb_name} is {self.tfb_state.status}"
                               + (f": {self.tfb_state.detail}" if self.tfb_state.detail else ""))

    def __del__(self):
        metrics = getattr(self, "tfb_metrics", None)
        if metrics is not None:
            metrics.close()


def load_or_raise(settings: Settings) -> loader.Loaded:
    """``loader.load``; a failure raises with the one line ``tfb serve`` prints.

    A start-up search (plain adapter + calibration) runs once: the loader takes a file lock in
    the cache directory, so replicas sharing it wait for the first one's search and then load
    its result.
    """
    try:
        return loader.load(settings)
    except BaseException as e:
        reason = str(e) if isinstance(e, (ValueError, TFBError)) else f"{type(e).__name__}: {e}"
        raise RuntimeError("tfb start-up failed: " + " ".join(reason.split())) from None


def _ready_and_drain(inner, state):
    """The app's lifespan, which also waits for readiness at start and drains at stop."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with inner(app) as value:
            while state.status not in ("ready", "failed"):  # the preloaded model: moments
                await asyncio.sleep(0.02)
            if state.status == "failed":
                raise RuntimeError(f"tfb start-up failed: {state.detail}")
            yield value
            await drain(state, timeout=state.settings.request_timeout)

    return lifespan


async def drain(state, timeout: float) -> None:
    """tfb's drain: new requests get 503, the engine finishes what it holds (or times out)."""
    state.status = "draining"
    deadline = time.monotonic() + timeout
    while state.engine is not None and not state.engine.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


class ReplicaHeader:
    """Adds ``x-tfb-replica: <replica id>`` to every response (which replica answered)."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class MetricsTarget:
    """This replica's ``tfb_*`` registry on its own port, announced as a file_sd target."""

    def __init__(self, registry, replica: str, base_port: int, local_rank: int):
        from prometheus_client import start_http_server

        from tfb_core import cache_dir

        port = base_port + local_rank if base_port else 0
        self.server, self.thread = start_http_server(port, addr="0.0.0.0", registry=registry)
        self.port = self.server.server_port
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.file = cache_dir() / TARGETS_DIR / f"{replica}.json"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        target = [{"targets": [self.address], "labels": {"replica": replica, "deployment": DEPLOYMENT}}]
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(target))
        tmp.replace(self.file)  # Prometheus never reads half a file
        log.info("replica %s: tfb_* metrics on http://%s/metrics (target file %s)", replica, self.address,
                 self.file)

    def close(self) -> None:
        self.file.unlink(missing_ok=True)
        self.server.shutdown()


def targets(directory: Path | None = None) -> dict[str, str]:
    """{replica: host:port} from the target files (what Prometheus' file_sd sees)."""
    from tfb_core import cache_dir

    directory = directory or cache_dir() / TARGETS_DIR
    out = {}
    for f in sorted(directory.glob("*.json")):
        for group in json.loads(f.read_text()):
            out[group["labels"]["replica"]] = group["targets"][0]
    return out


# --- building the application -----------------------------------------------------------------


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1."""
    lo, sep, hi = str(text).partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi)
    except ValueError:
        lo_i = hi_i = -1
    if not sep or lo_i < 0 or hi_i < max(1, lo_i):
        raise TFBError(f"--autoscale {text}: expected MIN:MAX with 0 <= MIN <= MAX and MAX >= 1 (e.g. 1:4)")
    return lo_i, hi_i


def uses_gpu(settings: Settings, cluster_gpus: float) -> bool:
    """GPU replicas unless ``--device cpu`` or the cluster has no GPU."""
    if settings.device and settings.device.startswith("cpu"):
        return False
    if settings.device and settings.device.startswith("cuda"):
        if not cluster_gpus:
            raise TFBError(f"--device {settings.device}: the Ray cluster has no GPU")
        return True
    return cluster_gpus > 0


def check_capacity(settings: Settings, replicas: int, num_cpus: float = 1, wait_s: float = 0.0) -> bool:
    """Whether replicas take GPUs; a clear error when the cluster has fewer than asked.

    One replica per GPU; a CPU replica takes ``num_cpus``. ``wait_s``: how long to wait for the
    resources to appear (a Kubernetes cluster whose worker pods are still starting).
    """
    deadline = time.monotonic() + wait_s
    while True:
        res = ray.cluster_resources()
        try:
            gpu = uses_gpu(settings, res.get("GPU", 0))
            kind, need = ("GPU", replicas) if gpu else ("CPU", replicas * num_cpus)
            have = res.get(kind, 0)
            if need <= have:
                return gpu
            error = TFBError(f"{replicas} replicas need {need:g} {kind}s ({'one' if gpu else f'{num_cpus:g}'} "
                             f"each) but the Ray cluster has {have:g}: ask for fewer replicas, or add nodes")
        except TFBError as e:
            error = e
        if time.monotonic() >= deadline:
            raise error
        time.sleep(1)


def deployment_options(settings: Settings, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       gpu: bool = False, num_cpus: float = 1) -> dict:
    """The Ray Serve deployment options for these settings (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    actor = {"num_gpus": 1} if gpu else {"num_cpus": num_cpus}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    opts = dict(
        name=DEPLOYMENT,
        ray_actor_options=actor,
        max_ongoing_requests=2 * settings.max_batch_size,
        health_check_period_s=5,
        health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=0.2,
        graceful_shutdown_timeout_s=settings.request_timeout + 30,
        max_constructor_retry_count=3,  # a failed load is usually not transient: report it soon
    )
    if autoscale is not None:
        lo, hi = autoscale
        opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                      "target_ongoing_requests": settings.max_batch_size}
    else:
        opts["num_replicas"] = replicas
    return opts


def build(settings: Settings, replicas: int = 1, autoscale: tuple[int, int] | None = None,
          metrics_port: int = 0, num_cpus: float = 1, wait_for_resources_s: float = 0.0):
    """The Ray Serve application (``serve.run(build(...))``); checks capacity first."""
    loader.preflight(settings)  # bad paths fail here, before any replica loads
    if replicas < 1:
        raise TFBError(f"--replicas {replicas}: must be >= 1")
    # autoscaling starts at MIN (at least 1); replicas above what the cluster holds now wait for
    # the Ray autoscaler (KubeRay) to add nodes
    need = max(autoscale[0], 1) if autoscale else replicas
    gpu = check_capacity(settings, need, num_cpus, wait_for_resources_s)
    if autoscale and autoscale[1] > need:
        have = ray.cluster_resources().get("GPU" if gpu else "CPU", 0) / (1 if gpu else num_cpus)
        if autoscale[1] > have:
            log.warning("--autoscale %d:%d: the cluster holds %d replicas now; more wait for the Ray "
                        "autoscaler to add nodes", autoscale[0], autoscale[1], int(have))
    opts = deployment_options(settings, replicas, autoscale, gpu, num_cpus)
    return serve.deployment(TFBReplica).options(**opts).bind(settings, metrics_port)


def app(args: dict | None = None):
    """The application builder for ``serve run server.ray_serve:app [key=value ...]``.

    Settings come from ``TFB_*`` as for ``tfb serve``. Arguments: ``replicas=N``,
    ``autoscale=MIN:MAX``, ``metrics_port=P`` (base port; 0: any free port), ``num_cpus=C``
    (per CPU replica), ``wait_for_resources_s=S``.
    """
    args = dict(args or {})
    known = {"replicas", "autoscale", "metrics_port", "num_cpus", "wait_for_resources_s"}
    if set(args) - known:
        raise TFBError(f"unknown arguments {sorted(set(args) - known)}; known: {sorted(known)}")
    from argparse import Namespace

    from .settings import settings_from_args

    if not ray.is_initialized():  # serve run builds the app before it connects; connect as it would
        ray.init(address=os.environ.get("RAY_ADDRESS"), namespace="serve")
    return build(settings_from_args(Namespace()), replicas=int(args.get("replicas", 1)),
                 autoscale=parse_autoscale(args["autoscale"]) if args.get("autoscale") else None,
                 metrics_port=int(args.get("metrics_port", 0)), num_cpus=float(args.get("num_cpus", 1)),
                 wait_for_resources_s=float(args.get("wait_for_resources_s", 0)))


# --- tfb serve --ray ------------------------------------------------------------------------------


def run(settings: Settings, replicas: int = 1, autoscale: tuple[int, int] | None = None,
        metrics_port: int = 0) -> int:
    """``tfb serve --ray``: start (or join, with RAY_ADDRESS) a Ray cluster, serve until SIGTERM."""
    import signal
    import threading

    ray.init(logging_level=logging.WARNING, include_dashboard=False)
    try:
        application = build(settings, replicas, autoscale, metrics_port)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application, name=DEPLOYMENT, route_prefix="/")
        except RuntimeError as e:
            raise TFBError(deployment_failure(DEPLOYMENT) or one_line(str(e))) from None
        log.info("ready: %s replicas behind http://%s:%d (Ray Serve)", autoscale or replicas, settings.host,
                 settings.port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1):
            pass
        log.info("stopping: draining the replicas (in-flight requests and streams finish)")
        serve.shutdown()
        return 0
    finally:
        ray.shutdown()


def deployment_failure(app_name: str) -> str | None:
    """tfb's one-line reason for a failed deployment, from Ray's status (``serve status``)."""
    status = serve.status().applications.get(app_name)
    for deployment in (status.deployments.values() if status else ()):
        if "tfb start-up failed:" in (deployment.message or ""):
            return one_line(deployment.message)
    return None


def one_line(message: str) -> str:
    """tfb's one-line reason out of Ray's deployment-failure message, else its last line."""
    for line in reversed(message.splitlines()):
        if "tfb start-up failed:" in line:
            return line[line.index("tfb start-up failed:"):].strip()
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    return lines[-1] if lines else message

