"""Repeated-n-gram blocking (``--no-repeat-ngram-size``) as a few tensor operations.

Semantics are those of fairseq's CUDA kernel and of fairseq 0.10: with history
``tokens[r, 0..t]`` (position 0 is BOS/EOS and counts), for every start ``i <= t+1-n``
whose ``n-1`` tokens equal the current suffix ``tokens[r, t+2-n .. t]``, the token that
followed them, ``tokens[r, i+n-1]``, is banned for step ``t+1``. fairseq 0.12's CPU fallback
bans nothing at all (it compares against padding); this is the fix.

No Python loop over rows or n-grams and no host sync, so it is the same code on CPU and GPU.
"""

import math

import torch
from torch import Tensor


def block_repeated_ngrams(tokens: Tensor, lprobs: Tensor, step: int, n: int, pad: int) -> Tensor:
    """Set to -inf, in place, every token of ``lprobs`` (rows, vocab) that would repeat an n-gram.

    ``tokens`` (rows, >= step+1) holds each row's history; ``lprobs[:, pad]`` must already
    be -inf: windows that do not match write there.
    """
    num_windows = step + 2 - n
    if num_windows <= 0:
        return lprobs
    history = tokens[:, : step + 1]
    windows = history.unfold(1, n, 1)  # (rows, num_windows, n): every n-gram, the last included
    suffix = history[:, num_windows:].unsqueeze(1)  # (rows, 1, n-1)
    matches = (windows[..., : n - 1] == suffix).all(-1)  # (rows, num_windows)
    banned = torch.where(matches, windows[..., n - 1], pad)
    # Every write is -inf, so duplicate indices are harmless and the result deterministic.
    return lprobs.scatter_(1, banned, -math.inf)
