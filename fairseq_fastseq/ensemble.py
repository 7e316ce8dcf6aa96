"""The fast generator's model ensemble: next-token log-probabilities written into buffers
that live for one batch.

On CPU, a (rows x vocabulary) float tensor is large at large batches: 640 rows (batch 128,
beam 5) x 32k tokens is 82 MB, above glibc's largest mmap threshold (32 MB). Each such
allocation is then a fresh ``mmap`` whose pages the kernel faults in and zeroes, and
fairseq allocates two per decoder step: the logits and their log-softmax. Measured on
transformer-base at batch 128, beam 5: about 3 million page faults and 5 s of 40 s spent in
the kernel (``BENCHMARKS.md``). Here the output projection and the log-softmax of a single
model write into two buffers made once per batch. The arithmetic is fairseq's: the same
``mm`` and ``log_softmax`` kernels, given ``out=``. On a GPU, PyTorch's caching allocator
already reuses memory, so the buffers are for CPU only.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from fairseq.models.fairseq_decoder import FairseqDecoder
from fairseq.models.fairseq_model import BaseFairseqModel
from fairseq.models.transformer.transformer_base import TransformerModelBase
from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase
from fairseq.sequence_generator import EnsembleModel
from torch import Tensor, nn


# fairseq's model-level get_normalized_probs: the base one, and the transformer's restatement
# of it (for TorchScript); both hand the work to the decoder.
_MODEL_NORMALIZERS = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)


def _plain_transformer_decoder(model: nn.Module) -> Optional[TransformerDecoderBase]:
    """The model's decoder if its log-probabilities are fairseq's default ones: a transformer
    decoder whose features go through a bias-free linear projection and a log-softmax, with
    none of those steps overridden; else None."""
    decoder = getattr(model, "decoder", None)
    plain = (
        isinstance(model, BaseFairseqModel)
        and isinstance(decoder, TransformerDecoderBase)
        and type(model).get_normalized_probs in _MODEL_NORMALIZERS
        and type(model).get_normalized_probs_scriptable is BaseFairseqModel.get_normalized_probs_scriptable
        and type(decoder).forward is TransformerDecoderBase.forward
        and type(decoder).output_layer is TransformerDecoderBase.output_layer
        and type(decoder).get_normalized_probs is FairseqDecoder.get_normalized_probs
        and type(decoder).get_normalized_probs_scriptable is FairseqDecoder.get_normalized_probs_scriptable
        and decoder.adaptive_softmax is None
        and not decoder.onnx_trace
        and type(decoder.output_projection) is nn.Linear
        and decoder.output_projection.bias is None
    )
    return decoder if plain else None


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
        self._step_outputs: Dict[str, Tensor] = {}
        # Within ``step_buffers()``, the output projection's weight if this ensemble's steps
        # write into the buffers (decided once per batch), else None.
        self._projection: Optional[Tensor] = None

    @contextmanager
    def step_buffers(self) -> Iterator[None]:
        """Within the block, decoder steps reuse buffers; they are freed when it ends."""
        self._projection = self._bufferable_projection()
        try:
            yield
        finally:
            self._projection = None
            self._step_outputs = {}

    def _bufferable_projection(self) -> Optional[Tensor]:
        if self.models_size != 1 or not self.has_incremental_states():
            return None
        decoder = _plain_transformer_decoder(self.single_model)
        weight = decoder.output_projection.weight if decoder is not None else None
        cpu_fp32 = weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
        return weight if cpu_fp32 else None

    def reuses_buffers(self) -> bool:
        """Whether a decoder step now writes into the step buffers (else it is fairseq's)."""
        return self._projection is not None

    def forward_decoder(
        self,
        tokens: Tensor,
        encoder_outs: List[Dict[str, List[Tensor]]],
        incremental_states: List[Dict[str, Dict[str, Optional[Tensor]]]],
        temperature: float = 1.0,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        weight = self._projection
        if weight is None:
            return super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        features, extra = self.single_model.decoder(
            tokens,
            encoder_out=encoder_outs[0] if self.has_encoder() else None,
            incremental_state=incremental_states[0],
            features_only=True,
        )
        rows = features.size(0)
        logits = torch.mm(features[:, -1, :], weight.t(), out=self._buffer("logits", rows, weight))
        if temperature != 1.0:  # x / 1.0 == x exactly, so fairseq's division is skipped then
            logits.div_(temperature)
        lprobs = torch.log_softmax(logits, dim=-1, out=self._buffer("lprobs", rows, weight))
        return lprobs, _last_step_attention(extra)

    def _buffer(self, name: str, rows: int, weight: Tensor) -> Tensor:
        """The first ``rows`` rows of a (rows x vocabulary) buffer, made at the batch's first step:
        the batch only shrinks afterwards."""
        buffer = self._step_outputs.get(name)
        if buffer is None or buffer.size(0) < rows:
            buffer = self._step_outputs[name] = weight.new_empty(rows, weight.size(0))
        return buffer[:rows]
