"""The fast sequence generator and the decision to use it or fall back to stock."""

import logging
import math
from contextlib import nullcontext
from typing import ContextManager, Dict, List, Optional, Tuple, Union

import torch
from fairseq import utils
from fairseq.search import DiverseBeamSearch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator, SequenceGeneratorWithAlignment
from fairseq.sequence_scorer import SequenceScorer
from torch import Tensor

from .attention import cache_steps, decoder_beam_size, describe, fast_attention
from .beam_step import adds_in_place, beam_step_in_place
from .ensemble import BufferedEnsembleModel
from .errors import explain_out_of_memory
from .config import FastGeneratorConfig
from .finished import FinishedHypotheses
from .ngram import block_repeated_ngrams

logger = logging.getLogger(__name__)


class UnsupportedByFastGenerator(ValueError):
    """Raised for an option the fast generator cannot honour under ``on_unsupported=error``."""


class FastSequenceGenerator(SequenceGenerator):
    """Beam search and sampling with the results of fairseq's ``SequenceGenerator``.

    It reuses fairseq's model ensemble and search strategies (``fairseq.search``), which are
    already batched tensor code, and replaces the decoding loop around them:

    - finished hypotheses are collected for the whole batch at once (``finished.py``), with
      no Python loop over hypotheses or sentences inside the loop;
    - the beam-expanded encoder output is reordered only when sentences leave the batch:
      every beam of a sentence holds the same copy, so reordering within a sentence
      changes nothing; with one beam the decoder caches are left alone too;
    - ``--no-repeat-ngram-size`` is vectorized and blocks on CPU too (``ngram.py``);
    - ``--diverse-beam-groups`` gets each sentence's row in the batch, not its dataset
      id (fairseq 0.12 indexes its per-sentence buffer with the id: an IndexError or
      wrong penalties on real data);
    - for the duration of ``generate()``, the models' attention modules take the faster,
      bitwise-equal cache paths of ``attention.py`` (knobs ``self_attn_cache`` and
      ``encoder_projection``).

    The one host sync per step is the number of sentences that finished: it sets the
    shape of the next step's batch.
    """

    @classmethod
    def from_stock(cls, stock: SequenceGenerator) -> "FastSequenceGenerator":
        """Build one with the constructor options the stock generator was built with."""
        return cls(stock.model, stock.tgt_dict, **_options_of(stock))

    def __init__(self, *args, no_repeat_ngram_size: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if type(self.model) is EnsembleModel:  # not a subclass, such as the alignment generator's
            self.model = BufferedEnsembleModel(list(self.model.models))
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.knobs = FastGeneratorConfig()

    def attention_options(self) -> Dict[str, Union[bool, str]]:
        """The knobs as ``attention.fast_attention`` arguments."""
        return dict(time_major_self_attn=self.knobs.self_attn_cache == "time_major", encoder=self.knobs.encoder_projection)

    def _generate(self, sample: Dict[str, Dict[str, Tensor]], **kwargs) -> List[List[Dict[str, Tensor]]]:
        models = self.model.models
        max_len = self._max_len(sample["net_input"])
        with explain_out_of_memory(sample, self.beam_size), decoder_beam_size(
            models, self.beam_size, every_model=self.knobs.encoder_projection == "grouped"
        ), fast_attention(
            models, **self.attention_options()
        ) as per_sentence_encoder, cache_steps(
            models, max_len + 1  # steps 0..max_len
        ), self._step_buffers():
            return self._search(sample, max_len, per_sentence_encoder=per_sentence_encoder, **kwargs)

    def _step_buffers(self) -> ContextManager[None]:
        """The ensemble's per-batch output buffers (``ensemble.py``), where it has them."""
        return self.model.step_buffers() if isinstance(self.model, BufferedEnsembleModel) else nullcontext()

    def _max_len(self, net_input: Dict[str, Tensor]) -> int:
        """The most tokens a hypothesis can have before EOS, as fairseq computes it."""
        src_tokens, src_lengths = self._source(net_input)
        if self.match_source_len:
            return int(src_lengths.max().item())
        return min(int(self.max_len_a * src_tokens.size(1) + self.max_len_b), self.max_len - 1)

    def _search(
        self,
        sample: Dict[str, Dict[str, Tensor]],
        max_len: int,
        prefix_tokens: Optional[Tensor] = None,
        constraints: Optional[Tensor] = None,
        bos_token: Optional[int] = None,
        per_sentence_encoder: bool = False,
    ) -> List[List[Dict[str, Tensor]]]:
        net_input = sample["net_input"]
        src_tokens, src_lengths = self._source(net_input)
        bsz = src_tokens.size(0)
        beam_size = self.beam_size
        device = src_tokens.device
        if constraints is not None and not self.search.supports_constraints:
            raise NotImplementedError(
                "Target-side constraints were provided, but search method doesn't support them"
            )
        self.search.init_constraints(constraints, beam_size)
        assert self.min_len <= max_len, "min_len cannot be larger than max_len, please adjust these!"

        incremental_states = [{} for _ in range(self.model.models_size)]
        encoder_outs = self.model.forward_encoder(net_input)
        # One copy of the encoder output per beam, as fairseq does, unless the decoders take
        # it once per sentence (see attention.py), or there is one beam.
        expanded = beam_size > 1 and not per_sentence_encoder
        if expanded:
            expand = torch.arange(bsz, device=device).repeat_interleave(beam_size)
            encoder_outs = self.model.reorder_encoder_out(encoder_outs, expand)

        scores = torch.zeros(bsz * beam_size, max_len + 1, device=device)  # (bsz*beam, max_len+1)
        tokens = torch.full((bsz * beam_size, max_len + 2), self.pad, dtype=torch.long, device=device)
        tokens[:, 0] = self.eos if bos_token is None else bos_token
        attn: Optional[Tensor] = None
        cands_to_ignore = torch.zeros(bsz, beam_size, dtype=torch.bool, device=device)
        finished = FinishedHypotheses(bsz, beam_size, device)
        sentences = torch.arange(bsz, device=device)  # active row -> original batch row
        # DiverseBeamSearch indexes a buffer made at step 0 with these: batch rows, not ids.
        if "id" in sample and isinstance(sample["id"], Tensor) and not isinstance(self.search, DiverseBeamSearch):
            search_batch_idxs = sample["id"]
        else:
            search_batch_idxs = sentences
        num_remaining = bsz
        cand_size = 2 * beam_size
        bbsz_offsets = (torch.arange(bsz, device=device) * beam_size).unsqueeze(1)
        cand_offsets = torch.arange(cand_size, device=device)
        normalize = None
        reorder_state: Optional[Tensor] = None
        batch_idxs: Optional[Tensor] = None

        for step in range(max_len + 1):  # one extra step for EOS
            if reorder_state is not None:
                if batch_idxs is not None:
                    corr = batch_idxs - torch.arange(batch_idxs.numel(), device=device)
                    reorder_state.view(-1, beam_size).add_(corr.unsqueeze(-1) * beam_size)
                    search_batch_idxs = search_batch_idxs[batch_idxs]
                    encoder_outs = self.model.reorder_encoder_out(
                        encoder_outs, reorder_state if expanded else batch_idxs
                    )
                if beam_size > 1 or batch_idxs is not None:
                    self.model.reorder_incremental_state(incremental_states, reorder_state)
            lprobs, avg_attn_scores = self.model.forward_decoder(
                tokens[:, : step + 1], encoder_outs, incremental_states, self.temperature
            )  # (bsz*beam, vocab)
            if self.lm_model is not None:
                lm_out = self.lm_model(tokens[:, : step + 1])
                lm_lprobs = self.lm_model.get_normalized_probs(lm_out, log_probs=True, sample=None)
                lprobs += lm_lprobs[:, -1, :] * self.lm_weight
            lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN -> -inf, one pass
            lprobs[:, self.pad] = -math.inf
            lprobs[:, self.unk] -= self.unk_penalty
            if step >= max_len:  # only EOS is left
                lprobs[:, : self.eos] = -math.inf
                lprobs[:, self.eos + 1 :] = -math.inf
            if prefix_tokens is not None and step < prefix_tokens.size(1) and step < max_len:
                lprobs, tokens, scores = self._prefix_tokens(step, lprobs, scores, tokens, prefix_tokens, beam_size)
            else:
                if step < self.min_len:
                    lprobs[:, self.eos] = -math.inf
                if self.token_indices_to_suppress is not None:
                    lprobs[:, self.token_indices_to_suppress] = -math.inf
            if avg_attn_scores is not None:
                if attn is None:
                    attn = torch.empty(bsz * beam_size, avg_attn_scores.size(1), max_len + 2).to(scores)
                attn[:, :, step + 1].copy_(avg_attn_scores)
            if self.no_repeat_ngram_size > 0:
                block_repeated_ngrams(tokens, lprobs, step, self.no_repeat_ngram_size, self.pad)
            if self.should_set_src_lengths:
                self.search.set_src_lengths(src_lengths)

            if adds_in_place(self.search, step):
                cand_scores, cand_indices, cand_beams = beam_step_in_place(
                    lprobs.view(bsz, -1, self.vocab_size), scores.view(bsz, beam_size, -1), step
                )
            else:
                cand_scores, cand_indices, cand_beams = self.search.step(
                    step,
                    lprobs.view(bsz, -1, self.vocab_size),
                    scores.view(bsz, beam_size, -1)[:, :, :step],
                    tokens[:, : step + 1],
                    search_batch_idxs,
                )  # each (bsz, cand_size)
            cand_bbsz_idx = cand_beams.add(bbsz_offsets)
            eos_mask = cand_indices.eq(self.eos) & cand_scores.ne(-math.inf)
            eos_mask[:, :beam_size] &= ~cands_to_ignore

            if self.normalize_scores:
                normalize = (step + 1) ** self.len_penalty
            too_long = step > src_lengths if self.match_source_len else None
            counts, ended_one = finished.add(
                step,
                eos_mask[:, :beam_size],
                cand_bbsz_idx[:, :beam_size],
                cand_scores[:, :beam_size],
                sentences,
                tokens,
                scores,
                attn,
                normalize,
                too_long,
                self.eos,
            )
            done = ended_one & ((counts == beam_size) | (step == max_len))
            num_done = int(done.sum())  # the step's one host sync: it sets the next batch shape
            num_remaining -= num_done
            if num_remaining == 0:
                break
            if self.search.stop_on_max_len and step >= max_len:
                break
            assert step < max_len, f"{step} < {max_len}"

            if num_done > 0:
                batch_idxs = (~done).nonzero().squeeze(1)
                new_bsz = bsz - num_done
                self.search.prune_sentences(batch_idxs)
                eos_mask = eos_mask[batch_idxs]
                cand_beams = cand_beams[batch_idxs]
                bbsz_offsets = bbsz_offsets[:new_bsz]
                cand_bbsz_idx = cand_beams.add(bbsz_offsets)
                cand_scores = cand_scores[batch_idxs]
                cand_indices = cand_indices[batch_idxs]
                if prefix_tokens is not None:
                    prefix_tokens = prefix_tokens[batch_idxs]
                src_lengths = src_lengths[batch_idxs]
                cands_to_ignore = cands_to_ignore[batch_idxs]
                sentences = sentences[batch_idxs]
                scores = scores.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
                tokens = tokens.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, -1)
                if attn is not None:
                    attn = attn.view(bsz, -1)[batch_idxs].view(new_bsz * beam_size, attn.size(1), -1)
                bsz = new_bsz
            else:
                batch_idxs = None

            # Candidates that ended in EOS (or are ignored) sort after the live ones; the
            # first beam_size live candidates continue.
            eos_mask[:, :beam_size] |= cands_to_ignore
            active_mask = eos_mask.long() * cand_size + cand_offsets[: eos_mask.size(1)]
            new_cands_to_ignore, active_hypos = torch.topk(active_mask, k=beam_size, dim=1, largest=False)
            cands_to_ignore = new_cands_to_ignore.ge(cand_size)[:, :beam_size]
            active_bbsz_idx = torch.gather(cand_bbsz_idx, dim=1, index=active_hypos).view(-1)

            tokens[:, : step + 1] = tokens[:, : step + 1].index_select(0, active_bbsz_idx)
            tokens.view(bsz, beam_size, -1)[:, :, step + 1] = torch.gather(cand_indices, dim=1, index=active_hypos)
            if step > 0:
                scores[:, :step] = scores[:, :step].index_select(0, active_bbsz_idx)
            scores.view(bsz, beam_size, -1)[:, :, step] = torch.gather(cand_scores, dim=1, index=active_hypos)
            self.search.update_constraints(active_hypos)
            if attn is not None:
                attn[:, :, : step + 2] = attn[:, :, : step + 2].index_select(0, active_bbsz_idx)
            reorder_state = active_bbsz_idx

        return finished.to_hypotheses()

    def _source(self, net_input: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """Source tokens (or features) and lengths, as fairseq's generator reads them."""
        if "src_tokens" in net_input:
            src_tokens = net_input["src_tokens"]
            if "src_lengths" in net_input:
                return src_tokens, net_input["src_lengths"]
            return src_tokens, (src_tokens.ne(self.eos) & src_tokens.ne(self.pad)).long().sum(dim=1)
        for key in ("source", "features"):
            if key in net_input:
                source, padding_mask = net_input[key], net_input["padding_mask"]
                if padding_mask is None:
                    return source, torch.tensor(source.size(-1)).to(source)
                return source, padding_mask.size(-1) - padding_mask.sum(-1)
        raise Exception("expected src_tokens or source in net input. input keys: " + str(net_input.keys()))


class FastSequenceGeneratorWithAlignment(SequenceGeneratorWithAlignment, FastSequenceGenerator):
    """``--print-alignment``: fairseq's alignment extraction on top of the fast search loop."""

    @classmethod
    def from_stock(cls, stock: SequenceGeneratorWithAlignment) -> "FastSequenceGeneratorWithAlignment":
        hard = stock.extract_alignment is utils.extract_hard_alignment
        return cls(
            stock.model.models,
            stock.tgt_dict,
            left_pad_target=stock.left_pad_target,
            print_alignment="hard" if hard else "soft",
            **_options_of(stock),
        )


def _options_of(stock: SequenceGenerator) -> Dict:
    """The constructor options a stock generator was built with."""
    blocker = stock.repeat_ngram_blocker
    return dict(
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
        no_repeat_ngram_size=blocker.no_repeat_ngram_size if blocker is not None else 0,
        search_strategy=stock.search,
        eos=stock.eos,
        symbols_to_strip_from_output=stock.symbols_to_strip_from_output,
        lm_model=stock.lm_model,
        lm_weight=stock.lm_weight,
    )


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
        logger.info("attention: %s", describe(fast.model.models, **fast.attention_options()))
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
