"""The output projection onto a large vocabulary in blocks of columns, where that gives the
bits of one call and is faster.

Each logit is one dot product over the model dimension. On the AMD EPYC core of
BENCHMARKS.md ("Output projection in column blocks") MKL's ``mm`` of 5-320 rows onto 8k-32k
columns ran 1.1-1.8x faster as calls of about 1 MB of weight each than as one call (the
weight of one call, 8-64 MB, does not stay in the core's caches); at 640 rows one call was
about as fast on one thread, not on two (blocks 1.07-1.15x at 480-960 rows). A block's call
computes its columns' dot products as the whole call does, in the same order, on every shape
measured there whose block width is a multiple of 64 columns.

That is checked, not assumed, wherever this runs: the first time a shape comes (rows,
model dimension, vocabulary, block width, thread count), the blocks' logits are compared bit
for bit with one call's on that step's own features; where they differ, that shape keeps one
call (logged once) and the step uses one call's logits.
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Weight bytes per block: about one core's share of cache (BENCHMARKS.md: 0.5-2 MB measured best).
BLOCK_BYTES = 2**20
# Above this many rows per thread one call was about as fast (1 thread: 640 rows 0.96-1.04x in
# blocks, 960 rows 0.96x; 2 threads: 640 rows 1.12-1.15x, 960 rows 1.07x).
MAX_ROWS_PER_THREAD = 320

# Block widths are a multiple of this many columns: at 341 columns (1364 bytes, not a multiple
# of 64), MKL's logits of 1-11 rows differed from one call's, at 320 they did not (BENCHMARKS.md).
COLUMN_ALIGNMENT = 64

# (rows, dim, vocabulary, block width, threads) -> whether blocks gave one call's bits
_SAME_BITS: Dict[Tuple[int, int, int, int, int], bool] = {}


def column_blocks(vocabulary: int, dim: int, element_size: int) -> Optional[List[slice]]:
    """Consecutive column ranges of about ``BLOCK_BYTES`` of weight each (a multiple of
    ``COLUMN_ALIGNMENT`` columns wide, the last one less), or None where the vocabulary is less
    than two of them."""
    width = BLOCK_BYTES // (dim * element_size) // COLUMN_ALIGNMENT * COLUMN_ALIGNMENT
    if width == 0 or vocabulary < 2 * width:
        return None
    return [slice(start, min(start + width, vocabulary)) for start in range(0, vocabulary, width)]


def blocks_help(rows: int, threads: int) -> bool:
    """Whether blocks were measured faster than one call at ``rows`` on ``threads`` threads."""
    return rows <= MAX_ROWS_PER_THREAD * threads


class BlockedProjection:
    """``features @ weight.T`` into ``out``, in column blocks on the shapes where that was
    checked to give one ``mm``'s bits, else as one ``mm`` (fairseq's call)."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.blocks = column_blocks(weight.size(0), weight.size(1), weight.element_size())
        # Each block's transposed weight, a view taken once (as ``mm`` operands, per call).
        self._block_weights = {block.start: weight[block].t() for block in self.blocks or ()}

    def __call__(self, features: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The logits (rows, vocabulary), into ``out`` (a new tensor where None)."""
        if out is None:
            out = features.new_empty(features.size(0), self.weight.size(0))
        rows, threads = features.size(0), torch.get_num_threads()
        if self.blocks is None or not blocks_help(rows, threads):
            return self._one_call(features, out)
        shape = (rows, self.weight.size(1), self.weight.size(0), self.blocks[0].stop, threads)
        same = _SAME_BITS.get(shape)
        if same is None:
            return self._check(features, out, shape)
        return self.in_blocks(features, out) if same else self._one_call(features, out)

    def in_blocks(self, features: Tensor, out: Tensor) -> Tensor:
        """The logits in blocks, whether or not they were checked (``benchmarks.column_blocks``)."""
        for block in self.blocks:
            self._block(features, out, block)
        return out

    def _one_call(self, features: Tensor, out: Tensor) -> Tensor:
        return torch.mm(features, self.weight.t(), out=out)

    def _block(self, features: Tensor, out: Tensor, block: slice) -> Tensor:
        return torch.mm(features, self._block_weights[block.start], out=out[:, block])

    def _check(self, features: Tensor, out: Tensor, shape: Tuple[int, ...]) -> Tensor:
        """One call's logits into ``out``; whether the blocks give the same bits, recorded.

        The blocks but the last have one shape, and their weights and logits start at the
        same offsets modulo 256 bytes: the first, a middle and the last block stand for all
        (checking every block cost as much as the projection, at each new row count)."""
        checked = list(dict.fromkeys((0, len(self.blocks) // 2, len(self.blocks) - 1)))
        blocked = [self._block(features, out, self.blocks[index]).clone() for index in checked]  # in out's layout
        self._one_call(features, out)
        same = _SAME_BITS[shape] = all(torch.equal(logits, out[:, self.blocks[index]]) for logits, index in zip(blocked, checked))
        if not same:
            rows, dim, vocabulary, width, threads = shape
            logger.info(
                "output projection: blocks of %d columns differ from one call at %d rows x %d -> %d "
                "(%d threads) on this CPU; one call there",
                width, rows, dim, vocabulary, threads,
            )  # fmt: skip
        return out
