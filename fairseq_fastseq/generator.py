"""The fast sequence generator: fairseq's search strategies in a loop of named steps over
the lean decoder step (or fairseq's modules). Whether a search gets it: ``choice.py``."""

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Dict, Iterator, List, Optional, Tuple, Union

import torch
from fairseq import utils
from fairseq.search import DiverseBeamSearch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator, SequenceGeneratorWithAlignment
from torch import Tensor

from .attention_plan import cache_steps, decoder_beam_size, fast_attention
from .beam_step import adds_in_place, beam_step_in_place
from .config import FastGeneratorConfig
from .ensemble import BufferedEnsembleModel
from .errors import explain_out_of_memory
from .finished import FinishedHypotheses, StepEnds, ordinary_tensors
from .finished_on_device import FinishedOnDevice
from .graphs import StaticSteps
from .logit_edits import edits_for_batch
from .model_steps import LeanSteps, ModuleSteps
from .search_state import Candidates, SearchState
from .static_loop import static_search
from .step.coverage import why_not_lean
from .step.kernels import ExactKernels
from .step.pool import BufferPool

# The knobs' values that the lean decoder step implements (the bitwise defaults).
_LEAN_KNOBS = {"decoder_step": "lean", "self_attn_cache": "time_major", "encoder_projection": "per_sentence"}


class FastSequenceGenerator(SequenceGenerator):
    """Beam search and sampling with the results of fairseq's ``SequenceGenerator``.

    It reuses fairseq's search strategies (``fairseq.search``), which are already batched
    tensor code, and replaces the decoding loop around them and the model step:

    - the model step (``model_steps.py``) is the lean decoder step of ``step/`` wherever it
      covers the models (typed caches, the encoder output once per sentence, no cache copy
      but the beam reorder), else fairseq's modules with the cache paths of ``attention.py``;
    - the per-hypothesis tensors live in one ``SearchState`` (one drop, one advance), and the
      edits of the log-probabilities are a list built once per batch (``logit_edits.py``);
    - finished hypotheses are collected for the whole batch at once (``finished.py``), with
      no Python loop over hypotheses or sentences inside the loop;
    - ``--no-repeat-ngram-size`` is vectorized and blocks on CPU too (``ngram.py``);
    - ``--diverse-beam-groups`` gets each sentence's row in the batch, not its dataset
      id (fairseq 0.12 indexes its per-sentence buffer with the id: an IndexError or
      wrong penalties on real data).

    The one host sync per step is the number of sentences that finished: it sets the
    shape of the next step's batch. With ``--fast-cuda-graphs`` the static-shape loop of
    ``static_loop.py`` runs instead, for the searches it covers (``static_loop``). ``need_attention``: whether the hypotheses carry the
    attention over the source, as fairseq's do (a caller that reads none can save it).
    """

    need_attention: bool = True

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
        self.kernels: ExactKernels = ExactKernels()  # the lean step's tier (``step/kernels.py``)
        self.static_loop = False  # whether searches run on static shapes (``static_loop.py``)
        self.buffers = BufferPool()  # the lean step's CPU buffers, kept from one search to the next

    def attention_options(self) -> Dict[str, Union[bool, str]]:
        """The knobs as ``attention_plan.fast_attention`` arguments."""
        return dict(time_major_self_attn=self.knobs.self_attn_cache == "time_major", encoder=self.knobs.encoder_projection)

    def why_not_lean(self) -> Optional[str]:
        """None if the lean decoder step runs the search, else why fairseq's modules do."""
        for knob, lean_value in _LEAN_KNOBS.items():
            value = getattr(self.knobs, knob)
            if value != lean_value:
                return f"--fast-{knob.replace('_', '-')} {value}"
        if not self.model.has_incremental_states():
            return "a decoder without incremental state"
        return next(filter(None, (why_not_lean(model) for model in self.model.models)), None)

    def _generate(
        self,
        sample: Dict[str, Dict[str, Tensor]],
        prefix_tokens: Optional[Tensor] = None,
        constraints: Optional[Tensor] = None,
        bos_token: Optional[int] = None,
    ) -> List[List[Dict[str, Tensor]]]:
        max_len = self._max_len(sample["net_input"])
        with explain_out_of_memory(sample, self.beam_size), torch.inference_mode():
            if self.static_loop:
                steps = StaticSteps(self.model, self.beam_size, max_len + 1, self.need_attention, self.temperature, self.kernels)
                hypotheses = static_search(self, sample, max_len, steps, prefix_tokens, constraints, bos_token)
            else:
                with self._model_steps(max_len) as steps:
                    hypotheses = self._search(sample, max_len, steps, prefix_tokens, constraints, bos_token)
        return ordinary_tensors(hypotheses)

    @contextmanager
    def _model_steps(self, max_len: int) -> Iterator[Union[LeanSteps, ModuleSteps]]:
        """The model side of one search, and everything it switches on for the search only:
        nothing for the lean step; for fairseq's modules, BART's beam size, the attention
        classes, their cache limit and the output buffers."""
        steps = max_len + 1  # steps 0..max_len
        if self.why_not_lean() is None:
            yield LeanSteps(self.model, self.beam_size, steps, self.need_attention, self.temperature, self.kernels, self.buffers)
            return
        models = self.model.models
        every_model = self.knobs.encoder_projection == "grouped"
        with decoder_beam_size(models, self.beam_size, every_model=every_model), fast_attention(
            models, **self.attention_options()
        ) as per_sentence_encoder, cache_steps(models, steps), self._step_buffers():
            yield ModuleSteps(self.model, self.beam_size, per_sentence_encoder, self.need_attention, self.temperature)

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
        steps: Union[LeanSteps, ModuleSteps],
        prefix_tokens: Optional[Tensor],
        constraints: Optional[Tensor],
        bos_token: Optional[int],
    ) -> List[List[Dict[str, Tensor]]]:
        state = self._start_search(sample, max_len, prefix_tokens, constraints, bos_token)
        bsz = state.bsz
        finished = FinishedHypotheses(bsz, self.beam_size, state.scores.device)
        edits = edits_for_batch(self, max_len, prefix_tokens is not None, nan_in_candidates=lambda step: adds_in_place(self.search, step))
        steps.start(sample["net_input"], bsz)

        for step in range(max_len + 1):  # one extra step for EOS
            lprobs, attention = steps.decode(state.tokens[:, : step + 1], step)  # (bsz * beam, vocab)
            for edit in edits:
                lprobs = edit(step, lprobs, state)
            state.record_attention(step, attention, max_len)
            candidates = self._candidates(step, lprobs, state)
            done = self._finish(step, candidates, state, finished, max_len)
            num_done = int(done.sum())  # the step's one host sync: it sets the next batch shape
            if num_done == state.bsz or (self.search.stop_on_max_len and step >= max_len):
                break
            assert step < max_len, f"{step} < {max_len}"
            kept = None
            if num_done > 0:
                kept, candidates = state.drop(step, done, candidates)
                self.search.prune_sentences(kept)
            active_hypos, parents = state.advance(step, candidates)
            self.search.update_constraints(active_hypos)
            steps.reorder(self._rows_before_drop(parents, kept), kept)
        return finished.to_hypotheses()

    def _start_search(
        self,
        sample: Dict[str, Dict[str, Tensor]],
        max_len: int,
        prefix_tokens: Optional[Tensor],
        constraints: Optional[Tensor],
        bos_token: Optional[int],
    ) -> SearchState:
        """The search strategy's set-up and the hypotheses' state before the first step."""
        src_tokens, src_lengths = self._source(sample["net_input"])
        self._start_constraints(constraints, max_len)
        return SearchState.start(
            src_tokens.size(0), self.beam_size, max_len, self.eos if bos_token is None else bos_token, self.pad,
            src_lengths, prefix_tokens, self._search_batch_ids(sample),
        )  # fmt: skip

    def _start_constraints(self, constraints: Optional[Tensor], max_len: int) -> None:
        """fairseq's checks and set-up before a search, in its order (and with its errors)."""
        if constraints is not None and not self.search.supports_constraints:
            raise NotImplementedError("Target-side constraints were provided, but search method doesn't support them")
        self.search.init_constraints(constraints, self.beam_size)
        assert self.min_len <= max_len, "min_len cannot be larger than max_len, please adjust these!"

    def _search_batch_ids(self, sample: Dict) -> Optional[Tensor]:
        """What the search strategy gets as batch ids: fairseq passes dataset ids, except that
        DiverseBeamSearch indexes a buffer made at step 0 with them (batch rows, the default)."""
        ids = sample.get("id")
        if isinstance(ids, Tensor) and not isinstance(self.search, DiverseBeamSearch):
            return ids
        return None

    def _candidates(self, step: int, lprobs: Tensor, state: SearchState) -> Candidates:
        """The search strategy's ``2 * beam`` candidates per sentence."""
        bsz, beam_size = state.bsz, self.beam_size
        if self.should_set_src_lengths:
            self.search.set_src_lengths(state.src_lengths)
        if adds_in_place(self.search, step):
            scores, indices, beams = beam_step_in_place(
                lprobs.view(bsz, -1, self.vocab_size), state.scores.view(bsz, beam_size, -1), step
            )
        else:
            scores, indices, beams = self.search.step(
                step,
                lprobs.view(bsz, -1, self.vocab_size),
                state.scores.view(bsz, beam_size, -1)[:, :, :step],
                state.tokens[:, : step + 1],
                state.search_batch_idxs,
            )
        return state.candidates(scores, indices, beams, self.eos)

    def _finish(
        self, step: int, candidates: Candidates, state: SearchState, finished: Union[FinishedHypotheses, FinishedOnDevice], max_len: int
    ) -> Tensor:
        """Store the hypotheses that end in EOS among the top ``beam`` candidates; return which
        sentences are done (bsz,) bool: ``beam`` finished hypotheses, or the last step."""
        beam_size = self.beam_size
        counts, ended_one = finished.add(
            StepEnds(
                step,
                candidates.eos_mask[:, :beam_size],
                candidates.bbsz_idx[:, :beam_size],
                candidates.scores[:, :beam_size],
                state.sentences,
                state.tokens,
                state.scores,
                state.attn,
                (step + 1) ** self.len_penalty if self.normalize_scores else None,
                step > state.src_lengths if self.match_source_len else None,
                self.eos,
            )
        )
        return ended_one & ((counts == beam_size) | (step == max_len))

    def _rows_before_drop(self, parents: Tensor, kept: Optional[Tensor]) -> Tensor:
        """Each new row's parent as a row of the caches, which still hold the dropped sentences."""
        if kept is None:
            return parents
        shift = kept - torch.arange(kept.numel(), device=kept.device)
        return parents.view(-1, self.beam_size).add(shift.unsqueeze(-1) * self.beam_size).view(-1)

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
