"""Fast model variants in fairseq's model registry: ``transformer_fast``, ``bart_fast`` and
``transformer_lm_fast``.

Each is fairseq's model class with the attention modules of ``attention.py`` installed when
the model is built: the same parameters and state dict, so ``--arch transformer_fast``
trains one, and ``as_fast_variant`` turns a loaded stock model into one in place (fairseq's
``--model-overrides`` cannot switch a checkpoint's model class: ``_name`` would be
overridden in every config group). Training, scoring and the stock generator see
fairseq's arithmetic: the fast modules take their own path only for incremental decoding.
``--generator fast`` installs the same modules into any stock model for the duration of a
search, so the variants are a convenience, not a requirement.
"""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.bart import BARTModel
from fairseq.models.bart.model import bart_base_architecture, bart_large_architecture, mbart_large_architecture
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from torch import nn

from .attention_plan import install_fast_attention


def _fast(model: nn.Module, encoder: str = "per_sentence") -> nn.Module:
    install_fast_attention([model], encoder=encoder)
    return model


@register_model("transformer_fast")
class FastTransformerModel(TransformerModel):
    """fairseq's ``transformer`` (pre- or post-norm, any size) with the fast attention."""

    @classmethod
    def build_model(cls, args, task):
        return _fast(super().build_model(args, task))


@register_model("bart_fast")
class FastBARTModel(BARTModel):
    """fairseq's ``bart`` (and mBART, an architecture of it) with the fast self-attention
    cache; its encoder attention is already shared by beams in fairseq."""

    @classmethod
    def build_model(cls, args, task):
        return _fast(super().build_model(args, task), encoder="per_beam")


@register_model("transformer_lm_fast", dataclass=TransformerLanguageModelConfig)
class FastTransformerLanguageModel(TransformerLanguageModel):
    """fairseq's decoder-only ``transformer_lm`` (GPT-2 style) with the fast self-attention cache."""

    @classmethod
    def build_model(cls, args, task):
        return _fast(super().build_model(args, task))


# The architectures of the legacy (argparse) variants: fairseq's, which only fill options a
# checkpoint or the command line leaves unset. transformer_lm_fast, a dataclass model, gets
# its architecture from fairseq's registry.
register_model_architecture("transformer_fast", "transformer_fast")(base_architecture)
register_model_architecture("bart_fast", "bart_fast")(bart_large_architecture)
register_model_architecture("bart_fast", "bart_base_fast")(bart_base_architecture)
register_model_architecture("bart_fast", "mbart_large_fast")(mbart_large_architecture)


VARIANTS = {
    TransformerModel: FastTransformerModel,
    BARTModel: FastBARTModel,
    TransformerLanguageModel: FastTransformerLanguageModel,
}


def as_fast_variant(model: nn.Module) -> nn.Module:
    """The loaded stock ``model`` as its fast variant, in place (the class and its attention
    modules change; no weight is touched or copied)."""
    fast_class = VARIANTS.get(type(model))
    if fast_class is None:
        if type(model) in VARIANTS.values():
            return model
        supported = ", ".join(cls.__name__ for cls in VARIANTS)
        raise ValueError(
            f"{type(model).__name__} has no fast variant (there are for {supported}); "
            "use --generator fast, which accelerates any fairseq model's search"
        )
    model.__class__ = fast_class
    return _fast(model, encoder="per_beam" if fast_class is FastBARTModel else "per_sentence")
