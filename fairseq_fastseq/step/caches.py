"""Typed caches of the lean decoder step: one object per layer instead of string keys in
fairseq's dict of dicts.

Self-attention: keys and values time-major, ``(capacity, rows, heads, head_dim)``. A step
writes one time slice in place (``exact``: its projections write it). On the CPU the rows
stay in slots (``slots.py``): a beam reorder copies, in place, only the histories of a
parent's later children; for the C++ self-attention of the tiers that round differently the
rows stay where they were written, read through a table (``histories.py``), and a beam
reorder copies nothing. Elsewhere a beam reorder is one ``index_select`` into a spare
buffer (a slice along time is contiguous: the copy's ``out=``), and the buffer it replaces
is the spare of the next layer's copy: the cache plus one layer's copy, as in fairseq
(which copies the whole cache twice per layer and step). The attention reads
``(rows * heads, length, head_dim)`` strided views: fairseq's ``bmm`` values.
The encoder-attention caches: ``encoder_caches.py``.
"""

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import native
from .encoder_caches import CrossAttentionCache
from .histories import Histories
from .pool import BufferPool, front_of, views_per_buffer
from .slots import RowSlots

# Off the CPU the cache grows by this many time slices when full: peak device memory close to
# fairseq's, growing (a copy of the filled slices) rare. On the CPU a buffer holds every step
# from the start: unwritten pages cost no memory, and no growth copies into fresh pages
# (page faults: BENCHMARKS.md, "Page faults of the lean step's own buffers").
GROWTH = 16


class SelfAttentionCache:
    """One layer's self-attention keys and values, time-major, filled up to ``length``."""

    SLICES_WRITABLE = True  # a step's projections may write into ``next_slices``

    def __init__(self, heads: int, head_dim: int, max_steps: int, pool: Optional[BufferPool] = None) -> None:
        self.heads, self.head_dim, self.max_steps = heads, head_dim, max_steps
        self.pool = pool or BufferPool()  # where its buffers come from (``pool.py``)
        self.length = 0
        self.keys: Optional[Tensor] = None  # (capacity, rows, heads, head_dim)
        self.values: Optional[Tensor] = None
        # (capacity, rows) bool, True where a row's input token was padding; made the first
        # time padding enters a step (fairseq then masks those positions from then on).
        self.padding: Optional[Tensor] = None
        self._rows: Optional[int] = None  # after ``move``: the rows in use, the buffer's first ones
        self._numpy_views: Optional[Tuple[Tuple[Tensor, ...], list]] = None  # ``_bits``
        self._merged_views: Optional[Tuple[Tuple[Tensor, ...], list]] = None  # ``_views``
        self._step_rows = 0  # the rows of the step being written (``next_slices``)

    def next_slices(self, like: Tensor) -> Tuple[Tensor, Tensor]:
        """Where this step's keys and values go, (rows, heads * head_dim) each for the rows of
        ``like``: a projection can write them there itself, and ``commit`` then."""
        rows = self.make_room(like)
        t = self.length
        return tuple(flat[t] if rows == flat.size(1) else flat[t, :rows] for _, flat in self._views())

    def make_room(self, like: Tensor) -> int:
        """Room for this step's keys and values of the rows of ``like`` (grown if needed); the rows."""
        rows = self._step_rows = like.size(0)
        if self.keys is None or self.length == self.keys.size(0) or rows > self.keys.size(1):
            self._grow(like, rows)
        return rows

    def append(self, k: Tensor, v: Tensor, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Write this step's ``k``/``v`` (rows, heads * head_dim, or any view of it) and ``commit``."""
        for slice_, new in zip(self.next_slices(k), (k, v)):
            slice_.view(new.shape).copy_(new)
        return self.commit(pad)

    def commit(self, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Close the step written into ``next_slices``, with ``pad`` (rows,) bool or None; return
        all keys and values so far as (rows * heads, length, head_dim) views."""
        self.close_step(pad)
        width = self.attended_rows() * self.heads
        # The first ``rows`` of each time slice (fewer than the buffer's after sentences left
        # a search in slots, ``move``): the same strided views, with a longer time stride.
        keys, values = (merged if width == merged.size(1) else merged[:, :width] for merged, _ in self._views())
        return keys[: self.length].transpose(0, 1), values[: self.length].transpose(0, 1)

    def close_step(self, pad: Optional[Tensor]) -> None:
        """Close the step written into ``next_slices`` (``make_room``), with ``pad`` (rows,) bool or None."""
        t, rows = self.length, self._step_rows
        if pad is not None and self.padding is None:
            self.padding = torch.zeros(self.keys.shape[:2], dtype=torch.bool, device=self.keys.device)
        if self.padding is not None:
            self.padding[t, :rows] = False if pad is None else pad
        self.length = t + 1

    def attended_rows(self) -> int:
        """The cache rows this step reads: its own."""
        return self._step_rows

    def history(self) -> Optional[Tensor]:
        """(length, rows) int64: the cache row holding each row's entry of each slice; None
        where row ``r``'s history is in row ``r`` (``IndexedSelfAttentionCache``)."""
        return None

    def _views(self) -> List[Tuple[Tensor, Tensor]]:
        """Keys and values as (capacity, rows * heads, head_dim), (capacity, rows, embed) views, once per buffer."""
        make = lambda b: (b.view(b.size(0), -1, self.head_dim), b.view(*b.shape[:2], -1))  # noqa: E731
        self._merged_views = views_per_buffer(self._merged_views, (self.keys, self.values), make)
        return self._merged_views[1]

    @property
    def rows(self) -> int:
        """The rows the cache holds: the buffer's, or after ``move`` the first ``rows`` of it."""
        return self._rows if self._rows is not None else (0 if self.keys is None else self.keys.size(1))

    def padding_so_far(self) -> Optional[Tensor]:
        """(rows, length) bool: the positions to mask, or None while no padding came in."""
        return None if self.padding is None else self.padding[: self.length, : self.rows].t()

    def _grow(self, like: Tensor, rows: int) -> None:
        """Capacity for every step of the search on the CPU; elsewhere ``GROWTH`` more slices
        (at most the search's steps, but at least one more)."""
        length = self.length
        limit = self.max_steps if like.device.type == "cpu" else length + GROWTH
        capacity = max(length + 1, min(limit, self.max_steps))
        grown = [self.pool.take((capacity, rows, self.heads, self.head_dim), like) for _ in range(2)]
        kept = 0 if self.keys is None else min(rows, self.keys.size(1))  # fewer: sentences left; more: beams came
        if self.keys is not None:
            grown[0][:length, :kept] = self.keys[:length, :kept]
            grown[1][:length, :kept] = self.values[:length, :kept]
        self.keys, self.values = grown
        if self.padding is not None:
            padding = torch.zeros(capacity, rows, dtype=torch.bool, device=like.device)
            padding[:length, :kept] = self.padding[:length, :kept]
            self.padding = padding
        self._rows = None

    def reorder(self, order: Tensor, spare: Optional[Tensor]) -> Optional[Tensor]:
        """Row ``i`` takes old row ``order[i]``; copies go into ``spare`` (the front of it when
        fewer rows are left, so that sentences leaving need no new buffer; one from the pool if
        it is too small) and the replaced buffers are handed on: returns the spare for the next copy."""
        length = self.length
        if self.keys is None:
            return spare
        reordered = []
        for buffer in (self.keys, self.values):
            shape = (buffer.size(0), order.numel(), self.heads, self.head_dim)
            spare = front_of(spare, shape, buffer, self.pool)
            torch.index_select(buffer[:length], 1, order, out=spare[:length])
            reordered.append(spare)
            spare = buffer
        self.keys, self.values = reordered
        if self.padding is not None:
            self.padding = self.padding.index_select(1, order)
        self._rows = None
        return spare

    def move(self, sources: np.ndarray, destinations: np.ndarray, rows: int) -> None:
        """Copy the histories in slots ``sources`` to slots ``destinations`` (``slots.py``; no
        slot is both) in place, and hold the first ``rows`` slots from now on. The copies are
        one pass of ``memcpy`` (``native.exact_attention().copy_rows``) or, without the
        extension, go through NumPy views of the buffers: twice the speed of ``index_select``
        + ``index_copy_`` (BENCHMARKS.md, "Self-attention histories in slots"), half that of
        the copies in one pass ("exact on an Intel Xeon")."""
        if sources.size > 0:
            buffers = self._buffers()
            kernels = native.exact_attention() if all(b.device.type == "cpu" and b.is_contiguous() for b in buffers) else None
            if kernels is not None:
                from_rows, to_rows = torch.from_numpy(sources.astype(np.int64)), torch.from_numpy(destinations.astype(np.int64))
                for buffer in buffers:
                    kernels.copy_rows(buffer, self.length, from_rows, to_rows)
            else:
                for bits in self._bits():
                    filled = bits[: self.length]
                    filled[:, destinations] = filled[:, sources]
        self._rows = rows

    def _buffers(self) -> Tuple[Tensor, ...]:
        return (self.keys, self.values) + (() if self.padding is None else (self.padding,))

    def _bits(self) -> List[np.ndarray]:
        """NumPy views of the bits of the keys, values (and padding) buffers, made once per
        buffer (each view costs PyTorch half a dozen operator calls, each ``move`` needs them)."""
        self._numpy_views = views_per_buffer(self._numpy_views, self._buffers(), lambda b: b.view(_BITS_OF_SIZE[b.element_size()]).numpy())
        return self._numpy_views[1]


class IndexedSelfAttentionCache(SelfAttentionCache):
    """A self-attention cache whose rows stay where each step wrote them, read through the
    decoder's ``Histories`` (``histories.py``): a beam reorder touches none of it."""

    def __init__(self, heads: int, head_dim: int, max_steps: int, histories: Histories, pool: Optional[BufferPool] = None) -> None:
        super().__init__(heads, head_dim, max_steps, pool)
        self.histories = histories

    def attended_rows(self) -> int:
        return self.keys.size(1)  # every cached row: the histories name which

    def history(self) -> Tensor:
        return self.histories.table()

    def padding_so_far(self) -> Optional[Tensor]:
        if self.padding is None:
            return None
        return self.padding[: self.length].gather(1, self.histories.table()).t()

    def in_rows(self) -> Tuple[Tensor, Tensor]:
        """Each row's keys and values gathered through the table into rows of their own, as
        (rows * heads, length, head_dim) views: for ``bmm``, which reads a row's history as one
        strided matrix (``exact``'s products at a length not checked yet)."""
        table = self.histories.table()
        index = table.unsqueeze(2).expand(-1, -1, self.heads * self.head_dim)
        filled = (buffer[: self.length].view(self.length, buffer.size(1), -1) for buffer in (self.keys, self.values))
        keys, values = (torch.gather(buffer, 1, index).view(self.length, -1, self.head_dim).transpose(0, 1) for buffer in filled)
        return keys, values


# The copies of ``move`` copy bits: through an integer type of the element's size, which NumPy
# has for every dtype of the caches (it has no bfloat16).
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class LayerCaches:
    """The caches of every layer of one decoder, the spare buffer their reorders share, and
    (on the CPU) the slots that hold each row's self-attention history (``slots.py``)."""

    def __init__(
        self,
        self_attention: List[SelfAttentionCache],
        cross_attention: List[Optional[CrossAttentionCache]],
        spare: Optional[Tensor] = None,
        slots: Optional[RowSlots] = None,
        histories: Optional[Histories] = None,
    ) -> None:
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.spare = spare
        self.slots = slots
        self.histories = histories  # with ``IndexedSelfAttentionCache``s

    def follow(self, order: Tensor, kept: Optional[Tensor]) -> None:
        """Row ``i`` continues old row ``order[i]``; ``kept``: the sentences that stay, if some
        left. With histories: nothing is copied; in slots: only the histories that must be
        copied are; else every row is."""
        if self.histories is not None:
            if kept is not None:
                self.keep_sentences(kept)
            self.histories.follow(order)
            return
        move = None
        if self.slots is not None and self.self_attention and self.self_attention[0].keys is not None:
            move = self.slots.follow(order, self.self_attention[0].rows)
        if move is None:
            if kept is not None:
                self.keep_sentences(kept)
            self.reorder_beams(order)
            return
        if kept is not None:
            self.keep_sentences(move.kept_blocks)
        for cache in self.self_attention:
            cache.move(move.sources, move.destinations, move.rows)

    def reorder_beams(self, order: Tensor) -> None:
        """Hypothesis row ``i`` continues old row ``order[i]`` (a beam reorder; after sentences
        left the batch, ``keep_sentences`` has run first)."""
        for cache in self.self_attention:
            self.spare = cache.reorder(order, self.spare)

    def keep_sentences(self, kept: Tensor) -> None:
        for cache in self.cross_attention:
            if cache is not None:
                cache.keep_sentences(kept)
