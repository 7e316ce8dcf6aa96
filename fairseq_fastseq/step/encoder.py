"""The encoder on the kernels of a tier that rounds differently (``fused``, ``int8``).

fairseq's ``TransformerEncoderBase.forward`` with ``return_all_hiddens`` off: fairseq's own
embedding stage (``forward_embedding``), then each ``TransformerEncoderLayerBase`` through
the tier's linear layers (one projection for queries, keys and values; oneDNN's prepacked
or int8 kernels) instead of MKL's ``F.linear`` in fairseq's modules, over the real source
positions only (``source_rows.py``: padded positions hold zeros in its output, which
attention masks out as fairseq's), then the final norm and fairseq's output dictionary. ``exact`` keeps fairseq's encoder (its kernels on its shapes:
bitwise). An encoder outside what this covers runs as fairseq's, with the reason in the log.
Figures: ``BENCHMARKS.md`` ("Kernel tiers").
"""

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq.models.transformer.transformer_encoder import TransformerEncoderBase
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from torch import Tensor, nn

from .coverage import active_dropout, attention_reason, first_reason, global_hooks_reason, hook_reason, plain_parts_reason
from .kernels import ExactKernels
from .layer import draw_as_layerdrop, layer_norm, sublayer
from .source_rows import SourceRows

EncoderOut = Dict[str, List[Tensor]]
# Encoder methods whose stock code this module restates or calls.
_ENCODER_METHODS = ("forward", "forward_scriptable", "forward_torchscript", "forward_non_torchscript", "forward_embedding")


def why_not_tier_encoder(encoder: nn.Module) -> Optional[str]:
    """None if ``TierEncoder`` computes what fairseq's ``encoder`` computes (up to the tier's
    rounding); else the first reason it does not."""
    if not isinstance(encoder, TransformerEncoderBase):
        return f"the encoder is {type(encoder).__name__}, not fairseq's transformer encoder"
    for method in _ENCODER_METHODS:
        if getattr(type(encoder), method) is not getattr(TransformerEncoderBase, method):
            return f"its encoder overrides {method}"
    if encoder.training:
        return "the encoder is in training mode"
    checks = (
        lambda: first_reason(_layer_reason(layer, index) for index, layer in enumerate(encoder.layers)),
        lambda: first_reason(active_dropout(module, label or "the encoder") for label, module in encoder.named_modules()),
        lambda: first_reason(hook_reason(module, label or "the encoder") for label, module in encoder.named_modules()),
        global_hooks_reason,
    )
    return first_reason(check() for check in checks)


def _layer_reason(layer: nn.Module, index: int) -> Optional[str]:
    where = f"encoder layer {index}"
    if not isinstance(layer, TransformerEncoderLayerBase) or type(layer).forward is not TransformerEncoderLayerBase.forward:
        return f"{where} is {type(layer).__name__}, not fairseq's transformer encoder layer"
    if layer.return_fc:
        return f"{where} returns its feed-forward output (return_fc)"
    return plain_parts_reason(layer, where, ("self_attn_layer_norm", "final_layer_norm")) or attention_reason(layer.self_attn, f"{where}'s self-attention", self_attention=True)


class _TierEncoderLayer:
    """``TransformerEncoderLayerBase.forward`` on time-major rows: all (src_len * sentences,
    dim), or the real ones of ``source_rows``."""

    def __init__(self, layer: TransformerEncoderLayerBase, kernels: ExactKernels) -> None:
        attention = layer.self_attn
        self.normalize_before = layer.normalize_before
        self.projections = kernels.self_projections(attention)
        self.out = kernels.linear(attention.out_proj)
        self.fc1 = kernels.feed_forward_in(layer.fc1, layer.activation_fn)
        self.fc2 = kernels.linear(layer.fc2)
        self.attention_norm = layer_norm(layer.self_attn_layer_norm)
        self.final_norm = layer_norm(layer.final_layer_norm)
        self.heads, self.head_dim = attention.num_heads, attention.head_dim

    def __call__(self, x: Tensor, sentences: int, attended: Optional[Tensor], source_rows: Optional[SourceRows]) -> Tensor:
        x = sublayer(x, self.attention_norm, lambda h: self._attend(h, sentences, attended, source_rows), self.normalize_before)
        return sublayer(x, self.final_norm, lambda h: self.fc2(self.fc1(h)), self.normalize_before)

    def _attend(self, h: Tensor, sentences: int, attended: Optional[Tensor], source_rows: Optional[SourceRows]) -> Tensor:
        """Self-attention of time-major rows h; ``attended`` (sentences, 1, 1, src_len) bool,
        False at padded source positions, or None. The products run on the padded layout
        (``source_rows``' zeros at padded positions). PyTorch's fused attention: 1.0-2.8x the
        speed of bmm/softmax/bmm here, more the longer the source (``BENCHMARKS.md``, "Kernel
        tiers")."""
        q, k, v = self.projections(h)
        if source_rows is not None:
            q, k, v = (source_rows.spread(t) for t in (q, k, v))
        src_len = q.size(0) // sentences
        q, k, v = (t.reshape(src_len, sentences, self.heads, self.head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attended, scale=1.0)  # queries already scaled
        context = context.permute(2, 0, 1, 3).reshape(src_len * sentences, -1)
        return self.out(context if source_rows is None else source_rows.take(context))


class TierEncoder:
    """fairseq's encoder (covered by ``why_not_tier_encoder``) on the tier's kernels."""

    def __init__(self, encoder: TransformerEncoderBase, kernels: ExactKernels) -> None:
        self.encoder = encoder
        self.layers = [_TierEncoderLayer(layer, kernels) for layer in encoder.layers]
        self.final_norm = layer_norm(encoder.layer_norm) if encoder.layer_norm is not None else None

    def __call__(self, net_input: Dict[str, Tensor]) -> EncoderOut:
        encoder, src_tokens = self.encoder, net_input["src_tokens"]
        padding = src_tokens.eq(encoder.padding_idx)
        source_rows = SourceRows.of(padding)
        x, embedding = encoder.forward_embedding(src_tokens)
        sentences, src_len, dim = x.shape
        x = x.transpose(0, 1).reshape(src_len * sentences, dim)  # time-major rows
        attended = None
        if source_rows is not None:  # fairseq zeroes the padded rows; here they are left out
            x, attended = source_rows.take(x), padding.logical_not().view(sentences, 1, 1, src_len)
        draw_as_layerdrop(encoder.layers)
        for layer in self.layers:
            x = layer(x, sentences, attended, source_rows)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if source_rows is not None:
            x = source_rows.spread(x)
        src_lengths = src_tokens.ne(encoder.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {
            "encoder_out": [x.view(src_len, sentences, dim)],
            "encoder_padding_mask": [padding],
            "encoder_embedding": [embedding],
            "encoder_states": [],
            "fc_results": [],
            "src_tokens": [],
            "src_lengths": [src_lengths],
        }


def encoder_for(model: nn.Module, kernels: ExactKernels) -> Callable[[Dict[str, Tensor]], EncoderOut]:
    """``model``'s encoder as the search calls it: on the tier's kernels where the tier takes
    the encoder (``fused``, ``int8``) and ``why_not_tier_encoder`` finds nothing against it,
    else fairseq's."""
    if kernels.tier_encoder and why_not_tier_encoder(model.encoder) is None:
        return TierEncoder(model.encoder, kernels)
    return model.encoder.forward_torchscript


def describe_encoders(models: List[nn.Module], kernels: ExactKernels) -> Optional[str]:
    """For the log: which encoders a tier that takes the encoder runs on its kernels."""
    if not kernels.tier_encoder:
        return None
    reasons = [why_not_tier_encoder(model.encoder) for model in models if hasattr(model, "encoder")]
    if not reasons:
        return None
    failing = first_reason(reasons)
    if failing is None:
        return f"encoder on the {kernels.name} kernels too"
    return f"fairseq's encoder and kernels ({failing})"
