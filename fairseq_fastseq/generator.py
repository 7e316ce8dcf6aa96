"""The fast sequence generator and the decision to use it or fall back to stock."""

import logging
from typing import Union

from fairseq.sequence_generator import SequenceGenerator, SequenceGeneratorWithAlignment
from fairseq.sequence_scorer import SequenceScorer

from .config import FastGeneratorConfig

logger = logging.getLogger(__name__)


class UnsupportedByFastGenerator(ValueError):
    """Raised for an option the fast generator cannot honour under ``on_unsupported=error``."""


class FastSequenceGenerator(SequenceGenerator):
    """Beam search / sampling with the stock ``SequenceGenerator``'s exact results."""

    @classmethod
    def from_stock(cls, stock: SequenceGenerator) -> "FastSequenceGenerator":
        """Build one with every option the stock generator was built with."""
        fast = cls(
            stock.model,
            stock.tgt_dict,
            beam_size=stock.beam_size,
            max_len_a=stock.max_len_a,
            max_len_b=stock.max_len_b,
            max_len=stock.max_len,
            min_len=stock.min_len,
            normalize_scores=stock.normalize_scores,
            len_penalty=stock.len_penalty,
            unk_penalty=stock.unk_penalty,
            temperature=stock.temperature,
            match_source_len=stock.match_source_len,
            no_repeat_ngram_size=(
                stock.repeat_ngram_blocker.no_repeat_ngram_size
                if stock.repeat_ngram_blocker is not None
                else 0
            ),
            search_strategy=stock.search,
            eos=stock.eos,
            symbols_to_strip_from_output=stock.symbols_to_strip_from_output,
            lm_model=stock.lm_model,
            lm_weight=stock.lm_weight,
        )
        fast.token_indices_to_suppress = stock.token_indices_to_suppress
        return fast


# What the stock build_generator returns for options we hand back to it, and why.
_FALLBACK_REASONS = {
    SequenceScorer: "--score-reference (scores the reference with fairseq's SequenceScorer)",
    SequenceGeneratorWithAlignment: "--print-alignment",
}


def accelerate(
    stock: object, knobs: FastGeneratorConfig
) -> Union[FastSequenceGenerator, object]:
    """Return the fast equivalent of a generator built by fairseq, or ``stock`` itself."""
    if isinstance(stock, FastSequenceGenerator):
        return stock
    if type(stock) is SequenceGenerator:
        logger.info("generator: fast (%s)", FastSequenceGenerator.__name__)
        return FastSequenceGenerator.from_stock(stock)
    reason = _FALLBACK_REASONS.get(type(stock), type(stock).__name__)
    if knobs.on_unsupported == "error":
        raise UnsupportedByFastGenerator(
            f"--generator fast cannot handle {reason}. Drop that option, use "
            "--generator stock, or pass --fast-on-unsupported fallback to run fairseq's "
            "stock generator for it."
        )
    logger.info("generator: stock %s, fallback for %s", type(stock).__name__, reason)
    return stock
