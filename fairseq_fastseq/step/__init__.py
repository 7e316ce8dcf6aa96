"""The lean decoder step: one incremental step of fairseq's transformer decoder, with its own
typed caches, through the same kernels on the same shapes as fairseq (so bitwise equal).

fairseq's decoder step goes through generic modules: every ``MultiheadAttention`` call looks
its cache up in a dict of dicts by string keys, copies its whole self-attention cache twice
(a beam reorder, then ``torch.cat``), reorders the encoder keys/values of every beam although
the beams of a sentence hold the same ones, and builds the attention record the caller may
not need. Here:

- ``coverage``: which models and options the lean step covers, and why not (a reason for the
  log, never a silent fallback);
- ``caches``, ``encoder_caches``: one typed cache per layer (self-attention keys/values
  time-major, written in place, their rows in ``slots`` or read through ``histories``;
  encoder keys/values, touched only when sentences leave the batch);
- ``layer``: a decoder layer's step on those caches;
- ``decoder``: embeddings, layers, final norm, output projection and log-softmax;
- ``kernels``: the tiers of ``--fast-kernels`` (``exact`` is the above; ``fused`` and ``int8``
  round differently), and ``native``: those tiers' attention in C++.

Figures: ``BENCHMARKS.md`` ("Lean decoder step").
"""
