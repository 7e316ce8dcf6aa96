"""The output stage of a decoder step on CPU float32: the output projection written into a
(rows x vocabulary) buffer made once per batch, and the log-softmax in place over it.

On CPU such a tensor is large at large batches: 640 rows (batch 128, beam 5) x 32k tokens
is 82 MB, above glibc's largest mmap threshold (32 MB), so each fresh one is an ``mmap``
whose pages the kernel faults in and zeroes; fairseq allocates two per decoder step (the
logits and their log-softmax). Figures: ``BENCHMARKS.md`` ("Allocator and encoder-cache
layout"). The arithmetic is fairseq's: the same ``mm`` and ``log_softmax`` kernels, given
``out=`` (the log-softmax kernel reads each row's logits before it writes that row, so in place
it gives the same bits and touches one buffer instead of two); onto a large vocabulary the
``mm`` runs in column blocks where they were checked to give its bits (``column_blocks.py``).
On a GPU, PyTorch's caching
allocator already reuses memory, so this is for CPU float32 only.
"""

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .column_blocks import BlockedProjection
from .coverage import plain_output_projection
from .pool import BufferPool


def bufferable_projection(model: nn.Module) -> Optional[Tensor]:
    """The output projection's weight if ``model``'s log-probabilities can be written into
    buffers (a plain output layer of a CPU float32 model), else None."""
    weight = plain_output_projection(model)
    cpu_fp32 = weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
    return weight if cpu_fp32 else None


def log_probabilities_in_place(logits: Tensor, temperature: float, out: Optional[Tensor] = None) -> Tensor:
    """fairseq's division by the temperature and log-softmax, over ``logits`` (rows, vocab)
    in place (the same bits as into a new tensor: see above), or into ``out``."""
    if temperature != 1.0:  # x / 1.0 == x exactly, so fairseq's division is skipped then
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1, out=logits if out is None else out)


class _PerBatchBuffer:
    """A (rows x vocabulary) buffer made at a batch's first step, which every step overwrites:
    the caller consumes the log-probabilities within the step."""

    def __init__(self, weight: Tensor, pool: Optional[BufferPool]) -> None:
        self.weight = weight
        self.pool = pool or BufferPool()
        self._buffer: Optional[Tensor] = None

    def _rows(self, rows: int) -> Tensor:
        """The first ``rows`` rows of the buffer made at the batch's first step (the batch only
        shrinks afterwards)."""
        if self._buffer is None or self._buffer.size(0) < rows:
            self._buffer = self.pool.take((rows, self.weight.size(0)), self.weight)
        return self._buffer[:rows]


class BufferedOutput(_PerBatchBuffer):
    """Log-probabilities (rows, vocab) of features (rows, dim) through ``weight`` (fairseq's
    ``mm``, in column blocks where bitwise the same, or ``project`` (features, out) with its
    bits), into the per-batch buffer."""

    def __init__(
        self, weight: Tensor, pool: Optional[BufferPool] = None, project: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    ) -> None:
        super().__init__(weight, pool)
        self.project = project or BlockedProjection(weight)

    def __call__(self, features: Tensor, temperature: float) -> Tensor:
        return log_probabilities_in_place(self.project(features, self._rows(features.size(0))), temperature)


# fbgemm's dynamic int8 linear onto the Bible model's 8k vocabulary ran 1.1-1.6x faster (its
# log-softmax included) as calls of 128 rows than as one call of 320-1,000 rows; at 160 rows
# one call was as fast (BENCHMARKS.md, "int8 output projection in row chunks").
ROWS_PER_CALL = 128


class RowChunkedOutput(_PerBatchBuffer):
    """Log-probabilities through a kernel tier's output projection ``project`` (rows, dim) ->
    (rows, vocab): above ``2 * ROWS_PER_CALL`` rows a call per ``ROWS_PER_CALL`` rows, each
    chunk's log-softmax written into the per-batch buffer; one call below that."""

    def __init__(self, project: Callable[[Tensor], Tensor], weight: Tensor, pool: Optional[BufferPool] = None) -> None:
        super().__init__(weight, pool)
        self.project = project

    def __call__(self, features: Tensor, temperature: float) -> Tensor:
        rows = features.size(0)
        if rows <= 2 * ROWS_PER_CALL:
            return log_probabilities_in_place(self.project(features), temperature)
        out = self._rows(rows)
        for start in range(0, rows, ROWS_PER_CALL):
            chunk = slice(start, start + ROWS_PER_CALL)
            log_probabilities_in_place(self.project(features[chunk]), temperature, out=out[chunk])
        return out
