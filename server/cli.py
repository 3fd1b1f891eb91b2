"""The `tfb` console script: tfb_core's commands plus `serve` (registered here).

Every ``serve`` flag is a field of :class:`server.settings.Settings`, so each is also an
environment variable ``TFB_<NAME>``; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import threading
import time
import typing
from pathlib import Path

import uvicorn

from tfb_core.cli import main as core_main
from tfb_core.cli import register_command
from tfb_core import TFBError

log = logging.getLogger("server")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per settings field; defaults are left to Settings (env var, then default)."""
    from .settings import Settings

    for name, info in Settings.model_fields.items():
        public = Settings.public_name(name)
        flag = "--" + public.replace("_", "-")
        dest = "serve_log_level" if name == "log_level" else name  # tfb's own --log-level is global
        kind = _flag_kind(info.annotation)
        help = f"{info.description or ''} [env TFB_{public.upper()}; default {info.get_default(call_default_factory=True)}]"
        kw: dict = dict(dest=dest, default=argparse.SUPPRESS, help=help.strip())
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is list:
            p.add_argument(flag, nargs="*", metavar="ORIGIN", **kw)
        elif isinstance(kind, tuple):
            p.add_argument(flag, choices=kind, **kw)
        else:
            p.add_argument(flag, type=kind, **kw)
    scale = p.add_argument_group("scale out on Ray Serve (needs the scale extra: pip install '.[scale]' in a "
                                 "clone of tfb)")
    scale.add_argument("--ray", action="store_true", help="serve replicas of this server on Ray Serve "
                       "(a local Ray cluster, or the one RAY_ADDRESS names); one replica per GPU")
    scale.add_argument("--replicas", type=int, default=None, help="with --ray: this many replicas [default 1]")
    scale.add_argument("--autoscale", metavar="MIN:MAX", default=None, help="with --ray: autoscale between MIN "
                       "and MAX replicas on ongoing requests per replica (target: --max-batch-size)")
    scale.add_argument("--metrics-port", type=int, default=0, help="with --ray: each replica serves its tfb_* "
                       "metrics on this port + its rank on the node [default 0: any free port]")


def _flag_kind(annotation):
    """bool, list, a tuple of choices, or the scalar type for argparse."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(m.value for m in annotation)
    if annotation is bool:
        return bool
    if typing.get_origin(annotation) is list:
        return list
    if args:  # X | None
        return _flag_kind(args[0])
    return {int: int, float: float, Path: str}.get(annotation, str)


def run_serve(args: argparse.Namespace) -> int:
    # OpenMP threads that wait for work sleep instead of spinning: on a CPU shared with other busy
    # processes a spinning thread takes the core the thread with work needs (docs/operations.md:
    # a short completion on a loaded 2-core machine, 27.5 s spinning, 2.6 s passive). Set before torch
    # loads (here, and in the engine process, which inherits it); a value of the user's stands.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from . import loader
    from .app import build_app
    from .connections import raise_open_file_limit, uvicorn_config
    from .lifecycle import freeze_heap
    from .settings import settings_from_args

    settings = settings_from_args(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    if getattr(args, "ray", False):
        return run_ray(args, settings)
    if getattr(args, "replicas", None) is not None or getattr(args, "autoscale", None) is not None:
        raise TFBError("--replicas and --autoscale need --ray")
    loader.preflight(settings)  # bad paths: one line, exit 2, before the port is bound
    check_port(settings.host, settings.port)  # before the engine starts, not after it loaded
    raise_open_file_limit()
    app = build_app(settings)
    state = app.state.tfb
    config = uvicorn_config(app, settings, log_level=settings.log_level, access_log=settings.log_level == "debug",
                            lifespan="on")
    server = DrainingServer(config, state)
    state.on_fatal = lambda reason: setattr(server, "should_exit", True)
    state.on_ready = freeze_heap
    server.run()
    if state.status == "failed":
        print(f"tfb serve: error: {state.detail}", file=sys.stderr)
        return 1
    return 0


def check_port(host: str, port: int) -> None:
    """A :class:`TFBError` naming ``host:port`` when the server could not listen there (in use,
    not an address of this machine, a privileged port), found by binding it as uvicorn will
    (every address ``host`` resolves to, ``SO_REUSEADDR``), then letting it go."""
    import errno
    import socket

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = set(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    except socket.gaierror as e:
        raise TFBError(f"--host {host} (TFB_HOST): {e.strerror}") from None
    for family, kind, proto, _, address in sorted(infos, key=str):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise TFBError(f"{where} is already in use (another server?): stop it, or choose "
                                   f"another --port / TFB_PORT") from None
                raise TFBError(f"cannot listen on {where}: {e.strerror or e} (--host / TFB_HOST, "
                               f"--port / TFB_PORT)") from None


def run_ray(args: argparse.Namespace, settings) -> int:
    """``tfb serve --ray``: the same settings, served by Ray Serve replicas (server/ray_serve.py)."""
    if args.replicas is not None and args.autoscale is not None:
        raise TFBError("--replicas and --autoscale exclude each other")
    if settings.engine_process and settings.given("engine_process"):
        raise TFBError("--engine-process / TFB_ENGINE_PROCESS does not apply with --ray: each Ray Serve "
                       "replica is a process of its own already, and runs its engine in it")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise TFBError("--ray needs Ray Serve, which is not installed: pip install '.[scale]' in a clone of tfb "
                       "(the scale extra)") from None
    from .ray_serve import parse_autoscale, run

    autoscale = parse_autoscale(args.autoscale) if args.autoscale is not None else None
    return run(settings, args.replicas or 1, autoscale, args.metrics_port)


LOOP_STUCK_S = 10.0  # after a stop signal, an event loop that answers nothing this long is stuck


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM drains: new requests get 503, in-flight ones finish, exit 0.
    Whatever holds the event loop, a stop signal stops the process (:func:`watch_loop`)."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self._watching = False

    def handle_exit(self, sig, frame) -> None:
        if not self._watching:  # a Python signal handler: it runs even while the event loop is held
            self._watching = True
            with contextlib.suppress(RuntimeError):
                threading.Thread(target=watch_loop, args=(asyncio.get_running_loop(),), name="tfb-stop-watch",
                                 daemon=True).start()
        if sig != signal.SIGTERM:
            return super().handle_exit(sig, frame)
        # not recorded in uvicorn's captured signals: it would re-raise SIGTERM at exit
        if self.state.status == "draining":  # a second SIGTERM: stop now
            self.should_exit = True
            return
        log.info("SIGTERM: draining (new requests get 503; finishing those in flight)")
        self.state.status = "draining"
        threading.Thread(target=self._drain, name="tfb-drain", daemon=True).start()

    def _drain(self) -> None:
        while self.state.engine is not None and not self.state.engine.idle:
            time.sleep(0.02)
        self.should_exit = True  # uvicorn then waits for open responses to be sent


def watch_loop(loop: asyncio.AbstractEventLoop) -> None:
    """After a stop signal: ask the event loop to answer, every second; if it answers nothing for
    LOOP_STUCK_S (work holding it, which nothing should do), exit at once without draining, with
    exit code 1, rather than never (the engine process dies with this one)."""
    while True:
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop is closed: the server is exiting anyway
            return
        if not answered.wait(LOOP_STUCK_S):
            log.error("the event loop answered nothing for %g s after the stop signal: exiting without "
                      "draining", LOOP_STUCK_S)
            logging.shutdown()
            os._exit(1)
        time.sleep(1.0)


register_command("serve", "serve the posterior over HTTP (/v1/choices, /metrics, ...)",
                 add_serve_arguments, run_serve)


def main(argv: list[str] | None = None) -> int:
    return core_main(argv)


if __name__ == "__main__":
    sys.exit(main())
