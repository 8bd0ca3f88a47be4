"""Data-parallel reduction of the Kronecker statistics over ``torch.distributed`` ranks."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> Tuple[int, int]:
    """``(world size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_mean(t: Tensor) -> Tensor:
    """``t`` averaged over the ranks (in place; unchanged without a process group)."""
    size, _ = world()
    if size > 1:
        dist.all_reduce(t)
        t /= size
    return t


def all_reduce_statistics(batch: Dict[str, Tuple[Tensor, Tensor]]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Every layer's ``(A, G)`` averaged over the ranks in one flat all-reduce."""
    size, _ = world()
    if size == 1:
        return batch
    flat = all_reduce_mean(torch.cat([t.reshape(-1) for pair in batch.values() for t in pair]))
    out, offset = {}, 0
    for name, (a, g) in batch.items():
        a2 = flat[offset : offset + a.numel()].view_as(a)
        g2 = flat[offset + a.numel() : offset + a.numel() + g.numel()].view_as(g)
        offset += a.numel() + g.numel()
        out[name] = (a2, g2)
    return out

