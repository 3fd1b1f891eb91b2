"""The clients users already run, against a real server on the tiny Llama (issue 24).

Prompt scoring (``echo`` on /v1/completions) against tfb_core's own scoring, with the engine in
the server's process and in its own; token-id prompts; the official ``openai`` client.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from server_helpers import ServerThread, tiny_posterior
from tfb_core import score_prompts, summarize
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
    settings = dict(model=str(base), adapter=post, samples=K, device="cpu", max_wait_ms=5)
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
    assert unc["sequence"] == pytest.approx(summarize(ref), abs=1e-5)
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
