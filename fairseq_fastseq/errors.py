"""Clear errors where fairseq and PyTorch report a cause only by its symptom.

- A missing checkpoint is "Model file not found", without the flag that named it.
- A checkpoint trained with other dictionaries than the data-bin's fails in
  ``load_state_dict`` with a ``size mismatch`` that names tensors, not the cause.
- A batch too large for memory fails deep in an allocation ("DefaultCPUAllocator: can't
  allocate memory", "CUDA out of memory") without saying which flags set the batch size.

Each is re-raised naming the cause and what to do.
"""

import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<param>\S+): copying a param with shape torch\.Size\(\[(?P<saved>\d+)[^\]]*\]\) "
    r"from checkpoint, the shape in current model is torch\.Size\(\[(?P<current>\d+)"
)

_DICTIONARY_SIZED = ("embed_tokens.weight", "output_projection.weight")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was trained with other dictionaries than the data-bin's."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint named by --path does not exist."""


@contextmanager
def clear_load_errors(checkpoint: str, data: str) -> Iterator[None]:
    """Turn a missing checkpoint or a dictionary-size mismatch raised inside the block into
    ``CheckpointNotFoundError`` or ``CheckpointMismatchError``."""
    try:
        yield
    except OSError as error:
        if not str(error).startswith("Model file not found: "):
            raise
        raise CheckpointNotFoundError(
            f"{error}. Check --path (checkpoints of an ensemble are separated by ':'; "
            f"this run has --path {checkpoint})."
        ) from error
    except RuntimeError as error:
        found = _SIZE_MISMATCH.search(str(error))
        if found is None or not found["param"].endswith(_DICTIONARY_SIZED):
            raise
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} does not match the dictionaries of data-bin {data}: "
            f"its {found['param']} has {found['saved']} rows (the size of the dictionary it was "
            f"trained with), the data-bin's dictionary gives {found['current']}. Generate with the "
            "data-bin the model was trained with, or binarize your text with fairseq-preprocess "
            "--srcdict/--tgtdict pointing at the model's dict.*.txt."
        ) from error


class GenerationOutOfMemoryError(RuntimeError):
    """A batch did not fit in memory."""


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text


@contextmanager
def explain_out_of_memory(sample: Dict[str, Any], beam: int) -> Iterator[None]:
    """Turn an allocation failure while generating ``sample`` into ``GenerationOutOfMemoryError``."""
    try:
        yield
    except GenerationOutOfMemoryError:
        raise
    except (RuntimeError, MemoryError) as error:
        if not _is_out_of_memory(error):
            raise
        sentences, source_tokens = sample["net_input"]["src_tokens"].shape[:2]
        raise GenerationOutOfMemoryError(
            f"out of memory while generating a batch of {sentences} sentences (longest source "
            f"{source_tokens} tokens) with beam {beam}: lower --max-tokens or --batch-size (or "
            "--beam). Without either flag fairseq-generate uses --max-tokens 12000."
        ) from error
