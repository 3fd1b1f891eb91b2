"""tfb_core.fused: each fused step against an independent computation.

The plain path (the CPU's) against the Llama modules' own arithmetic (transformers' RMSNorm,
``apply_rotary_pos_emb``, the MLP's activation); the Triton kernels against the plain path in
Triton's CPU interpreter (a subprocess: the interpreter is chosen at import) where Triton is
installed, and on CUDA (the ``cuda`` tests) in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from conftest import in_triton_interpreter, needs_triton
from tfb_core import fused
from tfb_core.cuda_llama import rotate_half_matrix


def norm_case(d: int, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(d, eps=1e-5)
    norm.weight.data = torch.randn(d, generator=g)
    x, y = torch.randn(3, 2, d, generator=g), torch.randn(3, 2, d, generator=g)
    return norm.to(device, dtype), x.to(device, dtype), y.to(device, dtype)


def rope_case(R, H, KVH, T, hd, dtype=torch.float32, device="cpu", seed=0):
    """q and k as the forward makes them: views of (R, T, heads, hd) projections."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, T, H, hd, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(R, T, KVH, hd, generator=g).to(device, dtype).transpose(1, 2)
    angle = torch.rand(R, 1, T, hd // 2, generator=g) * 6
    angle = torch.cat([angle, angle], -1)
    return q, k, angle.cos().to(device, dtype), angle.sin().to(device, dtype)


def kv_case(R, KVH, L, hd, dtype=torch.float32, device="cpu", seed=0):
    """New k and v (v a transposed view, as the forward's) and caches that are a slice of a
    larger buffer (the decoder's rows), with each row's column."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(R, KVH, 1, hd, generator=g).to(device, dtype)
    v = torch.randn(R, 1, KVH, hd, generator=g).to(device, dtype).transpose(1, 2)
    col = torch.randint(0, L, (R,), generator=g).to(device)
    big = torch.randn(R + 3, KVH, L, hd, generator=g).to(device, dtype)
    return k, v, col, big


SIZES = [64, 100]  # a power of two and not
ROPES = [(5, 4, 2, 3, 16), (2, 8, 8, 1, 24), (64, 32, 8, 1, 128)]  # R, H, KVH, T, hd


@pytest.mark.parametrize("d", SIZES)
def test_add_rms_norm_is_the_residual_add_then_the_module(d):
    norm, x, y = norm_case(d)
    s, h = fused.add_rms_norm(x, y, norm)
    assert torch.equal(s, x + y)
    torch.testing.assert_close(h, norm(x + y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R,H,KVH,T,hd", ROPES)
def test_rope_is_transformers_rotary_embedding(R, H, KVH, T, hd):
    q, k, cos, sin = rope_case(R, H, KVH, T, hd)
    qo, ko = fused.rope(q, k, cos, sin, rotate_half_matrix(hd, q))
    qr, kr = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])  # its unsqueeze_dim=1 adds the head axis
    torch.testing.assert_close(qo, qr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, kr, rtol=1e-6, atol=1e-6)


def test_silu_mul_is_the_activation_times_up():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(7, 1, 300, generator=g) * 8, torch.randn(7, 1, 300, generator=g)
    ref = gate.double() * torch.sigmoid(gate.double()) * up.double()
    torch.testing.assert_close(fused.silu_mul(gate, up).double(), ref, rtol=1e-6, atol=1e-6)


def test_write_kv_writes_each_row_s_column_and_nothing_else():
    R, KVH, L, hd = 6, 2, 10, 16
    k, v, col, big = kv_case(R, KVH, L, hd)
    kc, vc = big.clone(), big.clone() * 2
    before_k, before_v = kc.clone(), vc.clone()
    fused.write_kv(k, v, kc[1:R + 1], vc[1:R + 1], col)
    for r in range(R):
        assert torch.equal(kc[1 + r, :, col[r]], k[r, :, 0]) and torch.equal(vc[1 + r, :, col[r]], v[r, :, 0])
        kc[1 + r, :, col[r]], vc[1 + r, :, col[r]] = before_k[1 + r, :, col[r]], before_v[1 + r, :, col[r]]
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)  # no other column or row moved


def test_a_kernel_that_fails_turns_the_kernels_off_and_the_plain_path_answers(monkeypatch, caplog):
    """A GPU or Triton build the kernels cannot compile for: the op still answers (the plain
    path), every kernel is off from then on (the decode attention too), with one warning."""
    from tfb_core import cuda_llama

    norm, x, y = norm_case(64)
    want = fused.add_rms_norm(x, y, norm)
    class Unbuildable:  # a kernel launch that fails, as on a GPU Triton cannot compile for
        def __getitem__(self, grid):
            raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(fused, "INTERPRET", True)  # as if on a GPU: the kernel is launched
    monkeypatch.setattr(fused, "triton", fused.triton or object())
    monkeypatch.setattr(fused, "_add_rms_norm", Unbuildable(), raising=False)
    monkeypatch.setattr(fused, "FUSED", True)
    monkeypatch.setattr(fused, "BROKEN", None)
    with caplog.at_level("WARNING", logger="tfb_core.fused"):
        got = fused.add_rms_norm(x, y, norm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fused.FUSED is False and fused.BROKEN.startswith("add_rms_norm: ")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "plain torch ops" in caplog.text
    assert not fused.fused(x)  # the next op does not try
    q = torch.randn(2, 4, 1, 16)
    kc, vc = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    bias, last = torch.zeros(2, 8), torch.full((2,), 7)
    launched = []
    monkeypatch.setattr(cuda_llama, "triton", object())
    monkeypatch.setattr(cuda_llama, "_attend_kernel", lambda *args: launched.append(args))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # the kernel's condition, on a CPU
    out = cuda_llama.attend_decode(q, kc, vc, bias, last, 0.25)  # BROKEN: the dense attention, not the kernel
    monkeypatch.undo()
    assert launched == []
    torch.testing.assert_close(out, cuda_llama.attend_decode_dense(q, kc, vc, bias, 0.25))


def test_out_of_memory_in_a_kernel_s_launch_is_not_a_broken_kernel(monkeypatch):
    monkeypatch.setattr(fused, "FUSED", True)
    monkeypatch.setattr(fused, "BROKEN", None)

    def kernel():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        fused.guarded("rope", kernel, lambda: None)
    assert fused.FUSED is True and fused.BROKEN is None  # a later capture may fit


def kernels_against_plain(dtype, device: str) -> dict:
    """Each op with ``FUSED`` on (the kernel) and off (plain torch): the largest differences."""
    worst = {}

    def both(fn):
        fused.FUSED = True
        a = fn()
        fused.FUSED = False
        b = fn()
        fused.FUSED = True
        return a, b

    def diff(a, b):  # relative to the values' size
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    for d in SIZES + [4096]:
        norm, x, y = norm_case(d, dtype, device)
        (s1, h1), (s2, h2) = both(lambda: fused.add_rms_norm(x, y, norm))
        worst["add"] = max(worst.get("add", 0.0), diff(s1, s2))
        worst["norm"] = max(worst.get("norm", 0.0), diff(h1, h2))
    for shape in ROPES:
        q, k, cos, sin = rope_case(*shape, dtype=dtype, device=device)
        rot = rotate_half_matrix(shape[-1], q)
        (q1, k1), (q2, k2) = both(lambda: fused.rope(q, k, cos, sin, rot))
        worst["rope"] = max(worst.get("rope", 0.0), diff(q1, q2), diff(k1, k2))
    gate = torch.randn(7, 1, 3000, device=device).to(dtype) * 4
    up = torch.randn(7, 1, 3000, device=device).to(dtype)
    worst["silu_mul"] = diff(*both(lambda: fused.silu_mul(gate, up)))
    k, v, col, big = kv_case(6, 2, 10, 16, dtype, device)

    def write():
        kc, vc = big.clone(), big.clone()
        fused.write_kv(k, v, kc[1:7], vc[1:7], col)
        return torch.cat([kc, vc])
    worst["write_kv"] = diff(*both(write))
    assert fused.BROKEN is None, fused.BROKEN  # a kernel that failed would have compared plain with plain
    return worst


INTERPRETED = """
import torch, test_fused as t
worst = t.kernels_against_plain(torch.float32, "cpu")
print(worst)
assert worst["write_kv"] == 0.0 and worst["add"] == 0.0, worst
assert max(worst.values()) < 1e-5, worst
"""


@needs_triton
def test_the_kernels_in_triton_s_interpreter_match_the_plain_path():
    in_triton_interpreter(INTERPRETED)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernels_on_cuda_match_the_plain_path(dtype):
    assert fused.triton is not None, "Triton is missing: the plain path would run"
    worst = kernels_against_plain(dtype, "cuda")
    assert worst["write_kv"] == 0.0 and worst["add"] == 0.0, worst  # the same rounding
    # float32: the same arithmetic up to its order; bfloat16: a rounding step (2^-8) or two
    assert max(worst.values()) < (1e-5 if dtype == torch.float32 else 1e-2), worst
