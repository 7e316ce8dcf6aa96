"""Which models the lean decoder step covers, and for the others the reason why not.

The lean step restates fairseq's ``TransformerDecoderBase`` and ``TransformerDecoderLayerBase``
(``transformer``, ``bart``/``mbart``, ``transformer_lm`` and their variants: pre- or
post-norm, any heads and layers, shared or separate embeddings, learned or sinusoidal
positions, ``layernorm_embedding``, projections in and out, with or without
encoder attention). Anything that would make fairseq's forward compute something else is a
reason to keep fairseq's modules: an overridden method, a module of another class, an
option the restatement leaves out, dropout that stays on in inference, a forward hook. The
reason goes into the log, so that a user sees why a model runs slower.
"""

from typing import Iterable, Optional

from fairseq.models.fairseq_decoder import FairseqDecoder
from fairseq.models.fairseq_model import BaseFairseqModel
from fairseq.models.transformer.transformer_base import TransformerModelBase
from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase
from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from fairseq.modules.fairseq_dropout import FairseqDropout
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from ..attention_plan import FAST_CLASSES

# fairseq's model-level get_normalized_probs: the base one, and the transformer's restatement
# of it (for TorchScript); both hand the work to the decoder.
_MODEL_NORMALIZERS = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)
# Decoder methods whose stock code the lean step restates.
_DECODER_METHODS = ("forward", "extract_features", "extract_features_scriptable", "output_layer")
# Options of fairseq's layers that the lean step leaves out (NormFormer and friends).
_LAYER_OPTIONS = {
    "c_attn": "--scale-heads",
    "attn_ln": "--scale-attn",
    "ffn_layernorm": "--scale-fc",
    "w_resid": "--scale-resids",
}


def why_not_lean(model: nn.Module) -> Optional[str]:
    """None if the lean step computes what fairseq's decoder computes for ``model``; else the
    first reason it does not."""
    name = type(model).__name__
    decoder = getattr(model, "decoder", None)
    if not isinstance(model, BaseFairseqModel) or not isinstance(decoder, TransformerDecoderBase):
        return f"{name}'s decoder is {type(decoder).__name__}, not fairseq's transformer decoder"
    if model.training:
        return f"{name} is in training mode"
    checks = (
        lambda: _overridden_decoder_method(decoder),
        lambda: _normalizer(model),
        lambda: _decoder_option(decoder),
        lambda: first_reason(_layer_reason(layer, index) for index, layer in enumerate(decoder.layers)),
        lambda: _beam_size_reason(model),
        lambda: first_reason(active_dropout(module, label) for label, module in decoder.named_modules()),
        lambda: first_reason(hook_reason(module, label) for label, module in decoder.named_modules()),
        global_hooks_reason,
    )
    reason = first_reason(check() for check in checks)
    return None if reason is None else f"{name}: {reason}"


def plain_output_projection(model: nn.Module) -> Optional[Tensor]:
    """The weight of ``model``'s output projection if its log-probabilities are fairseq's
    default ones (a bias-free linear projection, then a log-softmax), else None."""
    decoder = getattr(model, "decoder", None)
    plain = (
        isinstance(model, BaseFairseqModel)
        and isinstance(decoder, TransformerDecoderBase)
        and _normalizer(model) is None
        and type(decoder).output_layer is TransformerDecoderBase.output_layer
        and decoder.adaptive_softmax is None
        and type(decoder.output_projection) is nn.Linear
        and decoder.output_projection.bias is None
    )
    return decoder.output_projection.weight if plain else None


def first_reason(reasons: Iterable[Optional[str]]) -> Optional[str]:
    return next((reason for reason in reasons if reason is not None), None)


def _overridden_decoder_method(decoder: TransformerDecoderBase) -> Optional[str]:
    for method in _DECODER_METHODS:
        if getattr(type(decoder), method) is not getattr(TransformerDecoderBase, method):
            return f"its decoder overrides {method}"
    return None


def _normalizer(model: BaseFairseqModel) -> Optional[str]:
    decoder = model.decoder
    stock = (
        type(model).get_normalized_probs in _MODEL_NORMALIZERS
        and type(model).get_normalized_probs_scriptable is BaseFairseqModel.get_normalized_probs_scriptable
        and type(decoder).get_normalized_probs is FairseqDecoder.get_normalized_probs
        and type(decoder).get_normalized_probs_scriptable is FairseqDecoder.get_normalized_probs_scriptable
        and not decoder.onnx_trace
    )
    return None if stock else "it normalizes its output its own way (get_normalized_probs)"


def _decoder_option(decoder: TransformerDecoderBase) -> Optional[str]:
    if decoder.cross_self_attention:
        return "cross-self-attention (--cross-self-attention)"
    if decoder.quant_noise is not None:
        return "quantization noise on the embeddings (--quant-noise-pq)"
    if type(decoder.embed_tokens) is not nn.Embedding or decoder.embed_tokens.max_norm is not None:
        return f"its token embedding is {type(decoder.embed_tokens).__name__}, not a plain nn.Embedding"
    positions = decoder.embed_positions
    if positions is not None and type(positions) not in (SinusoidalPositionalEmbedding, LearnedPositionalEmbedding):
        return f"its positions are {type(positions).__name__}"
    if isinstance(positions, LearnedPositionalEmbedding) and positions.max_norm is not None:
        return "its learned positions have max_norm"
    for label in ("layernorm_embedding", "layer_norm"):
        if not _plain_or_none(getattr(decoder, label), nn.LayerNorm):
            return f"its {label} is {type(getattr(decoder, label)).__name__}"
    for label in ("project_in_dim", "project_out_dim"):
        if not _plain_or_none(getattr(decoder, label), nn.Linear):
            return f"its {label} is {type(getattr(decoder, label)).__name__}"
    return None


def _layer_reason(layer: nn.Module, index: int) -> Optional[str]:
    where = f"decoder layer {index}"
    if not isinstance(layer, TransformerDecoderLayerBase) or type(layer).forward is not TransformerDecoderLayerBase.forward:
        return f"{where} is {type(layer).__name__}, not fairseq's transformer decoder layer"
    for option, flag in _LAYER_OPTIONS.items():
        if getattr(layer, option, None) is not None:
            return f"{where} uses {flag}"
    if layer.cross_self_attention:
        return f"{where} uses cross-self-attention"
    norms = ("self_attn_layer_norm", "final_layer_norm") + (("encoder_attn_layer_norm",) if layer.encoder_attn is not None else ())
    return plain_parts_reason(layer, where, norms) or attention_reason(layer.self_attn, f"{where}'s self-attention", self_attention=True) or (
        attention_reason(layer.encoder_attn, f"{where}'s encoder attention", self_attention=False)
        if layer.encoder_attn is not None
        else None
    )


def plain_parts_reason(layer: nn.Module, where: str, norms: Iterable[str]) -> Optional[str]:
    """A reason if a layer's ``norms`` are not plain layer norms or its feed-forward layers
    not plain linear layers (the lean code calls their functions, not their modules)."""
    for label, cls in [*((norm, nn.LayerNorm) for norm in norms), ("fc1", nn.Linear), ("fc2", nn.Linear)]:
        if type(getattr(layer, label)) is not cls:
            return f"{where}'s {label} is {type(getattr(layer, label)).__name__}"
    return None


def attention_reason(module: nn.Module, where: str, self_attention: bool) -> Optional[str]:
    # The fast variants' modules (``attention.py``) are fairseq's with other cache paths.
    if type(module) not in (MultiheadAttention, *FAST_CLASSES):
        return f"{where} is {type(module).__name__}"
    if module.self_attention != self_attention or module.encoder_decoder_attention == self_attention:
        return f"{where} is not a plain {'self' if self_attention else 'encoder-decoder'} attention"
    if module.bias_k is not None or module.add_zero_attn:
        return f"{where} has key/value biases or zero attention (--add-bias-kv, --add-zero-attn)"
    if getattr(module, "use_xformers", False):
        return f"{where} uses xformers"
    if module.onnx_trace:
        return f"{where} is prepared for ONNX export"
    for label in ("q_proj", "k_proj", "v_proj", "out_proj"):
        if type(getattr(module, label)) is not nn.Linear:
            return f"{where}'s {label} is {type(getattr(module, label)).__name__}"
    return None


def _beam_size_reason(model: nn.Module) -> Optional[str]:
    """Encoder attention that a caller set up for another beam size (``set_beam_size``) on a
    model whose generator would not set it: fairseq would group the beams by that size."""
    if hasattr(model, "set_beam_size"):
        return None  # BART: the search's beam size decides (``decoder.py``)
    for module in model.decoder.modules():
        if isinstance(module, MultiheadAttention) and module.encoder_decoder_attention and module.beam_size != 1:
            return f"its encoder attention was set for beam size {module.beam_size} (set_beam_size)"
    return None


def active_dropout(module: nn.Module, label: str) -> Optional[str]:
    active = False
    if isinstance(module, FairseqDropout):
        active = module.p > 0 and (module.training or module.apply_during_inference)
    elif isinstance(module, nn.Dropout):
        active = module.p > 0 and module.training
    return f"dropout stays on in inference at {label or 'the decoder'} (--retain-dropout)" if active else None


def hook_reason(module: nn.Module, label: str) -> Optional[str]:
    """A forward hook, or a forward replaced on the object itself: fairseq would call it."""
    where = label or "the decoder"
    if "forward" in vars(module):
        return f"the forward of {where} is replaced on the object"
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    # fairseq's quantization noise acts in training only.
    foreign = [hook for hook in hooks if getattr(hook, "__module__", None) != "fairseq.modules.quant_noise"]
    return f"a forward hook is registered on {where}" if foreign else None


def _plain_or_none(module: Optional[nn.Module], cls: type) -> bool:
    return module is None or type(module) is cls


def global_hooks_reason() -> Optional[str]:
    """A reason if torch's global module hooks are set (every module call would run them)."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook)"
    return None
