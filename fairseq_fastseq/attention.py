"""The attention classes of the module path: a time-major self-attention cache, and encoder
keys/values projected once per sentence (EL-attention is in ``el_attention.py``; which
module takes which class for a search: ``attention_plan.py``).

fairseq's incremental self-attention copies its whole cache twice per layer and step:
``reorder_incremental_state`` index-selects it into a new tensor (beam reorder), then the
attention forward grows it with ``torch.cat``. Here the cache is a (capacity, bsz, heads,
head_dim) buffer: a step writes one time slice in place, and a reorder is one
``index_select`` into a spare buffer of the same shape (a slice along time is contiguous,
so it can be the ``out=`` of the copy). The buffer it replaces becomes the spare of the next
copy, so the layers of a model pass one spare along: the memory is the cache plus one
layer's copy, as in fairseq. With one beam there is no reorder at all.

The arithmetic is fairseq's: the same projections, the same ``bmm`` shapes over the same
values (strided views instead of contiguous copies), the same float32 softmax.
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from fairseq import utils
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor

from .step.encoder_projection import encoder_keys_values_per_beam

_KEY, _VALUE = "time_major_key", "time_major_value"
# In the model's incremental state (next to the layers' own entries): the spare buffer.
_SPARE = "fastseq_spare_cache_buffer"
_LENGTH = "time_major_length"  # a Python int: how many time slices are filled
# The cache grows by this many time slices when full: a buffer and its spare hold at most
# this many unused slices each, so the peak memory stays close to fairseq's (which holds the
# cache and a copy of it during a reorder or a ``torch.cat``), while growing stays rare.
_GROWTH = 16


class AttentionCall(NamedTuple):
    """The arguments of fairseq's ``MultiheadAttention.forward`` by name (its signature, so
    ``AttentionCall(*args, **kwargs)`` binds a call as fairseq's forward would): the module
    path's attention classes take a path of their own for some calls and hand the others,
    as they came, to fairseq's forward."""

    query: Tensor
    key: Optional[Tensor]
    value: Optional[Tensor]
    key_padding_mask: Optional[Tensor] = None
    incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None
    need_weights: bool = True
    static_kv: bool = False
    attn_mask: Optional[Tensor] = None
    before_softmax: bool = False
    need_head_weights: bool = False

    def state(self, attention: MultiheadAttention) -> Optional[Dict[str, Optional[Tensor]]]:
        """``attention``'s entry in the incremental state, or None without one."""
        return attention._get_input_buffer(self.incremental_state) if self.incremental_state is not None else None


IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]


class OwnStateAttention(MultiheadAttention):
    """A ``MultiheadAttention`` whose incremental state can hold entries of its own (present
    when ``own_key`` is): it reorders those itself and leaves fairseq's entries to fairseq."""

    own_key = ""

    @torch.jit.unused
    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> IncrementalState:
        state = self._get_input_buffer(incremental_state)
        if self.own_key not in state:
            return super().reorder_incremental_state(incremental_state, new_order)
        self.reorder_own_state(incremental_state, state, new_order)
        return self._set_input_buffer(incremental_state, state)

    def reorder_own_state(self, incremental_state: IncrementalState, state: Dict[str, Optional[Tensor]], new_order: Tensor) -> None:
        """Row ``i`` of ``state`` takes old row ``new_order[i]``."""
        raise NotImplementedError


class TimeMajorCachedSelfAttention(OwnStateAttention):
    """fairseq's ``MultiheadAttention``; only incremental self-attention takes the new path."""

    own_key = _KEY
    # How many decoder steps the running search can take, if known (``cache_steps``): the
    # capacity never goes beyond it.
    max_steps: Optional[int] = None

    def forward(self, *args: Any, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        """The time-major path for one decoding step of self-attention, else fairseq's forward
        (the arguments are fairseq's: ``AttentionCall``)."""
        call = AttentionCall(*args, **kwargs)
        state = call.state(self)
        fast_path = (
            state is not None
            and "prev_key" not in state  # a cache fairseq's own path started
            and self.self_attention
            and call.query.size(0) == 1
            and call.key_padding_mask is None
            and not call.need_weights
            and not call.static_kv
            and call.attn_mask is None
            and not call.before_softmax
            and not call.need_head_weights
            and self.bias_k is None
            and not self.add_zero_attn
        )
        if not fast_path:
            if state is not None and _KEY in state:
                self._hand_cache_to_fairseq(call.incremental_state, state)
            return super().forward(*args, **kwargs)
        return self._incremental_self_attention(call.query, call.incremental_state, state), None

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
            keys, values = (self._grown(buffer, length, k, bsz, self.max_steps) for buffer in (keys, values))
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

    def _grown(self, buffer: Optional[Tensor], length: int, like: Tensor, bsz: int, limit: Optional[int]) -> Tensor:
        """A buffer with ``_GROWTH`` more slices of capacity (at most ``limit``, the steps the
        search can run, but at least one more), holding the ``length`` filled ones."""
        capacity = max(length + 1, min(length + _GROWTH, limit or length + _GROWTH))
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

    def reorder_own_state(self, incremental_state: IncrementalState, state: Dict[str, Optional[Tensor]], new_order: Tensor) -> None:
        length = state[_LENGTH]
        spares = incremental_state.setdefault(_SPARE, {})
        for name in (_KEY, _VALUE):
            buffer, spare = state[name], spares.pop("buffer", None)
            shape = (buffer.size(0), new_order.numel(), *buffer.shape[2:])
            if spare is None or spare.shape != shape or spare.dtype != buffer.dtype or spare.device != buffer.device:
                spare = buffer.new_empty(shape)
            torch.index_select(buffer[:length], 1, new_order, out=spare[:length])
            state[name], spares["buffer"] = spare, buffer  # the next copy (values, next layer) goes there


class SentenceProjectedEncoderAttention(MultiheadAttention):
    """Encoder-decoder attention fed the encoder output once per sentence, not once per beam.

    fairseq's generator copies the encoder output for every beam, and each decoder layer then
    projects every copy to keys and values. Here a layer projects each sentence once and
    copies the projected rows for its beams into a cache of fairseq's shape, so every later
    step is fairseq's own code. Unlike fairseq's cache (a strided view of the time-major
    projection), it is contiguous per beam and head: the same ``bmm`` values, read
    faster (``BENCHMARKS.md``, "Allocator and encoder-cache layout"). The values are bitwise fairseq's as long as the BLAS kernel
    computes each row the same way whatever the number of rows; for very small products it
    does not (on x86 CPUs, under about a dozen rows, the last bit can differ), so those, cheap
    anyway, are projected per beam as fairseq does.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        """fairseq's forward (its arguments: ``AttentionCall``), after seeding the cache on the
        first step of a beam search."""
        call = AttentionCall(*args, **kwargs)
        key = call.key
        if call.incremental_state is not None and call.static_kv and key is not None and call.query.size(1) != key.size(1):
            state = call.state(self)
            if "prev_key" not in state:
                self._project_once_per_sentence(key, call.value, call.key_padding_mask, call.query.size(1) // key.size(1), state)
                self._set_input_buffer(call.incremental_state, state)
        return super().forward(*args, **kwargs)

    def _project_once_per_sentence(self, key, value, key_padding_mask, beams: int, state) -> None:
        src_len, sentences, _ = key.size()  # (src_len, bsz, embed_dim)
        for name, projection, source in (("prev_key", self.k_proj, key), ("prev_value", self.v_proj, value)):
            per_beam = encoder_keys_values_per_beam(projection, source, beams, self.num_heads, self.head_dim)
            state[name] = per_beam.view(sentences * beams, self.num_heads, src_len, self.head_dim)
        state["prev_key_padding_mask"] = (
            key_padding_mask.repeat_interleave(beams, dim=0) if key_padding_mask is not None else None
        )
