"""The clients users already run, against a real server on the tiny Llama (issue 24).

Prompt scoring (``echo`` on /v1/completions) against tfb_core's own scoring, with the engine in
the server's process and in its own; token-id prompts; the official ``openai`` client; vLLM's
tokenizer endpoints; EleutherAI's lm-eval (``local-completions``) run as a user runs it.

lm-eval, litellm, langchain-openai and guidellm pin packages tfb's own environment cannot take:
they live in their own virtualenv, ``.venv-clients`` (``make clients-venv``, part of ``make
test``), and run here as subprocesses of its Python. Where that venv is missing the tests that
need it are skipped, unless ``TFB_CLIENTS_PYTHON`` names it (``make test`` does): then they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from server_helpers import ROOT, ServerThread, tiny_posterior
from tfb_core import Mode, SamplingParams, TokenInfo, generate
from tfb_core.encoding import Encoded
from tfb_core.scoring import choice_scores, score_prompts
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior

K = 3
PROMPT = "The capital of France is Paris, and the river is"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tiny_posterior(tmp_path_factory.mktemp("clients"))  # sigma 0.5: the samples disagree


@pytest.fixture(scope="module")
def servers(dirs):
    """{"here": the engine in the server's process, "apart": in its own}, same posterior and settings."""
    base, post = dirs
    settings = dict(model=str(base), adapter=post, samples=K, device="cpu", max_wait_ms=5, served_model_name="post")
    with ServerThread(**settings) as here, ServerThread(engine_process=True, **settings) as apart:
        yield {"here": here, "apart": apart}


@pytest.fixture(scope="module")
def srv(servers):
    return servers["here"]


@pytest.fixture(scope="module")
def core(dirs):
    base, post = dirs
    return Posterior.load(load_base_model(base, "cpu", "float32"), post)


def complete(srv, **body) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/completions", json={"model": "post", **body}, timeout=60)


# --- prompt scoring: echo ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["here", "apart"])
def test_echo_scores_the_prompt_as_tfb_core_does(servers, core, where):
    r = complete(servers[where], prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    ids = core.tokenizer(PROMPT).input_ids
    ref = score_prompts(core, [ids], [(core.config.seed, K)], top_logprobs=2)[0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [core.tokenizer.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    assert lp["token_logprobs"][1:] == pytest.approx([t.logprob for t in ref], abs=1e-5)
    for top, t in zip(lp["top_logprobs"][1:], ref):
        assert list(top) == [core.tokenizer.decode([i]) for i, _ in t.top]
        assert list(top.values()) == pytest.approx([v for _, v in t.top], abs=1e-5)
    unc = choice["uncertainty"]
    assert unc["tokens"][0] == {"token": lp["tokens"][0]}
    for got, t in zip(unc["tokens"][1:], ref, strict=True):
        for name in ("logprob", "predictive_entropy", "expected_entropy", "mutual_information"):
            assert got[name] == pytest.approx(getattr(t, name), abs=1e-5), name
    assert max(t.mutual_information for t in ref) > 1e-4  # the samples disagree: MI is not trivially 0
    # the summary covers the scored prompt tokens: how surprised the posterior is by this text
    assert unc["sequence"] == pytest.approx(TokenInfo.summarize(ref), abs=1e-5)
    assert unc["sequence"]["num_tokens"] == len(ids) - 1 and unc["sequence"]["sequence_mutual_information"] > 0


def test_echo_with_a_completion_is_the_prompt_then_the_generation(srv, core):
    plain = complete(srv, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1).json()["choices"][0]
    alone = complete(srv, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1).json()["choices"][0]
    both = complete(srv, prompt=PROMPT, echo=True, max_tokens=4, temperature=0, logprobs=1).json()["choices"][0]
    L = len(core.tokenizer(PROMPT).input_ids)
    assert both["text"] == PROMPT + plain["text"] and both["finish_reason"] == plain["finish_reason"]
    lp = both["logprobs"]
    assert lp["tokens"] == alone["logprobs"]["tokens"] + plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][1:L] == pytest.approx(alone["logprobs"]["token_logprobs"][1:], abs=1e-6)
    assert lp["token_logprobs"][L:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-6)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][L] == len(PROMPT)
    tokens = both["uncertainty"]["tokens"]
    assert [t["token"] for t in tokens] == lp["tokens"]
    for got, exp in zip(tokens[L:], plain["uncertainty"]["tokens"], strict=True):
        assert got.pop("token") == exp.pop("token") and got == pytest.approx(exp, abs=1e-6)
    # the summary spans the scored prompt and the completion
    seq = both["uncertainty"]["sequence"]
    assert seq["num_tokens"] == L - 1 + 4
    assert seq["total_logprob"] == pytest.approx(sum(lp["token_logprobs"][1:]), abs=1e-4)
    assert seq["max_mutual_information"] == pytest.approx(max(t["mutual_information"] for t in tokens[1:]))


def test_echo_with_n_repeats_the_prompt_before_each_choice(srv):
    r = complete(srv, prompt=["Once upon", "Red and"], echo=True, max_tokens=3, n=2, temperature=0.9, seed=4)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"][:len(p)] for c, p in zip(choices, ["Once upon"] * 2 + ["Red and"] * 2)] == \
        ["Once upon"] * 2 + ["Red and"] * 2
    assert r.json()["usage"]["completion_tokens"] == 4 * 3


# --- token-id prompts --------------------------------------------------------------------------------


def test_token_id_prompts_are_the_text_prompts(srv, core):
    ids = core.tokenizer(PROMPT).input_ids
    text = complete(srv, prompt=PROMPT, max_tokens=3, temperature=0).json()
    one = complete(srv, prompt=ids, max_tokens=3, temperature=0).json()
    assert one["choices"][0]["text"] == text["choices"][0]["text"] and one["usage"] == text["usage"]
    two = complete(srv, prompt=[ids, ids[:3]], max_tokens=3, temperature=0, echo=True).json()
    assert [c["text"][:len(t)] for c, t in zip(two["choices"], [PROMPT, core.tokenizer.decode(ids[:3])])] == \
        [PROMPT, core.tokenizer.decode(ids[:3])]
    assert two["usage"]["prompt_tokens"] == len(ids) + 3


def test_the_openai_client_scores_prompts(srv, core):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    ids = core.tokenizer(PROMPT).input_ids
    r = client.completions.create(model="post", prompt=ids, echo=True, max_tokens=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT and len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert r.usage.completion_tokens == 0


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param,says", [
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo", "not supported with 'stream'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "only with 'echo'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens",
     "1 or more"),
    ("/v1/completions", {"prompt": [1, 49152]}, "prompt", "allowed 0 to 49151"),
    ("/v1/completions", {"prompt": [[5, 6], [-1]]}, "prompt", "allowed 0 to 49151"),
    ("/v1/completions", {"prompt": []}, "prompt", "non-empty list of token ids"),
    ("/v1/completions", {"prompt": [[]]}, "prompt", "non-empty list of token ids"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "non-empty list of token ids"),
    ("/v1/completions", {"prompt": [1.5]}, "prompt", "non-empty list of token ids"),
    ("/v1/completions", {"prompt": "x " * 300, "echo": True, "num_samples": 64}, "prompt", "max-item-tokens"),
])
def test_bad_input_is_a_400_naming_the_field(srv, path, body, param, says):
    r = httpx.post(f"{srv.url}{path}", json={"model": "post", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert complete(srv, prompt="x", max_tokens=1).status_code == 200


# --- vLLM's tokenizer endpoints --------------------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info_answer_as_vllm_does(srv, core):
    tok = core.tokenizer
    r = httpx.post(f"{srv.url}/tokenize", json={"prompt": PROMPT, "return_token_strs": True}, timeout=30).json()
    assert r == {"count": len(tok(PROMPT).input_ids), "max_model_len": 512, "tokens": tok(PROMPT).input_ids,
                 "token_strs": tok.convert_ids_to_tokens(tok(PROMPT).input_ids)}
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{srv.url}/tokenize", json={"model": "post", "messages": messages}, timeout=30).json()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok(text, add_special_tokens=False).input_ids
    back = httpx.post(f"{srv.url}/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": PROMPT}
    info = httpx.get(f"{srv.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == 512 and info["vocab_size"] == len(tok)


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "add_bos": True}, 400, "add_bos"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "12"}, 400, "tokens"),
])
def test_bad_tokenizer_requests(srv, path, body, status, param):
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_the_openai_client_retrieves_the_model(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    card = client.models.retrieve("post")
    assert card.id == "post" and card.object == "model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


# --- the clients' own virtualenv ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clients_python() -> str:
    """The Python of the clients' virtualenv (see the module's docstring)."""
    given = os.environ.get("TFB_CLIENTS_PYTHON")
    path = Path(given) if given else ROOT / ".venv-clients" / "bin" / "python"
    if not path.exists():
        if given:
            pytest.fail(f"TFB_CLIENTS_PYTHON={given} does not exist: run make clients-venv")
        pytest.skip("no .venv-clients: make clients-venv installs lm-eval, litellm, langchain-openai, guidellm")
    return str(path)


def run_client(python: str, *args: str, tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in the clients' venv, offline, with its caches in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               OPENAI_API_KEY="unused", LITELLM_LOCAL_MODEL_COST_MAP="True")
    done = subprocess.run([python, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# --- lm-eval: multiple-choice (log-likelihood) tasks ---------------------------------------------------------

ITEMS = [
    ("Question: Which gas do plants take in from the air?\nAnswer:", ["Oxygen", "Carbon dioxide", "Helium", "Nitrogen"], 1),
    ("Question: What is frozen water called?\nAnswer:", ["Steam", "Ice", "Sand", "Glass"], 1),
    ("Question: How many legs does a spider have?\nAnswer:", ["Six", "Eight", "Ten", "Four"], 1),
    ("Question: Which planet is closest to the Sun?\nAnswer:", ["Mercury", "Venus", "Mars", "Jupiter"], 0),
    ("Question: What do bees make?\nAnswer:", ["Milk", "Silk", "Honey", "Wax paper"], 2),
]


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    """A server at sigma 0 and K = 1 (the engine in its own process, the default) and its posterior."""
    base, post = tiny_posterior(tmp_path_factory.mktemp("lm_eval"), sigma=0.0)
    with ServerThread(model=str(base), adapter=post, samples=1, device="cpu", engine_process=True,
                      served_model_name="post") as s:
        s.dirs = base, post
        yield s, base, Posterior.load(load_base_model(base, "cpu", "float32"), post)


def local_task(root: Path) -> Path:
    """A 5-question multiple-choice task of lm-eval's, read from a local JSONL file."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n" for q, c, g in ITEMS))
    (root / "tfb_mc.yaml").write_text(
        "task: tfb_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n")
    return root


@pytest.mark.parametrize("tokenizer", ["remote", "huggingface"])
def test_lm_eval_multiple_choice_acc_is_tfbs_own_scoring(deterministic, clients_python, tmp_path, tokenizer):
    """lm-eval's loglikelihood requests (token-id prompts, echo, logprobs 1, max_tokens 1) give,
    per choice, tfb's own log p(choice | question) and so the same acc. ``remote``: lm-eval's
    default with only model and base_url (it finds /tokenizer_info and /tokenize); ``huggingface``:
    a local tokenizer directory, as lm-eval's docs show for offline use."""
    srv, base, post = deterministic
    args = f"model=post,base_url={srv.url}/v1/completions"
    if tokenizer == "huggingface":
        args += f",tokenizer_backend=huggingface,tokenizer={base}"
    run_client(clients_python, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
               "--tasks", "tfb_mc", "--include_path", str(local_task(tmp_path / "task")),
               "--output_path", str(tmp_path / "out"), "--log_samples", tmp=tmp_path)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["tfb_mc"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_tfb_mc_*.jsonl")).open()]
    # tfb's own: sequence mode, log p(" " + choice | question) summed, one weight sample at sigma 0
    tok = post.tokenizer
    encoded = [Encoded([tok(q).input_ids + tok(" " + c).input_ids for c in cs], [tok(" " + c).input_ids for c in cs],
                       Mode.SEQUENCE) for q, cs, _ in ITEMS]
    ours = choice_scores(post, encoded, [(post.config.seed, 1)] * len(ITEMS))
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        assert theirs == pytest.approx(ours[s["doc_id"]][0].tolist(), abs=1e-4), s["doc_id"]
    acc = sum(int(ours[i][0].argmax()) == g for i, (_, _, g) in enumerate(ITEMS)) / len(ITEMS)
    assert results["acc,none"] == pytest.approx(acc)


# --- benchmark clients: vLLM's extensions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_first(deterministic, tmp_path_factory):
    """A server whose end-of-sequence token is the one its model picks first after PROMPT (sigma 0,
    K 1; the same weights, with generation_config.json naming that token): (server, that token)."""
    srv, base, post = deterministic
    ids = post.tokenizer(PROMPT).input_ids
    first = generate(post, [ids], SamplingParams(max_tokens=1, num_samples=1, weight_seed=post.config.seed))[0]
    eos = first.token_ids[0]
    copy = shutil.copytree(base, tmp_path_factory.mktemp("eos") / "base")
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    with ServerThread(model=str(copy), adapter=srv.dirs[1], samples=1, device="cpu", served_model_name="post") as s:
        yield s, post.tokenizer.decode([eos])


def test_ignore_eos_and_min_tokens_are_honoured(eos_first):
    srv, eos = eos_first
    body = dict(prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0)
    ended = complete(srv, **body).json()
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["finish_reason"] == "stop"
    past = complete(srv, **body, ignore_eos=True).json()
    assert past["usage"]["completion_tokens"] == 5 and past["choices"][0]["finish_reason"] == "length"
    assert past["choices"][0]["logprobs"]["tokens"][0] == eos
    kept = complete(srv, **body, min_tokens=3).json()
    assert kept["usage"]["completion_tokens"] >= 3 and eos not in kept["choices"][0]["logprobs"]["tokens"][:3]
    chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
        "model": "post", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4,
        "ignore_eos": True, "min_tokens": 2}).json()
    assert chat["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(srv, path):
    body = {"model": "post", "max_tokens": 4, "n": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": PROMPT} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]})
    with httpx.stream("POST", f"{srv.url}{path}", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages)  # every chunk
    prompt = usages[0]["prompt_tokens"]
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == 2 * 4 and all(u["prompt_tokens"] == prompt for u in usages)
    assert all(u["total_tokens"] == prompt + u["completion_tokens"] for u in usages)
    tokens = sum(len((e["choices"][0].get("uncertainty") or {}).get("tokens", [])) for e in events if e["choices"])
    assert tokens == 8 and events[-1]["choices"] == []  # the include_usage chunk last


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "ignore_eoss": True}, "ignore_eoss"),  # a typo stays a 400 naming it
    ({"prompt": "x", "stream": True, "stream_options": {"continuous_usage": True}}, "stream_options.continuous_usage"),
    ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
])
def test_unknown_or_bad_extension_fields_are_a_400_naming_them(srv, body, param):
    r = complete(srv, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_streams_unchanged_with_no_errors(deterministic, clients_python, tmp_path, request_format):
    """guidellm's streaming benchmark as its README runs it (it asks for ignore_eos and
    continuous usage stats): every request succeeds, each with its exact output tokens, and
    time to first token and inter-token latency are reported."""
    srv, base, _ = deterministic
    out = tmp_path / "benchmarks.json"
    run_client(clients_python, "-m", "guidellm", "run",
               "--backend", f"kind=openai_http,target={srv.url},request_format={request_format}",
               "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=4",
               "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
               "--tokenizer", f"kind=huggingface_auto,model={base}", "--output", f"kind=json,path={out}",
               "--disable-console-interactive", tmp=tmp_path)
    metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    assert metrics["request_totals"] == {"successful": 4, "errored": 0, "incomplete": 0, "total": 4}
    assert metrics["output_token_count"]["successful"]["median"] == 8
    assert metrics["time_to_first_token_ms"]["successful"]["count"] == 4
    assert metrics["inter_token_latency_ms"]["successful"]["mean"] > 0


# --- uncertainty where clients look: in each token's logprobs ------------------------------------------------

NAMES = ("predictive_entropy", "expected_entropy", "mutual_information")


def test_each_logprobs_token_carries_its_uncertainty(srv):
    """Chat: each logprobs.content entry; completions: lists parallel to logprobs.tokens (an
    echoed prompt's first token null); both equal to the choice's own uncertainty.tokens."""
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="post", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2).choices[0]
    expected = chat.model_extra["uncertainty"]["tokens"]
    for entry, exp in zip(chat.logprobs.content, expected, strict=True):
        assert [getattr(entry, n) for n in NAMES] == pytest.approx([exp[n] for n in NAMES], abs=1e-9)
        assert all(not (top.model_extra or {}) for top in entry.top_logprobs)  # alternatives: OpenAI's keys only
    for echo in (False, True):
        c = client.completions.create(model="post", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                      echo=echo).choices[0]
        lp, expected = c.logprobs, c.model_extra["uncertainty"]["tokens"]
        for n in NAMES:
            assert getattr(lp, n) == [t.get(n) for t in expected] and len(getattr(lp, n)) == len(lp.tokens)
        assert (lp.mutual_information[0] is None) == echo
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=60, json={
            "model": "post", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "stream": True}) as r:
        streamed = [e for line in r.iter_lines() if line.startswith("data: {")
                    for ch in json.loads(line[6:])["choices"] for e in (ch.get("logprobs") or {}).get("content", [])]
    assert [e["mutual_information"] for e in streamed] == pytest.approx(
        [e.mutual_information for e in chat.logprobs.content], abs=1e-9)  # streamed: each token's chunk


CLIENTS_SCRIPT = """
import json, sys
import litellm
from langchain_openai import ChatOpenAI, OpenAI

url, prompt = sys.argv[1], sys.argv[2]
messages = [{"role": "user", "content": prompt}]
out = {}
# LangChain keeps each choice's logprobs as they are: response_metadata["logprobs"]
chat = ChatOpenAI(model="post", base_url=url, api_key="unused", max_tokens=4, temperature=0).bind(logprobs=True)
out["langchain_chat"] = [t["mutual_information"] for t in chat.invoke(prompt).response_metadata["logprobs"]["content"]]
llm = OpenAI(model="post", base_url=url, api_key="unused", max_tokens=4, temperature=0, logprobs=1)
out["langchain_completions"] = llm.generate([prompt]).generations[0][0].generation_info["logprobs"]["mutual_information"]
# litellm: each token's entry of choices[0].logprobs
r = litellm.completion(model="openai/post", api_base=url, api_key="unused", messages=messages, max_tokens=4,
                       temperature=0, logprobs=True)
out["litellm_chat"] = [t.mutual_information for t in r.choices[0].logprobs.content]
chunks = litellm.completion(model="openai/post", api_base=url, api_key="unused", messages=messages, max_tokens=4,
                            temperature=0, logprobs=True, stream=True)
out["litellm_stream"] = [t.mutual_information for c in chunks if c.choices and c.choices[0].logprobs
                         for t in c.choices[0].logprobs.content]
t = litellm.text_completion(model="openai/post", api_base=url, api_key="unused", prompt=prompt, max_tokens=4,
                            temperature=0, logprobs=1)
out["litellm_completions"] = t.choices[0].logprobs.mutual_information
print(json.dumps(out))
"""


def test_langchain_and_litellm_reach_each_tokens_uncertainty(srv, clients_python, tmp_path):
    """langchain-openai 1.8 and litellm 1.110, unchanged, from the clients' venv: the documented
    one-line paths to each token's mutual information give the server's numbers."""
    done = run_client(clients_python, "-c", CLIENTS_SCRIPT, f"{srv.url}/v1", "Hi", tmp=tmp_path)
    got = json.loads(done.stdout.strip().splitlines()[-1])

    def mi(path: str, body: dict) -> list[float]:
        r = httpx.post(f"{srv.url}{path}", timeout=60, json={"model": "post", "max_tokens": 4, "temperature": 0, **body})
        return [t["mutual_information"] for t in r.json()["choices"][0]["uncertainty"]["tokens"]]

    chat = mi("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    completions = mi("/v1/completions", {"prompt": "Hi"})
    assert len(chat) == len(completions) == 4
    for name in ("langchain_chat", "litellm_chat", "litellm_stream"):
        assert got[name] == pytest.approx(chat, abs=1e-9), name
    for name in ("langchain_completions", "litellm_completions"):
        assert got[name] == pytest.approx(completions, abs=1e-9), name


# --- structured output: response_format ----------------------------------------------------------------------

SMALL = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "population": {"type": "integer", "minimum": 0, "maximum": 10**6},
    "coastal": {"type": "boolean"}}, "required": ["city", "population", "coastal"], "additionalProperties": False}


@pytest.mark.parametrize("where", ["here", "apart"])
def test_response_format_json_schema_is_followed_and_each_field_gets_its_uncertainty(servers, where):
    import jsonschema

    client = openai.OpenAI(base_url=f"{servers[where].url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="post", messages=[{"role": "user", "content": "A city, as JSON"}], max_tokens=80, temperature=0.8,
        seed=3, n=2, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SMALL,
                                                                            "strict": True}})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SMALL)
        unc = choice.model_extra["uncertainty"]
        fields, mis = unc["fields"], [t["mutual_information"] for t in unc["tokens"]]
        assert set(fields) == set(SMALL["properties"])
        for f in fields.values():
            assert f["num_tokens"] >= 1 and f["max_mutual_information"] in mis
            assert 0 <= f["mean_mutual_information"] <= f["max_mutual_information"]
    assert r.choices[0].message.content != r.choices[1].message.content


def test_the_openai_clients_parse_gets_a_pydantic_object(srv):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=10)
        coastal: bool

    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.parse(model="post", messages=[{"role": "user", "content": "A city"}], max_tokens=60,
                                      response_format=City)
    assert isinstance(r.choices[0].message.parsed, City)
    plain = client.chat.completions.create(model="post", messages=[{"role": "user", "content": "JSON, please"}],
                                           max_tokens=60, response_format={"type": "json_object"})
    assert plain.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_bad_response_formats_are_a_400_naming_the_field(srv, extra, param):
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                   json={"model": "post", "messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


STRUCTURED_SCRIPT = """
import json, sys
import litellm
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

class City(BaseModel):
    city: str = Field(max_length=10)
    coastal: bool

url = sys.argv[1]
llm = ChatOpenAI(model="post", base_url=url, api_key="unused", max_tokens=60, temperature=0)
city = llm.with_structured_output(City, method="json_schema").invoke("A city")
r = litellm.completion(model="openai/post", api_base=url, api_key="unused", max_tokens=60, temperature=0,
                       messages=[{"role": "user", "content": "A city"}], response_format=City)
print(json.dumps({"langchain": city.model_dump(), "litellm": City.model_validate_json(r.choices[0].message.content).model_dump()}))
"""


def test_langchain_and_litellm_structured_output(srv, clients_python, tmp_path):
    """langchain-openai's with_structured_output (json_schema) and litellm's response_format with a
    pydantic model, unchanged: each gets a valid object, the same one (greedy)."""
    done = run_client(clients_python, "-c", STRUCTURED_SCRIPT, f"{srv.url}/v1", tmp=tmp_path)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(got["langchain"]) == {"city", "coastal"} and got["langchain"] == got["litellm"]
