"""The model side of the static-shape search loop: the lean decoder step on static shapes
(``step/static.py``), captured in a CUDA graph once per self-attention bucket and replayed.

On a GPU the decoder step is launch-bound: hundreds of small kernels, each a Python call
(``BENCHMARKS.md``, GPU rows). A graph replays them all in one launch. What one replay does
is fixed at capture, so the step reads its inputs from buffers that keep their addresses:
the newest tokens, the beam order, the step number (``StepClock``), and writes its outputs
into the graph's own memory, which the next replay overwrites.

The beam reorder of the caches is the first thing a step does (in place), so that the whole
step is one graph. PyTorch runs a function once before capturing it (the warm-up); that run
reorders by the identity and writes this step's keys and values, which the real step then
reorders and overwrites: the warm-up changes nothing the search sees. On CPU nothing is
captured, but the same sequence runs (warm-up, then the step), so the CPU tests exercise it.

A search captures one graph per 16-step bucket (``step/static.py``) and per batch shape;
each capture costs a warm-up step and ``torch.cuda.graph``'s emptying of the allocator's
cache. Whether that is paid back is for the GPU figures to show (``BENCHMARKS.md``,
"Static-shape loop and CUDA graphs").
"""

import logging
from contextlib import contextmanager
from typing import Callable, ContextManager, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .model_steps import LeanSteps
from .step.caches import LayerCaches
from .step.kernels import ExactKernels
from .step.static import StaticLeanDecoder, StepClock

logger = logging.getLogger("fairseq_fastseq.generator")

StepOutput = Tuple[Tensor, Optional[Tensor]]


class StepGraph:
    """``step`` captured in a CUDA graph per bucket (or run eagerly on CPU) and replayed."""

    def __init__(self, step: Callable[[], StepOutput], rehearsal: Callable[[], ContextManager[None]], capture: bool) -> None:
        self.step, self.rehearsal, self.capture = step, rehearsal, capture
        self.bucket: Optional[int] = None
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.outputs: Optional[StepOutput] = None
        self.pool = None  # the CUDA graphs' memory pool, once one is captured
        self.captures = 0

    def run(self, bucket: int) -> StepOutput:
        """The step's outputs; a new ``bucket`` is warmed up and captured first (buckets only
        grow within a search, so the previous graph is released)."""
        if bucket != self.bucket:
            self.bucket, self.graph, self.outputs = bucket, None, None
            self._warm_up_and_capture()
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.outputs

    def _warm_up_and_capture(self) -> None:
        self.captures += 1
        with self.rehearsal():
            if not self.capture:
                self.step()
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            try:
                if self.pool is None:  # one memory pool for the search's graphs: one is live at a time
                    self.pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs = self.step()
                self.graph = graph
            except RuntimeError as error:  # the step then runs uncaptured: the same arithmetic
                logger.warning("cuda graphs: capturing the decoder step failed (%s); it runs uncaptured", error)
                self.capture, self.graph, self.outputs = False, None, None


class StaticSteps(LeanSteps):
    """``LeanSteps`` on static shapes: ``start``, ``decode``, ``reorder`` as the search loop
    calls them; the shapes change only where sentences leave the batch (rarely: see
    ``static_loop.COMPACT_AT``)."""

    def __init__(self, *args, **kwargs) -> None:  # ``LeanSteps``'s
        self.clock = StepClock()
        super().__init__(*args, **kwargs)
        self.newest: Optional[Tensor] = None  # (rows,): the tokens the next step reads
        self.order: Optional[Tensor] = None  # (rows,): the parent rows the next step reorders by
        self.graph: Optional[StepGraph] = None

    def _decoder(self, model: torch.nn.Module, kernels: ExactKernels) -> StaticLeanDecoder:
        return StaticLeanDecoder(model, kernels, self.clock)

    def start(self, net_input: Dict[str, Tensor], sentences: int) -> None:
        rows = sentences * self.beam_size
        device = self.decoders[0].embed_tokens.device
        self.clock.begin(rows, self.max_steps, device)
        super().start(net_input, sentences)
        self.newest = torch.zeros(rows, dtype=torch.long, device=device)
        self.order = torch.arange(rows, device=device)
        self.graph = StepGraph(self._step, self._identity_order, capture=device.type == "cuda")

    def decode(self, tokens: Tensor, step: int) -> StepOutput:
        self.newest.copy_(tokens[:, step])
        self.clock.set(step)
        if self.clock.span != self.graph.bucket:  # a new bucket: room for it before its graph
            self._reserve(self.clock.span)
        return self.graph.run(self.clock.span)

    def reorder(self, order: Tensor, kept: Optional[Tensor]) -> None:
        """The next step reorders by ``order`` (in its graph); if sentences left (``kept``), the
        caches shrink now, outside any graph, and the next step is captured anew."""
        if kept is None:
            self.order.copy_(order)
            return
        for caches in self.caches:
            caches.keep_sentences(kept)
            for cache in caches.self_attention:
                cache.keep_rows(order)
        self.clock.rows = rows = order.numel()
        self.newest = self.newest.new_zeros(rows)
        self.order = torch.arange(rows, device=order.device)
        self.graph = StepGraph(self._step, self._identity_order, capture=self.graph.capture)

    def _reserve(self, span: int) -> None:
        """Before a bucket's first step (and the first after sentences left): room for
        ``span`` positions in every cache, and a spare of their shape."""
        for caches in self.caches:
            for cache in caches.self_attention:
                cache.reserve(span)
            caches.spare = _spare_for(caches)

    def _step(self) -> StepOutput:
        """What one graph holds: the beam reorder of the caches, then the decoder step."""
        for caches in self.caches:
            caches.reorder_beams(self.order)
        return self.decode_newest(self.newest, 0)  # the step itself is the clock's

    @contextmanager
    def _identity_order(self) -> Iterator[None]:
        """The warm-up's order: the identity (the real one is restored for the step)."""
        real = self.order.clone()
        self.order.copy_(torch.arange(real.numel(), device=real.device))
        try:
            yield
        finally:
            self.order.copy_(real)


def _spare_for(caches: LayerCaches) -> Optional[Tensor]:
    """The buffer the layers' in-place reorders go through (fairseq's layers all have one
    shape), for the caches as they are now: the current one if it still fits."""
    if not caches.self_attention:
        return None
    keys = caches.self_attention[0].keys
    return caches.spare if caches.spare is not None and caches.spare.shape == keys.shape else torch.zeros_like(keys)
