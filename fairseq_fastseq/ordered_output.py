"""The output side of the pipelined fairseq-generate (``pipeline.py``): formatted batches
written and scored in generation order, and under torchrun gathered from every rank to
rank 0 first."""

import collections
from typing import Any, Deque, Iterable, List, Optional, TextIO, Tuple

from .distributed import Ranks
from .formatting import FormattedBatch


class Shard:
    """Where formatted batches go: straight to the writer in a single process; under torchrun,
    kept with their global batch index until rank 0 gathers and writes every rank's batches."""

    def __init__(self, ranks: Ranks, writer: "OrderedWriter") -> None:
        self.ranks, self.writer = ranks, writer
        self.positions: Deque[int] = collections.deque()  # of batches handed to the workers
        self.kept: List[Tuple[int, FormattedBatch]] = []

    def submitted(self, position: int) -> None:
        self.positions.append(self.ranks.global_batch_index(position))

    def add(self, batches: Iterable[FormattedBatch]) -> None:
        for batch in batches:  # the workers return batches in submission order
            index = self.positions.popleft()
            if self.ranks.world == 1:
                self.writer.write([batch])
            else:
                self.kept.append((index, batch))

    def finish(self, sentences: int, tokens: int, seconds: float, has_target: bool) -> Optional[Tuple]:
        """(sentences, generated tokens, generation seconds, has_target) over all ranks, on
        rank 0 after writing the other ranks' batches in order; None on the other ranks."""
        if self.ranks.world == 1:
            return sentences, tokens, seconds, has_target
        shards = self.ranks.gather((self.kept, sentences, tokens, seconds, has_target))
        if not self.ranks.writes_output:
            return None
        merged = sorted((item for kept, *_ in shards for item in kept), key=lambda item: item[0])
        self.writer.write(batch for _, batch in merged)
        return (
            sum(shard[1] for shard in shards),
            sum(shard[2] for shard in shards),
            max(shard[3] for shard in shards),  # the ranks ran side by side
            any(shard[4] for shard in shards),
        )


class OrderedWriter:
    """Writes formatted batches and feeds the scorer, in generation order, on the main process."""

    def __init__(self, output: TextIO, scorer: Any, tgt_dict: Any) -> None:
        self.output, self.scorer, self.tgt_dict = output, scorer, tgt_dict

    def write(self, batches: Any) -> None:
        for batch in batches:
            self._write_one(batch)

    def _write_one(self, batch: FormattedBatch) -> None:
        self.output.write(batch.text)
        for kind, reference, hypothesis in batch.score_inputs:
            if kind == "strings":
                self.scorer.add_string(reference, hypothesis)
            elif kind == "encode":  # fairseq re-encodes post-processed text (this grows the dictionary)
                reference = self.tgt_dict.encode_line(reference, add_if_not_exist=True)
                self.scorer.add(reference, self.tgt_dict.encode_line(hypothesis, add_if_not_exist=True))
            else:
                self.scorer.add(reference, hypothesis)
