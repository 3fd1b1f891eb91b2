"""The hand-written Llama-family forward both CUDA engines run, its CUDA graphs and its noise slots.

:class:`~tfb_core.cuda_decode.StaticDecoder` (one new token per row over a static KV cache) and
:class:`~tfb_core.cuda_prefill.PrefillEngine` (the scoring forward over left-padded rows) share

- the forward: :func:`embed`, :func:`layers` (RMSNorm, q/k/v, RoPE, the gated MLP; the model's
  own modules for every projection and the MLP, so the TFB layers run exactly as in the eager
  engine) and :func:`head`; each engine passes its own attention (``attend``);
- few kernels: the residual add and the next RMSNorm, RoPE of q and k, and the MLP's
  ``silu(gate) * up`` each in one kernel on CUDA (:mod:`tfb_core.fused`);
- the decode step's attention, :func:`attend_decode`: one query per row over a static KV cache,
  reading only each row's live columns (a Triton kernel on CUDA, every column elsewhere);
- each row's weight sample ``E_k`` read from fixed noise buffers through a row -> slot map
  (:func:`row_noise`), the buffers' slots given to (seed, k) pairs by :func:`assign_slots`;
- :class:`GraphSet`: the CUDA graphs captured into one memory pool (warm-up on a side stream,
  a new pool after the graphs are dropped).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Callable, Hashable, Iterable, Iterator, Sequence as Seq

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fused
from .fused import add_rms_norm, rope, silu_mul
from .sampling import noise_stack
from .trunk import attention_mask

try:  # the decode attention's kernel (attend_decode); without it, the dense attention
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch
    triton = None

SUPPORTED_MODEL_TYPES = ("llama",)
SILU = ("SiLU", "SiLUActivation")  # the MLP activations :func:`mlp` fuses with the product


def is_supported(model) -> bool:
    """Whether the CUDA engines can run this model (the Llama family)."""
    return getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES


def require_supported(model) -> None:
    """A ValueError naming the model type unless :func:`is_supported`."""
    if not is_supported(model):
        raise ValueError(f"model type {getattr(model.config, 'model_type', None)!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Llama-family config."""
    heads = config.num_attention_heads
    return heads, config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device (streams and graph replays follow it); a no-op
    off CUDA. The server's worker thread starts on cuda:0 whatever ``--device`` says."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


ROW_STEP = 64  # above this many rows, graphed shapes are multiples of it


def graph_rows(n: int) -> int:
    """The rows a forward of ``n`` rows runs when its shape is graphed: a power of two up to
    ``ROW_STEP``, a multiple of ``ROW_STEP`` above (640 rows run 640, not 1,024: a few more
    graphs, at most ``ROW_STEP`` - 1 wasted rows)."""
    return pow2(n) if n <= ROW_STEP else ROW_STEP * -(-n // ROW_STEP)


# --- the forward -------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm module's output in one fused kernel (float32 inside, as the module)."""
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate_half_matrix(head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """R with ``y @ R == rotate_half(y)`` (exact: one +-1 term per output), cached per device
    and dtype. Call it outside a CUDA graph capture first (the engines' warm-up does)."""
    return _rotation(head_dim, like.device, like.dtype)


@functools.lru_cache(maxsize=None)
def _rotation(head_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _rotate_half(torch.eye(head_dim, device=device, dtype=dtype))


def embed(model, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings (R, T, d) of ``ids`` (R, T) and RoPE's cos, sin (R, 1, T, hd) at ``pos``."""
    inner = model.model
    x = inner.embed_tokens(ids)  # (R, T, d)
    cos, sin = inner.rotary_emb(x, pos)  # (R, T, hd)
    return x, cos[:, None], sin[:, None]  # (R, 1, T, hd)


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layers(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
           fan_out: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The decoder layers over ``x`` (R, T, d): the residual stream after the last layer.

    ``attend(i, q, k, v)`` is layer ``i``'s attention: q (R, H, T, hd) and k (R, KVH, T, hd)
    after RoPE, v (R, KVH, T, hd); it returns (R, T, H * hd) for ``o_proj``.

    ``fan_out = (s, index)``: the shared trunk. Layers below ``s`` run on the rows of ``x`` (one
    per sequence: no weight noise there, so every sample of a sequence computes the same); at
    layer ``s`` the stream, cos and sin become ``index``'s rows (R' = len(index), each weight
    sample's row a copy of its sequence's), and ``attend`` sees R' rows from there up.
    """
    H, KVH, hd = attention_shape(model.config)
    R, T = x.shape[:2]
    rot = rotate_half_matrix(hd, x)
    stack = model.model.layers
    h = rms_norm(stack[0].input_layernorm, x)
    for i, layer in enumerate(stack):
        if fan_out is not None and i == fan_out[0]:
            index = fan_out[1]
            x, h, cos, sin = x[index], h[index], cos[index], sin[index]
            R = x.shape[0]
        attn = layer.self_attn
        q = attn.q_proj(h).view(R, T, H, hd).transpose(1, 2)  # (R, H, T, hd)
        k = attn.k_proj(h).view(R, T, KVH, hd).transpose(1, 2)
        v = attn.v_proj(h).view(R, T, KVH, hd).transpose(1, 2)
        q, k = rope(q, k, cos, sin, rot)
        x, h = add_rms_norm(x, attn.o_proj(attend(i, q, k, v)), layer.post_attention_layernorm)
        y = mlp(layer.mlp, h)
        if i + 1 < len(stack):  # the residual add and the next layer's norm in one kernel
            x, h = add_rms_norm(x, y, stack[i + 1].input_layernorm)
        else:
            x = x + y
    return x


def mlp(module, h: torch.Tensor) -> torch.Tensor:
    """A Llama MLP module's output: its own projections, ``silu(gate) * up`` in one kernel."""
    if type(getattr(module, "act_fn", None)).__name__ not in SILU:
        return module(h)
    return module.down_proj(silu_mul(module.gate_proj(h), module.up_proj(h)))


def prompt_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (R, 1, T, T) of left-padded prompts (``mask``: (R, T), 1 for
    real tokens): causal over the real keys; a padding query sees itself only (never a row of
    -inf, whose softmax is NaN): :func:`~tfb_core.trunk.attention_mask` with every column a query."""
    return attention_mask(mask, mask.shape[1], dtype)


# the prompt attention's SDPA backends: not cuDNN's, which torch prefers on Hopper with a mask
# and which builds an execution plan for every new (rows, length), ~0.2 s each; the engines meet
# a new shape with every join or scoring batch of a new size (a first join at 8B: 236 ms, the
# same join again 26-67 ms; bench/README.md)
PROMPT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of whole prompts: q (R, H, T, hd), k and v (R, KVH, T, hd), the
    additive ``mask`` of :func:`prompt_mask`; returns (R, T, H * hd) for ``o_proj``."""
    R, H, T, hd = q.shape
    KVH = k.shape[1]
    k = k[:, :, None].expand(R, KVH, H // KVH, T, hd).reshape(R, H, T, hd)
    v = v[:, :, None].expand(R, KVH, H // KVH, T, hd).reshape(R, H, T, hd)
    with sdpa_kernel(PROMPT_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
    return o.transpose(1, 2).reshape(R, T, H * hd)


def attend_decode(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, bias: torch.Tensor,
                  last: torch.Tensor, scaling: float) -> torch.Tensor:
    """Grouped-query attention of one new token per row over a static KV cache.

    Parameters
    ----------
    q : (R, H, 1, hd)
        Each row's query after RoPE.
    kc, vc : (R, KVH, L, hd)
        The cache's keys and values, the new token's already written at column ``last``.
    bias : (R, L) float32
        0 for a column the row attends to, -inf for one it does not (left padding; every
        column past ``last``).
    last : (R,) int64
        Each row's last live column: only columns ``0 .. last`` are read.
    scaling : float
        The score scale (``hd ** -0.5``).

    Returns
    -------
    (R, 1, H * hd) in q's dtype, for ``o_proj``. On CUDA with Triton, :func:`_attend_kernel`
    reads each row's live columns alone (float32 scores and softmax, the weights rounded to
    the cache's dtype for the product with V, as the dense path); elsewhere, or once a Triton
    kernel failed (:func:`tfb_core.fused.guarded`), :func:`attend_decode_dense` reads every
    column. Neither syncs with the host, so a step that calls it can be captured in a CUDA graph.
    """
    if triton is not None and q.is_cuda and fused.BROKEN is None:
        return fused.guarded("attend_decode", lambda: _attend_kernel(q, kc, vc, bias, last, scaling),
                             lambda: attend_decode_dense(q, kc, vc, bias, scaling))
    return attend_decode_dense(q, kc, vc, bias, scaling)


def attend_decode_dense(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, bias: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """:func:`attend_decode` with two matmuls over all ``L`` columns of the cache (the bias
    masks what a row does not attend to): where the kernel cannot run."""
    R, H, _, hd = q.shape
    KVH = kc.shape[1]
    qg = q.reshape(R, KVH, H // KVH, hd)
    scores = torch.add(bias[:, None, None, :], torch.matmul(qg, kc.transpose(-1, -2)), alpha=scaling)  # float32
    w = torch.softmax(scores, -1).to(vc.dtype)  # (R, KVH, G, L)
    return torch.matmul(w, vc).reshape(R, 1, H * hd).to(q.dtype)


DECODE_BLOCK = 64  # cache columns per iteration of the kernel
WAVE = 264  # programs wanted per launch: two per multiprocessor of an H100 (132)
MAX_SPLITS = 16  # the merge kernel unrolls its loop over the splits


def _attend_kernel(q, kc, vc, bias, last, scaling):
    """:func:`attend_decode` in Triton: one program per (row, KV head, split of the columns),
    the KV head's G query heads together (one ``tl.dot`` of a block of 16 padded heads); with
    few rows the columns are split (flash-decoding) so the launch fills the GPU, and a second
    kernel merges the splits."""
    R, H, _, hd = q.shape
    KVH, L = kc.shape[1], kc.shape[2]
    G = H // KVH
    blocks = triton.cdiv(L, DECODE_BLOCK)
    splits = min(blocks, triton.cdiv(WAVE, R * KVH), MAX_SPLITS)
    chunk = DECODE_BLOCK * triton.cdiv(blocks, splits)  # columns per split
    splits = triton.cdiv(L, chunk)
    out = torch.empty(R, 1, H * hd, device=q.device, dtype=q.dtype)
    BG, BD = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(hd))
    if splits == 1:
        acc = ml = out  # unused: the first kernel writes the output
    else:
        acc = torch.empty(R, KVH, splits, BG, BD, device=q.device, dtype=torch.float32)
        ml = torch.empty(R, KVH, splits, 2, BG, device=q.device, dtype=torch.float32)
    _decode_split[(R, KVH, splits)](
        q, kc, vc, bias, last, out, acc, ml, scaling, G, hd, chunk,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), bias.stride(0),
        BG=BG, BD=BD, BN=DECODE_BLOCK, SPLITS=splits, num_warps=4)
    if splits > 1:
        _decode_merge[(R, KVH)](acc, ml, out, G, hd, BG=BG, BD=BD, SPLITS=splits, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _decode_split(Q, K, V, Bias, Last, Out, Acc, ML, scaling, G, hd, chunk,
                      sq_r, sq_h, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l, sb_r,
                      BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr):
        r, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r64 = r.to(tl.int64)
        g = tl.arange(0, BG)
        d = tl.arange(0, BD)
        gd = (g[:, None] < G) & (d[None, :] < hd)
        q = tl.load(Q + r64 * sq_r + (h * G + g)[:, None] * sq_h + d[None, :], mask=gd, other=0.0)  # (BG, BD)
        start = s * chunk
        stop = tl.minimum(start + chunk, tl.load(Last + r).to(tl.int32) + 1)  # this split's live columns
        m = tl.full([BG], float("-inf"), tl.float32)  # running max of each head's scores
        l = tl.zeros([BG], tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros([BG, BD], tl.float32)
        kp = K + r64 * sk_r + h * sk_h
        vp = V + r64 * sv_r + h * sv_h
        j = start
        while j < stop:  # (a while loop: Triton's CPU interpreter cannot range over a loaded bound)
            cols = j + tl.arange(0, BN)
            live = cols < stop
            kv_mask = live[:, None] & (d[None, :] < hd)
            k = tl.load(kp + cols[:, None] * sk_l + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
            b = tl.load(Bias + r64 * sb_r + cols, mask=live, other=float("-inf"))
            x = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling + b[None, :]  # (BG, BN) float32
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of padding only
            p = tl.exp(x - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(vp + cols[:, None] * sv_l + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            l = l * alpha + tl.sum(p, 1)
            m = m_new
            j += BN
        if SPLITS == 1:
            o = acc / l[:, None]
            tl.store(Out + r64 * G * tl.num_programs(1) * hd + (h * G + g)[:, None] * hd + d[None, :],
                     o.to(Out.dtype.element_ty), mask=gd)
        else:
            base = (r64 * tl.num_programs(1) + h) * SPLITS + s
            tl.store(Acc + base * BG * BD + g[:, None] * BD + d[None, :], acc)
            tl.store(ML + base * 2 * BG + g, m)
            tl.store(ML + base * 2 * BG + BG + g, l)

    @triton.jit
    def _decode_merge(Acc, ML, Out, G, hd, BG: tl.constexpr, BD: tl.constexpr, SPLITS: tl.constexpr):
        r, h = tl.program_id(0), tl.program_id(1)
        r64 = r.to(tl.int64)
        g = tl.arange(0, BG)
        d = tl.arange(0, BD)
        base = (r64 * tl.num_programs(1) + h) * SPLITS
        m = tl.full([BG], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            m = tl.maximum(m, tl.load(ML + (base + s) * 2 * BG + g))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, BD], tl.float32)
        for s in tl.static_range(SPLITS):
            w = tl.exp(tl.load(ML + (base + s) * 2 * BG + g) - m_safe)  # a split with no live column: 0
            l += w * tl.load(ML + (base + s) * 2 * BG + BG + g)
            acc += w[:, None] * tl.load(Acc + (base + s) * BG * BD + g[:, None] * BD + d[None, :])
        o = acc / l[:, None]
        tl.store(Out + r64 * G * tl.num_programs(1) * hd + (h * G + g)[:, None] * hd + d[None, :],
                 o.to(Out.dtype.element_ty), mask=(g[:, None] < G) & (d[None, :] < hd))


def head(model, x: torch.Tensor) -> torch.Tensor:
    """The final norm and the LM head: logits of the positions in ``x``."""
    return model.lm_head(rms_norm(model.model.norm, x))


# --- weight samples: noise buffers and their slots ------------------------------------------------

def noise_buffers(post, slots: int, device: torch.device) -> list[torch.Tensor]:
    """Per noisy TFB layer (``post.noisy_layers``), zeroed room for ``slots`` weight samples:
    (slots, r, n), the layer's dtype."""
    return [torch.zeros(slots, *layer.lora_A.shape, device=device, dtype=layer.lora_A.dtype)
            for layer in post.noisy_layers]


def sample_noise(post, buffers: Seq[torch.Tensor], slot: int, key: tuple[int, int], sigma: float) -> None:
    """Write ``E_k`` of weight sample ``key`` = (seed, k) into ``slot`` of every layer's buffer
    (the values the eager engine's noise stacks hold, in the layer's dtype)."""
    z = post.draws.get(*key)
    for buf, layer, zi in zip(buffers, post.noisy_layers, z):
        buf[slot] = noise_stack(layer, [zi], sigma)[0]


def assign_slots(post, buffers: Seq[torch.Tensor], slot_of: OrderedDict, keys: Iterable[tuple[int, int]],
                 slots: int, sigma: float) -> None:
    """Give every (seed, k) of ``keys`` a slot of ``buffers`` (``slots`` of them) holding its ``E_k``.

    ``slot_of`` maps (seed, k) -> slot, least recently used first. A key already there keeps its
    slot (and becomes the most recently used); a new one takes the lowest free slot, else the
    slot of the least recently used key not in ``keys``. With ``sigma`` 0 nothing is written. A
    failed write leaves its key unmapped (never a half-written slot).
    """
    wanted = list(keys)
    free = sorted(set(range(slots)) - set(slot_of.values()))
    for key in wanted:
        if key in slot_of:
            slot_of.move_to_end(key)
            continue
        if not free:  # evict the least recently used sample this call does not need
            old = next(k for k in slot_of if k not in wanted)
            free.append(slot_of.pop(old))
        slot = free.pop(0)
        if sigma > 0:
            try:
                sample_noise(post, buffers, slot, key, sigma)
            except BaseException:
                free.insert(0, slot)
                raise
        slot_of[key] = slot


@contextmanager
def row_noise(post, buffers: Seq[torch.Tensor], slots: torch.Tensor) -> Iterator[None]:
    """The TFB layers read each row's ``E_k`` from fixed buffers through ``slots`` (addresses
    that stay put, so a CUDA graph can capture them). No buffers: the mean adapter."""
    try:
        for layer, noise in zip(post.noisy_layers, buffers):
            layer.noise, layer.slots = noise, slots
        yield
    finally:
        for layer in post.layers:
            layer.noise = layer.slots = None


# --- CUDA graphs -----------------------------------------------------------------------------------

class Graphed:
    """What an engine that keeps a :class:`GraphSet` in ``_graphs`` shows of it."""

    _graphs: "GraphSet"

    @property
    def graphs(self) -> OrderedDict:
        """key -> (CUDA graph, ...), least recently used first."""
        return self._graphs.graphs

    @property
    def capture_error(self) -> str | None:
        return self._graphs.error


class GraphSet:
    """An engine's CUDA graphs (key -> entry, oldest first), captured into one memory pool.

    :meth:`drop` forgets every graph *and* the pool: once its last graph is freed, the allocator
    releases a pool, and capturing into the released pool's handle again fails an internal
    assert (seen on an H200 after a join grew the buffers): a capture after a drop gets a new
    pool. ``error`` is set when a capture is refused for a reason other than memory (the engine
    then runs eagerly from then on).
    """

    def __init__(self):
        self.graphs: OrderedDict[Hashable, tuple] = OrderedDict()
        self.error: str | None = None
        self._pool = None

    def capture(self, fn: Callable[[], torch.Tensor],
                reset: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Warm ``fn`` up twice on a side stream, call ``reset`` (undoing what the warm-up moved),
        capture one ``fn`` into the pool: (graph, its output). None when out of memory (not the
        graph's fault: the caller runs eagerly, a later call captures) or when the capture is
        refused (``error`` set, every graph dropped)."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        fn()
            finally:
                torch.cuda.current_stream().wait_stream(stream)
            if reset is not None:
                reset()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        except Exception as e:  # e.g. an op that syncs: run eagerly from now on
            self.error = f"{type(e).__name__}: {e}"
            self.drop()
            torch.cuda.synchronize()
            return None
        return graph, out

    def drop(self) -> None:
        """Forget every graph and their memory pool (see the class)."""
        self.graphs.clear()
        self._pool = None
