"""The CUDA engines' elementwise work, one kernel per step instead of two to six.

A decode step at 640 rows spends a fifth of its time in ~600 small kernels (norms, RoPE, the
SwiGLU product, residual adds, KV cache writes), each a few microseconds whatever its size.
Each function here does one of those steps in one Triton kernel on CUDA and in plain torch
elsewhere (the CPU, or ``FUSED = False``), rounding where the plain path rounds:

- :func:`add_rms_norm`: the residual add and the next RMSNorm (2 kernels -> 1);
- :func:`rope`: rotary embeddings of q and k together (concatenate, two products and a
  rotate-half matmul: 4 kernels -> 1);
- :func:`silu_mul`: the gated MLP's ``silu(gate) * up`` (2 -> 1);
- :func:`write_kv`: one new key and value per row into a static cache (2 scatters -> 1).

None syncs with the host, so a step calling them can be captured in a CUDA graph. A kernel
that fails to build or launch turns them all off (:func:`guarded`): the plain path runs.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch
    triton = None

log = logging.getLogger(__name__)
T = TypeVar("T")

FUSED = True  # False: the plain torch path on CUDA too (bench/gpu.py --fusions measures both)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter runs the kernels on the CPU
BROKEN: str | None = None  # why the kernels were turned off: the first launch that raised


def fused(t: torch.Tensor) -> bool:
    """Whether ``t``'s op runs as a Triton kernel."""
    return FUSED and triton is not None and (t.is_cuda or INTERPRET)


def guarded(name: str, kernel: Callable[[], T], plain: Callable[[], T]) -> T:
    """``kernel()``; if it raises (a GPU or Triton build the kernels cannot compile for, e.g.
    bfloat16 before Ampere), every kernel here is turned off with one warning and ``plain()``
    runs, now and from then on: slower, never wrong. A kernel fails before it writes anything
    (compiling is the first thing its launch does)."""
    global FUSED, BROKEN
    try:
        return kernel()
    except torch.OutOfMemoryError:  # the memory's fault, not the kernel's: the caller's to handle
        raise
    except Exception as e:
        FUSED, BROKEN = False, f"{name}: {type(e).__name__}: {e}"
        log.warning("the fused %s kernel failed (%s: %s); the plain torch ops run from now on", name,
                    type(e).__name__, e)
        return plain()


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- residual add + RMSNorm ----------------------------------------------------------------------

def add_rms_norm(x: torch.Tensor, y: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + y`` (the residual stream, rounded to its dtype) and a Llama RMSNorm module's
    output of ``s`` (float32 inside): (s, norm(s)), both shaped as ``x``."""
    def plain():
        s = x + y
        return s, F.rms_norm(s, norm.weight.shape, norm.weight, norm.variance_epsilon)

    def kernel():
        d = x.shape[-1]
        xs, ys = x.reshape(-1, d).contiguous(), y.reshape(-1, d).contiguous()
        s, h = torch.empty_like(xs), torch.empty_like(xs)
        _add_rms_norm[(xs.shape[0],)](xs, ys, norm.weight, s, h, d, xs.stride(0), ys.stride(0),
                                      float(norm.variance_epsilon), BD=_pow2(d), num_warps=8 if d > 2048 else 4)
        return s.view(x.shape), h.view(x.shape)

    return guarded("add_rms_norm", kernel, plain) if fused(x) else plain()


# --- RoPE ------------------------------------------------------------------------------------------

def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (R, H, T, hd) and k (R, KVH, T, hd) rotated by cos, sin (R, 1, T, hd):
    ``x * cos + rotate_half(x) * sin``. ``rot`` is rotate-half as a +-1 matrix (the plain path's
    matmul). Returns new tensors, contiguous on the fused path."""
    R, H, T, hd = q.shape
    KVH = k.shape[1]

    def plain():
        qk = torch.cat([q, k], 1)
        qk = torch.addcmul(qk * cos, torch.matmul(qk, rot), sin)
        return qk[:, :H], qk[:, H:]

    def kernel():
        qo = torch.empty(R, H, T, hd, device=q.device, dtype=q.dtype)
        ko = torch.empty(R, KVH, T, hd, device=k.device, dtype=k.dtype)
        c, s = cos.expand(R, 1, T, hd), sin.expand(R, 1, T, hd)
        _rope[(T, R)](q, k, c, s, qo, ko, H, KVH, hd // 2,  # T on the grid's first axis: up to 2^31 - 1
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      c.stride(0), c.stride(2), s.stride(0), s.stride(2),
                      BQ=_pow2(H), BK=_pow2(KVH), BD=_pow2(hd // 2), num_warps=4)
        return qo, ko

    return guarded("rope", kernel, plain) if fused(q) else plain()


# --- SwiGLU ----------------------------------------------------------------------------------------

def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, each product rounded to the inputs' dtype as the plain path does."""
    def plain():
        return F.silu(gate) * up

    def kernel():
        out = torch.empty_like(gate)
        n = gate.numel()
        _silu_mul[(triton.cdiv(n, 2048),)](gate, up, out, n, BLOCK=2048, num_warps=8)
        return out

    if fused(gate) and gate.is_contiguous() and up.is_contiguous():
        return guarded("silu_mul", kernel, plain)
    return plain()


# --- the KV cache write ------------------------------------------------------------------------

def write_kv(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, col: torch.Tensor) -> None:
    """Write each row's one new key and value, k and v (R, KVH, 1, hd), into the caches kc and
    vc (R, KVH, L, hd) at the row's column ``col`` (R,) int64."""
    R, KVH, _, hd = k.shape

    def plain():
        at = col.view(R, 1, 1, 1).expand(R, KVH, 1, hd)
        kc.scatter_(2, at, k.to(kc.dtype))
        vc.scatter_(2, at, v.to(vc.dtype))

    def kernel():
        _write_kv[(R,)](k, v, kc, vc, col, KVH, hd, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
                        BH=_pow2(KVH), BD=_pow2(hd), num_warps=4)

    guarded("write_kv", kernel, plain) if fused(k) else plain()


if triton is not None:
    @triton.jit
    def _add_rms_norm(X, Y, W, S, Hn, d, sx, sy, eps, BD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BD)
        m = i < d
        x = tl.load(X + row * sx + i, mask=m, other=0.0)
        y = tl.load(Y + row * sy + i, mask=m, other=0.0)
        s = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)  # the residual stream, rounded as x + y
        tl.store(S + row * d + i, s, mask=m)
        sf = s.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / d + eps)
        w = tl.load(W + i, mask=m, other=0.0).to(tl.float32)
        tl.store(Hn + row * d + i, (sf * inv * w).to(x.dtype), mask=m)

    @triton.jit
    def _rotate(X, O, cos1, cos2, sin1, sin2, heads, half, sx_h, so_h, h, dd, BD: tl.constexpr):
        m = (h < heads) & (dd < half)
        x1 = tl.load(X + h * sx_h + dd, mask=m, other=0.0)
        x2 = tl.load(X + h * sx_h + half + dd, mask=m, other=0.0)
        # as the plain path: x * cos rounded, then + rotate_half(x) * sin in float32, rounded
        a1 = (x1.to(tl.float32) * cos1).to(x1.dtype).to(tl.float32)
        a2 = (x2.to(tl.float32) * cos2).to(x1.dtype).to(tl.float32)
        tl.store(O + h * so_h + dd, (a1 - x2.to(tl.float32) * sin1).to(x1.dtype), mask=m)
        tl.store(O + h * so_h + half + dd, (a2 + x1.to(tl.float32) * sin2).to(x1.dtype), mask=m)

    @triton.jit
    def _rope(Q, K, Cos, Sin, QO, KO, H, KVH, half, sq_r, sq_h, sq_t, sk_r, sk_h, sk_t, sc_r, sc_t, ss_r, ss_t,
              BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
        t, r = tl.program_id(0), tl.program_id(1).to(tl.int64)
        T = tl.num_programs(0)
        d = tl.arange(0, BD)
        dm = d < half
        cb, sb = Cos + r * sc_r + t * sc_t, Sin + r * ss_r + t * ss_t
        cos1 = tl.load(cb + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(cb + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(sb + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(sb + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        hq = tl.arange(0, BQ)[:, None]
        _rotate(Q + r * sq_r + t * sq_t, QO + (r * H * T + t) * 2 * half, cos1, cos2, sin1, sin2,
                H, half, sq_h, T * 2 * half, hq, d[None, :], BD)
        hk = tl.arange(0, BK)[:, None]
        _rotate(K + r * sk_r + t * sk_t, KO + (r * KVH * T + t) * 2 * half, cos1, cos2, sin1, sin2,
                KVH, half, sk_h, T * 2 * half, hk, d[None, :], BD)

    @triton.jit
    def _silu_mul(G, U, O, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        g = tl.load(G + i, mask=m, other=0.0)
        u = tl.load(U + i, mask=m, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu(gate), rounded as the plain path's
        tl.store(O + i, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)

    @triton.jit
    def _write_kv(K, V, KC, VC, Col, KVH, hd, sk_r, sk_h, sv_r, sv_h, skc_r, skc_h, skc_l, svc_r, svc_h, svc_l,
                  BH: tl.constexpr, BD: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        m = (h < KVH) & (d < hd)
        c = tl.load(Col + r)
        k = tl.load(K + r * sk_r + h * sk_h + d, mask=m)
        v = tl.load(V + r * sv_r + h * sv_h + d, mask=m)
        tl.store(KC + r * skc_r + h * skc_h + c * skc_l + d, k.to(KC.dtype.element_ty), mask=m)
        tl.store(VC + r * svc_r + h * svc_h + c * svc_l + d, v.to(VC.dtype.element_ty), mask=m)
