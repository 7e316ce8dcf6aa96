"""What the loop does to the next-token log-probabilities before the search strategy picks
candidates: an ordered list of edits built once per batch, in fairseq's order.

fairseq's ``SequenceGenerator._generate`` applies, at every step: shallow fusion with a
language model (``--lm-path``), NaN to -inf, no padding, the unknown-word penalty, only EOS
at the last step, then either the forced prefix (``--prefix-size``) or the minimum length
and suppressed tokens, and repeated-n-gram blocking. An edit that cannot change anything
for this batch (no LM, a zero penalty, no blocking) is left out of the list.
"""

import math
from typing import TYPE_CHECKING, Callable, List

from torch import Tensor

from .ngram import block_repeated_ngrams
from .search_state import SearchState

if TYPE_CHECKING:
    from .generator import FastSequenceGenerator

# (step, lprobs (rows, vocab), state) -> lprobs; may write lprobs in place, and the prefix
# edit may replace the state's tokens and scores (fairseq copies the first beam).
LogitEdit = Callable[[int, Tensor, SearchState], Tensor]


def edits_for_batch(generator: "FastSequenceGenerator", max_len: int, has_prefix: bool) -> List[LogitEdit]:
    g = generator
    edits: List[LogitEdit] = []
    if g.lm_model is not None:
        edits.append(_shallow_fusion(g))
    edits.append(_no_nan)
    edits.append(_never(g.pad))
    if g.unk_penalty != 0:  # x - 0 == x exactly
        edits.append(_unk_penalty(g.unk, g.unk_penalty))
    edits.append(_only_eos_at(max_len, g.eos))
    edits.append(_prefix_or_length_rules(g, max_len, has_prefix))
    if g.no_repeat_ngram_size > 0:
        edits.append(_no_repeated_ngrams(g.no_repeat_ngram_size, g.pad))
    return edits


def _shallow_fusion(g: "FastSequenceGenerator") -> LogitEdit:
    lm_model, weight = g.lm_model, g.lm_weight

    def fuse(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        lm_out = lm_model(state.tokens[:, : step + 1])
        lm_lprobs = lm_model.get_normalized_probs(lm_out, log_probs=True, sample=None)
        lprobs += lm_lprobs[:, -1, :] * weight
        return lprobs

    return fuse


def _no_nan(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
    # fairseq's ``lprobs[lprobs != lprobs] = -inf`` in one pass: NaN -> -inf, infinities kept.
    return lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _never(token: int) -> LogitEdit:
    def ban(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        lprobs[:, token] = -math.inf
        return lprobs

    return ban


def _unk_penalty(unk: int, penalty: float) -> LogitEdit:
    def penalize(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        lprobs[:, unk] -= penalty
        return lprobs

    return penalize


def _only_eos_at(max_len: int, eos: int) -> LogitEdit:
    def at_max_len(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        if step >= max_len:
            lprobs[:, :eos] = -math.inf
            lprobs[:, eos + 1 :] = -math.inf
        return lprobs

    return at_max_len


def _prefix_or_length_rules(g: "FastSequenceGenerator", max_len: int, has_prefix: bool) -> LogitEdit:
    """A forced prefix token while the prefix lasts (fairseq's ``_prefix_tokens``); otherwise
    no EOS before the minimum length, and no suppressed token."""

    def prefix_or_rules(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        if has_prefix and step < state.prefix_tokens.size(1) and step < max_len:
            lprobs, state.tokens, state.scores = g._prefix_tokens(
                step, lprobs, state.scores, state.tokens, state.prefix_tokens, state.beam_size
            )
            return lprobs
        if step < g.min_len:
            lprobs[:, g.eos] = -math.inf
        if g.token_indices_to_suppress is not None:
            lprobs[:, g.token_indices_to_suppress] = -math.inf
        return lprobs

    return prefix_or_rules


def _no_repeated_ngrams(n: int, pad: int) -> LogitEdit:
    def block(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        return block_repeated_ngrams(state.tokens, lprobs, step, n, pad)

    return block
