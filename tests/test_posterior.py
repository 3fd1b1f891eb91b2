"""tfb_core.posterior: the SVD transform, the row stds, the noise it induces, the artifact.

References are independent of the code under test: adapters are read from their files,
singular values come from numpy in float64, peft computes the adapter's own outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (fresh_base, module_order, peft_model, peft_scaling, read_lora, svd64)

import tiny
from tfb_core.errors import TFBError
from tfb_core.posterior import POSTERIOR_NAME, TFB_CONFIG_NAME, Posterior, bayesianize_factors
from tfb_core.sampling import row_std, standard_normal

SIGMA = 0.05
N_DRAWS = 2000


@pytest.fixture(scope="module")
def pattern_lora(tmp_path_factory, llama_dir):
    """rsLoRA with a per-module rank and alpha, on attention, an MLP projection and lm_head."""
    return tiny.make_lora(llama_dir, tmp_path_factory.mktemp("pattern") / "adapter", seed=5, r=4, alpha=8,
                          targets=("q_proj", "v_proj", "gate_proj", "lm_head"), use_rslora=True,
                          rank_pattern={"v_proj": 2}, alpha_pattern={"gate_proj": 32})


@pytest.fixture(scope="module")
def deficient_lora(tmp_path_factory, lora_dir):
    """The session LoRA with one column of one module's B set to zero (a rank-deficient B)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("deficient") / "adapter"
    shutil.copytree(lora_dir, out)
    state = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key][:, 1] = 0
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def prompt_ids(tok, text="The quick brown fox jumps over the lazy dog"):
    return torch.tensor([tok(text).input_ids])


# --- the transform -----------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,r", [(64, 64, 4), (128, 64, 8), (3000, 32, 2)])
def test_bayesianize_factors_keeps_the_product(m, n, r):
    torch.manual_seed(0)
    A, B = torch.randn(r, n), torch.randn(m, r)
    A1, B1, d = bayesianize_factors(A, B)
    BA = B.double() @ A.double()
    assert ((B1.double() @ A1.double() - BA).norm() / BA.norm()).item() < 1e-5
    d_ref = svd64(B)[1]
    assert torch.allclose(d.double(), d_ref, rtol=1e-6)
    # B' = U diag(d): orthogonal columns with norms d
    gram = B1.double().T @ B1.double()
    assert torch.allclose(gram, torch.diag(d_ref ** 2), atol=1e-4 * float(d_ref.max()) ** 2)


def row_stds(post, sigma: float) -> dict[str, torch.Tensor]:
    """``Omega_i = sigma / d_i`` per module (rank-deficient rows at 0)."""
    return {layer.name: row_std(layer.d, sigma) for layer in post.layers}


def check_transform(post, adapter_dir, sigma=SIGMA):
    config, pairs = read_lora(adapter_dir)
    assert sorted(layer.name for layer in post.layers) == sorted(pairs)
    stds = row_stds(post, sigma)
    for layer in post.layers:
        A, B = pairs[layer.name]
        BA = B @ A
        B1A1 = layer.lora_B.double() @ layer.lora_A.double()
        assert ((B1A1 - BA).norm() / BA.norm()).item() < 1e-5, layer.name
        d = svd64(B)[1]
        full = d > 1e-6 * d.max()
        expected = torch.where(full, sigma / d, torch.zeros_like(d))
        assert torch.allclose(stds[layer.name].double(), expected, rtol=1e-5, atol=0), layer.name
        assert layer.scaling == pytest.approx(peft_scaling(config, layer.name, A.shape[0]), rel=1e-12)


def test_transform_and_row_stds(post, lora_dir):
    check_transform(post, lora_dir)
    names = [layer.name for layer in post.layers]
    assert any(n.endswith("lm_head") for n in names) and any("down_proj" in n for n in names)
    # the draw index of a module is its position in the base model's module order
    assert names == module_order(post.model, names)
    assert [layer.index for layer in post.layers] == list(range(len(names)))


def test_rslora_rank_and_alpha_patterns(llama_dir, pattern_lora):
    """s = alpha / sqrt(r) per module, with peft's per-module r and alpha: peft is the judge."""
    post = Posterior.from_adapter(fresh_base(llama_dir), pattern_lora)
    check_transform(post, pattern_lora)
    ref = peft_model(llama_dir, pattern_lora)
    peft_layers = dict(ref.base_model.model.named_modules())
    ranks, scalings = {}, {}
    for layer in post.layers:
        peft_layer = peft_layers[layer.name]
        assert layer.scaling == pytest.approx(peft_layer.scaling["default"], rel=1e-12), layer.name
        ranks[layer.name.rsplit(".", 1)[-1]] = layer.rank
        scalings[layer.name.rsplit(".", 1)[-1]] = layer.scaling
    assert ranks == {"q_proj": 4, "v_proj": 2, "gate_proj": 4, "lm_head": 4}
    assert scalings["v_proj"] == pytest.approx(8 / 2 ** 0.5)
    assert scalings["gate_proj"] == pytest.approx(32 / 2)
    # and the function: sigma = 0 is exactly the adapter
    ids = prompt_ids(post.tokenizer)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = post.model(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_rank_deficient_b_gets_zero_std(llama_dir, deficient_lora):
    post = Posterior.from_adapter(fresh_base(llama_dir), deficient_lora)
    check_transform(post, deficient_lora)
    name = "model.layers.0.self_attn.q_proj"
    std = row_stds(post, SIGMA)[name]
    assert std[-1].item() == 0.0 and torch.all(std[:-1] > 0)
    layer = next(layer for layer in post.layers if layer.name == name)
    with post.samples(num_samples=3, seed=0, sigma=SIGMA):
        assert torch.all(layer.noise[:, -1] == 0)
        assert torch.all(torch.isfinite(layer.noise))


# --- the noise on the weight update: isotropic s*sigma inside col(B), zero outside ----------------


def isotropy_report(E: torch.Tensor, B1: torch.Tensor, U: torch.Tensor, s: float, sigma: float) -> dict:
    """How far the noise ``s B' E_k`` on the weight update is from the TFB law.

    E : (N, r, n) draws of the noise on A'; B1 : (m, r) = B'; U : (m, r) orthonormal basis of
    col(B) from an independent SVD. Inside col(B) the coordinates ``U^T s B' E_k`` (r x n) must
    be i.i.d. N(0, (s sigma)^2): their (r n) x (r n) covariance, divided by (s sigma)^2, is I.
    Outside, ``(I - U U^T) s B' E_k`` must be 0: it is ``(I - U U^T) B'`` times ``s E_k``.
    """
    E, B1, U = E.double(), B1.double(), U.double()
    inside = torch.einsum("ri,nij->nrj", U.T @ B1, E) * s  # (N, r, n)
    flat = inside.reshape(len(E), -1) / (s * sigma)  # (N, r*n), mean 0 by construction
    cov = flat.T @ flat / len(E)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    leak = (B1 - U @ (U.T @ B1)).norm() / B1.norm()
    return {"max_dev": (cov - eye).abs().max().item(),
            "mean_var": torch.diagonal(cov).mean().item(),
            "leak": leak.item()}


def isotropic(rep: dict) -> bool:
    # N = 2000 draws: entries of the sample covariance have sd ~ 1/sqrt(2000) = 0.022 (0.032 on
    # the diagonal); the max over (4*128)^2 entries stays below ~0.15. Mean variance: sd 0.002.
    return rep["max_dev"] < 0.25 and abs(rep["mean_var"] - 1) < 0.02 and rep["leak"] < 1e-5


@pytest.fixture(scope="module")
def draws(post):
    """N_DRAWS weight samples of every module, as the layers see them: E_k (N, r, n)."""
    with post.samples(num_samples=N_DRAWS, seed=123, sigma=SIGMA):
        return {layer.name: layer.noise.clone() for layer in post.layers}


@pytest.mark.parametrize("suffix", ["q_proj", "v_proj", "down_proj", "lm_head"])
def test_noise_is_isotropic_inside_col_b(post, lora_dir, draws, suffix):
    _, pairs = read_lora(lora_dir)
    layer = next(l for l in post.layers if l.name.endswith(suffix))
    A, B = pairs[layer.name]
    U, d = svd64(B)
    E = draws[layer.name]
    # the layer's E_k is Omega * Z_k with Z_k = standard_normal(seed, k, module index)
    for k in (0, 1, N_DRAWS - 1):
        Z = standard_normal(123, k, layer.index, A.shape).double()
        assert torch.allclose(E[k].double(), (SIGMA / d)[:, None] * Z, rtol=1e-5, atol=1e-9)
    s = layer.scaling
    rep = isotropy_report(E, layer.lora_B, U, s, SIGMA)
    assert isotropic(rep), rep
    # the same test rejects the wrong formulas: std sigma * d_i, or sigma alone
    Z = torch.stack([standard_normal(123, k, layer.index, A.shape) for k in range(N_DRAWS)]).double()
    assert d.min() > 1.2 or d.max() < 0.8, "the wrong-formula check needs d far from 1"
    for wrong in ((SIGMA * d)[:, None] * Z, SIGMA * Z):
        bad = isotropy_report(wrong, layer.lora_B, U, s, SIGMA)
        assert not isotropic(bad), bad


def test_isotropy_statistic_on_full_weight_q_proj(post, lora_dir, draws):
    """The full-weight version on one square module: covariance of the projected (m x n) noise."""
    import numpy as np

    _, pairs = read_lora(lora_dir)
    layer = next(l for l in post.layers if l.name.endswith("layers.1.self_attn.q_proj"))
    B = pairs[layer.name][1]
    U_full = torch.from_numpy(np.linalg.svd(B.numpy(), full_matrices=True)[0])  # (m, m)
    r = B.shape[1]
    U, U_perp = U_full[:, :r], U_full[:, r:]
    delta = layer.scaling * torch.einsum("mr,nrj->nmj", layer.lora_B.double(), draws[layer.name].double())
    inside = torch.einsum("mr,nmj->nrj", U, delta)  # (N, r, n)
    outside = torch.einsum("mq,nmj->nqj", U_perp, delta)  # (N, m-r, n)
    target = layer.scaling * SIGMA
    var_per_direction = inside.pow(2).mean(dim=(0, 2)) / target ** 2  # (r,)
    assert torch.allclose(var_per_direction, torch.ones(r, dtype=torch.float64), atol=0.03)
    assert outside.abs().max().item() < 1e-5 * target


# --- sigma = 0, save / load, peft on the saved directory ------------------------------------------


def test_sigma_zero_is_the_adapter(post, llama_dir, lora_dir):
    ref = peft_model(llama_dir, lora_dir)
    ids = prompt_ids(post.tokenizer)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        plain = post.model(input_ids=ids).logits
        with post.samples(num_samples=2, seed=0, sigma=0.0):
            sampled = post.model(input_ids=ids.repeat_interleave(2, 0)).logits
    assert (plain - expected).abs().max().item() < 1e-5
    assert (sampled - expected).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama_dir, lora_dir):
    post = Posterior.from_adapter(fresh_base(llama_dir), lora_dir, seed=7, num_samples=3)
    post.sigma = SIGMA
    out = post.save(tmp_path_factory.mktemp("saved") / "bayes")
    ids = prompt_ids(post.tokenizer)
    with torch.no_grad(), post.samples(num_samples=3, seed=7):
        logits = post.model(input_ids=ids.repeat_interleave(3, 0)).logits
    return out, ids, logits


def test_saved_artifact_reloads_exactly(saved, llama_dir, lora_dir):
    out, ids, logits = saved
    post = Posterior.load(fresh_base(llama_dir), out)
    assert post.sigma == SIGMA and post.config.seed == 7 and post.config.num_samples == 3
    with torch.no_grad(), post.samples(num_samples=3, seed=7):
        again = post.model(input_ids=ids.repeat_interleave(3, 0)).logits
    assert torch.equal(again, logits)
    check_transform(post, lora_dir)  # the stored factors are still B'A' = BA, stds sigma / d(B)


def test_peft_reads_the_saved_directory_as_the_mean(saved, llama_dir, lora_dir):
    out, ids, _ = saved
    with torch.no_grad():
        expected = peft_model(llama_dir, lora_dir)(input_ids=ids).logits
        got = peft_model(llama_dir, out)(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", POSTERIOR_NAME])
def test_tampered_file_fails_its_checksum(saved, tmp_path, llama_dir, name):
    out = tmp_path / "copy"
    shutil.copytree(saved[0], out)
    with open(out / name, "r+b") as f:  # flip one byte in the middle
        f.seek((out / name).stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(TFBError, match="checksum") as e:
        Posterior.load(fresh_base(llama_dir), out)
    assert name in str(e.value)


def test_load_refuses_another_base_and_a_plain_dir(saved, gpt2_dir, llama_dir, lora_dir):
    with pytest.raises(TFBError, match="another base model"):
        Posterior.load(fresh_base(gpt2_dir), saved[0])
    with pytest.raises(TFBError, match=TFB_CONFIG_NAME):
        Posterior.load(fresh_base(llama_dir), lora_dir)


def dir_digest(path: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_save_is_atomic_and_overwrites(tmp_path, post):
    out = tmp_path / "bayes"
    post.sigma = SIGMA
    try:
        post.save(out)
        first = dir_digest(out)
        post.sigma = 2 * SIGMA
        with pytest.raises(TFBError, match="already holds a Bayesianized adapter: pass --force"):
            post.save(out)
        assert dir_digest(out) == first
        post.save(out, force=True)  # replace a previous posterior
        assert json.loads((out / TFB_CONFIG_NAME).read_text())["sigma"] == 2 * SIGMA
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bayes"]  # nothing left aside
        second = dir_digest(out)
        assert second != first
        # a save that fails half-way (its calibration file is missing) leaves the old directory
        with pytest.raises(OSError):
            post.save(out, calibration_file=tmp_path / "missing.jsonl", force=True)
        assert dir_digest(out) == second
        with pytest.raises(OSError):
            post.save(tmp_path / "new", calibration_file=tmp_path / "missing.jsonl")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bayes"]
    finally:
        post.sigma = 0.0


def test_sigma_must_be_nonnegative(post):
    with pytest.raises(TFBError, match="sigma must be >= 0"):
        post.sigma = -1.0
    with pytest.raises(TFBError):
        post.sigma = float("nan")


@pytest.mark.parametrize("changes,problem", [
    ({"format_version": 5}, "format_version 5 is not supported"),
    ({"stochastic_layers": 0}, "stochastic_layers must be 'all' or a number of decoder layers >= 1, got 0"),
    ({"stochastic_layers": 3}, r"stochastic_layers must be 'all' or 1\.\.2 \(the model has 2 decoder layers\), got 3"),
    ({"sigma": -0.1}, "sigma must be a finite number >= 0"),
    ({"sigma": "0.1"}, "sigma must be a finite number >= 0"),
    ({"temperature": 0}, "temperature must be a finite number > 0"),
    ({"temperature": -2.0}, "temperature must be a finite number > 0"),
    ({"temperature": None}, "temperature must be a finite number > 0"),
    ({"files_sha256": "abc"}, "'files_sha256' must be an object, got str"),
    ({"files_sha256": {"adapter_config.json": 1}}, "'files_sha256' must map file names to sha256 strings"),
    ({"base_model": "smollm2"}, "'base_model' must be an object, got str"),
    ({"search_trace": {"sigma": 1}}, "'search_trace' must be a list, got dict"),
])
def test_bad_tfb_config(saved, tmp_path, llama_dir, changes, problem):
    out = tmp_path / "copy"
    shutil.copytree(saved[0], out)
    cfg = json.loads((out / TFB_CONFIG_NAME).read_text())
    cfg.update(changes)
    (out / TFB_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(TFBError, match=problem):
        Posterior.load(fresh_base(llama_dir), out)


def test_missing_posterior_file(saved, tmp_path, llama_dir):
    out = tmp_path / "copy"
    shutil.copytree(saved[0], out)
    (out / POSTERIOR_NAME).unlink()
    with pytest.raises(TFBError, match=f"{POSTERIOR_NAME} is missing"):
        Posterior.load(fresh_base(llama_dir), out)


def test_load_posterior_dispatches(saved, llama_dir, lora_dir):
    from tfb_core.posterior import load_posterior

    assert Posterior.is_bayesianized(saved[0]) and not Posterior.is_bayesianized(lora_dir)
    assert load_posterior(fresh_base(llama_dir), saved[0]).sigma == SIGMA
    assert load_posterior(fresh_base(llama_dir), lora_dir).sigma == 0.0
