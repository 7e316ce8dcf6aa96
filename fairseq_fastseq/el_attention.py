"""EL-attention (arXiv 2105.04779) for encoder-decoder attention: no encoder keys/values.

fairseq projects the encoder output to keys and values in every decoder layer and keeps
them, per beam, for the whole search. EL-attention keeps only the encoder output, once per
sentence, and moves the projections to the query side: with ``K = X Wk^T``,
``q K^T = (q Wk) X^T`` and ``softmax(q K^T) V = (softmax(q K^T) X) Wv^T + bv`` (each head's
slice of ``Wk``/``Wv``; the key bias adds a constant per query, which softmax cancels).
The result is fairseq's in exact arithmetic, not bitwise: sums run in another order, so
scores differ in the last bits and a near-tie can resolve another way. That is why it is a
choice (``--fast-encoder-projection el_attention``), not the default; it saves memory (no
per-layer key/value cache), at more compute per step (each head attends in the model
dimension instead of the head dimension), which favours GPUs with long sources.
"""

from typing import Any, Dict, Optional, Tuple

import torch
from fairseq import utils
from torch import Tensor

from .attention import AttentionCall, IncrementalState, OwnStateAttention

_SOURCE, _MASK, _BEAMS = "el_source", "el_source_padding_mask", "el_beams"


class ELEncoderAttention(OwnStateAttention):
    """fairseq's encoder-decoder ``MultiheadAttention``; incremental decoding fed the encoder
    output once per sentence takes the EL path."""

    own_key = _SOURCE

    def forward(self, *args: Any, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        """The EL path for a decoding step, else fairseq's forward (its arguments: ``AttentionCall``)."""
        call = AttentionCall(*args, **kwargs)
        state = call.state(self)
        el_path = (
            state is not None
            and call.static_kv
            and "prev_key" not in state  # a cache fairseq's own path started
            and (_SOURCE in state or call.key is not None)
            and call.attn_mask is None
            and not call.before_softmax
            and self.bias_k is None
            and not self.add_zero_attn
        )
        if not el_path:
            return super().forward(*args, **kwargs)
        if _SOURCE not in state:
            key = call.key
            sentences = key.size(1)
            state[_SOURCE] = key.transpose(0, 1).contiguous()  # (sentences, src_len, embed_dim)
            state[_MASK] = call.key_padding_mask
            state[_BEAMS] = call.query.size(1) // sentences
            self._set_input_buffer(call.incremental_state, state)
        return self._el_attention(call.query, state, call.need_weights or call.need_head_weights, call.need_head_weights)

    def _el_attention(
        self, query: Tensor, state, need_weights: bool, need_head_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        tgt_len, rows, embed_dim = query.size()  # (1, sentences*beams, embed_dim)
        heads, head_dim = self.num_heads, self.head_dim
        source, mask = state[_SOURCE], state[_MASK]
        sentences, src_len, _ = source.size()
        beams = rows // sentences
        q = self.q_proj(query) * self.scaling
        q = q.view(rows, heads, head_dim).transpose(0, 1)  # (heads, rows, head_dim)
        # Each head's query in the encoder-output space: q_h Wk_h, (heads, rows, embed_dim).
        q_source = torch.bmm(q, self.k_proj.weight.view(heads, head_dim, embed_dim))
        q_source = q_source.view(heads, sentences, beams, embed_dim).permute(1, 2, 0, 3)
        q_source = q_source.reshape(sentences, beams * heads, embed_dim)
        scores = torch.bmm(q_source, source.transpose(1, 2))  # (sentences, beams*heads, src_len)
        if mask is not None:
            scores = scores.masked_fill(mask.unsqueeze(1).to(torch.bool), float("-inf"))
        probs = utils.softmax(scores, dim=-1, onnx_trace=self.onnx_trace).type_as(scores)
        probs = self.dropout_module(probs)
        context = torch.bmm(probs, source)  # (sentences, beams*heads, embed_dim)
        context = context.view(rows, heads, embed_dim).transpose(0, 1)  # (heads, rows, embed_dim)
        # Each head's value projection applied after attending: (context_h) Wv_h^T + bv_h.
        attn = torch.bmm(context, self.v_proj.weight.view(heads, head_dim, embed_dim).transpose(1, 2))
        if self.v_proj.bias is not None:
            attn = attn + self.v_proj.bias.view(heads, 1, head_dim)
        attn = attn.transpose(0, 1).reshape(tgt_len, rows, embed_dim)
        weights = None
        if need_weights:  # fairseq's layout: (heads, rows, tgt_len, src_len), or the mean of the heads
            weights = probs.view(rows, heads, tgt_len, src_len).transpose(0, 1)
            weights = weights if need_head_weights else weights.mean(dim=0)
        return self.out_proj(attn), weights

    def reorder_own_state(self, incremental_state: IncrementalState, state: Dict[str, Optional[Tensor]], new_order: Tensor) -> None:
        """Beams move within their sentence, so only finished sentences change the state."""
        beams = state[_BEAMS]
        if new_order.numel() != state[_SOURCE].size(0) * beams:
            kept = new_order.view(-1, beams)[:, 0] // beams
            state[_SOURCE] = state[_SOURCE].index_select(0, kept)
            if state[_MASK] is not None:
                state[_MASK] = state[_MASK].index_select(0, kept)
