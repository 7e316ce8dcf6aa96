"""One decoder layer's incremental step, on the typed caches of ``caches.py`` and ``encoder_caches.py``.

The arithmetic is fairseq's ``TransformerDecoderLayerBase.forward`` with
``MultiheadAttention`` for one query position: with the ``exact`` kernels (``kernels.py``) the
same linear layers (``F.linear`` on the same rows), the same ``bmm``/``einsum`` products
(encoder attention: the same matrices, one ``bmm`` per beam; on CPUs with AVX-512 through
our own kernels in their order, ``exact_attention.py``), float32 softmax and layer
norms, and the residual added in place (``a + b`` and ``b + a`` are the same float). Dropout
is left out: the coverage check (``coverage.py``) only lets models through whose dropout is off in
inference. Activations are ``(rows, embed_dim)``: for one position fairseq's
``(1, rows, embed_dim)`` holds the same values in the same memory order. The tiers that round
differently (``fused``, ``int8``) take the attention's products to C++ (``native``).
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.layer_drop import LayerDropModuleList
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor, nn

from .caches import SelfAttentionCache
from .encoder_caches import FAIRSEQ_SHARED, GROUPED, PER_BEAM, PER_SENTENCE, CrossAttentionCache
from .encoder_projection import MIN_ROWS_PROJECTED_ONCE, encoder_keys_values_per_beam
from .exact_attention import by_matrix, cache_resident_chunks, each_beams_products
from .exact_layer import native_layer
from .kernels import ExactKernels
from .source_rows import SourceRows, projected

def layer_norm(norm: nn.LayerNorm) -> Callable[[Tensor], Tensor]:
    shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
    return lambda x: F.layer_norm(x, shape, weight, bias, eps)


def _softmax(weights: Tensor) -> Tuple[Tensor, Tensor]:
    """fairseq's ``utils.softmax`` in float32, and its result in the weights' type (for float32
    weights the same kernel, without the no-op conversions)."""
    if weights.dtype == torch.float32:
        probs = torch.softmax(weights, dim=-1)
        return probs, probs
    probs_float = F.softmax(weights.float(), dim=-1, dtype=torch.float32)
    return probs_float, probs_float.type_as(weights)


class _Attention:
    """The projections and head geometry of a fairseq ``MultiheadAttention``."""

    def __init__(self, module: MultiheadAttention, kernels: ExactKernels) -> None:
        self.k, self.v, self.out = (kernels.linear(m) for m in (module.k_proj, module.v_proj, module.out_proj))
        self.scaled_queries = kernels.queries(module)
        self.heads, self.head_dim, self.embed_dim = module.num_heads, module.head_dim, module.embed_dim
        self.native = kernels.native_attention(module.k_proj.weight)  # None: fairseq's products
        self.products = kernels.attention_products(module.k_proj.weight)  # fairseq's products, with their bits

    def heads_view(self, q: Tensor) -> Tensor:
        """Scaled queries (rows, heads, head_dim) as fairseq's (rows * heads, 1, head_dim) view."""
        return q.view(1, q.size(0) * self.heads, self.head_dim).transpose(0, 1)

    def scores(self, queries: Tensor, keys: Tensor) -> Tensor:
        """``bmm(queries, keys.transpose(1, 2))``: (matrices, 1, head_dim), (matrices, length, head_dim) -> (matrices, 1, length)."""
        out = queries.new_empty(queries.size(0), 1, keys.size(1))
        return self.products.scores(queries, keys, out, lambda: torch.bmm(queries, keys.transpose(1, 2), out=out))

    def context(self, probs: Tensor, values: Tensor) -> Tensor:
        """``bmm(probs, values)``: (matrices, 1, length), (matrices, length, head_dim) -> (matrices, 1, head_dim)."""
        out = probs.new_empty(probs.size(0), 1, values.size(2))
        return self.products.context(probs, values, out, lambda: torch.bmm(probs, values, out=out))

    def output(self, context: Tensor, rows: int) -> Tensor:
        """(rows * heads, 1, head_dim) -> the output projection, (rows, embed_dim)."""
        return self.out(context.transpose(0, 1).contiguous().view(rows, self.embed_dim))


class SelfAttentionStep(_Attention):
    def __init__(self, module: MultiheadAttention, kernels: ExactKernels) -> None:
        super().__init__(module, kernels)
        self.projections = kernels.self_projections(module)
        self.projections_into = kernels.self_projections_into(module)  # None: ``append`` copies

    def __call__(self, x: Tensor, cache: SelfAttentionCache, pad: Optional[Tensor]) -> Tensor:
        rows = x.size(0)
        if self.projections_into is not None and cache.SLICES_WRITABLE:
            q = self.projections_into(x, *cache.next_slices(x))
            keys, values = cache.commit(pad)
        else:
            q, k, v = self.projections(x)
            keys, values = cache.append(k, v, pad)
        padding, history = cache.padding_so_far(), cache.history()
        if self.native is not None:  # over the time-major views, (length, rows * heads, head_dim)
            time_major = None if padding is None else padding.t()
            context = self.native.self_attention(q.reshape(-1, self.head_dim), keys.transpose(0, 1), values.transpose(0, 1), time_major, self.heads, history)
            return self.out(context.view(rows, self.embed_dim))
        queries = self.heads_view(q)  # (rows * heads, 1, head_dim)
        context = queries.new_empty(queries.shape)
        if self.products.attend(queries, keys, values, padding, self.heads, context, history):
            return self.out(context.view(rows, self.embed_dim))
        if history is not None:  # rows read through a table: each row's own, for ``bmm``
            keys, values = cache.in_rows()
        weights = self.scores(queries, keys)  # (rows * heads, 1, length)
        if padding is not None:
            weights.view(rows, self.heads, 1, -1).masked_fill_(padding[:, None, None, :], float("-inf"))
        _, probs = _softmax(weights)
        return self.out(self.context(probs, values).view(rows, self.embed_dim))  # (rows * heads, 1, head_dim): contiguous


class CrossAttentionStep(_Attention):
    def start(self, encoder_out: Tensor, padding: Optional[Tensor], beams: int, layout: str) -> CrossAttentionCache:
        """Project the encoder output (src_len, sentences, dim) to this layer's keys and values.

        ``PER_BEAM``: ``encoder_keys_values_per_beam``. ``PER_SENTENCE``: its values once per
        sentence (with one beam, or for products too small to project once per sentence:
        ``PER_BEAM``). ``FAIRSEQ_SHARED``, exactly fairseq's beam-shared attention: the first
        beam's copy of the beam-expanded output. ``GROUPED``: the layout of ``PER_SENTENCE``.
        """
        src_len, sentences, _ = encoder_out.size()
        if layout == PER_SENTENCE and (beams == 1 or src_len * sentences < MIN_ROWS_PROJECTED_ONCE):
            layout = PER_BEAM
        if layout == PER_BEAM:
            keys, values = (encoder_keys_values_per_beam(p, encoder_out, beams, self.heads, self.head_dim) for p in (self.k, self.v))
            mask = None if padding is None else padding.repeat_interleave(beams, dim=0).view(-1, 1, 1, src_len)
            return CrossAttentionCache(keys, values, mask, beams, self.heads, PER_BEAM)
        if layout in (PER_SENTENCE, GROUPED):  # contiguous per sentence and head
            # ``GROUPED`` (the tiers): the real source positions only (``source_rows.py``)
            source_rows = SourceRows.of(padding) if layout == GROUPED else None
            keys, values = (
                projected(p, encoder_out, source_rows).view(src_len, sentences, self.heads, self.head_dim)
                .permute(1, 2, 0, 3).contiguous().view(sentences * self.heads, src_len, self.head_dim)
                for p in (self.k, self.v)
            )  # fmt: skip
            if layout == PER_SENTENCE:
                mask = None if padding is None else padding.view(sentences, 1, 1, src_len)
                return CrossAttentionCache(keys, values, mask, beams, self.heads, PER_SENTENCE)
        else:
            expanded = encoder_out.repeat_interleave(beams, dim=1)  # fairseq's beam expansion
            source = expanded.view(src_len, -1, beams, expanded.size(2))[:, :, 0, :]
            keys, values = (
                p(source).contiguous().view(src_len, sentences * self.heads, self.head_dim).transpose(0, 1)
                for p in (self.k, self.v)
            )
        mask = None if padding is None else padding.view(sentences, 1, 1, 1, src_len)
        return CrossAttentionCache(keys, values, mask, beams, self.heads, layout, reads_live=self.native is not None)

    def __call__(self, x: Tensor, cache: CrossAttentionCache, need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """The attention output (rows, embed_dim) and, with ``need_weights``, the weights
        averaged over heads (rows, src_len), as fairseq's decoder reports them."""
        queries = self.scaled_queries(x)
        if cache.layout == PER_SENTENCE:
            return self._each_beam_in_turn(queries, cache, need_weights)
        if cache.layout == GROUPED:
            return self._grouped(queries, cache, need_weights)
        q = self.heads_view(queries)  # (rows * heads, 1, head_dim)
        rows = x.size(0)
        if cache.layout == FAIRSEQ_SHARED:
            sentences = cache.keys.size(0) // self.heads
            weights = torch.einsum(
                "bxhtd,bhsd->bxhts",
                q.view(sentences, -1, self.heads, *q.shape[1:]),
                cache.keys.view(sentences, self.heads, *cache.keys.shape[1:]),
            ).reshape(rows * self.heads, 1, -1)
            masked = weights.view(sentences, -1, self.heads, 1, weights.size(-1))
        else:  # the cached rows, finished ones included (``CrossAttentionCache``)
            weights = self.scores(cache.all_queries(q), cache.keys)  # (rows * heads, 1, src_len)
            masked = weights.view(-1, self.heads, 1, weights.size(-1))
        if cache.padding is not None:
            masked.masked_fill_(cache.padding, float("-inf"))
        probs_float, probs = _softmax(weights)
        if cache.layout == FAIRSEQ_SHARED:
            context = torch.einsum(
                "bxhts,bhsd->bxhtd",
                probs.view(sentences, -1, self.heads, *probs.shape[1:]),
                cache.values.view(sentences, self.heads, *cache.values.shape[1:]),
            ).reshape(rows * self.heads, 1, self.head_dim)
        else:
            context = cache.live_part(self.context(probs, cache.values))
        averaged = _mean_over_heads(cache.live_part(probs_float).view(rows, self.heads, 1, -1), x) if need_weights else None
        return self.output(context, rows), averaged

    def _each_beam_in_turn(self, queries: Tensor, cache: CrossAttentionCache, need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """fairseq's per-beam products (each beam's and head's query row against its sentence's
        keys, then values), matrix for matrix, from keys/values held once per sentence: one
        ``bmm`` per beam over a cache-sized chunk of the (sentence, head) matrices at a time (a
        product's values do not depend on how many others share the call), so no per-beam copy
        of the cache is made, and the beams after the first read it from the CPU's cache."""
        heads, head_dim, beams = self.heads, self.head_dim, cache.beams
        by_beam = cache.queries_by_beam(queries.view(-1, beams, heads, head_dim))  # (beams, cached sentences, heads, head_dim)
        cached, src_len = by_beam.size(1), cache.keys.size(1)
        matrices = cached * heads
        by_beam = by_beam.view(beams, matrices, 1, head_dim)
        context = by_beam.new_empty(beams, matrices, 1, head_dim)
        padding = None if cache.padding is None else cache.padding.view(cached, src_len)
        if not need_weights and self.products.attend(by_matrix(by_beam), cache.keys, cache.values, padding, heads, by_matrix(context)):
            return self._output_of_live(context, cache), None
        weights = by_beam.new_empty(beams, matrices, 1, src_len)
        chunks = cache_resident_chunks(matrices, cache.keys[0].numel() * cache.keys.element_size())
        keys = cache.keys.transpose(1, 2)
        self.products.scores(by_matrix(by_beam), cache.keys, by_matrix(weights), lambda: each_beams_products(by_beam, keys, weights, chunks))
        if cache.padding is not None:
            weights.view(beams, cached, heads, 1, src_len).masked_fill_(cache.padding, float("-inf"))
        probs_float, probs = _softmax(weights)
        self.products.context(by_matrix(probs), cache.values, by_matrix(context), lambda: each_beams_products(probs, cache.values, context, chunks))
        out = self._output_of_live(context, cache)
        averaged = None
        if need_weights:
            rows = out.size(0)
            per_row = cache.live_sentences(probs_float.view(beams, cached, heads, src_len)).transpose(0, 1)
            averaged = _mean_over_heads(per_row.reshape(rows, heads, 1, src_len), out)
        return out, averaged

    def _output_of_live(self, context: Tensor, cache: CrossAttentionCache) -> Tensor:
        """The output projection (rows, embed_dim) of the live sentences' rows of a
        (beams, cached sentences * heads, 1, head_dim) context."""
        beams = context.size(0)
        live = cache.live_sentences(context.view(beams, cache.cached_sentences, self.embed_dim))  # (beams, live sentences, embed_dim)
        return self.out(live.transpose(0, 1).reshape(live.size(1) * beams, self.embed_dim))

    def _grouped(self, queries: Tensor, cache: CrossAttentionCache, need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """A sentence's beams attend to its one copy of the keys/values as a group of queries
        (scaled, (rows, embed_dim)): one (beams x head_dim) @ (head_dim x src_len) product per
        sentence and head."""
        heads, head_dim = self.heads, self.head_dim
        sentences = cache.keys.size(0) // heads
        if self.native is not None:
            padding = None if cache.padding is None else cache.padding.view(sentences, -1)
            averaged = queries.new_empty(queries.size(0), cache.keys.size(1)) if need_weights else None
            context = self.native.grouped_attention(queries, cache.keys, cache.values, padding, heads, averaged, cache.live)
            return self.out(context), averaged
        beams = queries.size(0) // sentences
        grouped = queries.view(sentences, beams, heads, head_dim).transpose(1, 2).reshape(sentences * heads, beams, head_dim)
        weights = torch.bmm(grouped, cache.keys.transpose(1, 2))  # (sentences * heads, beams, src_len)
        if cache.padding is not None:
            weights.view(sentences, heads, beams, -1).masked_fill_(cache.padding.view(sentences, 1, 1, -1), float("-inf"))
        probs_float, probs = _softmax(weights)
        context = torch.bmm(probs, cache.values).view(sentences, heads, beams, head_dim)
        rows = sentences * beams
        out = self.out(context.transpose(1, 2).reshape(rows, self.embed_dim))
        averaged = None
        if need_weights:
            averaged = probs_float.view(sentences, heads, beams, -1).float().to(out).mean(dim=1).view(rows, -1)
        return out, averaged


def _mean_over_heads(per_row: Tensor, like: Tensor) -> Tensor:
    """fairseq's decoder-side average of the attention weights (rows, heads, 1, src_len) over
    heads (rows, src_len), in ``like``'s type: the same reduction over the same layout."""
    return per_row.transpose(1, 0).float().to(like).mean(dim=0)[:, -1, :]


class LayerStep:
    """``TransformerDecoderLayerBase.forward`` for one position, pre- or post-norm."""

    def __init__(self, layer: TransformerDecoderLayerBase, kernels: ExactKernels) -> None:
        self.normalize_before = layer.normalize_before
        self.self_attention = SelfAttentionStep(layer.self_attn, kernels)
        self.self_attention_norm = layer_norm(layer.self_attn_layer_norm)
        cross = layer.encoder_attn is not None
        self.cross_attention = CrossAttentionStep(layer.encoder_attn, kernels) if cross else None
        self.cross_attention_norm = layer_norm(layer.encoder_attn_layer_norm) if cross else None
        self.fc1 = kernels.feed_forward_in(layer.fc1, layer.activation_fn)
        self.fc2 = kernels.linear(layer.fc2)
        self.final_norm = layer_norm(layer.final_layer_norm)
        self.native = native_layer(layer, kernels, self.self_attention.products)  # the decoder's one-call step (``exact_layer.py``)

    def __call__(
        self, x: Tensor, self_cache: SelfAttentionCache, cross_cache: Optional[CrossAttentionCache], pad: Optional[Tensor], need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        x = self._residual(x, self.self_attention_norm, lambda h: self.self_attention(h, self_cache, pad))
        attention = None
        if self.cross_attention is not None and cross_cache is not None:
            def cross(h: Tensor) -> Tensor:
                nonlocal attention
                out, attention = self.cross_attention(h, cross_cache, need_weights)
                return out

            x = self._residual(x, self.cross_attention_norm, cross)
        return self._residual(x, self.final_norm, self._feed_forward), attention

    def _feed_forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.fc1(h))

    def _residual(self, x: Tensor, norm: Callable[[Tensor], Tensor], block: Callable[[Tensor], Tensor]) -> Tensor:
        return sublayer(x, norm, block, self.normalize_before)


def sublayer(x: Tensor, norm: Callable[[Tensor], Tensor], block: Callable[[Tensor], Tensor], normalize_before: bool) -> Tensor:
    """fairseq's sublayer: (norm before) -> block -> + residual -> (norm after)."""
    out = block(norm(x) if normalize_before else x)
    out += x
    return out if normalize_before else norm(out)


def draw_as_layerdrop(layers: nn.Module) -> None:
    """fairseq's ``LayerDropModuleList`` draws one random number per layer each time a stack
    iterates its layers, in inference too: the same draw, so that sampling after it sees it."""
    if isinstance(layers, LayerDropModuleList):
        torch.empty(len(layers)).uniform_()
