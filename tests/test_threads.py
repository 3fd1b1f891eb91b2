"""CPU threads: ``tfb serve`` sizes torch's threads to the cores it is given (``--threads`` wins)
and lets OpenMP's idle threads sleep rather than spin (docs/operations.md has the timings)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from server.settings import Settings
from server_helpers import start_cli, tiny_posterior, wait_ready


def test_threads_default_to_the_cores_this_process_may_run_on(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert Settings().torch_threads == 3  # the affinity mask (taskset, a container's cpuset), not cpu_count
    assert Settings(threads=1).torch_threads == 1
    with pytest.raises(ValueError, match="threads"):
        Settings(threads=0)


def engine_of(pid: int) -> int:
    """The engine process: the child of ``pid`` that multiprocessing spawned."""
    kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]
    [engine] = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    return engine


@pytest.mark.parametrize("flags,threads", [(["--threads", "1"], 1), ([], len(os.sched_getaffinity(0)))])
def test_serve_sizes_the_engines_threads_and_lets_openmp_sleep(tmp_path, flags, threads):
    base, post = tiny_posterior(tmp_path)
    proc, url = start_cli("--model", str(base), "--adapter", str(post), "--device", "cpu", *flags)
    try:
        wait_ready(url, proc=proc)
        environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{engine_of(proc.pid)}/environ").read_bytes()
                       .split(b"\0") if b"=" in v)
        assert environ[b"OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE").encode()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert f"torch uses {threads} CPU threads" in err
