"""``tfb serve``: the start-up search and its cache, the built-in demo end to end as a real
subprocess (env settings, SIGTERM drain), and failed start-ups."""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest

from server_helpers import ServerThread, bayesianized, metric, start_cli, wait_for, wait_ready

OK = {"question": "Which gas do plants absorb from the air?", "choices": ["Oxygen", "Carbon dioxide", "Helium"]}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.jsonl"
    rows = [{"question": f"Calibration question {i}?", "choices": ["red", "green", "blue"]}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_startup_search_is_cached_and_a_restart_skips_it(llama_dir, lora_dir, calibration, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("TFB_CACHE_DIR", str(tmp_path / "cache"))
    settings = dict(model=str(llama_dir), adapter=lora_dir, calibration=calibration, device="cpu",
                    samples=4, eps=0.05)
    with ServerThread(**settings) as srv:
        first = httpx.get(srv.url + "/v1/posterior").json()
        answer = httpx.post(srv.url + "/v1/choices", json=OK, timeout=60).json()
    assert first["source"] == "searched" and first["search_trace"] and first["sigma"] > 0
    assert first["criterion"] == "nll" and first["eps"] == 0.05 and first["calibration_sha256"]
    saved = list((tmp_path / "cache" / "posteriors").iterdir())
    assert len(saved) == 1 and (saved[0] / "tfb_config.json").is_file()

    import tfb_core.search as search

    def no_search(*a, **k):
        raise AssertionError("searched again")

    monkeypatch.setattr(search, "search_sigma", no_search)
    with ServerThread(**settings) as srv:
        again = httpx.get(srv.url + "/v1/posterior").json()
        assert httpx.post(srv.url + "/v1/choices", json=OK, timeout=60).json()["probs"] == pytest.approx(answer["probs"], abs=1e-6)
    assert again["source"] == "cached search" and again["sigma"] == first["sigma"]

    # other search settings: another key, so it searches again (here: into --posterior-out)
    monkeypatch.undo()
    monkeypatch.setenv("TFB_CACHE_DIR", str(tmp_path / "cache"))
    with ServerThread(**{**settings, "eps": 0.1, "posterior_out": tmp_path / "out"}) as srv:
        assert httpx.get(srv.url + "/v1/posterior").json()["source"] == "searched"
    assert (tmp_path / "out" / "tfb_config.json").is_file()


def test_demo_end_to_end_env_settings_and_sigterm_drain():
    """``tfb serve`` with no arguments (settings from TFB_* only), then SIGTERM mid-request."""
    proc, url = start_cli(env={"TFB_SAMPLES": "3", "TFB_MAX_WAIT_MS": "1", "TFB_REQUEST_TIMEOUT": "300"})
    try:
        wait_ready(url, timeout=240, proc=proc)
        r = httpx.post(url + "/v1/choices", json={**OK, "return_samples": True}, timeout=60)
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["num_samples"] == 3 and len(a["samples"]) == 3 and a["model"] == "tfb-demo"
        assert sum(a["probs"]) == pytest.approx(1, abs=1e-6) and a["uncertainty"]["mutual_information"] >= 0
        assert httpx.get(url + "/v1/posterior").json()["source"] == "demo"  # the shipped posterior, not a stand-in

        # a long request in flight, then SIGTERM: it finishes; new requests get 503; exit 0
        results = {}
        big = {"items": [{**OK, "num_samples": 8, "question": f"{OK['question']} ({i})"} for i in range(8)]}
        t = threading.Thread(target=lambda: results.setdefault(
            "r", httpx.post(url + "/v1/choices", json=big, timeout=300)))
        t.start()
        wait_for(lambda: metric(url, "tfb_requests_running") >= 1, timeout=60, what="the long request running")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health", timeout=30).status_code == 503, timeout=60,
                 what="/health 503 while draining")
        late = httpx.post(url + "/v1/choices", json=OK, timeout=30)
        health = httpx.get(url + "/health", timeout=30)
        t.join(300)
        assert results["r"].status_code == 200 and len(results["r"].json()["items"]) == 8
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert proc.wait(60) == 0
        log_text = "".join(proc.communicate())
        assert "start-up objects frozen" in log_text  # the CLI froze its heap once ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigterm_stops_a_server_whose_event_loop_is_held(tmp_path):
    """A request that holds the event loop (issue 25: a coverage of 0.9999999999999999 searched
    forever on it, and SIGTERM did not stop the server): after SIGTERM the loop answers nothing
    for the stuck timeout (2 s in tests/stuck_serve.py, 10 s otherwise), and the process exits 1
    without draining, its engine process with it."""
    import tiny
    from pathlib import Path

    base = tiny.make_llama(tmp_path / "base")
    post = bayesianized(base, tiny.make_lora(base, tmp_path / "lora"), tmp_path / "post")
    script = Path(__file__).parent / "stuck_serve.py"
    proc, url = start_cli("--model", str(base), "--adapter", str(post), "--samples", "2", script=script)
    try:
        wait_ready(url, proc=proc)
        threading.Thread(target=_get_quietly, args=(url + "/hold",), daemon=True).start()
        wait_for(lambda: _held(url), 60, "the event loop held")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 1
        log = proc.communicate()[1]
        assert "the event loop answered nothing for 2 s after the stop signal" in log
        engine = int(re.search(r"engine process (\d+) started", log).group(1))
        wait_for(lambda: not Path(f"/proc/{engine}").exists() or "Z" in Path(f"/proc/{engine}/stat").read_text()
                 .split(")")[-1].split()[0], 30, "the engine process gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _get_quietly(url: str) -> None:
    try:
        httpx.get(url, timeout=600)
    except httpx.HTTPError:  # the server exits under it
        pass


def _held(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=0.5)
        return False
    except httpx.TimeoutException:
        return True


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    proc, _ = start_cli("--adapter", str(tmp_path / "missing"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == f"tfb serve: error: --adapter {tmp_path / 'missing'}: no such directory"

    (tmp_path / "empty").mkdir()
    proc, _ = start_cli("--adapter", str(tmp_path / "empty"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        f"tfb serve: error: --adapter {tmp_path / 'empty'} is empty: expected a peft LoRA adapter "
        f"(adapter_config.json and adapter_model.safetensors, as save_pretrained writes them) or a "
        f"Bayesianized adapter (tfb bayesianize)")

    proc, _ = start_cli("--samples", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--samples / TFB_SAMPLES" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("layout", ["--engine-process", "--no-engine-process"])
def test_failed_load_exits_1_with_the_reason(llama_dir, lora_dir, tmp_path, layout):
    post = bayesianized(llama_dir, lora_dir, tmp_path / "post")
    (post / "tfb_posterior.safetensors").write_bytes(b"corrupt")
    proc, _ = start_cli("--model", str(llama_dir), "--adapter", str(post), "--device", "cpu", layout)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("tfb serve: error: ") and "checksum mismatch" in last


def test_served_model_name_is_the_model_id_everywhere(llama_dir, lora_dir, tmp_path):
    import server.cli  # noqa: F401 (registers `tfb serve`)
    from server.settings import settings_from_args
    from tfb_core import TFBError
    from tfb_core.cli import build_parser

    post = bayesianized(llama_dir, lora_dir, tmp_path / "post")
    with ServerThread(model=str(llama_dir), adapter=post, device="cpu", samples=2) as srv:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == f"{llama_dir.name}+post"
    with ServerThread(model=str(llama_dir), adapter=post, device="cpu", samples=2, served_model_name="my-bot") as srv:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "my-bot"
        assert httpx.post(srv.url + "/v1/choices", json=OK, timeout=60).json()["model"] == "my-bot"
        done = httpx.post(srv.url + "/v1/completions", json={"model": "my-bot", "prompt": "Hi", "max_tokens": 2},
                          timeout=60)
        assert done.status_code == 200 and done.json()["model"] == "my-bot"
        other = httpx.post(srv.url + "/v1/completions", json={"model": f"{llama_dir.name}+post", "prompt": "Hi",
                                                              "max_tokens": 2}, timeout=60)
        assert other.status_code == 404 and "'my-bot'" in other.json()["error"]["message"]
        assert metric(srv, "tfb_requests_total", model="my-bot", endpoint="/v1/choices") == 1
    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve", "--served-model-name", "a+b"])).served_model_name == "a+b"
    with pytest.raises(TFBError, match="^--served-model-name / TFB_SERVED_MODEL_NAME: "):
        settings_from_args(parse(["serve", "--served-model-name", "two words"]))


def test_choice_limits_from_flags_and_env(monkeypatch):
    import server.cli  # noqa: F401 (registers `tfb serve`)
    from server.settings import Settings, settings_from_args
    from tfb_core.cli import build_parser

    assert Settings().max_choices == 64 and Settings().item_token_limit == Settings().max_batch_tokens
    monkeypatch.setenv("TFB_MAX_ITEM_TOKENS", "5000")
    s = settings_from_args(build_parser().parse_args(["serve", "--max-choices", "8"]))
    assert s.max_choices == 8 and s.max_item_tokens == 5000 and s.item_token_limit == 5000


def test_startup_search_runs_in_float32_and_serves_the_dtype_asked(llama_dir, lora_dir, calibration, tmp_path,
                                                                   monkeypatch):
    """docs/method.md §4: --dtype bfloat16 searches in float32 (the same sigma as a float32 server),
    then serves bf16 (with bf16 noise, not the search's float32 noise) exactly as a restart does."""
    import torch

    import tfb_core.search as search
    from server.loader import load
    from server.settings import Settings
    from tfb_core.data import MCItem
    from tfb_core.posterior import fit_key
    from tfb_core.encoding import encode_item
    from tfb_core.scoring import choice_probs

    searched_in = []
    real = search.search_sigma

    def spy(post, *a, **k):
        searched_in.append({p.dtype for p in post.model.parameters()})
        return real(post, *a, **k)

    monkeypatch.setattr(search, "search_sigma", spy)
    common = dict(model=str(llama_dir), adapter=lora_dir, calibration=calibration, device="cpu", samples=4, eps=0.05)
    (tmp_path / "bf16").mkdir()  # an empty --posterior-out is fine
    bf16 = load(Settings(**common, dtype="bfloat16", posterior_out=tmp_path / "bf16"))
    fp32 = load(Settings(**common, dtype="float32", posterior_out=tmp_path / "fp32"))
    assert searched_in == [{torch.float32}] * 2
    assert bf16.source == fp32.source == "searched"
    assert bf16.post.sigma == fp32.post.sigma > 0
    key = [fit_key(llama_dir, lora_dir, calibration, Settings(**common, dtype=d).search_config(), device="cpu")
           for d in ("bfloat16", "float32")]
    assert key[0] == key[1]  # the search does not depend on the serving dtype

    post = bf16.post
    assert {p.dtype for p in post.model.parameters()} == {torch.bfloat16}
    assert all(layer.d.dtype == torch.float32 for layer in post.layers)
    noise = post.draws.noise(post.sigma, [(0, k) for k in range(4)])  # the search ran this sigma in fp32
    assert {n.dtype for n in noise} == {torch.bfloat16}

    restart = load(Settings(**common, dtype="bfloat16", posterior_out=tmp_path / "bf16"))
    assert restart.source == "cached search" and restart.post.sigma == post.sigma
    enc = encode_item(post.tokenizer, MCItem(choices=OK["choices"], question=OK["question"]), "letter")
    got = choice_probs(post, [enc], [(0, 4)])[0]
    assert torch.equal(got, choice_probs(restart.post, [enc], [(0, 4)])[0])


def test_posterior_out_follows_the_rule_of_every_output(llama_dir, lora_dir, calibration, tmp_path, monkeypatch):
    """``--posterior-out``: a user's directory is refused with or without --force (at once, as a
    real ``tfb serve``: one line, exit 2, files intact); a previous posterior for other inputs
    only with --force; an input or the current directory never (tfb_core.artifacts' rule)."""
    import hashlib

    from server.loader import load, preflight
    from server.settings import Settings
    from tfb_core.errors import TFBError

    def snapshot(root):
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        proc, _ = start_cli("--model", str(llama_dir), "--adapter", str(lora_dir), "--calibration",
                            str(calibration), "--device", "cpu", "--posterior-out", str(other), *extra)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:  # it started serving instead of refusing
                proc.kill()
                proc.communicate()
        assert proc.returncode == 2
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"tfb serve: error: --posterior-out {other} is not empty") and "--force" in last
        assert "Started server process" not in err  # refused before the engine started
    assert (other / "notes.txt").read_text() == "mine"

    common = dict(model=str(llama_dir), adapter=lora_dir, calibration=calibration, device="cpu", samples=4, eps=0.05)
    # a posterior, but not the start-up search's for these inputs: only with --force
    post = bayesianized(llama_dir, lora_dir, tmp_path / "post")
    before = snapshot(post)
    with pytest.raises(TFBError, match=f"--posterior-out {post} already holds a Bayesianized adapter: pass --force"):
        preflight(Settings(**common, posterior_out=post))
    assert snapshot(post) == before
    replaced = load(Settings(**common, posterior_out=post, force=True))
    assert replaced.source == "searched" and snapshot(post) != before
    assert load(Settings(**common, posterior_out=post)).source == "cached search"  # its own result: loaded
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # an input, the directory holding the calibration, the current directory: never
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inputs = snapshot(lora_dir) | snapshot(calibration.parent)
    for out, says in ((lora_dir, "is the input --adapter"), (calibration.parent, "contains the input --calibration"),
                      (Path("."), "is the current directory")):
        with pytest.raises(TFBError, match=f"--posterior-out {out} {says}"):
            preflight(Settings(**common, posterior_out=out, force=True))
    assert snapshot(lora_dir) | snapshot(calibration.parent) == inputs and not any(here.iterdir())


def test_api_key_file(llama_dir, lora_dir, tmp_path, capsys):
    """``--api-key-file``: the key is read once, whitespace stripped; a missing or empty file, or a
    key given twice, is a one-line start-up error naming it; --help says to prefer it."""
    post = bayesianized(llama_dir, lora_dir, tmp_path / "post")
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-from-a-file \n")
    with ServerThread(model=str(llama_dir), adapter=post, device="cpu", samples=2, api_key_file=key_file) as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 401
        ok = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret-from-a-file"})
        assert ok.status_code == 200, ok.text

    (tmp_path / "empty").write_text(" \n")
    for args, env, says in (
            (["--api-key-file", str(tmp_path / "missing")], {}, f"--api-key-file {tmp_path / 'missing'}: cannot read it"),
            ([], {"TFB_API_KEY_FILE": str(tmp_path / "empty")}, f"--api-key-file {tmp_path / 'empty'} is empty"),
            (["--api-key-file", str(key_file), "--api-key", "k"], {}, "not both")):
        proc, _ = start_cli(*args, env=env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tfb serve: error: ") and says in lines[0], err

    from server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "prefer TFB_API_KEY or --api-key-file" in help_text and "/proc/PID/cmdline" in help_text


def test_an_unknown_model_fails_at_once(llama_dir, lora_dir, tmp_path):
    """Before the engine process starts (it used to fail there, ~12 s later, exit 1)."""
    post = bayesianized(llama_dir, lora_dir, tmp_path / "post")
    proc, _ = start_cli("--model", "no-such-model", "--adapter", str(post), "--device", "cpu")
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [
        "tfb serve: error: --model: base model 'no-such-model' is neither a directory nor a built-in model; "
        "built-ins: smollm2-135m"]


def test_a_port_in_use_is_one_line_naming_it(tmp_path):
    """Exit 2 naming host:port and --port / TFB_PORT, before the model loads (it was uvicorn's
    [Errno 98] after the engine had started, exit 3)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = start_cli("--port", str(port))  # the demo: no flag but the port
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [
        f"tfb serve: error: 127.0.0.1:{port} is already in use (another server?): stop it, or choose another "
        f"--port / TFB_PORT"]


def test_the_kind_of_kernels_is_set_by_engine_and_tfb_engine(monkeypatch):
    """Settings.engine_kind is what users name --engine and TFB_ENGINE; a bad value names the flag."""
    import server.cli  # noqa: F401 (registers `tfb serve`)
    from server.settings import Settings, settings_from_args
    from tfb_core import TFBError
    from tfb_core.cli import build_parser

    parse = build_parser().parse_args
    monkeypatch.delenv("TFB_ENGINE", raising=False)
    assert Settings().engine_kind == "auto" and Settings(engine="eager").engine_kind == "eager"
    assert settings_from_args(parse(["serve", "--engine", "static"])).engine_kind == "static"
    monkeypatch.setenv("TFB_ENGINE", "eager")
    assert settings_from_args(parse(["serve"])).engine_kind == "eager"
    assert settings_from_args(parse(["serve", "--engine", "static"])).engine_kind == "static"  # the flag wins
    monkeypatch.setenv("TFB_ENGINE", "fast")
    with pytest.raises(TFBError, match="^--engine / TFB_ENGINE: Input should be 'auto', 'static' or 'eager'"):
        settings_from_args(parse(["serve"]))
