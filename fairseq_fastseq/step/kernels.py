"""How the lean step computes its linear layers and encoder attention: the tiers of
``--fast-kernels``.

- ``exact`` (the default): fairseq's kernels on fairseq's shapes, so bitwise equal to stock
  on CPU float32.
- ``fused``: the same float32 model through cheaper arithmetic that only rounds
  differently: one projection for the queries, keys and values of self-attention (their
  weights interleaved per head, the query scaling folded in), its attention in C++ over the
  time-major cache (``native``), and the encoder keys/values
  kept once per sentence, attended by its beams as grouped queries (fairseq's BART path,
  for every model; CTranslate2 does the same); the self-attention histories read where they
  were written (``histories.py``) and the encoder's position-wise work on real source
  positions (``source_rows.py``); on CPUs with AMX every linear layer as three bfloat16
  products per float32 product (``split_linear.py``: ~1e-5 relative error where float32
  has ~1e-6), elsewhere oneDNN's and MKL's float32 kernels.
- ``int8``: ``fused``, with every linear layer in dynamic int8 (oneDNN's kernels on AMX,
  fbgemm's elsewhere: weights per output channel once, activations per call); float32 elsewhere.

Prepared weights (the fused projection, the int8 weights) are made once per generator and
weight version, never written to disk. Measured speed and agreement with stock:
``BENCHMARKS.md`` ("Kernel tiers").
"""

import logging
from types import ModuleType
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from . import native
from .column_blocks import BlockedProjection
from .cpu import CPU_VENDOR, HAS_VNNI
from .exact_attention import AttentionProducts, attention_products
from .exact_gemm import native_linear
from .prepared import INT8_ENGINE, int8_packed, interleaved_qkv, scaled_linear
from .split_linear import split_bf16_linear

logger = logging.getLogger(__name__)

Projection = Callable[[Tensor], Tensor]
# (rows, embed_dim) -> scaled queries, keys, values, each (rows, heads, head_dim)
SelfProjections = Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]
# (rows, embed_dim), keys and values destinations (rows, embed_dim) -> scaled queries (rows, heads, head_dim)
SelfProjectionsInto = Callable[[Tensor, Tensor, Tensor], Tensor]


class ExactKernels:
    """fairseq's own arithmetic."""

    name = "exact"
    # Encoder keys/values per beam, except where fairseq itself shares them (BART).
    grouped_encoder_attention = False
    # The encoder on the tier's kernels (``encoder.py``) rather than fairseq's modules.
    tier_encoder = False
    # Step 0 on one row per sentence (``model_steps.LeanSteps``).
    first_step_per_sentence = False
    # The tier's output projection in calls of a bounded number of rows (``output.RowChunkedOutput``).
    output_in_row_chunks = False

    def __init__(self) -> None:
        self._prepared: Dict[Tuple, object] = {}

    def linear(self, module: nn.Linear) -> Projection:
        return self.exact_projection(module.weight, module.bias)

    def exact_projection(self, weight: Tensor, bias: Optional[Tensor], fallback: Optional[Projection] = None) -> Projection:
        """``exact_linear`` (MKL's ``addmm``, with ``out=``) through the native kernel on the
        shapes where it gives the same bits (``exact_gemm.py``), through ``fallback`` (its
        bits by other means; default: itself) elsewhere."""
        reference = exact_linear(weight, bias)
        pack = lambda: self.prepared(("exact_gemm",), (weight,), lambda: native.exact_gemm().pack(weight.detach()))
        return native_linear(weight, bias, fallback or reference, pack, reference)

    def buffered_output_projection(self, weight: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """(features, out) -> logits written into ``out``, for fairseq's ``mm`` into the
        per-batch buffers (``output.py``): MKL in column blocks or the native kernel, both
        with one ``mm``'s bits."""
        return self.exact_projection(weight, None, BlockedProjection(weight))

    def prepared(self, key: Tuple, tensors: Tuple[Tensor, ...], make: Callable[[], object]) -> object:
        """``make()``, cached for the identity and version of ``tensors`` (in-place changes
        of a parameter bump its version; tensors made in inference mode, such as prepared
        weights prepared again, have none and change only there, never by a caller)."""
        full_key = key + tuple((id(t), 0 if t.is_inference() else t._version) for t in tensors)
        if full_key not in self._prepared:
            self._prepared[full_key] = make()
        return self._prepared[full_key]

    def feed_forward_in(self, module: nn.Linear, activation: Callable[[Tensor], Tensor]) -> Projection:
        """``activation(fc1(x))``; ReLU in place (the same values)."""
        project = self.linear(module)
        if activation is F.relu:
            return lambda x: torch.relu_(project(x))
        return lambda x: activation(project(x))

    def queries(self, attention: MultiheadAttention) -> Projection:
        """(rows, embed_dim) -> scaled queries (rows, embed_dim), as fairseq scales them."""
        project, scaling = self.linear(attention.q_proj), attention.scaling

        def scaled(x: Tensor) -> Tensor:
            q = project(x)
            q *= scaling
            return q

        return scaled

    def self_projections(self, attention: MultiheadAttention) -> SelfProjections:
        heads = (attention.num_heads, attention.head_dim)
        q, k, v = self.queries(attention), self.linear(attention.k_proj), self.linear(attention.v_proj)
        return lambda x: (q(x).view(-1, *heads), k(x).view(-1, *heads), v(x).view(-1, *heads))

    def self_projections_into(self, attention: MultiheadAttention) -> Optional[SelfProjectionsInto]:
        """``self_projections`` with the keys and values written into the cache's slices by
        the product itself (``addmm``'s ``out=``: the same kernel on the same operands into
        contiguous rows), sparing their copy; None where the tier cannot."""
        heads = (attention.num_heads, attention.head_dim)
        q = self.queries(attention)
        k, v = (self.exact_projection(m.weight, m.bias) for m in (attention.k_proj, attention.v_proj))

        def projections(x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
            k(x, out=keys)
            v(x, out=values)
            return q(x).view(-1, *heads)

        return projections

    def output_projection(self, weight: Tensor) -> Optional[Projection]:
        """The output projection of a plain output layer, or None for fairseq's ``mm`` into
        the per-batch buffers (``output.py``)."""
        return None

    def native_attention(self, weight: Tensor) -> Optional[ModuleType]:
        """The C++ attention kernels (``native``) for an attention with this weight, or None
        for fairseq's ``bmm`` / softmax / ``bmm``."""
        return None

    def attention_products(self, weight: Tensor) -> AttentionProducts:
        """fairseq's two ``bmm`` of an attention with this weight, with their bits (``exact_attention.py``)."""
        return attention_products(weight)


class FusedKernels(ExactKernels):
    """One self-attention projection, grouped encoder attention, linear layers on AMX as
    three bfloat16 products (or oneDNN's prepacked float32 kernel where it was measured
    faster than MKL's); rounding differs."""

    name = "fused"
    grouped_encoder_attention = True
    tier_encoder = True
    first_step_per_sentence = True

    def linear(self, module: nn.Linear) -> Projection:
        return self._linear(module.weight, module.bias, "none")

    def feed_forward_in(self, module: nn.Linear, activation: Callable[[Tensor], Tensor]) -> Projection:
        if activation is not F.relu:
            return super().feed_forward_in(module, activation)
        return self._linear(module.weight, module.bias, "relu")

    def output_projection(self, weight: Tensor) -> Optional[Projection]:
        return self._linear(weight, None, "none")

    def self_projections_into(self, attention: MultiheadAttention) -> Optional[SelfProjectionsInto]:
        return None  # one projection for all three (``self_projections``)

    def native_attention(self, weight: Tensor) -> Optional[ModuleType]:
        return native.compiled() if weight.device.type == "cpu" and weight.dtype == torch.float32 else None

    def _linear(self, weight: Tensor, bias: Optional[Tensor], activation: str) -> Projection:
        """``activation(x @ weight.T + bias)``: three bfloat16 products on AMX where this CPU
        and process have it (``split_linear.py``: 1.2-3.7x the float32 kernels); else
        oneDNN's prepacked kernel (activation fused in) for the shapes where it was measured
        faster than MKL's ``F.linear`` (see ``prepacked_is_faster``), ``F.linear`` elsewhere
        and off the CPU in float32."""
        relu, plain = activation == "relu", exact_linear(weight, bias)
        float32 = (lambda x: torch.relu_(plain(x))) if relu else plain
        on_amx = split_bf16_linear(weight, bias, relu, self.prepared, float32)
        if on_amx is not None:
            return on_amx
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return float32
        tensors = (weight,) if bias is None else (weight, bias)
        packed = self.prepared(("onednn",), tensors, lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 160))

        def project(x: Tensor) -> Tensor:
            if prepacked_is_faster(x.numel() // x.size(-1), weight.size(1), weight.size(0)):
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], "")
            return float32(x)

        return project

    def queries(self, attention: MultiheadAttention) -> Projection:
        module = attention.q_proj
        scaled = self.prepared(("q", attention.scaling), (module.weight, module.bias), lambda: scaled_linear(module, attention.scaling))
        return self.linear(scaled)

    def self_projections(self, attention: MultiheadAttention) -> SelfProjections:
        heads, head_dim = attention.num_heads, attention.head_dim
        parameters = tuple(p for m in (attention.q_proj, attention.k_proj, attention.v_proj) for p in (m.weight, m.bias) if p is not None)
        fused = self.prepared(("qkv",), parameters, lambda: interleaved_qkv(attention))
        project = self.linear(fused)

        def projections(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
            q, k, v = project(x).view(-1, heads, 3, head_dim).unbind(2)  # from (rows, heads, q/k/v, head_dim)
            return q, k, v

        return projections


class Int8Kernels(FusedKernels):
    """``fused`` with dynamic int8 linear layers (oneDNN's on AMX, else fbgemm's), the output
    projection included."""

    name = "int8"
    output_in_row_chunks = True  # fbgemm onto a large vocabulary (``output.ROWS_PER_CALL``)

    def linear(self, module: nn.Linear) -> Projection:
        packed, reduce_range = self._packed(module.weight, module.bias), REDUCE_RANGE
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range)

    def feed_forward_in(self, module: nn.Linear, activation: Callable[[Tensor], Tensor]) -> Projection:
        if activation is not F.relu:
            return super().feed_forward_in(module, activation)
        packed, reduce_range = self._packed(module.weight, module.bias), REDUCE_RANGE
        if INT8_ENGINE == "onednn":  # its linear_relu_dynamic leaves out the ReLU (torch 2.13)
            return lambda x: torch.relu_(torch.ops.quantized.linear_dynamic(x, packed, reduce_range))
        return lambda x: torch.ops.quantized.linear_relu_dynamic(x, packed, reduce_range)

    def output_projection(self, weight: Tensor) -> Optional[Projection]:
        packed, reduce_range = self._packed(weight, None), REDUCE_RANGE
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range)

    def _packed(self, weight: Tensor, bias: Optional[Tensor]) -> object:
        tensors = (weight,) if bias is None else (weight, bias)
        return self.prepared(("int8",), tensors, lambda: int8_packed(weight, bias))


def exact_linear(weight: Tensor, bias: Optional[Tensor]) -> Projection:
    """``F.linear(x, weight, bias)``. For the decoder step's rows (2-D ``x``) that is
    ``addmm(bias, x, weight.t())`` (``mm`` without a bias), the very call ``F.linear`` makes
    there, made directly with the transposed view taken once: two dispatches fewer per call
    (the ``linear`` wrapper and its ``t``), the same kernel on the same operands; with ``out``
    (2-D ``x``; contiguous (rows, out_features)) the same call writes there."""
    transposed = weight.t()

    def project(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 2 and out is None:
            return F.linear(x, weight, bias)
        return torch.mm(x, transposed, out=out) if bias is None else torch.addmm(bias, x, transposed, out=out)

    return project


def prepacked_is_faster(rows: int, in_features: int, out_features: int) -> bool:
    """Where oneDNN's prepacked linear beat MKL's ``F.linear`` on one core (sweeps over shapes,
    ``BENCHMARKS.md`` "Kernel tiers"). On an Intel CPU: from a few rows on, unless the product
    is tiny (its call costs more) or above ~320 rows (MKL's own blocking wins again). Elsewhere
    (measured on an AMD EPYC, where MKL runs a generic path at a third to a half of oneDNN's
    speed at small row counts): every product of at least ~0.5M multiply-adds, one row included."""
    if CPU_VENDOR == "GenuineIntel":
        return 2 <= rows <= PREPACKED_MAX_ROWS_ON_INTEL and rows * out_features >= PREPACKED_MIN_OUTPUTS_ON_INTEL
    return rows * in_features * out_features >= PREPACKED_MIN_WORK_ELSEWHERE


PREPACKED_MAX_ROWS_ON_INTEL = 320
PREPACKED_MIN_OUTPUTS_ON_INTEL = 16384
PREPACKED_MIN_WORK_ELSEWHERE = 2**19


# fbgemm's int8 kernels without VNNI sum pairs of products in 16 bits, which saturates unless
# activations use 7 bits ("reduce range"); with VNNI the full 8 bits are safe and closer to
# float32 (figures: BENCHMARKS.md, "Kernel tiers").
REDUCE_RANGE = not HAS_VNNI


TIERS = {"exact": ExactKernels, "fused": FusedKernels, "int8": Int8Kernels}
# What each tier that rounds differently was measured to change (``benchmarks.peers``,
# ``BENCHMARKS.md`` "Kernel tiers"): said in the log when it is chosen.
MEASURED = {
    "fused": "the same text as stock's for all 1,004 Bible test verses, BLEU equal, on an Intel CPU with AMX (bfloat16 products) and an AMD one",
    "int8": "23-28% of the 1,004 Bible test verses translated differently, BLEU 36.75 -> 36.60-36.79",
}


def kernel_tier(name: str, models: Sequence[nn.Module]) -> ExactKernels:
    """The kernels of tier ``name`` for ``models``, with a log line for a tier that rounds
    differently; int8 needs a float32 model on the CPU (fbgemm), elsewhere ``fused`` runs
    instead."""
    if name == "int8" and any(p.device.type != "cpu" or p.dtype != torch.float32 for model in models for p in model.parameters()):
        logger.warning("kernels: fused instead of int8 (its int8 kernels take a float32 model on the CPU only)")
        name = "fused"
    if name != "exact":
        logger.info(
            "kernels: %s (outputs can differ from stock's, which --fast-kernels exact gives; measured: %s)",
            name, MEASURED[name],
        )  # fmt: skip
    return TIERS[name]()
