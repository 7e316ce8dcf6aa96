"""CPU buffers of the lean step kept from one batch to the next.

The self-attention caches and the output buffer of a batch are large (at batch 128, beam 5
on transformer-base, 13 buffers of 41 x 640 x 512 floats and an 82 MB output): made afresh
per batch, each of their pages is mapped, faulted in and zeroed by the kernel again when the
batch first writes it: 296,000 faults for that one batch, 266,000 of them in the caches, with
their growth and shrinking (BENCHMARKS.md, "Page faults of the lean step's own buffers").
A generator keeps one pool; a search takes its buffers from it,
and the next search takes the same ones again, whose pages are mapped already.

Off the CPU the pool gives new tensors: PyTorch's caching allocator already reuses device
memory.
"""

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class BufferPool:
    """Flat buffers handed out once per search (``new_search``), each to one taker."""

    def __init__(self) -> None:
        self._kept: List[Tensor] = []  # every buffer the pool holds
        self._free: List[Tensor] = []  # those not handed out in this search

    def new_search(self) -> None:
        """A new search: the buffers of the last one are no longer read."""
        self._free = list(self._kept)

    def take(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` like ``like``, uninitialized: the front of the
        smallest free buffer that holds it, else a new buffer (replacing a free one too small)."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        needed = math.prod(shape)
        same_type = [i for i, buffer in enumerate(self._free) if buffer.dtype == like.dtype]
        fitting = [i for i in same_type if self._free[i].numel() >= needed]
        if fitting:
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
            return buffer[:needed].view(shape)
        if same_type:  # too small for this search: let it go
            too_small = self._free.pop(max(same_type, key=lambda i: self._free[i].numel()))
            self._kept = [buffer for buffer in self._kept if buffer is not too_small]
        buffer = torch.empty(needed, dtype=like.dtype, device=like.device)
        self._kept.append(buffer)
        return buffer.view(shape)


def front_of(spare: Optional[Tensor], shape: Tuple[int, ...], like: Tensor, pool: BufferPool) -> Tensor:
    """A contiguous buffer of ``shape`` like ``like``: the front of ``spare`` where it is large
    enough (its pages are mapped already), else one from ``pool``."""
    needed = math.prod(shape)
    if spare is None or spare.numel() < needed or spare.dtype != like.dtype or spare.device != like.device:
        return pool.take(shape, like)
    return spare.view(-1)[:needed].view(shape)


def views_per_buffer(cached: Optional[Tuple[Tuple[Tensor, ...], list]], buffers: Tuple[Tensor, ...], make: Callable) -> Tuple[Tuple[Tensor, ...], list]:
    """``(buffers, [make(b) for b in buffers])``: ``cached`` while it was made for these very buffers."""
    if cached is None or len(cached[0]) != len(buffers) or any(old is not new for old, new in zip(cached[0], buffers)):
        cached = (buffers, [make(buffer) for buffer in buffers])
    return cached
