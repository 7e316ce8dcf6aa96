"""One model's lean decoder for a search: embeddings, layers, final norm and output.

``TransformerDecoderBase.extract_features_scriptable`` for one position, followed by the
output stage of fairseq's ``EnsembleModel.forward_decoder``: the output projection, the
division by the temperature and the log-softmax, into per-batch buffers for a plain output
layer on CPU float32 (``output.py``), else through the model's own ``output_layer`` and
``get_normalized_probs`` (adaptive softmax, GPU, half precision).
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .caches import IndexedSelfAttentionCache, LayerCaches, SelfAttentionCache
from .encoder_caches import FAIRSEQ_SHARED, GROUPED, PER_BEAM, PER_SENTENCE
from .histories import Histories
from .coverage import plain_output_projection
from .kernels import ExactKernels
from .exact_layer import native_layers
from .layer import LayerStep, draw_as_layerdrop, layer_norm
from .output import BufferedOutput, RowChunkedOutput, bufferable_projection, log_probabilities_in_place
from .pool import BufferPool
from .slots import RowSlots


class LeanDecoder:
    """The decoder of ``model`` (covered by ``coverage.why_not_lean``), stepped one position
    at a time on typed caches."""

    def __init__(self, model: nn.Module, kernels: ExactKernels) -> None:
        decoder = model.decoder
        self.model, self.kernels = model, kernels
        self.padding_idx = decoder.padding_idx
        self.embed_tokens = decoder.embed_tokens.weight
        self.embed_scale = decoder.embed_scale
        self.project_in = kernels.linear(decoder.project_in_dim) if decoder.project_in_dim is not None else None
        self.embed_positions = decoder.embed_positions
        self.embedding_norm = layer_norm(decoder.layernorm_embedding) if decoder.layernorm_embedding is not None else None
        self.fairseq_layers = decoder.layers
        self.layers = [LayerStep(layer, kernels) for layer in decoder.layers]
        self.native_layers = native_layers([layer.native for layer in self.layers])  # None: one by one
        self.final_norm = layer_norm(decoder.layer_norm) if decoder.layer_norm is not None else None
        self.project_out = kernels.linear(decoder.project_out_dim) if decoder.project_out_dim is not None else None
        self._output: Optional[Callable[[Tensor, float], Tensor]] = None
        self._positions: Optional[Tensor] = None  # (steps, embed_dim): the embedding of each step's position

    def start(
        self, encoder_out: Optional[Dict[str, List[Tensor]]], beams: int, max_steps: int, pool: Optional[BufferPool] = None
    ) -> LayerCaches:
        """Fresh caches for a batch, the encoder keys/values of every layer projected; the
        self-attention caches and the output buffer from ``pool`` (``pool.py``)."""
        pool = pool or BufferPool()
        self._output = self._output_stage(pool)
        self._positions = self._position_table(max_steps)
        memory, padding = None, None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            memory = encoder_out["encoder_out"][0]  # (src_len, sentences, dim)
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            padding = encoder_out["encoder_padding_mask"][0]  # (sentences, src_len)
            padding = padding if bool(padding.any()) else None  # masking nothing changes nothing
        histories = self._histories(max_steps, beams, memory is not None)
        self_caches, cross_caches = [], []
        for layer in self.layers:
            attention = layer.self_attention
            self_caches.append(self._self_attention_cache(attention.heads, attention.head_dim, max_steps, pool, histories))
            cross = layer.cross_attention if memory is not None else None
            cross_caches.append(cross.start(memory, padding, beams, self._encoder_layout(beams)) if cross is not None else None)
        # On the CPU each row's self-attention history stays where it was written (``histories.py``,
        # for the C++ self-attention) or in its slot (``slots.py``); off it (not measured there)
        # every reorder copies the rows.
        slots = RowSlots(beams) if self.embed_tokens.device.type == "cpu" and histories is None else None
        return LayerCaches(self_caches, cross_caches, slots=slots, histories=histories)

    def _histories(self, max_steps: int, beams: int, attends_source: bool) -> Optional[Histories]:
        """Histories read where they were written (``histories.py``) where every layer's
        self-attention is a C++ kernel that reads them: the tiers', or ``exact``'s in its
        one-call layer step (``exact_layer.py``) for beams above one with encoder keys/values
        once per sentence (the layouts it steps); else None (slots, ``slots.py``)."""
        if not self.layers:
            return None
        tiers = all(layer.self_attention.native is not None for layer in self.layers)
        stepped_natively = not attends_source or self._encoder_layout(beams) == PER_SENTENCE
        exact = beams > 1 and stepped_natively and self.native_layers is not None
        return Histories(max_steps) if tiers or exact else None

    def _self_attention_cache(
        self, heads: int, head_dim: int, max_steps: int, pool: BufferPool, histories: Optional[Histories]
    ) -> SelfAttentionCache:
        if histories is not None:
            return IndexedSelfAttentionCache(heads, head_dim, max_steps, histories, pool)
        return SelfAttentionCache(heads, head_dim, max_steps, pool)

    def _encoder_layout(self, beams: int) -> str:
        if self.kernels.grouped_encoder_attention and beams > 1:
            return GROUPED
        # BART's encoder attention shares the keys/values of a sentence's beams (its
        # ``set_beam_size``, which fairseq's generator sets for beams above 1).
        if hasattr(self.model, "set_beam_size") and beams > 1:
            return FAIRSEQ_SHARED
        # Each beam in turn against one copy per sentence: checked bitwise against the per-beam
        # products on CPU; elsewhere (GPU BLAS picks kernels by batch size) per beam, as fairseq.
        return PER_SENTENCE if self.embed_tokens.device.type == "cpu" else PER_BEAM

    def _output_stage(self, pool: BufferPool) -> Optional[Callable[[Tensor, float], Tensor]]:
        """Log-probabilities (rows, vocab) of features and a temperature: the tier's output
        projection, or fairseq's ``mm`` into per-batch buffers; None for fairseq's output layer."""
        weight = plain_output_projection(self.model)
        project = self.kernels.output_projection(weight) if weight is not None else None
        if project is not None and self.kernels.output_in_row_chunks:
            return RowChunkedOutput(project, weight, pool)
        if project is not None:
            return lambda features, temperature: log_probabilities_in_place(project(features), temperature)
        weight = bufferable_projection(self.model)
        return BufferedOutput(weight, pool, self.kernels.buffered_output_projection(weight)) if weight is not None else None

    def step(
        self, tokens: Tensor, step: int, caches: LayerCaches, need_attention: bool, temperature: float
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Log-probabilities (rows, vocab) after ``tokens`` (rows,), the newest token of each
        hypothesis, at position ``step``; and the last layer's attention over the source
        (rows, src_len) if ``need_attention`` and the model attends to a source."""
        slots = caches.slots
        if slots is not None:  # the layers compute in slot order
            tokens = slots.to_slots(tokens)
        if caches.histories is not None:
            caches.histories.open_step(tokens.size(0), tokens.device)
        x = self._embed(tokens, step)
        # fairseq masks the self-attention positions whose input was padding (never emitted
        # by the search, but a prefix or BOS could be).
        pad = self._padding(tokens)
        draw_as_layerdrop(self.fairseq_layers)
        x, attention = self._layers(x, caches, pad, need_attention)
        if slots is not None:
            x = slots.to_rows(x)
            attention = None if attention is None else slots.to_rows(attention)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self._log_probabilities(x, attention, temperature), attention

    def _layers(self, x: Tensor, caches: LayerCaches, pad: Optional[Tensor], need_attention: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Every layer on ``x``, and the last one's attention over the source if asked for:
        the layers in one native call where it can run them (``exact_layer.py``), tried at the
        first layer and, where that was refused, once more after the first layer's Python
        step (which checks a shape new at this step); the others one by one. The last layer's
        attention weights come from its Python step."""
        layers, attention = self.layers, None
        last = len(layers) - 1
        stop = last if need_attention and layers and layers[last].cross_attention is not None else len(layers)
        index, tries = 0, 2 if self.native_layers is not None else 0
        while index <= last:
            if tries and index < stop:
                tries -= 1
                out = self.native_layers(x, caches, pad, index, stop)
                if out is not None:
                    x, index = out, stop
                    continue
            x, layer_attention = layers[index](x, caches.self_attention[index], caches.cross_attention[index], pad, need_attention and index == last)
            attention = layer_attention if index == last else None
            index += 1
        return x, attention

    def _padding(self, tokens: Tensor) -> Optional[Tensor]:
        """(rows,) bool where the newest token is padding, or None if none is."""
        pad = tokens.eq(self.padding_idx)
        return pad if bool(pad.any()) else None

    def _embed(self, tokens: Tensor, step: int) -> Tensor:
        x = F.embedding(tokens, self.embed_tokens, self.padding_idx)  # (rows, dim)
        if self.embed_scale != 1.0:  # x * 1.0 == x exactly
            x = self.embed_scale * x
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            x += self._position(step, tokens)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return x

    def _position_table(self, steps: int) -> Optional[Tensor]:
        """The position embeddings of steps 0..steps-1 (the rows fairseq's incremental call
        reads), from one call of the module, as far as it has positions."""
        module = self.embed_positions
        if module is None:
            return None
        limit = getattr(module, "max_positions", steps)
        steps = min(steps, limit)
        probe = torch.full((1, steps), self.padding_idx + 1, dtype=torch.long, device=self.embed_tokens.device)
        return module(probe)[0]

    def _position(self, step: int, tokens: Tensor) -> Tensor:
        if step < self._positions.size(0):
            return self._positions[step]
        # Beyond the table: fairseq's own incremental call (and its error, if any).
        history = tokens.new_full((tokens.size(0), step + 1), self.padding_idx + 1)
        return self.embed_positions(history, incremental_state={})[:, -1, :]

    def _log_probabilities(self, features: Tensor, attention: Optional[Tensor], temperature: float) -> Tensor:
        if self._output is not None:
            return self._output(features, temperature)
        # fairseq's output layer and normalizer
        logits = self.model.decoder.output_layer(features.unsqueeze(1))
        logits.div_(temperature)
        lprobs = self.model.get_normalized_probs((logits, {"attn": [attention]}), log_probs=True, sample=None)
        return lprobs[:, -1, :]
