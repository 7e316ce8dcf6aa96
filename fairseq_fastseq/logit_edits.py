"""What the loop does to the next-token log-probabilities before the search strategy picks
candidates: an ordered list of edits built once per batch, in fairseq's order.

fairseq's ``SequenceGenerator._generate`` applies, at every step: shallow fusion with a
language model (``--lm-path``), NaN to -inf, no padding, the unknown-word penalty, only EOS
at the last step, then either the forced prefix (``--prefix-size``) or the minimum length
and suppressed tokens, and repeated-n-gram blocking. An edit that cannot change anything
for this batch (no LM, a zero penalty, no blocking) is left out of the list.

NaN to -inf may be left to the candidates' step (``nan_in_candidates``): plain beam
search's one-pass top-k reads every log-probability anyway and hands a row with a NaN to
the old way, which replaces NaNs first (``beam_step.py``). That gives the same values as
replacing them here, before the later edits, because none of those looks at a value to
decide anything: they assign (-inf, a forced prefix's own value, copies of a first beam) or
subtract a finite penalty, and a NaN stays NaN through each until it is replaced, as -inf
would have stayed -inf. It spares a read and write of the log-probabilities per step.
"""

import math
from typing import TYPE_CHECKING, Callable, List, Tuple

import torch
from torch import Tensor

from .beam_step import nan_to_minus_infinity
from .ngram import block_repeated_ngrams
from .search_state import SearchState

if TYPE_CHECKING:
    from .generator import FastSequenceGenerator

# (step, lprobs (rows, vocab), state) -> lprobs; may write lprobs in place, and the prefix
# edit may replace the state's tokens and scores (fairseq copies the first beam).
LogitEdit = Callable[[int, Tensor, SearchState], Tensor]


def edits_for_batch(
    generator: "FastSequenceGenerator",
    max_len: int,
    has_prefix: bool,
    prefix_on_device: bool = False,
    nan_in_candidates: Callable[[int], bool] = lambda step: False,
) -> List[LogitEdit]:
    """The edits, in fairseq's order. ``prefix_on_device``: the forced prefix without host
    syncs (``_prefix_on_device``), for the static-shape loop; ``nan_in_candidates(step)``:
    whether the candidates' step replaces NaNs itself at that step (see above)."""
    g = generator
    edits: List[LogitEdit] = []
    if g.lm_model is not None:
        edits.append(_shallow_fusion(g))
    edits.append(_no_nan_unless(nan_in_candidates))
    edits.append(_never(g.pad))
    if g.unk_penalty != 0:  # x - 0 == x exactly
        edits.append(_unk_penalty(g.unk, g.unk_penalty))
    edits.append(_only_eos_at(max_len, g.eos))
    edits.append(_prefix_or_length_rules(g, max_len, has_prefix, _prefix_on_device(g.pad, g.eos) if prefix_on_device else g._prefix_tokens))
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


def _no_nan_unless(nan_in_candidates: Callable[[int], bool]) -> LogitEdit:
    def no_nan(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        return lprobs if nan_in_candidates(step) else nan_to_minus_infinity(lprobs)

    return no_nan


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


def _prefix_or_length_rules(g: "FastSequenceGenerator", max_len: int, has_prefix: bool, force_prefix: Callable) -> LogitEdit:
    """A forced prefix token while the prefix lasts (``force_prefix``: fairseq's
    ``_prefix_tokens`` or ``_prefix_on_device``); otherwise no EOS before the minimum length, and
    no suppressed token."""

    def prefix_or_rules(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        if has_prefix and step < state.prefix_tokens.size(1) and step < max_len:
            lprobs, state.tokens, state.scores = force_prefix(
                step, lprobs, state.scores, state.tokens, state.prefix_tokens, state.beam_size
            )
            return lprobs
        if step < g.min_len:
            lprobs[:, g.eos] = -math.inf
        if g.token_indices_to_suppress is not None:
            lprobs[:, g.token_indices_to_suppress] = -math.inf
        return lprobs

    return prefix_or_rules


def _prefix_on_device(pad: int, eos: int) -> Callable[..., Tuple[Tensor, Tensor, Tensor]]:
    """fairseq's ``_prefix_tokens`` with the same values, through selections instead of
    boolean indexing and without its check that the first beam followed the prefix (it did:
    the prefix was forced), so without a host sync. Where the step's prefix token is not
    padding, every other token is -inf; where it is EOS, the sentence's beams become copies
    of its first."""

    def force(step: int, lprobs: Tensor, scores: Tensor, tokens: Tensor, prefix_tokens: Tensor, beam_size: int):
        forced = prefix_tokens[:, step].unsqueeze(-1).repeat(1, beam_size).view(-1, 1)  # (rows, 1)
        only_forced = torch.full_like(lprobs, -math.inf).scatter_(-1, forced, lprobs.gather(-1, forced))
        lprobs = torch.where(forced.ne(pad), only_forced, lprobs)
        ends = forced.view(-1, beam_size)[:, 0].eq(eos)  # (sentences,)
        return tuple(_first_beam_where(ends, t, beam_size) for t in (lprobs, tokens, scores))

    return force


def _first_beam_where(sentences: Tensor, rows: Tensor, beam_size: int) -> Tensor:
    """``rows`` (sentences * beam, n) with every beam of the ``sentences`` (bool) set to the first's."""
    per_sentence = rows.view(-1, beam_size, rows.size(-1))
    first = per_sentence[:, :1, :].expand_as(per_sentence)
    return torch.where(sentences.view(-1, 1, 1), first, per_sentence).view(-1, rows.size(-1))


def _no_repeated_ngrams(n: int, pad: int) -> LogitEdit:
    def block(step: int, lprobs: Tensor, state: SearchState) -> Tensor:
        return block_repeated_ngrams(state.tokens, lprobs, step, n, pad)

    return block
