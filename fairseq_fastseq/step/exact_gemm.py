"""``exact``'s linear layers through our own kernel, bit for bit MKL's.

MKL's single-precision product gives each output element in one of two orders (found by
cancelling pairs of terms; ``native/exact_gemm.cpp``): blocks, the bias (or nothing) plus,
for each block of the inner dimension in turn, that block's dot product summed from zero by
fused multiply-adds in index order (on the AMD EPYC of BENCHMARKS.md: one block up to 192
inner terms, two halves up to 384, blocks of 192 and the rest beyond; on an Intel Xeon from
11-16 rows on, blocks of 256 up to 512 and of 384 beyond; where MKL splits the inner dimension
over two threads, the halves as two such chains, added at the end); or LANES, sixteen fused lanes over
the inner dimension (the Intel Xeon at 2-10 rows, 2-15 from 512 inner terms on). The bits
depend only on that order; tiling, threads and the weight's layout are free. The kernel
keeps the order, packs each weight once for the blocks (MKL packs its operands per call) and
tiles for this core (BENCHMARKS.md, "exact's linear layers in MKL's order").

Nothing is assumed: the blocks are found per inner dimension by trying candidates against
MKL on this machine (none found: no blocks for that dimension), and the first time a shape
comes (rows, inner and output dimensions, bias or not, threads) each order's output is
compared bit for bit with MKL's on that call's own operands (a sample of its rows, the
kernel's rows being independent of each other) and, for calls of few outputs, on random
operands of the same shape, the caller getting MKL's. Where no order gives its bits (MKL takes another path
at a few rows on the AMD EPYC, a matrix-vector product at one row), that shape stays on MKL.
Where one does but MKL is faster, the shape stays on MKL too: both give the same bits, so only
time decides. The kernel beats MKL at few rows (no packing per call) and loses at many (on the
Intel Xeon of BENCHMARKS.md MKL ran 640 rows 2-20% faster, the 8,008-word output projection
from 160 rows on): each layer shape is timed once against MKL on random rows, 64 to 1,024,
until MKL is faster, and from those rows on it runs MKL ("MKL where it is faster").
"""

import functools
import logging
import math
import time
from types import ModuleType
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import native

logger = logging.getLogger(__name__)

# out = x @ weight.T (+ bias): (rows, in) [, out (rows, out_features)] -> out
Projection = Callable[..., Tensor]

# A shape's check compares at least this many outputs (random operands added to the call's
# own, in at most MAX_DRAWS draws): the fuzzer found a 1-row shape of 8 outputs whose call agreed.
CHECKED_ELEMENTS, MAX_DRAWS = 4096, 64
# Of a call with more rows than that needs, the check compares runs of rows at its start,
# middle and end (where MKL's edge tiles and a second thread's first rows are), this many
# each at least: checking every row of each new row count cost a fifth of a whole
# fairseq-generate run (BENCHMARKS.md, "Checks on a sample of rows").
SAMPLE_RUN = 4
# The rows at which a layer shape's kernel is timed against MKL (``mkl_faster_from``), in turn
# until MKL is faster (each side's best of TIMINGS calls): it is taken to be faster from there on.
TIMED_ROWS, TIMINGS = (64, 128, 256, 512, 1024), 2

LANES = "lanes"  # the kernel's sixteen-lane order; its block orders are ``Blocks``
# The blocks are looked for on this many rows and outputs: on an Intel Xeon MKL takes other
# paths at few outputs (40) and at few rows (up to 15); on two threads it splits the inner
# dimension at few rows, not at many.
PROBE_ROWS, PROBE_UNSPLIT_ROWS, PROBE_OUTPUTS = 16, 512, 256


class Blocks(NamedTuple):
    """Bounds (0, ..., inner) of the blocks summed in turn; from block ``split`` on (0: none)
    a second such chain from zero, added to the first at the end (MKL splitting the inner
    dimension over two threads)."""

    bounds: Tuple[int, ...]
    split: int = 0


Order = Union[Blocks, str]  # a ``Blocks`` or ``LANES``

# (rows, inner, outputs, bias, threads) -> the order that gave MKL's bits there (None: MKL)
_SAME_BITS: Dict[Tuple[int, int, int, bool, int], Optional[Order]] = {}
# (inner, outputs, bias, threads) -> the fewest rows from which MKL was faster (inf: none timed)
_MKL_FASTER_FROM: Dict[Tuple[int, int, bool, int], float] = {}


def order_name(order: Optional[Order]) -> str:
    """"blocks", "blocks in halves" (two chains), "lanes" or "none"."""
    if isinstance(order, Blocks):
        return "blocks in halves" if order.split else "blocks"
    return order or "none"


def candidate_blocks(inner: int) -> List[Tuple[int, ...]]:
    """Bounds (0, ..., inner) of the blocks to try: equal parts (2-8), then every width that
    is a multiple of 16 with the rest last (one block included)."""
    candidates = []
    for parts in range(2, 9):
        width = -(-inner // parts)
        candidates.append(tuple(range(0, inner, width)) + (inner,))
    for width in [*range(16, inner, 16), inner]:
        candidates.append(tuple(range(0, inner, width)) + (inner,))
    return list(dict.fromkeys(candidates))


def candidate_chains(inner: int) -> List[Blocks]:
    """``candidate_blocks`` as one chain, then (for an even ``inner``) as two halves, each
    half in the candidate blocks of its size."""
    candidates = [Blocks(bounds) for bounds in candidate_blocks(inner)]
    if inner % 2 == 0 and inner >= 32:
        half = inner // 2
        for bounds in candidate_blocks(half):
            candidates.append(Blocks(bounds + tuple(half + bound for bound in bounds[1:]), len(bounds) - 1))
    return candidates


@functools.lru_cache(maxsize=None)
def mkl_blocks(inner: int, threads: int) -> Tuple[Blocks, ...]:
    """The blocks of the inner dimension in which MKL sums on this machine (none found: an
    empty tuple): found on random operands of ``PROBE_ROWS`` x ``PROBE_OUTPUTS`` (with a
    bias), and where MKL splits the inner dimension there, also the one chain it sums at
    ``PROBE_UNSPLIT_ROWS`` (more rows to share among threads: 180 and up at 1024 -> 256)."""
    found = [_probed_blocks(inner, PROBE_ROWS)]
    if found[0] is not None and found[0].split:
        found.append(_probed_blocks(inner, PROBE_UNSPLIT_ROWS))
    blocks = tuple(dict.fromkeys(order for order in found if order is not None))
    if not blocks:
        logger.info("exact linear layers: no block order of %d inner terms gives MKL's bits on this CPU; MKL there", inner)
    return blocks


def _probed_blocks(inner: int, rows: int) -> Optional[Blocks]:
    kernels = native.exact_gemm()
    generator = torch.Generator().manual_seed(inner)
    shapes = ((rows, inner), (PROBE_OUTPUTS, inner), (PROBE_OUTPUTS,))
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in shapes)
    want, packed = torch.addmm(bias, x, weight.t()), kernels.pack(weight)
    for blocks in candidate_chains(inner):
        got = torch.empty_like(want)
        kernels.linear_into(x, packed, bias, blocks.bounds, blocks.split, got)
        if same_bits(got, want):
            return blocks
    return None


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two float32 tensors hold the same bits (signed zeros and NaNs included)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


class NativeLinear:
    """``x @ weight.T + bias`` (rows, outputs) through the native kernel in the order that
    was checked to give ``reference``'s (MKL's) bits at the call's shape, through ``fallback``
    (the same bits by other means; default ``reference``) where none was."""

    def __init__(
        self, kernels: ModuleType, packed: Tensor, weight: Tensor, bias: Optional[Tensor], fallback: Projection,
        reference: Optional[Projection] = None,
    ) -> None:  # fmt: skip
        self.kernels, self.packed, self.weight, self.bias, self.fallback = kernels, packed, weight.detach(), bias, fallback
        self.reference = reference or fallback
        self.inner, self.outputs = weight.size(1), weight.size(0)

    def __call__(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if not self._fits(x, out):
            return self.fallback(x, out=out)
        shape = self.shape_at(x.size(0), torch.get_num_threads())
        if shape not in _SAME_BITS:
            return self._check(x, out, shape)
        order = _SAME_BITS[shape]
        return self._kernel(x, order, out) if order is not None else self.fallback(x, out=out)

    def shape_at(self, rows: int, threads: int) -> Tuple[int, int, int, bool, int]:
        """The key of ``_SAME_BITS`` for a call of ``rows`` rows on ``threads`` threads."""
        return rows, self.inner, self.outputs, self.bias is not None, threads

    def orders(self) -> List[Order]:
        """The kernel's orders that can run this layer: the blocks found for this inner
        dimension, LANES where it is a multiple of 16 and the weight's rows are contiguous."""
        lanes = [LANES] if self.inner % 16 == 0 and self.weight.stride(1) == 1 else []
        return [*mkl_blocks(self.inner, torch.get_num_threads()), *lanes]

    def _fits(self, x: Tensor, out: Optional[Tensor]) -> bool:
        return cpu_rows(x) and (out is None or cpu_rows(out)) and not (torch.is_grad_enabled() and x.requires_grad)

    def _check(self, x: Tensor, out: Optional[Tensor], shape: Tuple) -> Tensor:
        """MKL's output; the first order whose kernel gives its bits at ``shape``, recorded:
        on this call's operands (``sampled_rows``) and, where they are fewer, on random ones
        of the same shape, at least ``CHECKED_ELEMENTS`` outputs in all (on a few outputs of
        a few terms two orders can agree by chance)."""
        want = self.reference(x, out=out)
        _SAME_BITS[shape] = None
        sample = sampled_rows(x.size(0), self.outputs)
        x_sample, want_sample = (x, want) if sample is None else (x.index_select(0, sample), want.index_select(0, sample))
        for order in self.orders():
            kernel = lambda probe: self._kernel(probe, order)  # noqa: E731
            same = same_bits(kernel(x_sample), want_sample)
            if same and agrees_on_random_operands(want_sample.numel(), [x.shape], kernel, self.reference, len(_SAME_BITS)):
                if x.size(0) < self.mkl_faster_from(order):
                    _SAME_BITS[shape] = order
                else:
                    logger.debug("exact linear layers: MKL at %d rows x %d -> %d (bias %s, %d threads), faster there", *shape)
                break
        else:
            logger.debug("exact linear layers: MKL at %d rows x %d -> %d (bias %s, %d threads)", *shape)
        return want

    def mkl_faster_from(self, order: Order) -> float:
        """The fewest rows of ``TIMED_ROWS`` at which MKL's product of this layer's shape was
        faster than the kernel's in ``order`` on this machine (inf: at none), timed once per
        shape and thread count, rung by rung until it was (BENCHMARKS.md, "MKL where it is faster")."""
        key = (self.inner, self.outputs, self.bias is not None, torch.get_num_threads())
        if key not in _MKL_FASTER_FROM:
            _MKL_FASTER_FROM[key] = next((rows for rows in TIMED_ROWS if self._mkl_faster_at(rows, order)), math.inf)
        return _MKL_FASTER_FROM[key]

    def _mkl_faster_at(self, rows: int, order: Order) -> bool:
        x = torch.randn(rows, self.inner, generator=torch.Generator().manual_seed(rows))
        out = x.new_zeros(rows, self.outputs)  # written once: no page faults in either timing
        kernel = fastest_of(TIMINGS, lambda: self._kernel(x, order, out))
        return kernel > fastest_of(TIMINGS, lambda: self.reference(x, out=out))

    def _kernel(self, x: Tensor, order: Order, out: Optional[Tensor] = None) -> Tensor:
        out = out if out is not None else x.new_empty(x.size(0), self.outputs)
        if isinstance(order, Blocks):
            self.kernels.linear_into(x, self.packed, self.bias, order.bounds, order.split, out)
        else:
            self.kernels.lanes_into(x, self.weight, self.bias, out)
        return out


def fastest_of(times: int, call: Callable[[], object]) -> float:
    """The least wall time of ``times`` calls, in seconds."""
    best = math.inf
    for _ in range(times):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def agrees_on_random_operands(
    outputs: int, shapes: Sequence[torch.Size], kernel: Callable[..., Tensor], reference: Callable[..., Tensor], seed: int
) -> bool:
    """Whether ``kernel`` gives ``reference``'s bits on random operands of ``shapes``, drawn
    (at most ``MAX_DRAWS`` times) until, with the ``outputs`` of a call already compared,
    ``CHECKED_ELEMENTS`` outputs were: on a few outputs of a few terms two orders can agree by
    chance. Stops at the first difference."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(MAX_DRAWS):
        if outputs >= CHECKED_ELEMENTS:
            break
        operands = [torch.randn(shape, generator=generator) for shape in shapes]
        got = kernel(*operands)
        if not same_bits(got, reference(*operands)):
            return False
        outputs += got.numel()
    return True


def sampled_rows(rows: int, outputs_per_row: int) -> Optional[Tensor]:
    """The rows a check compares (None: all): runs at the start, middle and end, of
    ``SAMPLE_RUN`` rows each or more, enough for ``CHECKED_ELEMENTS`` outputs in all."""
    run = max(SAMPLE_RUN, -(-CHECKED_ELEMENTS // (3 * max(1, outputs_per_row))))
    if rows <= 3 * run:
        return None
    middle = (rows - run) // 2
    return torch.cat([torch.arange(0, run), torch.arange(middle, middle + run), torch.arange(rows - run, rows)])


def cpu_rows(t: Tensor, dims: int = 2) -> bool:
    """Whether ``t`` is CPU float32 with ``dims`` dimensions, the last contiguous, as the native kernels take it."""
    return t.dim() == dims and t.stride(-1) == 1 and t.dtype == torch.float32 and t.device.type == "cpu"


def native_linear(
    weight: Tensor, bias: Optional[Tensor], fallback: Projection, packed: Callable[[], Tensor], reference: Optional[Projection] = None
) -> Projection:
    """``fallback`` (MKL's product with ``out=``, or ``reference``'s bits by other means)
    through the native kernel where it gives ``reference``'s bits; ``fallback`` itself where
    the kernel cannot run (no AVX-512, no build, not a CPU float32 weight). ``packed()`` gives
    the weight packed by the kernel (cached by the caller)."""
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    kernels = native.exact_gemm() if cpu_fp32 else None
    if kernels is None:
        return fallback
    return NativeLinear(kernels, packed(), weight, bias, fallback, reference)
