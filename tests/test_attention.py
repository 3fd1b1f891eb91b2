"""tfb_core.cuda_llama.attend_decode: the decode step's attention against a float64 reference.

One query per row over a static KV cache whose rows hold different live lengths, left padding
among their columns and stale values past their last column. The function runs its dense path
on the CPU; its Triton kernel runs on CUDA (the ``cuda`` tests) and, where Triton is installed,
in Triton's CPU interpreter (a subprocess, since the interpreter is chosen at import).
"""

from __future__ import annotations

import pytest
import torch

from conftest import in_triton_interpreter, needs_triton
from tfb_core.cuda_llama import attend_decode, attend_decode_dense

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the reference's norm


def case(R: int, H: int, KVH: int, hd: int, L: int, dtype=torch.float32, device="cpu", seed=0):
    """Random q, cache, bias and last columns: row lengths from 1 to L, some rows with left
    padding (masked columns among the live ones), garbage (large values) past each row's end."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, H, 1, hd, generator=g)
    kc, vc = torch.randn(R, KVH, L, hd, generator=g), torch.randn(R, KVH, L, hd, generator=g)
    last = torch.randint(0, L, (R,), generator=g)
    last[0], last[-1] = 0, L - 1  # a row of one column (rows past the active ones) and a full one
    cols = torch.arange(L)
    bias = torch.where(cols[None] <= last[:, None], 0.0, float("-inf"))
    pad = torch.randint(0, 4, (R,), generator=g) * (last >= 8)  # left padding of rows with room
    bias[cols[None] < pad[:, None]] = float("-inf")
    past = cols[None, None, :, None] > last[:, None, None, None]
    kc, vc = kc.masked_fill(past, 1e4), vc.masked_fill(past, 1e4)  # never read, never weighted
    q = q * 2  # scores spread enough that the softmax is not flat
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), kc.to(dtype=dtype, **to), vc.to(dtype=dtype, **to), bias.to(**to),
            last.to(**to))


def reference(q, kc, vc, bias, last, scaling) -> torch.Tensor:
    """Row by row in float64 over the live columns 0 .. last alone: (R, 1, H * hd)."""
    R, H, _, hd = q.shape
    G = H // kc.shape[1]
    out = torch.empty(R, H, hd, dtype=torch.float64)
    for r in range(R):
        n = int(last[r]) + 1
        for h in range(H):
            k, v = kc[r, h // G, :n].double().cpu(), vc[r, h // G, :n].double().cpu()
            s = k @ q[r, h, 0].double().cpu() * scaling + bias[r, :n].double().cpu()
            out[r, h] = torch.softmax(s, 0) @ v
    return out.reshape(R, 1, H * hd)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.isfinite().all(), "non-finite output"
    return float((out.double().cpu() - ref).norm() / ref.norm())


SHAPES = [(5, 4, 2, 16, 70), (3, 8, 8, 32, 64), (7, 8, 2, 64, 200), (2, 4, 1, 24, 33)]  # R, H, KVH, hd, L


@pytest.mark.parametrize("R,H,KVH,hd,L", SHAPES)
def test_matches_a_float64_reference_over_the_live_columns(R, H, KVH, hd, L):
    q, kc, vc, bias, last = case(R, H, KVH, hd, L)
    out = attend_decode(q, kc, vc, bias, last, hd ** -0.5)
    assert out.shape == (R, 1, H * hd) and out.dtype == q.dtype
    assert rel_err(out, reference(q, kc, vc, bias, last, hd ** -0.5)) < TOL[torch.float32]


KERNEL_CHECK = """
import torch
import test_attention as t
from tfb_core import cuda_llama
worst = 0.0
for i, (R, H, KVH, hd, L) in enumerate(t.SHAPES + [(1, 4, 2, 16, 300)]):  # the last: split columns
    q, kc, vc, bias, last = t.case(R, H, KVH, hd, L, seed=i)
    out = cuda_llama._attend_kernel(q, kc, vc, bias, last, hd ** -0.5)
    worst = max(worst, t.rel_err(out, t.reference(q, kc, vc, bias, last, hd ** -0.5)))
print("worst", worst)
assert worst < t.TOL[torch.float32], worst
"""


@needs_triton
def test_the_kernel_in_triton_s_interpreter_matches_the_reference():
    in_triton_interpreter(KERNEL_CHECK)


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R,H,KVH,hd,L", SHAPES + [(1, 32, 8, 128, 576), (64, 32, 8, 128, 128),
                                                   (640, 32, 8, 128, 128), (9, 32, 8, 128, 1000)])
def test_the_kernel_on_cuda_matches_the_reference(R, H, KVH, hd, L, dtype):
    from tfb_core import cuda_llama

    assert cuda_llama.triton is not None, "Triton is missing: attend_decode would run the dense path"
    q, kc, vc, bias, last = case(R, H, KVH, hd, L, dtype=dtype, device="cuda")
    out = attend_decode(q, kc, vc, bias, last, hd ** -0.5)
    assert out.shape == (R, 1, H * hd) and out.dtype == dtype
    ref = reference(q, kc, vc, bias, last, hd ** -0.5)
    err = rel_err(out, ref)
    assert err < TOL[dtype], err
    if dtype == torch.bfloat16:  # no worse than the dense path it replaces
        assert err <= 1.5 * rel_err(attend_decode_dense(q, kc, vc, bias, hd ** -0.5), ref) + 1e-3


@pytest.mark.cuda
@on_cuda
def test_the_graphed_decoder_gives_the_dense_attention_s_generation(tmp_path, monkeypatch):
    """The tiny model in float32, mixed K and weight seeds, prompts of different lengths (left
    padding): the static decoder with the kernel (in its CUDA graphs) against the same decoder
    with the dense attention."""
    import tiny
    from tfb_core import cuda_decode
    from tfb_core.engines import make_decoder
    from tfb_core.generation import SamplingParams, generate
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior

    base = tiny.make_llama(tmp_path / "base", layers=2, hidden=128)
    lora = tiny.make_lora(base, tmp_path / "lora")
    post = Posterior.from_adapter(load_base_model(base, device="cuda", dtype=torch.float32), lora)
    post.sigma = 0.5
    tok = post.tokenizer
    ps = [tok("The capital of France is").input_ids, tok("1 2 3").input_ids,
          tok("Once upon a time, in a land far away, there lived a").input_ids]
    params = [SamplingParams(max_tokens=70, num_samples=4, ignore_eos=True, weight_seed=3, top_logprobs=2),
              SamplingParams(max_tokens=40, num_samples=2, ignore_eos=True, weight_seed=7),
              SamplingParams(max_tokens=60, num_samples=8, ignore_eos=True, weight_seed=1)]
    new = generate(post, ps, params, make_decoder(post, "static"))
    monkeypatch.setattr(cuda_decode, "attend_decode",
                        lambda q, kc, vc, bias, last, scaling: attend_decode_dense(q, kc, vc, bias, scaling))
    old = generate(post, ps, params, make_decoder(post, "static"))
    for a, b in zip(old, new, strict=True):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
            assert y.mutual_information == pytest.approx(x.mutual_information, abs=1e-4)
    assert max(t.mutual_information for r in new for t in r.tokens) > 1e-6  # the samples differ
