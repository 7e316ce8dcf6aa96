"""Which of fairseq's attention modules take which of the fast attention classes
(``attention.py``, ``el_attention.py``) for a search on the module path, for how long, and
the log line that says so."""

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Sequence, Tuple

from fairseq.modules.multihead_attention import MultiheadAttention
from torch import nn

from .attention import SentenceProjectedEncoderAttention, TimeMajorCachedSelfAttention
from .el_attention import ELEncoderAttention

FAST_CLASSES = (TimeMajorCachedSelfAttention, SentenceProjectedEncoderAttention, ELEncoderAttention)


# Encoder-decoder attention (the knob ``encoder_projection``) -> the class of its modules.
ENCODER_ATTENTION = {
    "per_sentence": SentenceProjectedEncoderAttention,
    "per_beam": MultiheadAttention,
    "grouped": MultiheadAttention,  # with its beam size set (``decoder_beam_size``)
    "el_attention": ELEncoderAttention,
}


def _plan(models: Iterable[nn.Module], time_major_self_attn: bool, encoder: str) -> Tuple[Dict[MultiheadAttention, type], bool]:
    """The class each of fairseq's attention modules in ``models`` takes for a fast search,
    and whether the decoders take the encoder output once per sentence.

    Planned are modules that are fairseq's ``MultiheadAttention`` or one of ours (a fast model
    variant has them installed already), never a subclass of a model's own. Encoder attention
    is per sentence only if every model attends to its encoder that way, and (except for
    ``grouped``, which is BART's own way) none of them is already beam-aware as BART's are.
    """
    plan: Dict[MultiheadAttention, type] = {}
    per_sentence, cross_modules = encoder != "per_beam", []
    for model in models:
        attention = [m for m in model.modules() if type(m) in (MultiheadAttention, *FAST_CLASSES)]
        for module in attention:
            if module.self_attention:
                plan[module] = TimeMajorCachedSelfAttention if time_major_self_attn else MultiheadAttention
        cross = [m for m in model.modules() if isinstance(m, MultiheadAttention) and m.encoder_decoder_attention]
        beam_aware = any(m.beam_size != 1 for m in cross) and encoder != "grouped"
        per_sentence &= bool(cross) and all(m in attention for m in cross) and not beam_aware
        cross_modules += [m for m in cross if m in attention]
    for module in cross_modules:
        plan[module] = ENCODER_ATTENTION[encoder] if per_sentence else MultiheadAttention
    return plan, per_sentence


def describe(models: Sequence[nn.Module], time_major_self_attn: bool = True, encoder: str = "per_sentence") -> str:
    """One line for the log: which attention ``fast_attention`` accelerates in ``models``, and why not."""
    plan, per_sentence = _plan(models, time_major_self_attn, encoder)
    self_attn = [m for m, cls in plan.items() if cls is TimeMajorCachedSelfAttention]
    attention = [m for model in models for m in model.modules() if isinstance(m, MultiheadAttention)]
    if not attention:
        names = ", ".join(sorted({type(model).__name__ for model in models}))
        return f"fairseq's ({names} has no fairseq MultiheadAttention; the fast search still applies)"
    if per_sentence:
        encoder_part = {
            "per_sentence": "encoder keys/values once per sentence",
            "grouped": "encoder keys/values once per sentence, attended by its beams as grouped queries",
            "el_attention": "EL-attention (encoder output once per sentence, no encoder keys/values)",
        }[encoder]
    elif any(m.encoder_decoder_attention for m in attention):
        encoder_part = "fairseq's (or the model's own) encoder attention"
    else:
        encoder_part = "no encoder attention (decoder-only)"
    self_part = f"time-major self-attention cache ({len(self_attn)} modules)" if self_attn else "fairseq's self-attention cache"
    return f"{self_part}, {encoder_part}"


def install_fast_attention(
    models: Iterable[nn.Module], time_major_self_attn: bool = True, encoder: str = "per_sentence"
) -> None:
    """Give ``models`` the attention modules above for good (the fast model variants).

    Only module classes change: parameters and state dict stay fairseq's, and outside
    incremental decoding the modules run fairseq's own forward.
    """
    for module, cls in _plan(models, time_major_self_attn, encoder)[0].items():
        module.__class__ = cls


@contextmanager
def cache_steps(models: Iterable[nn.Module], steps: int) -> Iterator[None]:
    """Within the block, the time-major caches of ``models`` know that the search runs at most
    ``steps`` decoder steps, so that none is allocated beyond them."""
    modules = [m for model in models for m in model.modules() if isinstance(m, TimeMajorCachedSelfAttention)]
    for module in modules:
        module.max_steps = steps
    try:
        yield
    finally:
        for module in modules:
            del module.max_steps  # back to the class default: unknown


@contextmanager
def decoder_beam_size(models: Iterable[nn.Module], beam_size: int, every_model: bool = False) -> Iterator[None]:
    """Within the block, beam-aware encoder attention (BART's) is set for ``beam_size``; with
    ``every_model``, every model's fairseq encoder attention is (``grouped``).

    fairseq's generator sets it when built, for beams above 1 only, and never back: a BART
    model that served a beam search then fails a greedy search (a shape error). Here it is
    set for every search, 1 included, and restored afterwards for the model's other users.
    """
    if not every_model:
        models = [model for model in models if hasattr(model, "set_beam_size")]
    modules = [
        m for model in models for m in model.modules() if isinstance(m, MultiheadAttention) and m.encoder_decoder_attention
    ]
    before = [m.beam_size for m in modules]
    for module in modules:
        module.set_beam_size(beam_size)
    try:
        yield
    finally:
        for module, size in zip(modules, before):
            module.beam_size = size


@contextmanager
def fast_attention(
    models: Iterable[nn.Module], time_major_self_attn: bool = True, encoder: str = "per_sentence"
) -> Iterator[bool]:
    """Within the block, ``models`` use the attention modules chosen by the arguments.

    Only the classes of fairseq's ``MultiheadAttention`` modules change, and only for the
    block: afterwards every module has its class from before (fairseq's for a stock model),
    so other users of the same model objects (a stock generator, training) see them
    unchanged. Yields whether the decoders take the encoder output once per sentence.
    """
    plan, per_sentence = _plan(models, time_major_self_attn, encoder)
    before = {module: type(module) for module in plan}
    for module, cls in plan.items():
        module.__class__ = cls
    try:
        yield per_sentence
    finally:
        for module, cls in before.items():
            module.__class__ = cls
