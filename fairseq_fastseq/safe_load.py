"""Let fairseq checkpoints load under torch's safe ``weights_only=True`` unpickler.

A fairseq checkpoint is a pickle. torch >= 2.6 unpickles with ``weights_only=True`` and
refuses the ``argparse.Namespace`` (and, in older checkpoints, the omegaconf containers)
that fairseq stores next to the weights. The usual workaround,
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, turns the safe unpickler off, so a malicious
checkpoint can run code. Instead we keep it on and allow-list exactly the plain-data
classes fairseq checkpoints contain: none of them runs code when unpickled.
"""

import argparse
import collections
import typing

import numpy
import torch
from omegaconf import DictConfig, ListConfig, nodes
from omegaconf.base import ContainerMetadata, Metadata

# Every global a fairseq 0.9-0.12 checkpoint of a text model refers to, beyond torch's defaults.
CHECKPOINT_GLOBALS: typing.List[typing.Any] = [
    # legacy `args` and Namespace-valued `cfg.task`/`cfg.model`
    argparse.Namespace,
    # checkpoints of fairseq 0.10 saved `cfg` as a DictConfig
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    nodes.AnyNode,
    nodes.StringNode,
    nodes.IntegerNode,
    nodes.FloatNode,
    nodes.BooleanNode,
    typing.Any,
    dict,
    list,
    int,
    collections.defaultdict,
    # numpy scalars in `extra_state` (e.g. the best validation loss)
    numpy.core.multiarray.scalar,
    numpy.dtype,
    type(numpy.dtype(numpy.float64)),
    type(numpy.dtype(numpy.float32)),
    type(numpy.dtype(numpy.int64)),
]


def allow_fairseq_checkpoint_globals() -> None:
    """Allow-list the classes above for ``torch.load(weights_only=True)``, process-wide."""
    torch.serialization.add_safe_globals(CHECKPOINT_GLOBALS)
