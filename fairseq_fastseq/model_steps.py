"""The model side of the fast search loop: encode a batch once, then per step the next-token
log-probabilities, and the caches following the chosen beams.

Two implementations of one small interface (``start``, ``decode``, ``reorder``):

- ``LeanSteps``: the lean decoder step (``step/``) of every model of the ensemble, on typed
  caches; the encoder output is used once per sentence, never expanded per beam.
- ``ModuleSteps``: fairseq's modules, with the cache paths of ``attention.py`` installed for
  the search: for models or knobs the lean step does not cover.

Either way the log-probabilities of an ensemble are combined as fairseq's ``EnsembleModel``
combines them.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.sequence_generator import EnsembleModel
from torch import Tensor

from .step.caches import LayerCaches
from .step.decoder import LeanDecoder
from .step.encoder import encoder_for
from .step.kernels import ExactKernels
from .step.pool import BufferPool


class LeanSteps:
    """Every model of ``ensemble`` decoded by the lean step."""

    def __init__(
        self,
        ensemble: EnsembleModel,
        beam_size: int,
        max_steps: int,
        need_attention: bool,
        temperature: float,
        kernels: Optional[ExactKernels] = None,
        pool: Optional[BufferPool] = None,
    ) -> None:
        self.ensemble = ensemble
        self.pool = pool or BufferPool()  # the generator's, kept from one search to the next
        self.beam_size, self.max_steps = beam_size, max_steps
        self.need_attention, self.temperature = need_attention, temperature
        kernels = kernels or ExactKernels()
        self.decoders = [self._decoder(model, kernels) for model in ensemble.models]
        self.encoders = [encoder_for(model, kernels) for model in ensemble.models] if ensemble.has_encoder() else None
        self.caches: List[LayerCaches] = []
        # Step 0 on one row per sentence (its beams all read the same first token), expanded
        # to the beams after the step, as CTranslate2 starts its beams: for the tiers that
        # round differently (a row count changes the last bits of some kernels).
        self.first_step_per_sentence = kernels.first_step_per_sentence and beam_size > 1
        self._rows_are_sentences = False  # the caches hold one row per sentence (after step 0)

    def _decoder(self, model: torch.nn.Module, kernels: ExactKernels) -> LeanDecoder:
        return LeanDecoder(model, kernels)

    def start(self, net_input: Dict[str, Tensor], sentences: int) -> None:
        """Encode the batch and project every layer's encoder keys/values."""
        encoder_outs = [encode(net_input) for encode in self.encoders] if self.encoders is not None else None
        self.pool.new_search()
        self.caches = [
            decoder.start(encoder_outs[i] if encoder_outs is not None else None, self.beam_size, self.max_steps, self.pool)
            for i, decoder in enumerate(self.decoders)
        ]

    def decode(self, tokens: Tensor, step: int) -> Tuple[Tensor, Optional[Tensor]]:
        """Log-probabilities (rows, vocab) and attention (rows, src_len) or None after
        ``tokens`` (rows, step + 1)."""
        if step == 0 and self.first_step_per_sentence:
            self._rows_are_sentences = True
            lprobs, attention = self.decode_newest(tokens[:: self.beam_size, 0], step)
            lprobs = lprobs.repeat_interleave(self.beam_size, dim=0)
            return lprobs, None if attention is None else attention.repeat_interleave(self.beam_size, dim=0)
        return self.decode_newest(tokens[:, step], step)

    def decode_newest(self, newest: Tensor, step: int) -> Tuple[Tensor, Optional[Tensor]]:
        """``decode`` given only the newest token of each row (rows,)."""
        outputs = [
            decoder.step(newest, step, caches, self.need_attention, self.temperature)
            for decoder, caches in zip(self.decoders, self.caches)
        ]
        return outputs[0] if len(outputs) == 1 else combine(outputs)

    def reorder(self, order: Tensor, kept: Optional[Tensor]) -> None:
        """Row ``i`` continues old row ``order[i]``; ``kept``: the sentences that stay, if some left."""
        if self._rows_are_sentences:  # each new row's parent row -> that row's sentence
            order, self._rows_are_sentences = order.div(self.beam_size, rounding_mode="floor"), False
        if self.beam_size > 1 or kept is not None:
            for caches in self.caches:
                caches.follow(order, kept)


class ModuleSteps:
    """fairseq's ``EnsembleModel`` with its incremental states, as fairseq's loop drives it.

    ``per_sentence_encoder``: the decoders take the encoder output once per sentence
    (``attention.py``); else it is copied per beam, as fairseq does (with one beam there is
    nothing to copy).
    """

    def __init__(
        self, ensemble: EnsembleModel, beam_size: int, per_sentence_encoder: bool, need_attention: bool, temperature: float
    ) -> None:
        self.ensemble = ensemble
        self.beam_size, self.need_attention, self.temperature = beam_size, need_attention, temperature
        self.expanded = beam_size > 1 and not per_sentence_encoder
        self.incremental_states: List[Dict] = [{} for _ in range(ensemble.models_size)]
        self.encoder_outs = None

    def start(self, net_input: Dict[str, Tensor], sentences: int) -> None:
        self.encoder_outs = self.ensemble.forward_encoder(net_input)
        if self.expanded:
            expand = torch.arange(sentences, device=self._device(net_input)).repeat_interleave(self.beam_size)
            self.encoder_outs = self.ensemble.reorder_encoder_out(self.encoder_outs, expand)

    def decode(self, tokens: Tensor, step: int) -> Tuple[Tensor, Optional[Tensor]]:
        lprobs, attention = self.ensemble.forward_decoder(tokens, self.encoder_outs, self.incremental_states, self.temperature)
        return lprobs, attention if self.need_attention else None

    def reorder(self, order: Tensor, kept: Optional[Tensor]) -> None:
        # The beams of a sentence hold the same encoder output: it follows the sentences only.
        if kept is not None:
            self.encoder_outs = self.ensemble.reorder_encoder_out(self.encoder_outs, order if self.expanded else kept)
        if self.beam_size > 1 or kept is not None:
            self.ensemble.reorder_incremental_state(self.incremental_states, order)

    @staticmethod
    def _device(net_input: Dict[str, Tensor]) -> torch.device:
        return next(value.device for value in net_input.values() if isinstance(value, Tensor))


def combine(outputs: List[Tuple[Tensor, Optional[Tensor]]]) -> Tuple[Tensor, Optional[Tensor]]:
    """An ensemble's log-probabilities and attention from its models', as ``EnsembleModel``
    combines them: log of the mean probability, mean attention."""
    log_probs = [lprobs for lprobs, _ in outputs]
    average_attention = None
    for _, attention in outputs:
        if attention is not None:
            average_attention = attention if average_attention is None else average_attention.add_(attention)
    average = torch.logsumexp(torch.stack(log_probs, dim=0), dim=0) - math.log(len(outputs))
    if average_attention is not None:
        average_attention.div_(len(outputs))
    return average, average_attention
