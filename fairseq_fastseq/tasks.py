"""``--task translation_fast``: fairseq's translation task, generated through the pipeline.

The task is ``translation`` in every respect (same data-bins, checkpoints, options), plus
the post-processing knobs below. Selecting it makes ``fairseq-generate`` run
``pipeline.main`` (routed by ``hook.py``), which overlaps decoding with the
string conversion, BPE removal, detokenization and scoring of earlier batches and writes
exactly fairseq-generate's output. BART summarization checkpoints fine-tuned with the
``translation`` task use it unchanged.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .worker_count import AUTO
from .workers import BACKENDS

PIPELINED_TASKS = ("translation_fast",)

logger = logging.getLogger(__name__)


@dataclass
class TranslationFastConfig(TranslationConfig):
    postprocess_workers: str = field(
        default=AUTO,
        metadata={
            "help": "workers that turn generated tokens into text (BPE removal, detokenization, "
            "scoring input) while the next batches decode; 0 does it on the main process, "
            "between batches, as fairseq-generate does; 'auto': one where the decoder leaves "
            "a core free (on a GPU, or with fewer threads than cores), else 0"
        },
    )
    postprocess_backend: ChoiceEnum(list(BACKENDS)) = field(  # type: ignore[valid-type]
        default="process",
        metadata={
            "help": "'process' (forked worker processes: parallel even for pure-Python "
            "detokenizers) or 'thread' (no copies; parallel only while the decoder releases the GIL)"
        },
    )
    distributed_timeout_seconds: float = field(
        default=1800.0,
        metadata={
            "help": "under torchrun: how long a rank waits for the others in a collective before "
            "giving up with an error (ranks finish within a few batches of each other)"
        },
    )


@register_task("translation_fast", dataclass=TranslationFastConfig)
class TranslationFastTask(TranslationTask):
    """fairseq's ``translation`` task; generation runs through ``fairseq_fastseq.pipeline``."""

    def get_batch_iterator(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """fairseq's batches, plus the sentences that fairseq's batching drops.

        fairseq 0.12's ``batch_by_size`` drops the last batch when its size is not a multiple
        of ``--required-batch-size-multiple`` (8 by default), so ``fairseq-generate``
        silently skips up to 7 of the longest sentences. We keep fairseq's batches as they
        are and generate the dropped sentences in one more batch at the end.
        """
        batch_by_size = dataset.batch_by_size

        def keeping_dropped_sentences(indices, *batch_args, **batch_kwargs):
            batches = batch_by_size(indices, *batch_args, **batch_kwargs)
            kept = sum(len(batch) for batch in batches)
            if kept < len(indices):
                logger.warning(
                    f"fairseq's batching drops the last {len(indices) - kept} sentences (batch sizes must be "
                    "multiples of --required-batch-size-multiple); generating them in one more batch"
                )
                batches = [*batches, np.asarray(indices[kept:], dtype=np.int64)]
            return batches

        dataset.batch_by_size = keeping_dropped_sentences  # this dataset object, this call only
        try:
            return super().get_batch_iterator(dataset, *args, **kwargs)
        finally:
            del dataset.batch_by_size
