"""The rows of a batched forward: padding, and which weight sample each row runs.

A batch runs every request's prompt once per weight sample: K rows for a request of K samples.
Rows of different lengths are padded (left for generation and scoring, so the last real token
of every row is at the last position; right for training and for continuations of a cache),
and each row is mapped to its weight sample (seed, k) through a slot index.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def pad(rows: Sequence[list[int]], length: int | None = None, side: str = "left",
        value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded with ``value`` to ``length`` (default: the longest): ids, mask (CPU)."""
    length = max(len(r) for r in rows) if length is None else length
    if any(len(r) > length for r in rows):
        raise ValueError(f"a row of {max(len(r) for r in rows)} tokens does not fit the length {length}")
    if side == "left":
        ids = [[value] * (length - len(r)) + list(r) for r in rows]
        mask = [[0] * (length - len(r)) + [1] * len(r) for r in rows]
    else:
        ids = [list(r) + [value] * (length - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (length - len(r)) for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the mask (padding does not move a real token's position)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def sample_map(groups: Iterable[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """For row groups of (seed, K), K rows each (samples k = 0..K-1): the distinct weight samples
    (seed, k) in first-seen order, and each row's index into them."""
    keys: dict[tuple[int, int], int] = {}
    slots = [keys.setdefault((seed, k), len(keys)) for seed, K in groups for k in range(K)]
    return list(keys), slots
