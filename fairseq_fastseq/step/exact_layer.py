"""``exact``'s decoder layer step in one native call (``native/exact_layer.cpp``).

``layer.LayerStep`` makes about fifty operator calls per layer around its kernels, and each
costs microseconds of Python and dispatch: at batch 32 on the bundled model a fifth of the
step (BENCHMARKS.md, "One call per attention, one call per layer"). ``exact_layer.cpp`` makes the same calls on the
same operands from C++. It runs a layer only where the Python step has already checked
every shape it meets: each linear layer at this row count (``exact_gemm._SAME_BITS``: the
kernel's order, or MKL) and both attention products at this length
(``exact_attention._SAME_BITS``); otherwise (a new row count or length, attention weights
asked for, a layout other than once per sentence) the Python step runs, and checks. So the
bits are the Python step's, which are fairseq's.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor

from . import exact_attention, exact_gemm, native
from .caches import SelfAttentionCache
from .encoder_caches import PER_SENTENCE, CrossAttentionCache
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


class NativeLayerStep:
    """One layer's step through ``exact_layer.cpp``, where the Python step has checked its shapes."""

    def __init__(self, module: object, linears: List[NativeLinear], products: AttentionProducts, cross: bool, heads: int) -> None:
        self.module, self.linears, self.products, self.cross, self.heads = module, linears, products, cross, heads
        self._encoded: Dict[Optional[Order], NativeOrder] = {}

    def __call__(
        self, x: Tensor, self_cache: SelfAttentionCache, cross_cache: Optional[CrossAttentionCache], pad: Optional[Tensor]
    ) -> Optional[Tensor]:
        """The layer's output (rows, embed_dim), or None where it cannot run (nothing changed)."""
        threads = torch.get_num_threads()
        orders = self._linear_orders(x.size(0), threads)
        if orders is None or not self_cache.SLICES_WRITABLE:
            return None
        attention_orders = self._attention_orders(self_cache.length + 1, threads)
        cross_args: Tuple = (None, None, None, 0, None, None)
        if self.cross and cross_cache is not None:
            if cross_cache.layout != PER_SENTENCE:
                return None
            attention_orders += self._attention_orders(cross_cache.keys.size(1), threads)
            cross_args = self._cross_arguments(x, cross_cache)
        if None in attention_orders:
            return None
        key_slice, value_slice = self_cache.next_slices(x)
        if not all(buffer.data_ptr() % (4 * ALIGNMENT_FLOATS) == 0 for buffer in (self_cache.keys, self_cache.values)):
            return None  # MKL's order of the scores assumes it (``exact_attention.py``)
        keys, values = self_cache.commit(pad)
        history = self_cache.history()
        return self.module.step(x, orders, key_slice, value_slice, keys, values, self_cache.padding_so_far(), history, *cross_args, attention_orders)

    def _linear_orders(self, rows: int, threads: int) -> Optional[List[NativeOrder]]:
        """Each linear layer's recorded order at ``rows``, or None if one is not checked yet."""
        orders = []
        for linear in self.linears:
            key = (rows, linear.inner, linear.outputs, linear.bias is not None, threads)
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

    def _cross_arguments(self, x: Tensor, cache: CrossAttentionCache) -> Tuple:
        """Keys, values, mask (cached sentences, src_len), beams, live sentences and the queries' buffer."""
        embed_dim = x.size(1)
        mask = None if cache.padding is None else cache.padding.view(-1, cache.keys.size(1))
        buffer = cache.queries_buffer(x.view(-1, cache.beams, self.heads, embed_dim // self.heads))
        return cache.keys, cache.values, mask, cache.beams, cache.live, None if buffer is None else buffer.view(cache.beams, -1, embed_dim)


def native_layer_step(layer: TransformerDecoderLayerBase, kernels: ExactKernels, products: AttentionProducts) -> Optional[NativeLayerStep]:
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
    return NativeLayerStep(step, linears, products, cross, heads)
