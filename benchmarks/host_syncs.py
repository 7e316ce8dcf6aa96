"""How often a search makes the host wait for the device: a count of host syncs.

A host sync is a call that needs a tensor's value on the host: ``item``, ``tolist``,
``bool``/``int``/``float`` of a tensor, ``nonzero``. On a GPU each one stalls the launch
queue until the device has caught up, which is what the static-shape loop avoids
(``fairseq_fastseq/static_loop.py``). ``counting_host_syncs`` counts the calls made from
Python on any device; on a GPU also what CUDA's sync debug mode reports, which includes
syncs inside operators (e.g. boolean indexing) that the Python-side count cannot see.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

# The Tensor methods that read a value on the host.
_SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


@dataclass
class HostSyncs:
    python: int = 0  # calls of the methods above
    cuda: Optional[int] = None  # syncs CUDA's sync debug mode reported (these calls included), on a GPU

    @property
    def total(self) -> int:
        return self.python if self.cuda is None else max(self.cuda, self.python)


@contextmanager
def counting_host_syncs() -> Iterator[HostSyncs]:
    """Count the host syncs made within the block (in this thread and any other)."""
    counts = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING_METHODS}

    def counted(original):
        def method(self, *args, **kwargs):
            counts.python += 1
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    on_gpu = torch.cuda.is_available()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if on_gpu:
                torch.cuda.set_sync_debug_mode("warn")
            yield counts
            counts.cuda = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        if on_gpu:
            torch.cuda.set_sync_debug_mode("default")
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
