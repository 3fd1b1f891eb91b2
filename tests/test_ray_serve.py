"""tfb on Ray Serve (server/ray_serve.py): a real local Ray cluster serving the tiny model with
two CPU replicas behind Ray's HTTP proxy.

One cluster for the module (Ray is heavy on a small CPU); the tests run in file order and the
last ones change it (a replica killed, the app deleted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from deploy_helpers import need_modules
from server_helpers import ROOT, bayesianized, free_port

pytestmark = need_modules("ray", why="Ray Serve (the scale extra)")

QUESTION = {"question": "Which gas do plants absorb from the air?", "choices": ["Oxygen", "Carbon dioxide", "Helium"],
            "seed": 7}
APP = "tfb"


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition()`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not after {timeout} s")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.jsonl"
    rows = [{"question": f"Calibration question {i}?", "choices": ["red", "green", "blue"]} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, llama_dir, lora_dir, calibration):
    """Ray (3 logical CPUs), Serve's proxy on a free port, and the tfb app with 2 replicas of a
    plain LoRA + calibration (so the start-up search has to run once for both)."""
    import ray
    from ray import serve

    from server.ray_serve import build
    from server.settings import Settings

    cache = tmp_path_factory.mktemp("raycache")
    old = os.environ.get("TFB_CACHE_DIR")
    os.environ["TFB_CACHE_DIR"] = str(cache)  # the replicas inherit it (and build forwards it)
    ray.init(num_cpus=3, include_dashboard=False, logging_level="warning", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(model=str(llama_dir), adapter=lora_dir, calibration=calibration, device="cpu", samples=4,
                        eps=0.05, max_batch_size=4, log_level="warning")
    serve.run(build(settings, replicas=2), name=APP, route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "cache": cache, "settings": settings,
               "address": ray.get_runtime_context().gcs_address}
    finally:
        serve.shutdown()
        ray.shutdown()
        if old is None:
            os.environ.pop("TFB_CACHE_DIR", None)
        else:
            os.environ["TFB_CACHE_DIR"] = old


def by_replica(url: str, path: str, n: int, body: dict | None = None, workers: int = 4) -> dict[str, list]:
    """Send ``n`` requests (``workers`` at a time); {replica: [json bodies]} from the header."""
    def one(_):
        r = httpx.post(url + path, json=body, timeout=60) if body is not None else httpx.get(url + path, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-tfb-replica"], r.json()

    out: dict[str, list] = {}
    with ThreadPoolExecutor(workers) as pool:
        for replica, data in pool.map(one, range(n)):
            out.setdefault(replica, []).append(data)
    return out


def replica_counter(address: str, endpoint: str) -> float:
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tfb_requests_total{") and f'endpoint="{endpoint}"' in line)


# --- two replicas ---------------------------------------------------------------------------------


def test_the_startup_search_ran_once_for_both_replicas(cluster):
    def both():
        seen = by_replica(cluster["url"], "/v1/posterior", 8)
        return seen if len(seen) == 2 else None

    seen = wait_for(both, 60, "both replicas answering /v1/posterior")
    sources = sorted(v[0]["source"] for v in seen.values())
    assert sources == ["cached search", "searched"]  # one searched, the other waited and loaded it
    sigmas = {v[0]["sigma"] for v in seen.values()}
    assert len(sigmas) == 1 and sigmas.pop() > 0
    saved = [p for p in (cluster["cache"] / "posteriors").iterdir() if p.is_dir()]
    assert len(saved) == 1


def test_requests_reach_both_replicas_and_the_same_seed_gives_the_same_answer(cluster):
    from server.ray_serve import targets

    answers = by_replica(cluster["url"], "/v1/choices", 24, QUESTION)
    assert len(answers) == 2, answers.keys()
    probs = [a["probs"] for replica in answers.values() for a in replica]
    assert all(p == probs[0] for p in probs)  # bit for bit, whichever replica answered
    uncertainty = [a["uncertainty"] for replica in answers.values() for a in replica]
    assert all(u == uncertainty[0] for u in uncertainty)

    # each replica's own tfb_* metrics, at the target Prometheus discovers (file_sd), with its name
    found = targets(cluster["cache"] / "prometheus_targets")
    assert set(found) == set(answers)
    for replica, address in found.items():
        assert replica_counter(address, "/v1/choices") >= len(answers[replica]) > 0


def test_prometheus_scrapes_each_replica_with_its_replica_label(cluster, tmp_path):
    """The target files are Prometheus file_sd: a real Prometheus finds both replicas."""
    import yaml

    from deploy_helpers import Prometheus

    prom = Prometheus(tmp_path, target="unused")  # skips locally without the binary (CI installs it)
    prom.config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "tfb", "file_sd_configs": [
            {"files": [str(cluster["cache"] / "prometheus_targets" / "*.json")], "refresh_interval": "1s"}]}]}))
    with prom:
        ready = prom.wait_for("count(count by (replica) (tfb_ready == 1)) == 2", timeout=60)
        assert ready, prom.log.read_text()[-2000:]
        per_replica = prom.query('sum by (replica) (tfb_requests_total{endpoint="/v1/choices"})')
    assert {s["metric"]["replica"] for s in per_replica} == set(targets_of(cluster))
    assert all(float(s["value"][1]) > 0 for s in per_replica)


def targets_of(cluster) -> dict[str, str]:
    from server.ray_serve import targets

    return targets(cluster["cache"] / "prometheus_targets")


def test_a_streamed_chat_through_the_proxy_equals_the_plain_one(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=cluster["url"] + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, seed=3)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                 seed=3, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3  # token by token, not one buffered body
    assert streamed == plain.choices[0].message.content and streamed


def test_bad_input_fails_before_anything_loads(cluster, llama_dir, lora_dir, tmp_path):
    from server.ray_serve import build, check_capacity
    from server.settings import Settings
    from tfb_core.errors import TFBError

    cpu = Settings(model=str(llama_dir), adapter=lora_dir, device="cpu", calibration=cluster["settings"].calibration)
    # 2 CPUs are taken by the two replicas; 1 is left
    with pytest.raises(TFBError, match=r"^4 replicas need 4 CPUs \(1 each\) but the Ray cluster has 3"):
        build(cpu, replicas=4)
    with pytest.raises(TFBError, match="the Ray cluster has no GPU"):
        check_capacity(Settings(**{**cpu.model_dump(), "device": "cuda"}), 1)

    # the CLI joining this cluster: more replicas than the cluster holds, one line, exit 2, nothing loaded
    env = {**os.environ, "RAY_ADDRESS": cluster["address"], "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--ray", "--replicas", "9", "--device", "cpu",
                          "--model", str(llama_dir), "--adapter", str(lora_dir), "--calibration",
                          str(cpu.calibration), "--port", str(free_port())],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("tfb serve: error: 9 replicas need 9 CPUs (1 each) but the Ray "
                                                   "cluster has 3: ask for fewer replicas, or add nodes")


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, llama_dir, lora_dir):
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")  # as if not installed
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--ray", "--replicas", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("tfb serve: error: --ray needs Ray Serve, which is not installed: "
                                  "pip install '.[scale]' in a clone of tfb (the scale extra)")


def test_a_failing_replica_is_reported_by_ray_with_tfbs_reason(cluster, llama_dir, lora_dir, tmp_path):
    from ray import serve

    from server.ray_serve import build, deployment_failure
    from server.settings import Settings

    broken = bayesianized(llama_dir, lora_dir, tmp_path / "post")
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # passes preflight, fails its checksum
    app = build(Settings(model=str(llama_dir), adapter=broken, device="cpu"), replicas=1)
    with pytest.raises(RuntimeError):
        serve.run(app, name="broken", route_prefix="/broken")
    reason = deployment_failure("broken")  # from Ray's deployment status, as `serve status` shows it
    assert reason == (f"tfb start-up failed: {weights}: checksum mismatch (sha256 differs from tfb_config.json); "
                      f"the directory was modified or is corrupt: Bayesianize again")
    serve.delete("broken")


def test_killing_one_replica_mid_traffic_loses_only_what_it_held(cluster):
    """Requests in flight on the killed replica may fail (its process is gone); every other
    request succeeds, and the surviving replica keeps answering."""
    import ray
    import ray.exceptions

    url = cluster["url"]
    victim = next(iter(by_replica(url, "/v1/choices", 4, QUESTION)))
    handle = ray.get_actor(f"SERVE_REPLICA::{APP}#tfb#{victim}", namespace="serve")
    results: list[tuple[float, float, int, str | None]] = []  # (start, end, status, replica)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = httpx.post(url + "/v1/choices", json=QUESTION, timeout=60)
                results.append((t0, time.monotonic(), r.status_code, r.headers.get("x-tfb-replica")))
            except httpx.TransportError:
                results.append((t0, time.monotonic(), 0, None))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(1 for r in results if r[3] == victim) >= 2, 60, "traffic on the victim")
    ray.kill(handle, no_restart=True)  # returns before the actor is dead: requests may still reach it

    def dead() -> bool:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        return False

    wait_for(dead, 60, "the killed replica's death")
    killed = time.monotonic()
    survivor_ok_after = lambda: sum(1 for r in results if r[0] > killed + 1 and r[2] == 200) >= 8  # noqa: E731
    wait_for(survivor_ok_after, 90, "answers after the kill")
    stop.set()
    for t in threads:
        t.join(60)
    failed = [r for r in results if r[2] != 200]
    print(f"kill: {len(results)} requests, {len(failed)} failed, victim {victim}")
    # only requests sent before the victim was dead may fail (those it held, or got while dying)
    assert all(r[0] <= killed for r in failed), ("a request sent after the replica died failed", failed)
    after = [r for r in results if r[0] > killed and r[2] == 200]
    assert after and {r[3] for r in after} - {victim}


def test_shutdown_drains_an_open_stream(cluster):
    """Deleting the app while a stream is open: the stream finishes, then the replicas go."""
    from ray import serve

    model = httpx.get(cluster["url"] + "/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 48, "stream": True, "temperature": 0}
    with httpx.stream("POST", cluster["url"] + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        data = [next(line for line in lines if line.startswith("data: "))]
        deleted = []
        deleting = threading.Thread(target=lambda: deleted.append((serve.delete(APP), time.monotonic())))
        deleting.start()
        data += [line for line in lines if line.startswith("data: ")]
        stream_done = time.monotonic()
    deleting.join(120)
    assert deleted and deleted[0][1] >= stream_done  # the delete waited for the stream
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(d[6:]) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 40
    assert not deleting.is_alive()
    assert httpx.get(cluster["url"] + "/health", timeout=10).status_code == 404  # no app behind the proxy now
