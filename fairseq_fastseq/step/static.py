"""The lean decoder step on static shapes, so that it can be captured in a CUDA graph.

A captured graph replays the same kernels on the same memory: every tensor a step reads
or writes must keep its address and shape from one step to the next, and nothing in it may
depend on a Python value that changes per step. So, unlike the lean step of ``decoder.py``:

- the step number is a device tensor (``StepClock.index``), read by the position embedding
  and by the cache write;
- each layer's self-attention cache is zeroed (a masked position must weigh 0 x a finite
  value), written at ``index`` and reordered in place, and grows by a bucket only between
  two buckets' graphs;
- the self-attention spans a *bucket* of ``SPAN`` positions (``StepClock.span``), the
  positions after the step masked like padding: one graph serves ``SPAN`` steps. A longer
  softmax and product sum the same terms in another order, so scores equal the lean step's
  up to rounding, not bitwise;
- the padding of the newest token is always tracked (testing whether there is any would
  be a host sync).

The rows of finished sentences stay in the batch until most of it has finished (the search
then drops them, ``keep_rows``): the caches keep one shape between those drops.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .caches import SelfAttentionCache
from .decoder import LeanDecoder
from .kernels import ExactKernels
from .pool import BufferPool

# Positions per self-attention bucket: the graph of a bucket serves this many steps.
SPAN = 16


class StepClock:
    """Where a static-shape search stands: the step on the device, its bucket on the host."""

    def __init__(self) -> None:
        self.rows, self.max_steps, self.span = 0, 0, 0
        self.index: Optional[Tensor] = None  # (1,) long: the step, for the captured kernels
        self._positions: Optional[Tensor] = None  # (max_steps,) 0, 1, ...

    def begin(self, rows: int, max_steps: int, device: torch.device) -> None:
        """A new batch of ``rows`` hypotheses and at most ``max_steps`` steps."""
        self.rows, self.max_steps = rows, max_steps
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self._positions = torch.arange(max_steps, device=device)

    def set(self, step: int) -> None:
        """Move to ``step`` (outside any graph: a ``fill_`` on the device, no host sync)."""
        self.index.fill_(step)
        self.span = min(-(-(step + 1) // SPAN) * SPAN, self.max_steps)

    def after_step(self) -> Tensor:
        """(span,) bool: the positions of the bucket after the step (masked)."""
        return self._positions[: self.span] > self.index


class StaticSelfAttentionCache(SelfAttentionCache):
    """One layer's self-attention keys and values (and padding), at addresses that stay put
    within a bucket: new buffers only when the cache grows by a bucket or loses rows."""

    BUFFERS = ("keys", "values", "padding")
    SLICES_WRITABLE = False  # written at the clock's step (``append``)

    def __init__(self, heads: int, head_dim: int, clock: StepClock, like: Tensor) -> None:
        super().__init__(heads, head_dim, clock.max_steps)
        self.clock = clock
        shape = (min(SPAN, clock.max_steps), clock.rows, heads, head_dim)
        self.keys, self.values = like.new_zeros(shape), like.new_zeros(shape)
        self.padding = torch.zeros(shape[:2], dtype=torch.bool, device=like.device)

    def reserve(self, span: int) -> None:
        """Room for ``span`` positions (new buffers, outside any graph: a bucket's graph is
        captured after its cache has grown), so the cache holds at most one bucket unused."""
        if self.keys.size(0) >= span:
            return
        filled = self.keys.size(0)
        for name in self.BUFFERS:
            buffer = getattr(self, name)
            grown = buffer.new_zeros(span, *buffer.shape[1:])
            grown[:filled] = buffer
            setattr(self, name, grown)

    def append(self, k: Tensor, v: Tensor, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Write this step's keys/values at the clock's step; return the bucket's keys and
        values as (rows * heads, span, head_dim) views (``padding_so_far`` masks the rest)."""
        rows, index = k.size(0), self.clock.index
        self.keys.index_copy_(0, index, k.view(1, rows, self.heads, self.head_dim))
        self.values.index_copy_(0, index, v.view(1, rows, self.heads, self.head_dim))
        self.padding.index_copy_(0, index, pad.view(1, rows))
        span, merged = self.clock.span, rows * self.heads
        keys = self.keys[:span].view(span, merged, self.head_dim).transpose(0, 1)
        values = self.values[:span].view(span, merged, self.head_dim).transpose(0, 1)
        return keys, values

    def padding_so_far(self) -> Tensor:
        """(rows, span) bool: padding, and the bucket's positions after the step."""
        return self.padding[: self.clock.span].t() | self.clock.after_step()

    def reorder(self, order: Tensor, spare: Optional[Tensor]) -> Optional[Tensor]:
        """Row ``i`` takes old row ``order[i]``, in place (through ``spare``, which stays the
        spare), over the bucket's positions."""
        span = self.clock.span
        for buffer in (self.keys, self.values):
            torch.index_select(buffer[:span], 1, order, out=spare[:span])
            buffer[:span].copy_(spare[:span])
        self.padding[:span] = self.padding[:span].index_select(1, order)
        return spare

    def keep_rows(self, order: Tensor) -> None:
        """Fewer rows from here on: new row ``i`` is old row ``order[i]`` (new buffers)."""
        for name in self.BUFFERS:
            setattr(self, name, getattr(self, name).index_select(1, order))


class StaticLeanDecoder(LeanDecoder):
    """``LeanDecoder`` with the static caches and the step read from ``clock``."""

    def __init__(self, model: nn.Module, kernels: ExactKernels, clock: StepClock) -> None:
        super().__init__(model, kernels)
        self.clock = clock

    def _histories(self, max_steps: int, beams: int, attends_source: bool) -> None:
        return None  # the static caches reorder in the step's graph

    def _self_attention_cache(self, heads: int, head_dim: int, max_steps: int, pool: BufferPool, histories: None) -> SelfAttentionCache:
        return StaticSelfAttentionCache(heads, head_dim, self.clock, self.embed_tokens)

    def _padding(self, tokens: Tensor) -> Tensor:
        return tokens.eq(self.padding_idx)

    def _position(self, step: int, tokens: Tensor) -> Tensor:
        return self._positions.index_select(0, self.clock.index)  # (1, dim): the same row for all
