"""``exact``'s attention products through our own kernels, bit for bit ``bmm``'s.

The decoder step's attention is two ``bmm`` calls of one query row per matrix: scores =
queries (matrices, 1, head_dim) @ keys^T, and context = probabilities (matrices, 1, length) @
values. ``bmm`` hands them to ATen's own loop (under 400 multiply-adds) or to MKL, one
matrix-vector product per matrix, with a call overhead per matrix that is most of their
time at these sizes. ``native/exact_attention.cpp`` computes each output element in the
order these kernels do, for all of a sentence's beams against its keys in one pass. MKL's
order depends on the CPU; the kernel has the two found by cancelling pairs of terms
(BENCHMARKS.md, "exact's attention products in bmm's order"): on an AMD EPYC (no fused
multiply-add) and on an Intel Xeon with AVX-512 (sixteen fused lanes).

Nothing is assumed: which of the two this CPU's ``bmm`` follows is found on random operands
(neither: ``bmm`` throughout), and the first time a kind of product comes at a length (and
thread count), the kernel's output is compared bit for bit with ``bmm``'s on that call's
operands (a sample of its matrices, ``exact_gemm.sampled_rows``) and, for calls of few
outputs, on random ones, the caller getting ``bmm``'s; where they differ, that length stays
on ``bmm``.
Scores whose queries or keys are off the 16-byte alignment that the caches keep (MKL's
order changes with it) or whose heads are not 64 wide go to ``bmm`` unchecked.
"""

import functools
import logging
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import native
from .exact_gemm import agrees_on_random_operands, cpu_rows, same_bits, sampled_rows

logger = logging.getLogger(__name__)

SCORES, CONTEXT = "scores", "context"
_SAME_BITS: Dict[Tuple[str, int, int], bool] = {}  # (kind, length, threads) -> the kernel gave bmm's bits
ALIGNMENT_FLOATS = 4  # 16 bytes
ORDERS = (0, 1)  # native/exact_attention.cpp's orders, by these names:
ORDER_NAMES = ("four lanes", "sixteen lanes, fused")
# Where the order is looked for: grouped and remainder columns, whole blocks of keys and a rest.
PROBE_MATRICES, PROBE_LENGTH = 64, 31


class AttentionProducts:
    """``out[m, i] = a[m, i] @ b[m]`` for each query row ``i`` (``bmm`` of one row per matrix):
    scores (``b`` = keys transposed) or context (``b`` = values), through the native kernel
    where it was checked to give ``bmm``'s bits."""

    def __init__(self, kernels: Optional[ModuleType]) -> None:
        self.kernels = kernels
        self.orders = {kind: bmm_order(kernels, kind) for kind in (SCORES, CONTEXT)} if kernels is not None else {}

    def scores(self, queries: Tensor, keys: Tensor, out: Tensor, reference: Callable[[], None]) -> Tensor:
        """queries (matrices, rows, head_dim), keys (matrices, length, head_dim) -> ``out``
        (matrices, rows, length); ``reference()`` writes ``bmm``'s result into ``out``."""
        fits = queries.size(2) == 64 and _aligned_rows(queries) and _aligned_rows(keys)  # MKL's order depends on it
        return self._product(SCORES, queries, keys, out, reference, fits)

    def context(self, probs: Tensor, values: Tensor, out: Tensor, reference: Callable[[], None]) -> Tensor:
        """probs (matrices, rows, length), values (matrices, length, dim) -> ``out`` (matrices, rows, dim)."""
        fits = values.size(2) % 16 == 0 and all(cpu_rows(t, 3) for t in (probs, values))
        return self._product(CONTEXT, probs, values, out, reference, fits)

    def attend(
        self, queries: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor], group: int, context: Tensor, history: Optional[Tensor] = None
    ) -> bool:
        """The whole attention in one native call (``attend_into``): queries (matrices, rows,
        head_dim) against keys and values (matrices, length, dim), keys masked where ``mask``
        (matrices / group, length) is true, fairseq's softmax, the context written into
        ``context`` (matrices, rows, dim); with ``history`` (length, matrices / group), keys and
        values of every cached row, each row's read through the table (``histories.py``). Only
        where both products were already checked to give ``bmm``'s bits at this length; False
        (nothing written) otherwise: the caller then takes ``scores`` / softmax / ``context``,
        which check a new length."""
        if self.kernels is None or (torch.is_grad_enabled() and any(t.requires_grad for t in (queries, keys, values))):
            return False
        length, threads = keys.size(1), torch.get_num_threads()
        if not (_SAME_BITS.get((SCORES, length, threads)) and _SAME_BITS.get((CONTEXT, length, threads))):
            return False
        if not (queries.size(2) == 64 and all(cpu_rows(t, 3) for t in (queries, keys, values, context)) and values.size(2) % 16 == 0):
            return False
        return self.kernels.attend_into(queries, keys, values, mask, group, context, self.orders[SCORES], self.orders[CONTEXT], history)

    def _product(self, kind: str, a: Tensor, b: Tensor, out: Tensor, reference: Callable[[], None], fits: bool) -> Tensor:
        differentiable = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        if self.orders.get(kind) is None or differentiable or not (fits and cpu_rows(out, 3)):
            reference()
            return out
        key = (kind, b.size(1), torch.get_num_threads())
        same = _SAME_BITS.get(key)
        if same is None:
            reference()
            _SAME_BITS[key] = self._check(kind, a, b, out, key)
        elif same:
            self._kernel(kind, a, b, out)
        else:
            reference()
        return out

    def _kernel(self, kind: str, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        return _native(self.kernels, kind, a, b, out, self.orders[kind])

    def _check(self, kind: str, a: Tensor, b: Tensor, want: Tensor, key: Tuple) -> bool:
        """Whether the kernel gives ``want`` (``bmm``'s on the call's operands; on a sample of
        its matrices, ``sampled_rows``) and, for calls of few outputs, ``bmm``'s on random
        operands of the same shape (``agrees_on_random_operands``)."""
        kernel = lambda a_, b_: self._kernel(kind, a_, b_, a_.new_empty(a_.size(0), *want.shape[1:]))  # noqa: E731
        reference = lambda a_, b_: _bmm_per_row(kind, a_, b_)  # noqa: E731
        sample = sampled_rows(a.size(0), want[0].numel())
        a_, b_, want = (a, b, want) if sample is None else (t.index_select(0, sample) for t in (a, b, want))
        same = same_bits(kernel(a_, b_), want) and agrees_on_random_operands(want.numel(), [a.shape, b.shape], kernel, reference, len(_SAME_BITS))
        if not same:
            logger.debug("exact attention: bmm for the %s at length %d (%d threads)", *key)
        return same


@functools.lru_cache(maxsize=None)
def bmm_order(kernels: ModuleType, kind: str) -> Optional[int]:
    """The kernel's order that this CPU's ``bmm`` follows for ``kind`` on random operands, or
    None (logged) where neither does."""
    generator = torch.Generator().manual_seed(len(kind))
    shapes = [(PROBE_MATRICES, 1, 64), (PROBE_MATRICES, PROBE_LENGTH, 64)] if kind == SCORES else [(PROBE_MATRICES, 1, PROBE_LENGTH), (PROBE_MATRICES, PROBE_LENGTH, 64)]
    a, b = (torch.randn(shape, generator=generator) for shape in shapes)
    want = _bmm_per_row(kind, a, b)
    for order in ORDERS:
        if same_bits(_native(kernels, kind, a, b, torch.empty_like(want), order), want):
            return order
    logger.info("exact attention: no order of the kernel's gives bmm's bits for the %s on this CPU; bmm there", kind)
    return None


# Each beam's product reads its sentence's keys (values) again: taken a chunk of matrices at a
# time, about this many bytes, the beams after the first find them in the CPU's last-level
# cache instead of memory (long sources: BENCHMARKS.md, "Encoder keys/values once per sentence").
CACHE_RESIDENT_BYTES = 4 * 2**20


def cache_resident_chunks(matrices: int, bytes_per_matrix: int) -> List[slice]:
    """Consecutive slices of ``matrices`` of about ``CACHE_RESIDENT_BYTES`` each (at least one matrix)."""
    size = max(1, CACHE_RESIDENT_BYTES // max(1, bytes_per_matrix))
    return [slice(start, min(start + size, matrices)) for start in range(0, matrices, size)]


def each_beams_products(per_beam: Tensor, shared: Tensor, out: Tensor, chunks: List[slice]) -> None:
    """``out[beam] = per_beam[beam] @ shared`` for every beam, (matrices, m, k) @ (matrices, k, n)
    with ``shared`` the same for all beams: one ``bmm`` per chunk of matrices and beam, every
    beam before the next chunk."""
    whole = len(chunks) == 1  # the common case: nothing to slice
    for chunk in chunks:
        matrices, rows, outs = (shared, per_beam, out) if whole else (shared[chunk], per_beam[:, chunk], out[:, chunk])
        for beam_rows, beam_out in zip(rows.unbind(0), outs.unbind(0)):  # each beam's views from one call
            torch.bmm(beam_rows, matrices, out=beam_out)


def by_matrix(per_beam: Tensor) -> Tensor:
    """(beams, matrices, 1, n) -> the same memory as (matrices, beams, n)."""
    return per_beam[:, :, 0].transpose(0, 1)


def _native(kernels: ModuleType, kind: str, a: Tensor, b: Tensor, out: Tensor, order: int) -> Tensor:
    (kernels.scores_into if kind == SCORES else kernels.context_into)(a, b, out, order)
    return out


def _bmm_per_row(kind: str, a: Tensor, b: Tensor) -> Tensor:
    """``bmm`` of each row of ``a`` on its own (one row per matrix, as the decoder step calls it)."""
    b = b.transpose(1, 2) if kind == SCORES else b
    return torch.cat([torch.bmm(a[:, i : i + 1], b) for i in range(a.size(1))], dim=1)


def _aligned_rows(t: Tensor) -> bool:
    """``cpu_rows`` (3-D) with every row starting on a 16-byte boundary."""
    aligned = t.data_ptr() % (4 * ALIGNMENT_FLOATS) == 0 and t.stride(0) % ALIGNMENT_FLOATS == 0
    return cpu_rows(t, 3) and aligned and (t.size(1) == 1 or t.stride(1) % ALIGNMENT_FLOATS == 0)


def attention_products(weight: Tensor) -> AttentionProducts:
    """The products for an attention with this weight: native where it is CPU float32 and built."""
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    return AttentionProducts(native.exact_attention() if cpu_fp32 else None)
