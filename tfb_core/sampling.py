"""K weight samples in one batched forward: the sample-aware LoRA layer and its draws.

A weight sample k is one draw ``E_k = Omega * Z_k`` for every module, with ``Z_k`` standard
normal from a generator seeded by (seed, k, module index) (docs/method.md §2). The layer computes

    h = W0 x + s * B' (A' x)  +  s * B' (E_k x)
        \\__ base __/  \\_ mean (shared) _/  \\_ noise (rank r, per row) _/

so the base weights are read once for every row of the batch, and only the rank-r noise path
differs between rows. Rows are laid out sample-major inside each prompt: row ``b * K + k``
holds prompt b under sample k (``input_ids.repeat_interleave(K, 0)``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = ("torch.nn.Linear", "transformers.pytorch_utils.Conv1D")


def is_supported_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    n_in, n_out = module.weight.shape  # Conv1D stores its weight as (in, out)
    return n_in, n_out


class TFBLoRALayer(nn.Module):
    """A base layer plus a Bayesianized LoRA: deterministic ``B'``, Gaussian ``A'``.

    Parameters
    ----------
    base_layer : nn.Linear or transformers Conv1D
        The frozen base layer; its output is computed once for all rows.
    lora_A : Tensor, shape (r, n)
        ``A' = V^T A``, the posterior mean.
    lora_B : Tensor, shape (m, r)
        ``B' = U diag(d)``.
    d : Tensor, shape (r,)
        Singular values of the original ``B`` (descending).
    scaling : float
        ``s = lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
    index : int
        The module index that seeds this module's draws.
    """

    def __init__(self, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 d: torch.Tensor, scaling: float, index: int, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.lora_A = nn.Parameter(lora_A.to(weight.device, weight.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B.to(weight.device, weight.dtype), requires_grad=False)
        self.register_buffer("d", d.float().to(weight.device), persistent=False)
        self.scaling = float(scaling)
        self.index = index
        self.name = name
        # set by `weight_samples`: noise (S, r, n) and, for mixed batches, a row -> sample map
        self.noise: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x = x.to(self.lora_A.dtype)
        h = F.linear(x, self.lora_A)  # (..., r), shared by every sample
        if self.noise is not None:
            h = h + self._noise_term(x)
        h = h.to(result.dtype)
        if result.is_contiguous() and not torch.is_grad_enabled():
            # result += s * h B'^T in the GEMM's epilogue: one kernel, no (..., m) temporaries
            out = result.view(-1, result.shape[-1])
            out.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t().to(result.dtype), alpha=self.scaling)
            return result
        return result + self.scaling * F.linear(h, self.lora_B.to(result.dtype))

    def _noise_term(self, x: torch.Tensor) -> torch.Tensor:
        """``E_k x`` for each row's sample k: (rows, ..., n) -> (rows, ..., r)."""
        noise = self.noise  # (S, r, n)
        rows, n = x.shape[0], x.shape[-1]
        xr = x.reshape(rows, -1, n)  # (rows, T, n)
        if self.slots is None:  # regular layout: row b*K + k uses sample k
            K = noise.shape[0]
            if rows % K:
                raise ValueError(f"{rows} rows are not B x K for K = {K} weight samples: "
                                 f"repeat each prompt K times (repeat_interleave) or pass slots")
            xk = xr.view(rows // K, K, -1, n)  # (B, K, T, n)
            h = torch.einsum("bktn,krn->bktr", xk, noise)
        elif xr.shape[1] == 1:  # one token per row (a decode step): every sample's E x in one GEMM,
            S, r = noise.shape[:2]  # then each row's own; no (rows, r, n) copy of gathered noise
            h = F.linear(xr[:, 0], noise.view(S * r, n)).view(rows, S, r)
            h = h.gather(1, self.slots.view(rows, 1, 1).expand(rows, 1, r))  # (rows, 1, r)
        else:  # any row -> sample map (a mixed batch of requests)
            h = torch.bmm(xr, noise[self.slots].transpose(1, 2))  # (rows, T, r)
        return h.reshape(*x.shape[:-1], -1)


def draw_seed(seed: int, k: int, module_index: int) -> int:
    """A 63-bit generator seed for (seed, sample k, module): independent of K and the batch."""
    digest = hashlib.sha256(f"tfb:{seed}:{k}:{module_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def standard_normal(seed: int, k: int, module_index: int, shape: Sequence[int]) -> torch.Tensor:
    """``Z_k`` for one module: float32 on CPU, the same on every machine."""
    gen = torch.Generator().manual_seed(draw_seed(seed, k, module_index))
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


class DrawCache:
    """Standard-normal draws per (seed, k), on the layers' device, kept for reuse (LRU)."""

    def __init__(self, layers: Sequence[TFBLoRALayer], max_samples: int = 64, max_stacks: int = 4):
        self.layers = layers
        self.max_samples = max_samples
        self.max_stacks = max_stacks
        self._cache: OrderedDict[tuple[int, int], list[torch.Tensor]] = OrderedDict()
        # per (sigma, samples): the scaled noise of every layer, reused by every decode step
        self._stacks: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()

    def __contains__(self, key: tuple[int, int]) -> bool:
        """Whether the draws of (seed, k) are cached."""
        return (int(key[0]), int(key[1])) in self._cache

    def noise(self, sigma: float, samples: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Per layer, ``E`` stacked over ``samples``: (S, r, n) in the layer's dtype (LRU)."""
        key = (float(sigma), tuple((int(a), int(b)) for a, b in samples))
        if key in self._stacks:
            self._stacks.move_to_end(key)
            return self._stacks[key]
        draws = [self.get(seed, k) for seed, k in samples]  # S lists of per-layer Z
        stacks = [noise_stack(layer, (z[i] for z in draws), sigma) for i, layer in enumerate(self.layers)]
        self._stacks[key] = stacks
        if len(self._stacks) > self.max_stacks:
            self._stacks.popitem(last=False)
        return stacks

    def get(self, seed: int, k: int) -> list[torch.Tensor]:
        key = (int(seed), int(k))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        z = [standard_normal(seed, k, layer.index, layer.lora_A.shape).to(layer.lora_A.device)
             for layer in self.layers]
        self._cache[key] = z
        if len(self._cache) > self.max_samples:
            self._cache.popitem(last=False)
        return z


def noise_stack(layer: TFBLoRALayer, draws: Iterable[torch.Tensor], sigma: float) -> torch.Tensor:
    """``E = (sigma / d)[:, None] * Z`` for each draw, stacked: (S, r, n) in the layer's dtype."""
    omega = row_std(layer.d, sigma)  # (r,)
    z = torch.stack(list(draws))  # (S, r, n)
    return (omega[None, :, None] * z).to(layer.lora_A.dtype)


def row_std(d: torch.Tensor, sigma: float, tol: float | torch.Tensor | None = None) -> torch.Tensor:
    """``Omega_i = sigma / d_i``; rows of a rank-deficient B (d_i below tol) get 0. Computed on
    d's device without a sync (the default tolerance stays a tensor)."""
    tol = rank_tolerance(d) if tol is None else tol
    keep = d > tol
    return torch.where(keep, sigma / torch.where(keep, d, torch.ones_like(d)), torch.zeros_like(d))


def rank_tolerance(d: torch.Tensor) -> torch.Tensor:
    """Singular values below this are treated as zero (numpy's matrix_rank rule, scaled): a
    0-dim tensor on d's device."""
    if d.numel() == 0:
        return d.new_zeros(())
    return d.max() * d.numel() * torch.finfo(torch.float32).eps * 10


@contextmanager
def weight_samples(layers: Sequence[TFBLoRALayer], cache: DrawCache, sigma: float,
                   samples: Sequence[tuple[int, int]], slots: torch.Tensor | None = None
                   ) -> Iterator[None]:
    """Activate weight samples for the forwards inside the block.

    Parameters
    ----------
    samples : sequence of (seed, k)
        The S distinct weight samples of the batch.
    slots : LongTensor, shape (rows,), default=None
        Row -> index into ``samples``. ``None`` means the regular layout: S = K samples and row
        ``b * K + k`` uses sample k.

    With ``sigma == 0`` every sample is the mean adapter and no noise path runs.
    """
    try:
        if sigma > 0:
            device_slots = None if slots is None else slots.to(layers[0].lora_A.device)
            for layer, noise in zip(layers, cache.noise(sigma, samples)):
                layer.noise = noise
                layer.slots = device_slots
        yield
    finally:
        for layer in layers:
            layer.noise = None
            layer.slots = None
