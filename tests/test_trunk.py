"""Only the last L decoder layers stochastic (``stochastic_layers``): the posterior, its artifact,
its flags, and the trunk the weight samples share below layer N - L.

The reference for sample k is a plain float64 copy of the base model whose weights are
``W0 + s * B'(A' + E_k)`` for the modules of the last L layers (and the LM head) and
``W0 + s * B'A'`` (the mean adapter) for every module below: no TFB layer runs in it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import left_pad, module_order

import tiny
from tfb_core.cli import main
from tfb_core.errors import TFBError
from tfb_core.generation import GenSequence, SamplingParams
from tfb_core.models import load_base_model
from tfb_core.posterior import TFB_CONFIG_NAME, Posterior
from tfb_core.sampling import standard_normal

LAYERS = 4
SIGMA = 0.5
SEED = 3
K = 3
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog", "One two three four five"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Llama of 4 layers and a LoRA on q, v, down_proj and lm_head."""
    root = tmp_path_factory.mktemp("trunk")
    base = tiny.make_llama(root / "base", layers=LAYERS)
    return base, tiny.make_lora(base, root / "lora")


def posterior(dirs, stochastic_layers="all", sigma=SIGMA):
    base, lora = dirs
    post = Posterior.from_adapter(load_base_model(base, dtype="float32"), lora, stochastic_layers=stochastic_layers)
    post.sigma = sigma
    return post


def reference_model(model_dir, post, k: int, sigma: float):
    """float64: the weights of sample k, with the noise only in ``post.noisy_layers``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, local_files_only=True)
    model.eval().requires_grad_(False)
    noisy = {layer.name for layer in post.noisy_layers}
    layers = {layer.name: layer for layer in post.layers}
    with torch.no_grad():
        for index, name in enumerate(module_order(model, list(layers))):
            layer = layers[name]
            A1, B1 = layer.lora_A.double(), layer.lora_B.double()
            d = B1.norm(dim=0)  # B' = U diag(d)
            omega = sigma / d if name in noisy else torch.zeros_like(d)
            Z = standard_normal(SEED, k, index, A1.shape).double()
            model.get_submodule(name).weight += layer.scaling * B1 @ (A1 + omega[:, None] * Z)
    return model


def sampled_forward(post, seqs):
    """Every prompt x K samples in one padded forward: (logits, hidden states) per row."""
    ids, mask, pos = left_pad(seqs)
    with torch.no_grad(), post.samples(num_samples=K, seed=SEED):
        out = post.model(input_ids=ids.repeat_interleave(K, 0), attention_mask=mask.repeat_interleave(K, 0),
                         position_ids=pos.repeat_interleave(K, 0), output_hidden_states=True)
    return out.logits, out.hidden_states, ids.shape[1]


# --- the posterior ------------------------------------------------------------------------------


def test_all_layers_is_every_module_and_the_posterior_of_before(dirs):
    """L = all (the default) and L = N with an adapted head put the noise in every module: the same
    draws, the same logits, bit for bit."""
    default, every = posterior(dirs), posterior(dirs, LAYERS)
    assert default.stochastic_layers == "all" and default.noisy_layers == default.layers
    assert [l.name for l in every.noisy_layers] == [l.name for l in default.layers]
    seqs = [default.tokenizer(t).input_ids for t in TEXTS]
    assert torch.equal(sampled_forward(default, seqs)[0], sampled_forward(every, seqs)[0])


@pytest.mark.parametrize("L", [1, 3])
def test_the_layers_below_are_the_mean_adapter_in_every_sample(dirs, L):
    post = posterior(dirs, L)
    split = LAYERS - L
    assert post.first_stochastic_layer == split
    assert {l.name for l in post.noisy_layers} == {l.name for l in post.layers
                                                   if l.name == "lm_head" or int(l.name.split(".")[2]) >= split}
    seqs = [post.tokenizer(t).input_ids for t in TEXTS]
    logits, hidden, T = sampled_forward(post, seqs)
    mean = reference_model(dirs[0], post, 0, 0.0)
    with torch.no_grad():
        for b, s in enumerate(seqs):
            ids = torch.tensor([s])
            mean_hidden = mean(input_ids=ids, output_hidden_states=True).hidden_states
            refs = [reference_model(dirs[0], post, k, SIGMA)(input_ids=ids).logits[0] for k in range(K)]
            for k in range(K):
                row = b * K + k
                # hidden_states[i] is the residual stream after layer i - 1: up to N - L, the trunk
                for i in range(split + 1):
                    got = hidden[i][row, T - len(s):].double()
                    assert (got - mean_hidden[i][0]).abs().max().item() < 1e-5, (b, k, i)
                    assert torch.equal(hidden[i][row], hidden[i][b * K])  # every sample the same
                assert (logits[row, T - len(s):].double() - refs[k]).abs().max().item() < 1e-4, (b, k)
            # above the trunk the samples differ (the test is not vacuous)
            assert (hidden[split + 1][b * K + 1] - hidden[split + 1][b * K]).abs().max().item() > 1e-3
            assert (refs[1] - refs[0]).abs().max().item() > 1e-3


def test_only_the_top_layers_get_noise(dirs):
    post = posterior(dirs, 1)
    noisy = {l.name for l in post.noisy_layers}
    assert noisy == {"model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
                     "model.layers.3.mlp.down_proj", "lm_head"}
    noise = dict(zip([l.name for l in post.draws.layers], post.draws.noise(0.1, [(0, 0), (0, 1)])))
    assert set(noise) == noisy  # the draws (and so the search's samples) cover the noisy set only
    for name, E in noise.items():
        assert E.abs().max().item() > 0, name


def test_a_bad_number_of_layers_names_the_range(dirs):
    for bad in (0, -1, "none", 2.5, True):
        with pytest.raises(TFBError, match=r"stochastic_layers must be 'all' or a number of decoder layers >= 1"):
            posterior(dirs, bad)
    with pytest.raises(TFBError, match=r"stochastic_layers must be 'all' or 1\.\.4 \(the model has 4 decoder "
                                       r"layers\), got 5"):
        posterior(dirs, 5)
    base, _ = dirs
    lower = tiny.make_lora(base, dirs[1].parent / "lower", targets=("q_proj",), layers_to_transform=[0, 1])
    with pytest.raises(TFBError, match="no LoRA module of the adapter is in the last 2 decoder layers"):
        Posterior.from_adapter(load_base_model(base, dtype="float32"), lower, stochastic_layers=2)


# --- the artifact and the flags -----------------------------------------------------------------


def test_a_saved_posterior_keeps_its_layers_and_an_older_one_loads_as_all(dirs, tmp_path):
    post = posterior(dirs, 2)
    out = post.save(tmp_path / "post")
    data = json.loads((out / TFB_CONFIG_NAME).read_text())
    assert data["stochastic_layers"] == 2 and data["format_version"] == 4
    loaded = Posterior.load(load_base_model(dirs[0], dtype="float32"), out)
    assert loaded.stochastic_layers == 2
    assert [l.name for l in loaded.noisy_layers] == [l.name for l in post.noisy_layers]

    del data["stochastic_layers"]  # as tfb wrote it before the setting existed (not checksummed)
    data["format_version"] = 3
    (out / TFB_CONFIG_NAME).write_text(json.dumps(data))
    old = Posterior.load(load_base_model(dirs[0], dtype="float32"), out)
    assert old.stochastic_layers == "all" and old.noisy_layers == old.layers


def test_bayesianize_flag_searches_sigma_for_the_top_layers(dirs, tmp_path, capsys):
    from conftest import mc_items

    base, lora = dirs
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"question": it.question, "choices": it.choices, "answer": it.answer}) + "\n"
                           for it in mc_items(24)))
    common = ["bayesianize", "--model", str(base), "--adapter", str(lora), "--device", "cpu",
              "--calibration", str(cal), "--samples", "2", "--sigma-grid", "0,0.05,0.5"]
    assert main(common + ["--out", str(tmp_path / "top"), "--stochastic-layers", "1"]) == 0
    saved = json.loads((tmp_path / "top" / TFB_CONFIG_NAME).read_text())
    assert saved["stochastic_layers"] == 1 and saved["criterion"] == "cv-nll"
    assert [p["sigma"] for p in saved["search_trace"]] == [0.0, 0.05, 0.5]
    capsys.readouterr()

    assert main(common + ["--out", str(tmp_path / "zero"), "--stochastic-layers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "tfb bayesianize: error: stochastic_layers must be 'all' or a number of decoder layers >= 1, got '0'"
    assert main(common + ["--out", str(tmp_path / "many"), "--stochastic-layers", "9"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tfb bayesianize: error: stochastic_layers must be 'all' or 1..4 (the model has 4 decoder layers), got 9")
    assert not (tmp_path / "zero").exists() and not (tmp_path / "many").exists()


def test_serve_takes_the_setting_searches_with_it_and_shows_it(dirs, tmp_path, monkeypatch):
    """``tfb serve --stochastic-layers`` / ``TFB_STOCHASTIC_LAYERS``: checked at once, given to the
    start-up search (its cache key too), shown by /v1/posterior."""
    import httpx
    from conftest import mc_items
    from server_helpers import ServerThread

    import server.cli  # noqa: F401 (registers `tfb serve`)
    from server.settings import settings_from_args
    from server.loader import load
    from tfb_core.posterior import fit_key
    from server.settings import Settings

    assert Settings().stochastic_layers == "all" and Settings(stochastic_layers="2").stochastic_layers == 2
    monkeypatch.setenv("TFB_STOCHASTIC_LAYERS", "3")
    assert Settings().stochastic_layers == 3 and Settings().search_config().stochastic_layers == 3
    monkeypatch.delenv("TFB_STOCHASTIC_LAYERS")
    from tfb_core.cli import build_parser

    with pytest.raises(TFBError) as bad:
        settings_from_args(build_parser().parse_args(["serve", "--stochastic-layers", "0"]))
    assert str(bad.value) == ("--stochastic-layers / TFB_STOCHASTIC_LAYERS: stochastic_layers must be 'all' "
                              "or a number of decoder layers >= 1, got '0'")

    base, lora = dirs
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"question": it.question, "choices": it.choices}) + "\n"
                           for it in mc_items(6)))
    monkeypatch.setenv("TFB_CACHE_DIR", str(tmp_path / "cache"))
    common = dict(model=str(base), adapter=lora, calibration=cal, device="cpu", samples=2, eps=0.05)
    keys = {fit_key(base, lora, cal, Settings(**common, stochastic_layers=L).search_config()) for L in ("all", 1, 2)}
    assert len(keys) == 3
    with pytest.raises(TFBError, match=r"stochastic_layers must be 'all' or 1\.\.4 \(the model has 4 "
                                       r"decoder layers\), got 7"):
        load(Settings(**common, stochastic_layers=7))
    with ServerThread(**common, stochastic_layers=1) as srv:
        info = httpx.get(srv.url + "/v1/posterior").json()
    assert info["source"] == "searched" and info["stochastic_layers"] == 1 and info["sigma"] > 0
    saved = next((tmp_path / "cache" / "posteriors").iterdir())
    assert json.loads((saved / TFB_CONFIG_NAME).read_text())["stochastic_layers"] == 1
    # a Bayesianized posterior keeps its own L: the flag may repeat it, not change it
    served = dict(model=str(base), adapter=saved, device="cpu", samples=2)
    assert load(Settings(**served)).post.stochastic_layers == 1
    assert load(Settings(**served, stochastic_layers=1)).post.stochastic_layers == 1
    with pytest.raises(TFBError, match=r"--stochastic-layers 2: --adapter .* was Bayesianized with "
                                       r"stochastic_layers 1 .*tfb bayesianize --stochastic-layers 2"):
        load(Settings(**served, stochastic_layers=2))


def test_a_shared_trunk_counts_fewer_kv_rows_against_the_budget(dirs, tmp_path):
    """--max-kv-rows counts rows of every layer: with the noise in the last L of N layers a
    sequence of K samples holds (N - L + L K) / N of them (rounded up), so requests that K rows
    a sequence would refuse are served, and the 400 names the rows per sequence."""
    import httpx
    from server_helpers import ServerThread, metric

    from tfb_core.generation import kv_rows

    assert [kv_rows(10, 32, 28), kv_rows(10, 32, 0), kv_rows(1, 32, 28), kv_rows(8, LAYERS, LAYERS - 1)] == [3, 10, 1, 3]
    base, _ = dirs
    post = posterior(dirs, 1).save(tmp_path / "post")
    with ServerThread(model=str(base), adapter=post, device="cpu", samples=8, max_kv_rows=6) as srv:
        model = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello there", "max_tokens": 3, "temperature": 0}
        ok = httpx.post(f"{srv.url}/v1/completions", json={**body, "n": 2}, timeout=120)  # 2 x 3 rows, not 2 x 8
        assert ok.status_code == 200, ok.text
        held = metric(srv, "tfb_kv_cache_rows_max")
        bad = httpx.post(f"{srv.url}/v1/completions", json={**body, "n": 3}, timeout=60)
    assert held == 2 * kv_rows(8, LAYERS, LAYERS - 1) == 6  # each sequence (3 + 8) / 4 rows, rounded up
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert err["code"] == "too_many_kv_rows" and "9 KV cache rows" in err["message"], err
    assert "3 for num_samples=8" in err["message"] and "at most 6" in err["message"], err


# --- the engines with the noise in the top layers only ------------------------------------------


def test_the_static_engines_give_the_eager_answers_with_top_layers_only(dirs):
    """The static engines' noise buffers hold the noisy layers only: the same tokens, uncertainty and
    choice probabilities as the eager engine (their code run eagerly on this CPU)."""
    from test_cuda_decode import assert_same
    from tiny import prompts

    from tfb_core.cuda_prefill import PrefillEngine
    from tfb_core.data import MCItem
    from tfb_core.engines import make_decoder
    from tfb_core.generation import SamplingParams, generate
    from tfb_core.scoring import choice_probs, encode_item

    post = posterior(dirs, 1)
    params = SamplingParams(max_tokens=8, num_samples=3, ignore_eos=True, weight_seed=SEED)
    ref = generate(post, prompts(post.tokenizer), params)
    assert_same(ref, generate(post, prompts(post.tokenizer), params, make_decoder(post, "static")))
    assert max(t.mutual_information for s in ref for t in s.tokens) > 1e-6
    enc = [encode_item(post.tokenizer, MCItem(question=q, choices=["red", "green", "blue"]), "letter")
           for q in ("Which colour is the sky?", "Grass is")]
    samples = [(SEED, 3), (SEED + 1, 2)]
    want = choice_probs(post, enc, samples)
    got = choice_probs(post, enc, samples, engine=PrefillEngine(post))
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(w, g, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_graphed_engines_give_the_eager_answers_with_top_layers_only(tmp_path):
    """On a GPU, from captured CUDA graphs (float32): decode and scoring with L = 1 of 4 give the
    eager engine's tokens, uncertainty and choice probabilities."""
    from test_cuda_engines import assert_same_generation, decode_in_rounds
    from tiny import prompts

    from tfb_core.data import MCItem
    from tfb_core.generation import SamplingParams, generate
    from tfb_core.scoring import choice_probs, encode_item

    base = tiny.make_llama(tmp_path / "base", layers=LAYERS, hidden=128)
    lora = tiny.make_lora(base, tmp_path / "lora", targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"))
    post = Posterior.from_adapter(load_base_model(base, device="cuda", dtype="float32"), lora, stochastic_layers=1)
    post.sigma = SIGMA
    ps = prompts(post.tokenizer)
    params = SamplingParams(max_tokens=12, num_samples=4, ignore_eos=True, weight_seed=3)
    dec, engine, rounds = decode_in_rounds(post, ps, params)
    assert dec.graphs, f"no CUDA graph was captured ({dec.capture_error})"
    alone = [generate(post, [p], params)[0] for p in ps]
    for seqs in rounds:
        assert_same_generation(alone, seqs, torch.float32)
    assert max(t.mutual_information for s in alone for t in s.tokens) > 1e-6

    enc = [encode_item(post.tokenizer, MCItem(["Paris", "Rome", "Berlin"], question="The capital of France?"),
                       "letter")] * 2
    samples = [(0, 4), (3, 2)]
    ref = choice_probs(post, enc, samples)
    for _ in range(3):  # eagerly once, then from its graph
        for r, g in zip(ref, choice_probs(post, enc, samples, engine=engine), strict=True):
            torch.testing.assert_close(g, r, atol=2e-4, rtol=0)
    assert engine.graphs, f"no CUDA graph was captured ({engine.capture_error})"


# --- the shared trunk -------------------------------------------------------------------------


def rows_through(post, layer: int):
    """A counter of the rows each forward sends through decoder layer ``layer``'s q projection."""
    seen = []
    module = post.model.model.layers[layer].self_attn.q_proj
    return seen, module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))


@pytest.mark.parametrize("L", [1, 3])
def test_the_scoring_engine_shares_the_trunk_and_scores_as_row_by_row(dirs, L):
    """PrefillEngine with the trunk shared (layers below N - L once per distinct row, then fanned out
    to each weight sample's row) gives the logits of the same engine running every row through every
    layer, for mixed K and weight seeds, letter and sequence items; and the trunk did run on fewer rows."""
    from tfb_core.cuda_prefill import PrefillEngine
    from tfb_core.data import MCItem
    from tfb_core.scoring import choice_scores, encode_item

    post = posterior(dirs, L)
    items = [MCItem(["Paris", "Rome", "Berlin"], question="What is the capital of France?"),
             MCItem(["4", "five", "22", "none of these"], question="2 + 2 ="),
             MCItem(["blue", "green"], question="The sky on a clear day is")]
    samples = [(0, 4), (3, 2), (0, 3)]  # mixed K and weight seeds
    shared, alone = PrefillEngine(post), PrefillEngine(post, share_trunk=False)
    for mode in ("letter", "sequence"):
        enc = [encode_item(post.tokenizer, it, mode) for it in items]
        seen, hook = rows_through(post, 0)
        try:
            got = choice_scores(post, enc, samples, engine=shared)
            trunk_rows = seen.pop()
            want = choice_scores(post, enc, samples, engine=alone)
            all_rows = seen.pop()
        finally:
            hook.remove()
        distinct = sum(len(e.sequences) for e in enc)  # one trunk row per (item, sequence)
        assert (trunk_rows, all_rows) == (distinct, sum(len(e.sequences) * K for e, (_, K) in zip(enc, samples)))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert max(float(s.std(0).max()) for s in want) > 1e-4  # the samples differ
        # and both are the posterior's: the eager HF forward, every row through every layer
        for g, e in zip(got, choice_scores(post, enc, samples), strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


def test_generation_prefilled_through_the_shared_trunk_decodes_as_the_eager_engine(dirs):
    """admit through the scoring engine: each prompt's trunk runs once (its keys and values copied
    to its K rows), and every sequence decodes as the eager engine decodes it; mixed K and seeds."""
    from test_cuda_decode import assert_same
    from tiny import prompts

    from tfb_core.cuda_decode import StaticDecoder
    from tfb_core.cuda_prefill import PrefillEngine
    from tfb_core.generation import GenSequence, SamplingParams, generate

    post = posterior(dirs, 1)
    ps = prompts(post.tokenizer)
    params = [SamplingParams(max_tokens=8, num_samples=K, ignore_eos=True, weight_seed=seed)
              for K, seed in ((4, 3), (2, 7), (3, 3))][:len(ps)]
    alone = [generate(post, [p], sp)[0] for p, sp in zip(ps, params)]
    seqs = [GenSequence(list(p), sp) for p, sp in zip(ps, params)]
    dec = StaticDecoder(post, prefill=PrefillEngine(post))
    seen, hook = rows_through(post, 0)
    try:
        dec.admit(seqs)
    finally:
        hook.remove()
    assert seen == [len(ps)]  # one trunk row per prompt, not one per weight sample
    while dec.seqs:
        dec.filter()
        if dec.seqs:
            dec.step()
    assert_same(alone, seqs)
    assert max(t.mutual_information for s in seqs for t in s.tokens) > 1e-6


@pytest.mark.parametrize("L", [1, 3])
def test_the_eager_scorer_shares_the_trunk_and_scores_as_row_by_row(dirs, L):
    """The prompt-sharing eager scorer (HF modules, one layer at a time) runs the trunk once per prompt
    (and once per choice continuation), and scores as the HF forward that runs one row per
    (item, choice, sample) through every layer: letter and sequence (length-normalised too), mixed K
    and seeds, at the posterior's sigma and at another (the search's)."""
    from tfb_core.data import MCItem
    from tfb_core.scoring import choice_scores, encode_item

    post = posterior(dirs, L)
    items = [MCItem(["Paris", "Rome", "Berlin"], question="What is the capital of France?"),
             MCItem(["4", "five", "22", "none of these at all"], question="2 + 2 ="),
             MCItem(["blue", "green"], question="The sky on a clear day is")]
    samples = [(0, 4), (3, 2), (0, 3)]
    for mode, norm in (("letter", False), ("sequence", False), ("sequence", True)):
        enc = [encode_item(post.tokenizer, it, mode, length_normalize=norm) for it in items]
        for sigma in (None, 0.2):
            seen, hook = rows_through(post, 0)
            try:
                got = choice_scores(post, enc, samples, sigma=sigma)
            finally:
                hook.remove()
            assert seen[0] == len(items)  # the prompts' trunk: one row per item
            if mode == "sequence":  # the continuations' trunk: one row per (item, choice of 2+ tokens)
                assert seen[1] == sum(len(t) > 1 for e in enc for t in e.targets) > 0
            want = choice_scores(post, enc, samples, sigma=sigma, share_prefix=False)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
            assert max(float(s.std(0).max()) for s in want) > 1e-4


# --- decoding with the trunk shared ---------------------------------------------------------------


def schedule(tok):
    """Sequences for :func:`decode_schedule`: mixed K, weight seeds, lengths and sampling."""
    texts = ["The capital of France is", "Hello", "1 2 3 4 5 6 7 8 9 10 11 12", "Once upon a time", "A"]
    params = [SamplingParams(max_tokens=9, num_samples=4, weight_seed=3, ignore_eos=True),
              SamplingParams(max_tokens=3, num_samples=2, weight_seed=7, ignore_eos=True, top_logprobs=2),
              SamplingParams(max_tokens=12, num_samples=3, weight_seed=3, temperature=0.8, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=5, num_samples=1, weight_seed=1, ignore_eos=True),
              SamplingParams(max_tokens=7, num_samples=5, weight_seed=2, ignore_eos=True)]
    return [GenSequence(tok(t).input_ids, sp, id=i) for i, (t, sp) in enumerate(zip(texts, params))]


def decode_schedule(dec, seqs, on_step=None):
    """Two sequences admitted, three more joining at steps 2 and 4, one step done one sequence at
    a time (``step_each``), finished sequences filtered out (their rows packed) after every step."""
    joins = {0: seqs[:2], 2: seqs[2:4], 4: seqs[4:]}
    for step in range(40):
        if step in joins:
            dec.admit(joins[step])
        dec.filter()
        if not dec.seqs and step > max(joins):
            return seqs
        if on_step is not None:
            on_step(dec)
        dec.step_each() if step == 3 else dec.step()
    raise AssertionError("the schedule did not finish")


def assert_close_generation(want, got, atol=1e-5):
    """The same tokens and finish reasons; logprobs, uncertainty and each sample's logprob within ``atol``."""
    for w, g in zip(want, got, strict=True):
        assert (g.token_ids, g.finish_reason, g.text) == (w.token_ids, w.finish_reason, w.text)
        for a, b in zip(w.tokens, g.tokens, strict=True):
            got_ = [b.logprob, b.predictive_entropy, b.expected_entropy, b.mutual_information, *b.sample_logprobs]
            want_ = [a.logprob, a.predictive_entropy, a.expected_entropy, a.mutual_information, *a.sample_logprobs]
            assert got_ == pytest.approx(want_, abs=atol)
            assert [t for t, _ in b.top] == [t for t, _ in a.top]


@pytest.mark.parametrize("L,through", [(1, "own forward"), (3, "own forward"), (1, "prefill engine")])
def test_the_static_decoder_shares_the_trunk_and_decodes_as_without(dirs, L, through):
    """StaticDecoder with the trunk shared (one KV cache row per sequence below layer N - L, fanned
    out to its K rows there) decodes as the same decoder keeping K rows in every layer: prefill,
    joins into a running batch, mixed K and seeds, a step one sequence at a time, sequences
    retired and rows packed. The cache holds N - L rows per sequence and L per weight sample."""
    from tfb_core.cuda_decode import StaticDecoder
    from tfb_core.cuda_prefill import PrefillEngine

    post = posterior(dirs, L)
    split = LAYERS - L

    def make(share):
        engine = PrefillEngine(post, share_trunk=share) if through == "prefill engine" else None
        return StaticDecoder(post, prefill=engine, share_trunk=share, bucket=16)

    want = decode_schedule(make(False), schedule(post.tokenizer))
    shared, seen = make(True), []
    got = decode_schedule(shared, schedule(post.tokenizer),
                          lambda dec: seen.append((len(dec.seqs), dec.n, dec.kv_layer_rows)))
    assert_close_generation(want, got)
    assert max(t.mutual_information for s in got for t in s.tokens) > 1e-6  # the samples differ
    assert {len(s.tokens) for s in got} == {9, 3, 12, 5, 7}
    assert shared.split == split and shared.kc[0].shape[0] == shared.trunk_cap < shared.rows_cap
    assert shared.kc[split].shape[0] == shared.rows_cap
    assert all(kv == split * m + L * n for m, n, kv in seen) and any(m < n for m, n, _ in seen)
    assert shared.kv_rows == 0 and shared.kv_layer_rows == 0


def test_the_static_decoder_s_step_runs_the_trunk_once_per_sequence(dirs):
    """One step of 3 sequences x K = 4: 3 rows through the layers below N - L, 12 through those
    above (the buckets' powers of two are capped at the buffers, made exactly this size)."""
    from tfb_core.cuda_decode import StaticDecoder

    post = posterior(dirs, 1)
    params = SamplingParams(max_tokens=4, num_samples=4, ignore_eos=True)
    dec = StaticDecoder(post)
    dec.admit([GenSequence(post.tokenizer(t).input_ids, params) for t in TEXTS])
    (bottom, h0), (top, h1) = rows_through(post, 0), rows_through(post, LAYERS - 1)
    try:
        dec.step()
    finally:
        h0.remove(), h1.remove()
    assert (dec.trunk_cap, dec.rows_cap) == (3, 12) and (bottom, top) == ([3], [12])
    assert dec.kv_layer_rows == 3 * (LAYERS - 1) + 12 and dec.kv_rows == 3 * 2  # each (3 + 4) / 4, rounded up


@pytest.mark.parametrize("L", [1, 3])
def test_the_eager_decoder_shares_the_trunk_and_decodes_as_without(dirs, L):
    """EagerDecoder (HF modules one layer at a time over a DynamicCache whose layers below N - L
    hold one row per sequence) decodes the schedule as the same decoder keeping K rows in every
    layer (the HF forward of the whole model): prefill, joins, mixed K and seeds, a step one
    sequence at a time, sequences retired; and its trunk ran on one row per sequence."""
    from tfb_core.generation import EagerDecoder

    post = posterior(dirs, L)
    want = decode_schedule(EagerDecoder(post, share_trunk=False), schedule(post.tokenizer))
    dec, caches = EagerDecoder(post), []
    seen, hook = rows_through(post, 0)
    try:
        got = decode_schedule(dec, schedule(post.tokenizer),
                              lambda d: caches.append((len(d.seqs), d.batch.rows,
                                                       [layer.keys.shape[0] for layer in d.batch.cache.layers],
                                                       d.kv_layer_rows)))
    finally:
        hook.remove()
    assert_close_generation(want, got)
    assert max(t.mutual_information for s in got for t in s.tokens) > 1e-6
    split = LAYERS - L
    assert all(rows == [m] * split + [n] * L and kv == sum(rows) for m, n, rows, kv in caches)
    assert any(m < n for m, n, _, _ in caches)
    # the trunk's forwards: one row per sequence (of an admit, a step, a step of one), never one per sample
    assert max(seen) == max(m for m, *_ in caches) < max(n for _, n, *_ in caches)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("through", ["own forward", "prefill engine"])
def test_the_graphed_decoder_shares_the_trunk_and_decodes_as_without(tmp_path, through):
    """On a GPU, steps replayed from CUDA graphs keyed by (rows, trunk rows), float32: the decoder
    sharing the trunk decodes the schedule (joins, mixed K, a step one sequence at a time,
    retirements) as the one keeping K rows in every layer."""
    from tfb_core.cuda_decode import StaticDecoder
    from tfb_core.cuda_prefill import PrefillEngine

    base = tiny.make_llama(tmp_path / "base", layers=LAYERS, hidden=128)
    lora = tiny.make_lora(base, tmp_path / "lora", targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"))
    post = Posterior.from_adapter(load_base_model(base, device="cuda", dtype="float32"), lora, stochastic_layers=1)
    post.sigma = SIGMA

    def make(share):
        engine = PrefillEngine(post, share_trunk=share) if through == "prefill engine" else None
        return StaticDecoder(post, prefill=engine, share_trunk=share, bucket=16)

    want = decode_schedule(make(False), schedule(post.tokenizer))
    dec = make(True)
    got = decode_schedule(dec, schedule(post.tokenizer))
    assert dec.graphs and all(trunks < rows for rows, trunks in dec.graphs), (list(dec.graphs), dec.capture_error)
    assert_close_generation(want, got, atol=2e-4)
    assert max(t.mutual_information for s in got for t in s.tokens) > 1e-6


def test_a_nan_sequence_s_trunk_rows_leave_no_nan_for_the_next(dirs):
    """A sequence whose trunk went NaN at a decode step ends with an error while another runs on;
    the next sequence prefilled into its trunk row (and its sample rows) with a shorter prompt
    never reads the NaN columns past its own: both decode as the decoder without a trunk does."""
    from tfb_core.cuda_decode import StaticDecoder

    post = posterior(dirs, 1)
    tok = post.tokenizer
    nan_id = tok(" quokka", add_special_tokens=False).input_ids[-1]

    def seqs():
        params = SamplingParams(max_tokens=8, num_samples=2, ignore_eos=True)
        return [GenSequence(tok(t).input_ids, params) for t in
                ("The capital of France is", "one two three four five six seven eight nine ten", "Hi")]

    def run(share):
        other, long, short = seqs()
        dec = StaticDecoder(post, share_trunk=share)
        dec.admit([other, long])
        hook = post.model.get_input_embeddings().register_forward_hook(
            lambda m, args, out: out.masked_fill((args[0] == nan_id)[..., None], float("nan")))
        try:
            dec.tok[2:4] = nan_id  # its rows are fed the poisoned token: its trunk's next keys are NaN
            dec.step()
        finally:
            hook.remove()
        assert dec.filter() == [long] and long.finish_reason == "error"
        dec.admit([short])  # into the trunk row and the rows the NaN sequence held
        while dec.seqs:
            dec.step()
            dec.filter()
        assert [s.finish_reason for s in (other, short)] == ["length", "length"], (other.error, short.error)
        return [other, short]

    assert_close_generation(run(False), run(True))
