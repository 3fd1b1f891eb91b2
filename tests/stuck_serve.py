"""``tfb serve`` with a route that holds the event loop, for tests/test_server_cli.py: run as
``python tests/stuck_serve.py serve ARGS``. The real CLI; ``GET /hold`` sleeps an hour on the
event loop (as a CPU-bound search on it once did), and a stuck loop is declared after 2 s."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server.app as app_module  # noqa: E402
import server.cli as cli  # noqa: E402

real_build_app = app_module.build_app


def build_app(settings=None, *args):
    app = real_build_app(settings, *args)

    @app.get("/hold")
    async def hold():
        time.sleep(3600)

    return app


if __name__ == "__main__":
    cli.LOOP_STUCK_S = 2.0
    app_module.build_app = build_app
    sys.exit(cli.main())
