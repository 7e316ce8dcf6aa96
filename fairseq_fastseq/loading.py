"""Clear errors for checkpoints that do not fit the data-bin.

fairseq reports a checkpoint trained with other dictionaries as a PyTorch ``size mismatch``
in ``load_state_dict``, which names tensors, not the cause. We re-raise it naming the
checkpoint, the data-bin, both sizes, and what to do.
"""

import re
from contextlib import contextmanager
from typing import Iterator

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<param>\S+): copying a param with shape torch\.Size\(\[(?P<saved>\d+)[^\]]*\]\) "
    r"from checkpoint, the shape in current model is torch\.Size\(\[(?P<current>\d+)"
)

_DICTIONARY_SIZED = ("embed_tokens.weight", "output_projection.weight")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was trained with other dictionaries than the data-bin's."""


@contextmanager
def clear_load_errors(checkpoint: str, data: str) -> Iterator[None]:
    """Turn a dictionary-size mismatch raised inside the block into ``CheckpointMismatchError``."""
    try:
        yield
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
