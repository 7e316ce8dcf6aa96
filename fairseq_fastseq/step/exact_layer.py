"""``exact``'s decoder layers stepped in one native call (``native/exact_layer.cpp``).

``layer.LayerStep`` makes about fifty operator calls per layer around its kernels, and each
costs microseconds of Python and dispatch: at batch 32 on the bundled model a fifth of the
step (BENCHMARKS.md, "One call per attention, one call per layer"). ``exact_layer.cpp`` makes
the same calls on the same operands from C++, for every layer of the decoder in one call
(the caches' views made there too: "One call per decoder step"). It runs only where the
Python step has already checked every shape it meets: each linear layer at this row count
(``exact_gemm._SAME_BITS``: the kernel's order, or MKL) and both attention products at this
length (``exact_attention._SAME_BITS``); otherwise (a new row count or length, attention
weights asked for, a layout other than once per sentence) the Python step runs a layer, and
checks. So the bits are the Python step's, which are fairseq's.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor

from . import exact_attention, exact_gemm, native
from .caches import LayerCaches
from .encoder_caches import PER_SENTENCE
from .exact_attention import ALIGNMENT_FLOATS, CONTEXT, SCORES, AttentionProducts
from .exact_gemm import LANES, Blocks, NativeLinear, Order
from .kernels import ExactKernels

# exact_layer.cpp's modes: MKL's ``addmm``, the kernel's blocks, its sixteen lanes
MKL, BLOCKS, LANES_MODE = 0, 1, 2
NativeOrder = Tuple[int, Tuple[int, ...], int]  # (mode, bounds, split)


def native_order(order: Optional[Order]) -> NativeOrder:
    """A recorded order (``exact_gemm._SAME_BITS``: ``Blocks``, ``LANES`` or None for MKL) as
    ``exact_layer.cpp`` takes it."""
    if isinstance(order, Blocks):
        return BLOCKS, order.bounds, order.split
    return (LANES_MODE, (), 0) if order == LANES else (MKL, (), 0)


class NativeLayer:
    """One layer's native step (``exact_layer.cpp``'s ``ExactLayer``) and what decides whether
    it can run: its linear layers (whose shapes were checked, ``exact_gemm``) and attention
    products (checked per length, ``exact_attention``)."""

    def __init__(self, module: object, linears: List[NativeLinear], products: AttentionProducts, cross: bool, heads: int) -> None:
        self.module, self.linears, self.products, self.cross, self.heads = module, linears, products, cross, heads

    def shape(self) -> Tuple:
        """What must be equal for layers to share one call's orders."""
        linears = tuple((linear.inner, linear.outputs, linear.bias is not None) for linear in self.linears)
        return linears, tuple(sorted(self.products.orders.items())), self.cross, self.heads


class NativeLayers:
    """A decoder's layers stepped in one native call (``ExactStack``), where the Python step has
    checked every shape the call meets; else (``None``) the layers step one by one."""

    def __init__(self, layers: List[NativeLayer]) -> None:
        first = layers[0]
        self.linears, self.products, self.cross, self.heads = first.linears, first.products, first.cross, first.heads
        self.stack = native.exact_layer().ExactStack([layer.module for layer in layers])
        self._encoded: Dict[Optional[Order], NativeOrder] = {}

    def __call__(self, x: Tensor, caches: LayerCaches, pad: Optional[Tensor], first: int, stop: int) -> Optional[Tensor]:
        """The output (rows, embed_dim) of layers ``first`` to ``stop - 1`` on ``x``, or None
        where a shape is not checked yet or a cache's layout is not the one the call steps
        (then nothing changed)."""
        threads, rows = torch.get_num_threads(), x.size(0)
        self_caches, cross_caches = caches.self_attention[first:stop], caches.cross_attention[first:stop]
        orders = self._linear_orders(rows, threads)
        if orders is None or not self_caches[0].SLICES_WRITABLE:
            return None
        attention_orders = self._attention_orders(self_caches[0].length + 1, threads)
        cross = self.cross and cross_caches[0] is not None
        if cross:
            if any(cache.layout != PER_SENTENCE for cache in cross_caches):
                return None
            attention_orders += self._attention_orders(cross_caches[0].keys.size(1), threads)
        if None in attention_orders:
            return None
        for cache in self_caches:
            cache.make_room(x)
        # MKL's order of the scores assumes it (``exact_attention.py``)
        if any(buffer.data_ptr() % (4 * ALIGNMENT_FLOATS) for cache in self_caches for buffer in (cache.keys, cache.values)):
            return None
        for cache in self_caches:
            cache.close_step(pad)
        lead = self_caches[0]
        self_args = ([c.keys for c in self_caches], [c.values for c in self_caches], lead.length, lead.attended_rows(), lead.padding_so_far(), lead.history())
        cross_args: Tuple = ([], [], [], 0, [], [])
        if cross:
            beams = cross_caches[0].beams
            like = x.view(-1, beams, self.heads, x.size(1) // self.heads) if cross_caches[0].live is not None else None
            cross_args = (
                [c.keys for c in cross_caches], [c.values for c in cross_caches], [c.padding for c in cross_caches], beams,
                [c.live for c in cross_caches], [c.queries_buffer(like) for c in cross_caches],
            )  # fmt: skip
        return self.stack.step(x, first, stop, orders, attention_orders, *self_args, *cross_args)

    def _linear_orders(self, rows: int, threads: int) -> Optional[List[NativeOrder]]:
        """Each linear layer's recorded order at ``rows``, or None if one is not checked yet."""
        orders = []
        for linear in self.linears:
            key = linear.shape_at(rows, threads)
            if key not in exact_gemm._SAME_BITS:
                return None
            order = exact_gemm._SAME_BITS[key]
            if order not in self._encoded:
                self._encoded[order] = native_order(order)
            orders.append(self._encoded[order])
        return orders

    def _attention_orders(self, length: int, threads: int) -> List[Optional[int]]:
        """The scores' and context's orders at ``length`` where the kernel was checked to give
        ``bmm``'s bits there (else None)."""
        checks = exact_attention._SAME_BITS
        return [self.products.orders[kind] if checks.get((kind, length, threads)) else None for kind in (SCORES, CONTEXT)]


def native_layers(layers: List[Optional[NativeLayer]]) -> Optional[NativeLayers]:
    """The layers' one-call step, or None where a layer has no native step or the layers'
    shapes differ (fairseq builds every layer of a decoder from one configuration)."""
    if not layers or None in layers or len({layer.shape() for layer in layers}) != 1:
        return None
    return NativeLayers(layers)


def native_layer(layer: TransformerDecoderLayerBase, kernels: ExactKernels, products: AttentionProducts) -> Optional[NativeLayer]:
    """The layer's native step, or None where it does not apply: a kernel tier that rounds
    differently (its linear layers are not ``NativeLinear``), no AVX-512 build, an activation
    other than ReLU, heads not 64 wide, or a layer norm outside fairseq's plain one."""
    module = native.exact_layer()
    if module is None:
        return None
    attentions = [(layer.self_attn, ("q_proj", "k_proj", "v_proj", "out_proj"))]
    if layer.encoder_attn is not None:
        attentions.append((layer.encoder_attn, ("q_proj", "out_proj")))
    modules = [getattr(attention, name) for attention, names in attentions for name in names] + [layer.fc1, layer.fc2]
    linears = [kernels.linear(m) for m in modules]
    heads, head_dim = layer.self_attn.num_heads, layer.self_attn.head_dim
    if not all(isinstance(linear, NativeLinear) for linear in linears) or layer.activation_fn is not F.relu:
        return None
    cross = layer.encoder_attn is not None
    if head_dim != 64 or (cross and layer.encoder_attn.num_heads != heads) or products.kernels is None or None in products.orders.values():
        return None
    norms = [layer.self_attn_layer_norm] + ([layer.encoder_attn_layer_norm] if cross else []) + [layer.final_layer_norm]
    if not all(isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1 for norm in norms):
        return None
    parts = [(linear.weight, linear.bias, linear.packed) for linear in linears]
    cross_scaling = layer.encoder_attn.scaling if cross else 1.0
    step = module.ExactLayer(
        parts, [(norm.weight, norm.bias, norm.eps) for norm in norms], layer.normalize_before, heads, layer.self_attn.scaling, cross_scaling
    )
    return NativeLayer(step, linears, products, cross, heads)
