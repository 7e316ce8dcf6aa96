"""The per-hypothesis state of a batch in search: one object, one ``drop`` of the sentences
that finished, one ``advance`` to the chosen candidates.

fairseq's loop keeps a dozen tensors (tokens, scores, attention, ignored candidates, source
lengths, prefix, sentence ids, offsets) and prunes each of them inline; here each is
selected in exactly one place. The values and the order of the operations on them are
fairseq's, so the hypotheses are the same.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass
class Candidates:
    """A step's ``2 * beam`` candidates per sentence (each (bsz, cand_size)): scores, tokens,
    parent beams, parent hypothesis rows, and which of them end in EOS."""

    scores: Tensor
    indices: Tensor
    beams: Tensor
    bbsz_idx: Tensor
    eos_mask: Tensor

    def keep(self, kept: Tensor, bbsz_offsets: Tensor) -> "Candidates":
        """The candidates of the sentences ``kept``, with their parents' rows after the drop."""
        beams = self.beams[kept]
        return Candidates(self.scores[kept], self.indices[kept], beams, beams.add(bbsz_offsets), self.eos_mask[kept])


@dataclass
class SearchState:
    """Hypotheses of the active sentences, ``beam_size`` rows each."""

    beam_size: int
    tokens: Tensor  # (bsz * beam, max_len + 2), starts with BOS/EOS, pad after the step
    scores: Tensor  # (bsz * beam, max_len + 1), cumulative
    attn: Optional[Tensor]  # (bsz * beam, src_len, max_len + 2), once the model reports attention
    cands_to_ignore: Tensor  # (bsz, beam) bool: hypotheses that ran out of live candidates
    sentences: Tensor  # (bsz,) original batch row of each active sentence
    src_lengths: Tensor  # (bsz,)
    prefix_tokens: Optional[Tensor]  # (bsz, prefix_len)
    search_batch_idxs: Tensor  # (bsz,) what the search strategy is given as batch ids
    bbsz_offsets: Tensor  # (bsz, 1): first row of each sentence
    cand_offsets: Tensor  # (2 * beam,): 0, 1, ...: candidates sort in their order

    @classmethod
    def start(
        cls,
        bsz: int,
        beam_size: int,
        max_len: int,
        first_token: int,
        pad: int,
        src_lengths: Tensor,
        prefix_tokens: Optional[Tensor],
        search_batch_idxs: Optional[Tensor],
    ) -> "SearchState":
        device = src_lengths.device
        tokens = torch.full((bsz * beam_size, max_len + 2), pad, dtype=torch.long, device=device)
        tokens[:, 0] = first_token
        sentences = torch.arange(bsz, device=device)
        return cls(
            beam_size=beam_size,
            tokens=tokens,
            scores=torch.zeros(bsz * beam_size, max_len + 1, device=device),
            attn=None,
            cands_to_ignore=torch.zeros(bsz, beam_size, dtype=torch.bool, device=device),
            sentences=sentences,
            src_lengths=src_lengths,
            prefix_tokens=prefix_tokens,
            search_batch_idxs=sentences if search_batch_idxs is None else search_batch_idxs,
            bbsz_offsets=(sentences * beam_size).unsqueeze(1),
            cand_offsets=torch.arange(2 * beam_size, device=device),
        )

    @property
    def bsz(self) -> int:
        return self.sentences.numel()

    def record_attention(self, step: int, attention: Optional[Tensor], max_len: int) -> None:
        """Keep the step's attention (rows, src_len) as fairseq does, from the first report."""
        if attention is None:
            return
        if self.attn is None:
            self.attn = torch.empty(self.tokens.size(0), attention.size(1), max_len + 2).to(self.scores)
        self.attn[:, :, step + 1].copy_(attention)

    def candidates(self, scores: Tensor, indices: Tensor, beams: Tensor, eos: int) -> Candidates:
        """The step's candidates, EOS marked where it is live and not ignored."""
        eos_mask = indices.eq(eos) & scores.ne(-math.inf)
        eos_mask[:, : self.beam_size] &= ~self.cands_to_ignore
        return Candidates(scores, indices, beams, beams.add(self.bbsz_offsets), eos_mask)

    def drop(self, step: int, done: Tensor, candidates: Candidates) -> Tuple[Tensor, Candidates]:
        """Remove the sentences that are ``done`` (bsz,) bool; return the indices of those kept
        and their candidates."""
        kept = (~done).nonzero().squeeze(1)
        old_bsz, new_bsz = self.bsz, kept.numel()
        self.bbsz_offsets = self.bbsz_offsets[:new_bsz]
        if self.prefix_tokens is not None:
            self.prefix_tokens = self.prefix_tokens[kept]
        self.src_lengths = self.src_lengths[kept]
        self.cands_to_ignore = self.cands_to_ignore[kept]
        self.sentences = self.sentences[kept]
        self.search_batch_idxs = self.search_batch_idxs[kept]
        self.scores = self.scores.view(old_bsz, -1)[kept].view(new_bsz * self.beam_size, -1)
        self.tokens = self.tokens.view(old_bsz, -1)[kept].view(new_bsz * self.beam_size, -1)
        if self.attn is not None:
            # The kept sentences' rows move to the front of the same buffer (a fresh one of
            # max_len columns cost page faults at every drop); only the columns written so far.
            attn = self.attn.view(old_bsz, self.beam_size, *self.attn.shape[1:])
            attn[:new_bsz, :, :, : step + 2] = attn[kept, :, :, : step + 2]
            self.attn = attn[:new_bsz].view(new_bsz * self.beam_size, *self.attn.shape[1:])
        return kept, candidates.keep(kept, self.bbsz_offsets)

    def advance(self, step: int, candidates: Candidates) -> Tuple[Tensor, Tensor]:
        """Continue with the first ``beam_size`` live candidates of each sentence (those that
        ended in EOS or are ignored sort after them); return which candidates were chosen
        (bsz, beam) and each new row's parent row (bsz * beam,)."""
        beam_size, cand_size = self.beam_size, self.cand_offsets.numel()
        eos_mask = candidates.eos_mask
        eos_mask[:, :beam_size] |= self.cands_to_ignore
        active_mask = eos_mask.long() * cand_size + self.cand_offsets[: eos_mask.size(1)]
        new_cands_to_ignore, active_hypos = torch.topk(active_mask, k=beam_size, dim=1, largest=False)
        self.cands_to_ignore = new_cands_to_ignore.ge(cand_size)[:, :beam_size]
        active_bbsz_idx = torch.gather(candidates.bbsz_idx, dim=1, index=active_hypos).view(-1)

        bsz = self.bsz
        self.tokens[:, : step + 1] = self.tokens[:, : step + 1].index_select(0, active_bbsz_idx)
        self.tokens.view(bsz, beam_size, -1)[:, :, step + 1] = torch.gather(candidates.indices, dim=1, index=active_hypos)
        if step > 0:
            self.scores[:, :step] = self.scores[:, :step].index_select(0, active_bbsz_idx)
        self.scores.view(bsz, beam_size, -1)[:, :, step] = torch.gather(candidates.scores, dim=1, index=active_hypos)
        if self.attn is not None:
            self.attn[:, :, : step + 2] = self.attn[:, :, : step + 2].index_select(0, active_bbsz_idx)
        return active_hypos, active_bbsz_idx
