"""Which generator a search gets: the fast one, with its decoder step and kernels chosen and
logged, or fairseq's stock generator, with the reason (or an error, if the user asked for
one). Also the switch for callers that read no attention (fairseq-generate and
fairseq-interactive without ``--print-alignment``)."""

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Union

import torch
from fairseq.sequence_generator import SequenceGenerator, SequenceGeneratorWithAlignment
from fairseq.sequence_scorer import SequenceScorer

from .attention_plan import describe
from .config import FastGeneratorConfig
from .generator import FastSequenceGenerator, FastSequenceGeneratorWithAlignment
from .static_loop import SYNC_EVERY, why_not_static
from .step.encoder import describe_encoders
from .step.kernels import kernel_tier

logger = logging.getLogger("fairseq_fastseq.generator")  # the log lines users grep for keep their logger


class UnsupportedByFastGenerator(ValueError):
    """Raised for an option the fast generator cannot honour under ``on_unsupported=error``."""


# Whether a caller may read the hypotheses' attention (set by ``attention_unread``).
_ATTENTION_READ: ContextVar[bool] = ContextVar("fastseq_attention_read", default=True)


@contextmanager
def attention_unread() -> Iterator[None]:
    """Within the block, fast generators built leave the attention over the source out of
    their hypotheses (an empty tensor, as fairseq gives for a model without one), except the
    alignment generator, which needs it: for callers that read none, such as
    fairseq-generate and fairseq-interactive without ``--print-alignment``."""
    token = _ATTENTION_READ.set(False)
    try:
        yield
    finally:
        _ATTENTION_READ.reset(token)


# The fast generator for each stock generator class it replaces.
_FAST_EQUIVALENT = {
    SequenceGenerator: FastSequenceGenerator,
    SequenceGeneratorWithAlignment: FastSequenceGeneratorWithAlignment,
}

# What the stock build_generator returns for options we hand back to it, and why.
_FALLBACK_REASONS = {
    SequenceScorer: "--score-reference (scores the reference with fairseq's SequenceScorer)",
}


def accelerate(
    stock: object, knobs: FastGeneratorConfig
) -> Union[FastSequenceGenerator, object]:
    """Return the fast equivalent of a generator built by fairseq, or ``stock`` itself."""
    if isinstance(stock, FastSequenceGenerator):
        return stock
    fast_cls = _FAST_EQUIVALENT.get(type(stock))
    if fast_cls is not None and stock.beam_size < 1:
        # Stock fails later with "cannot reshape tensor of 0 elements ...".
        raise ValueError(f"--beam must be at least 1 (got {stock.beam_size}); --beam 1 is greedy search.")
    if fast_cls is not None:
        logger.info("generator: fast (%s)", fast_cls.__name__)
        fast = fast_cls.from_stock(stock)
        # Set after construction: the stock generator holds suppressed tokens as indices,
        # its constructor takes them as strings.
        fast.token_indices_to_suppress = stock.token_indices_to_suppress
        fast.knobs = knobs
        fast.need_attention = _ATTENTION_READ.get() or isinstance(fast, FastSequenceGeneratorWithAlignment)
        reason = fast.why_not_lean()
        if reason is None:
            logger.info("decoder step: lean (typed caches, encoder keys/values once per sentence)")
            fast.kernels = kernel_tier(knobs.kernels, fast.model.models)
            encoders = describe_encoders(fast.model.models, fast.kernels)
            if encoders is not None:
                logger.info("kernels: %s", encoders)
        else:
            logger.info("decoder step: fairseq's modules (outside the lean step: %s)", reason)
            logger.info("attention: %s", describe(fast.model.models, **fast.attention_options()))
            if knobs.kernels != "exact":
                logger.warning("kernels: exact (--fast-kernels %s needs the lean decoder step)", knobs.kernels)
        _choose_search_loop(fast, knobs.cuda_graphs)
        return fast
    reason = _FALLBACK_REASONS.get(type(stock), type(stock).__name__)
    if knobs.on_unsupported == "error":
        raise UnsupportedByFastGenerator(
            f"--generator fast cannot handle {reason}. Drop that option, use "
            "--generator stock, or pass --fast-on-unsupported fallback to run fairseq's "
            "stock generator for it."
        )
    logger.info("generator: stock %s, fallback for %s", type(stock).__name__, reason)
    return stock


def _choose_search_loop(fast: FastSequenceGenerator, cuda_graphs: str) -> None:
    """Static shapes (``static_loop.py``) or the dynamic loop, logged unless nothing asked for
    it (``auto`` off a GPU, or ``off``)."""
    device = next(fast.model.parameters(), torch.empty(0)).device
    reason = why_not_static(fast, cuda_graphs, device)
    fast.static_loop = reason is None
    if fast.static_loop:
        captured = "captured in CUDA graphs" if device.type == "cuda" else "not captured (not on a GPU)"
        logger.info(
            "search loop: static shapes (finished sentences kept in the batch, a host sync every %d steps), decoder step %s; "
            "tokens as stock's, scores equal up to rounding", SYNC_EVERY, captured,
        )  # fmt: skip
    elif cuda_graphs == "on" or (cuda_graphs == "auto" and device.type == "cuda"):
        logger.warning("search loop: dynamic shapes, no CUDA graphs (--fast-cuda-graphs %s does not cover %s)", cuda_graphs, reason)
