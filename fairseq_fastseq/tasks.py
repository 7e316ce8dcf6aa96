"""``--task translation_fast``: fairseq's translation task, generated through the pipeline.

The task is ``translation`` in every respect (same data-bins, checkpoints, options), plus
the post-processing knobs below. Selecting it makes ``fairseq-generate`` run
``pipeline.generate`` (routed by ``hook.py``), which overlaps decoding with the
string conversion, BPE removal, detokenization and scoring of earlier batches and writes
exactly fairseq-generate's output. BART summarization checkpoints fine-tuned with the
``translation`` task use it unchanged.
"""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .workers import BACKENDS

PIPELINED_TASKS = ("translation_fast",)


@dataclass
class TranslationFastConfig(TranslationConfig):
    postprocess_workers: int = field(
        default=1,
        metadata={
            "help": "workers that turn generated tokens into text (BPE removal, detokenization, "
            "scoring input) while the next batches decode; 0 does it on the main process, "
            "between batches, as fairseq-generate does"
        },
    )
    postprocess_backend: ChoiceEnum(list(BACKENDS)) = field(  # type: ignore[valid-type]
        default="process",
        metadata={
            "help": "'process' (forked worker processes: parallel even for pure-Python "
            "detokenizers) or 'thread' (no copies; parallel only while the decoder releases the GIL)"
        },
    )


@register_task("translation_fast", dataclass=TranslationFastConfig)
class TranslationFastTask(TranslationTask):
    """fairseq's ``translation`` task; generation runs through ``fairseq_fastseq.pipeline``."""
