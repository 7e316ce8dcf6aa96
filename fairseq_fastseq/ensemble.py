"""The fast generator's model ensemble for fairseq's modules: next-token log-probabilities
written into buffers that live for one batch (``step/output.py`` says why).
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

from fairseq.sequence_generator import EnsembleModel
from torch import Tensor, nn

from .step.output import BufferedOutput, bufferable_projection


def _last_step_attention(extra: Optional[Dict]) -> Optional[Tensor]:
    """The decoder's attention over the source for the newest position, read from its extra
    output the way fairseq's ensemble reads it."""
    if extra is None:
        return None
    held = extra if isinstance(extra, Tensor) else extra["attn"]
    if held is not None and not isinstance(held, Tensor):
        held = held[0]
    return None if held is None else held[:, -1, :]


class BufferedEnsembleModel(EnsembleModel):
    """fairseq's ``EnsembleModel``; inside ``step_buffers()`` a single CPU float32 model with a
    plain transformer decoder projects and normalizes into buffers reused from step to step.

    The log-probabilities returned are a view of a buffer that the next step overwrites:
    the caller consumes them within the step (the fast search loop does).
    """

    def __init__(self, models: List[nn.Module]) -> None:
        super().__init__(models)
        # Within ``step_buffers()``, the buffered output stage if this ensemble's steps write
        # into buffers (decided once per batch), else None.
        self._output: Optional[BufferedOutput] = None

    @contextmanager
    def step_buffers(self) -> Iterator[None]:
        """Within the block, decoder steps reuse buffers; they are freed when it ends."""
        single = self.models_size == 1 and self.has_incremental_states()
        weight = bufferable_projection(self.single_model) if single else None
        self._output = BufferedOutput(weight) if weight is not None else None
        try:
            yield
        finally:
            self._output = None

    def reuses_buffers(self) -> bool:
        """Whether a decoder step now writes into the step buffers (else it is fairseq's)."""
        return self._output is not None

    def forward_decoder(
        self,
        tokens: Tensor,
        encoder_outs: List[Dict[str, List[Tensor]]],
        incremental_states: List[Dict[str, Dict[str, Optional[Tensor]]]],
        temperature: float = 1.0,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if self._output is None:
            return super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        features, extra = self.single_model.decoder(
            tokens,
            encoder_out=encoder_outs[0] if self.has_encoder() else None,
            incremental_state=incremental_states[0],
            features_only=True,
        )
        return self._output(features[:, -1, :], temperature), _last_step_attention(extra)
