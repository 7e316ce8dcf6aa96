"""How many post-processing workers the pipelined tasks start (``--postprocess-workers``).

A worker process turns finished batches into text while the next ones decode. That pays
only where a core is left for it: decoding on a GPU, or on the CPU with fewer intra-op
threads than the cores this process has. Where the decoder's threads take every core, the
worker takes turns with them, and each turn stalls the decoder's OpenMP barriers for far
longer than the post-processing it overlaps (the whole Bible test set on 2 cores with 2
threads: 1.2-1.8 s more per run with one worker than without, for ~0.2 s of post-processing;
BENCHMARKS.md, "Post-processing workers on a busy CPU"). So ``auto`` (the default) starts one
worker where a core is free for it and none elsewhere; ``N`` starts N.
"""

import os
from typing import Optional, Tuple

import torch

from .threads import AUTO, parse_auto_count, usable_cpus


def parse_workers(value: object) -> Optional[int]:
    """``None`` for ``auto``, else the number of workers ``value`` names (0 or more)."""
    count = "a number of workers (0 post-processes on the main process)"
    return parse_auto_count(value, 0, "--postprocess-workers (task.postprocess_workers)", count)


def postprocess_workers(setting: object, on_gpu: bool, cores: Optional[int] = None, threads: Optional[int] = None) -> Tuple[int, str]:
    """The workers to start for ``setting`` and why. ``cores``: those of this process's share
    of the machine (default: the CPUs it may run on, divided among torchrun's ranks on this
    machine); ``threads``: the decoder's intra-op threads (default: torch's count now, after
    the generator chose them)."""
    chosen = parse_workers(setting)
    if chosen is not None:
        return chosen, f"--postprocess-workers {chosen}"
    if on_gpu:
        return 1, "auto: the decoder runs on the GPU"
    if cores is None:
        cores = max(1, len(list(usable_cpus())) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    threads = torch.get_num_threads() if threads is None else threads
    if threads < cores:
        return 1, f"auto: the decoder's {threads} thread(s) leave a core of {cores} free"
    return 0, (
        f"auto: the decoder's {threads} thread(s) use all {cores} core(s); a worker would stall them "
        "(--postprocess-workers 1 overlaps anyway)"
    )
