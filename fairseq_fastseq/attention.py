"""Decoder self-attention with a preallocated, time-major key/value cache.

fairseq's incremental self-attention copies its whole cache twice per layer and step:
``reorder_incremental_state`` index-selects it into a new tensor (beam reorder), then the
attention forward grows it with ``torch.cat``. Here the cache is a (capacity, bsz, heads,
head_dim) buffer: a step writes one time slice in place, and a reorder is one
``index_select`` into a spare buffer of the same shape (a slice along time is contiguous,
so it can be the ``out=`` of the copy). With one beam there is no reorder at all.

The arithmetic is fairseq's: the same projections, the same ``bmm`` shapes over the same
values (strided views instead of contiguous copies), the same float32 softmax.
"""

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from fairseq import utils
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

_KEY, _VALUE = "time_major_key", "time_major_value"
_SPARE_KEY, _SPARE_VALUE = "spare_key", "spare_value"
_LENGTH = "time_major_length"  # a Python int: how many time slices are filled
_INITIAL_CAPACITY = 32


class TimeMajorCachedSelfAttention(MultiheadAttention):
    """fairseq's ``MultiheadAttention``; only incremental self-attention takes the new path."""

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        *args,
        **kwargs,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The time-major path for one decoding step of self-attention, else fairseq's forward
        (``args``/``kwargs``: static_kv, attn_mask, before_softmax, need_head_weights)."""
        state = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        fast_path = (
            state is not None
            and "prev_key" not in state  # a cache fairseq's own path started
            and self.self_attention
            and query.size(0) == 1
            and key_padding_mask is None
            and not need_weights
            and not args
            and not any(kwargs.values())  # no attn_mask, before_softmax, need_head_weights
            and self.bias_k is None
            and not self.add_zero_attn
        )
        if not fast_path:
            if state is not None and _KEY in state:
                self._hand_cache_to_fairseq(incremental_state, state)
            return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights, *args, **kwargs)
        return self._incremental_self_attention(query, incremental_state, state), None

    def _incremental_self_attention(self, query: Tensor, incremental_state, state) -> Tensor:
        _, bsz, embed_dim = query.size()  # (1, bsz, embed_dim)
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query)
        k = self.k_proj(query)
        v = self.v_proj(query)
        q *= self.scaling
        q = q.contiguous().view(1, bsz * heads, head_dim).transpose(0, 1)  # (bsz*heads, 1, head_dim)

        length = state.get(_LENGTH, 0)
        keys, values = state.get(_KEY), state.get(_VALUE)
        if keys is None or length == keys.size(0):
            keys, values = (self._grown(buffer, length, k, bsz) for buffer in (keys, values))
            state[_SPARE_KEY] = state[_SPARE_VALUE] = None
        keys[length] = k.view(bsz, heads, head_dim)
        values[length] = v.view(bsz, heads, head_dim)
        length += 1
        k_all = keys[:length].view(length, bsz * heads, head_dim).transpose(0, 1)  # (bsz*heads, t, head_dim)
        v_all = values[:length].view(length, bsz * heads, head_dim).transpose(0, 1)

        attn_weights = torch.bmm(q, k_all.transpose(1, 2))  # (bsz*heads, 1, t)
        attn_weights = utils.softmax(attn_weights, dim=-1, onnx_trace=self.onnx_trace).type_as(attn_weights)
        attn_probs = self.dropout_module(attn_weights)
        attn = torch.bmm(attn_probs, v_all)  # (bsz*heads, 1, head_dim)
        attn = attn.transpose(0, 1).contiguous().view(1, bsz, embed_dim)

        state.update({_KEY: keys, _VALUE: values, _LENGTH: length})
        self._set_input_buffer(incremental_state, state)
        return self.out_proj(attn)

    def _grown(self, buffer: Optional[Tensor], length: int, like: Tensor, bsz: int) -> Tensor:
        """A buffer with twice the capacity (or the initial one), holding ``length`` slices."""
        capacity = max(_INITIAL_CAPACITY, 2 * length)
        grown = like.new_empty(capacity, bsz, self.num_heads, self.head_dim)
        if buffer is not None:
            grown[:length] = buffer[:length]
        return grown

    def _hand_cache_to_fairseq(self, incremental_state, state) -> None:
        """Rewrite the cache in fairseq's layout, for a step our path does not take."""
        length = state[_LENGTH]
        fairseq_state = {
            "prev_key": state[_KEY][:length].permute(1, 2, 0, 3).contiguous(),  # (bsz, heads, t, head_dim)
            "prev_value": state[_VALUE][:length].permute(1, 2, 0, 3).contiguous(),
            "prev_key_padding_mask": None,
        }
        state.clear()
        state.update(fairseq_state)
        self._set_input_buffer(incremental_state, state)

    @torch.jit.unused
    def reorder_incremental_state(
        self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor
    ) -> Dict[str, Dict[str, Optional[Tensor]]]:
        state = self._get_input_buffer(incremental_state)
        if _KEY not in state:
            return super().reorder_incremental_state(incremental_state, new_order)
        length = state[_LENGTH]
        for name, spare_name in ((_KEY, _SPARE_KEY), (_VALUE, _SPARE_VALUE)):
            buffer, spare = state[name], state.get(spare_name)
            if spare is None or spare.size(1) != new_order.numel():
                spare = buffer.new_empty(buffer.size(0), new_order.numel(), *buffer.shape[2:])
            torch.index_select(buffer[:length], 1, new_order, out=spare[:length])
            # The old buffer becomes the spare of the next reorder, if the batch keeps its size.
            state[name], state[spare_name] = spare, buffer if spare.size(1) == buffer.size(1) else None
        return self._set_input_buffer(incremental_state, state)


# Below this many rows (source tokens x sentences) the encoder output is projected per beam.
MIN_ROWS_PROJECTED_ONCE = 64


class SentenceProjectedEncoderAttention(MultiheadAttention):
    """Encoder-decoder attention fed the encoder output once per sentence, not once per beam.

    fairseq's generator copies the encoder output for every beam, and each decoder layer then
    projects every copy to keys and values. Here a layer projects each sentence once and
    copies the projected rows for its beams, in the cache layout fairseq uses, so every later
    step is fairseq's own code. The values are bitwise fairseq's as long as the BLAS kernel
    computes each row the same way whatever the number of rows; for very small products it
    does not (on x86 CPUs, under about a dozen rows, the last bit can differ), so those, cheap
    anyway, are projected per beam as fairseq does.
    """

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        *args,
        **kwargs,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """fairseq's forward, after seeding the cache on the first step of a beam search."""
        if incremental_state is not None and static_kv and key is not None and query.size(1) != key.size(1):
            state = self._get_input_buffer(incremental_state)
            if "prev_key" not in state:
                self._project_once_per_sentence(key, value, key_padding_mask, query.size(1) // key.size(1), state)
                self._set_input_buffer(incremental_state, state)
        return super().forward(
            query, key, value, key_padding_mask, incremental_state, need_weights, static_kv, *args, **kwargs
        )

    def _project_once_per_sentence(self, key, value, key_padding_mask, beams: int, state) -> None:
        src_len, sentences, _ = key.size()  # (src_len, bsz, embed_dim)
        rows = sentences * beams
        small = src_len * sentences < MIN_ROWS_PROJECTED_ONCE
        for name, projection, source in (("prev_key", self.k_proj, key), ("prev_value", self.v_proj, value)):
            if small:  # fairseq's way: project every beam's copy
                projected = projection(source.repeat_interleave(beams, dim=1))
            else:
                projected = projection(source).repeat_interleave(beams, dim=1)  # (src_len, bsz*beams, embed_dim)
            # fairseq's layout: (bsz*beams, heads, src_len, head_dim) as a view of the projection
            per_head = projected.view(src_len, rows * self.num_heads, self.head_dim).transpose(0, 1)
            state[name] = per_head.view(rows, self.num_heads, src_len, self.head_dim)
        state["prev_key_padding_mask"] = (
            key_padding_mask.repeat_interleave(beams, dim=0) if key_padding_mask is not None else None
        )


def _swappable(
    models: Iterable[nn.Module], time_major_self_attn: bool, per_sentence_encoder: bool
) -> Tuple[List[MultiheadAttention], List[MultiheadAttention]]:
    """The self-attention and encoder-attention modules whose class ``fast_attention`` swaps.

    Encoder attention is swapped only if every model attends to its encoder with fairseq's
    ``MultiheadAttention``, none of them already beam-aware as BART's are.
    """
    self_attn, encoder_attn, per_sentence = [], [], per_sentence_encoder
    for model in models:
        attention = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
        if time_major_self_attn:
            self_attn += [m for m in attention if type(m) is MultiheadAttention and m.self_attention]
        cross = [m for m in attention if m.encoder_decoder_attention]
        per_sentence &= bool(cross) and all(type(m) is MultiheadAttention and m.beam_size == 1 for m in cross)
        encoder_attn += cross
    return self_attn, encoder_attn if per_sentence else []


def describe(models: Sequence[nn.Module], time_major_self_attn: bool = True, per_sentence_encoder: bool = True) -> str:
    """One line for the log: which attention ``fast_attention`` accelerates in ``models``, and why not."""
    self_attn, encoder_attn = _swappable(models, time_major_self_attn, per_sentence_encoder)
    attention = [m for model in models for m in model.modules() if isinstance(m, MultiheadAttention)]
    if not attention:
        names = ", ".join(sorted({type(model).__name__ for model in models}))
        return f"fairseq's ({names} has no fairseq MultiheadAttention; the fast search still applies)"
    if encoder_attn:
        encoder_part = "encoder keys/values once per sentence"
    elif any(m.encoder_decoder_attention for m in attention):
        encoder_part = "fairseq's (or the model's own) encoder attention"
    else:
        encoder_part = "no encoder attention (decoder-only)"
    self_part = f"time-major self-attention cache ({len(self_attn)} modules)" if self_attn else "fairseq's self-attention cache"
    return f"{self_part}, {encoder_part}"


@contextmanager
def fast_attention(
    models: Iterable[nn.Module], time_major_self_attn: bool = True, per_sentence_encoder: bool = True
) -> Iterator[bool]:
    """Within the block, ``models`` use the attention modules above.

    Only the classes of fairseq's ``MultiheadAttention`` modules change, and only for the
    block: parameters, state dict and every other code path stay fairseq's, and other users
    of the same model objects (a stock generator, training) see them unchanged afterwards.
    Yields whether the decoders take the encoder output once per sentence.
    """
    self_attn, encoder_attn = _swappable(models, time_major_self_attn, per_sentence_encoder)
    for module in self_attn:
        module.__class__ = TimeMajorCachedSelfAttention
    for module in encoder_attn:
        module.__class__ = SentenceProjectedEncoderAttention
    try:
        yield bool(encoder_attn)
    finally:
        for module in self_attn + encoder_attn:
            module.__class__ = MultiheadAttention
