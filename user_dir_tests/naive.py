"""Naive, obviously-correct reference implementations the fast code is tested against."""

import math
from typing import List, Set

import torch


def banned_next_tokens(history: List[int], n: int) -> Set[int]:
    """Tokens that would repeat an n-gram of ``history`` (fairseq's CUDA-kernel semantics)."""
    t = len(history) - 1
    suffix = history[t + 2 - n :] if n > 1 else []
    return {history[i + n - 1] for i in range(max(t + 2 - n, 0)) if history[i : i + n - 1] == suffix}


class NaiveNGramBlocker(torch.nn.Module):
    """Drop-in for fairseq's ``NGramRepeatBlock`` that really blocks (stock's CPU path does not)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        for row in range(tokens.size(0)):
            for token in banned_next_tokens(tokens[row, : step + 1].tolist(), self.n):
                lprobs[row, token] = -math.inf
        return lprobs


def with_correct_ngram_blocking(stock):
    """The stock generator with its no-op CPU n-gram blocker replaced by a correct one."""
    stock.repeat_ngram_blocker = NaiveNGramBlocker(stock.repeat_ngram_blocker.no_repeat_ngram_size)
    return stock


class WithoutSampleIds:
    """The stock generator with fairseq 0.12's diverse-beam bug fixed: without ``id`` in the
    sample, stock indexes its per-sentence overlap buffer by batch row, as intended."""

    def __init__(self, stock) -> None:
        self.stock = stock

    def generate(self, models, sample, **kwargs):
        return self.stock.generate(models, {k: v for k, v in sample.items() if k != "id"}, **kwargs)
