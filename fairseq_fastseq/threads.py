"""How many intra-op threads the fast generator runs with (``--fast-threads``, ``fastseq.threads``).

Why: PyTorch starts one OpenMP thread per core, and each parallel region ends in a barrier
where those threads wait for each other. When another process keeps the cores busy, one of
them is always descheduled, and everybody waits: next to another OpenMP job,
``fairseq-generate`` with torch's default threads takes many times as long as with one
thread (``BENCHMARKS.md``, "Busy machine"). So with ``auto`` (the default) the generator
counts the cores that are free when it is built, from two reads of ``/proc/stat`` 0.2 s
apart over the cores this process may run on (``os.sched_getaffinity``), and runs with
that many threads: never more than torch's default, never fewer than one. ``N`` runs with
N threads.

The choice is the user's where they made one, and then ``auto`` leaves torch alone: an
``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment (torch reads it at start; so
does ``torchrun``, which sets ``OMP_NUM_THREADS=1``), or a ``torch.set_num_threads`` made
after the plugin was imported (torch's count then differs from the one recorded at
import, or from the one this module set last). A ``torch.set_num_threads`` made before the import
cannot be told apart from torch's default: set ``OMP_NUM_THREADS`` or ``--fast-threads N``
instead.

The decision is made once per process and logged at INFO; later generators (the hub
interface builds one per call) reuse it. The count is process-wide (``torch.set_num_threads``).

The thread count is part of the arithmetic: the BLAS kernels split their sums by thread,
so runs with other thread counts can differ in the last bits of the scores (stock's too).
Fast's output is bitwise stock's for the same thread count; to compare the two, pin it
(``OMP_NUM_THREADS=N`` for both runs).
"""

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

AUTO = "auto"
ENVIRONMENT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SAMPLE_SECONDS = 0.2
# A core counts as free from 75% idle on: a neighbour that takes a quarter of a core
# stalls a barrier now and then, not every one.
FREE_SHARE = 0.75

_TORCH_DEFAULT = torch.get_num_threads()  # at plugin import: torch's default, or the user's


@dataclass
class _State:
    auto: Optional[int] = None  # what auto chose (None: not decided yet)
    applied: Optional[int] = None  # what this module last set (None: nothing yet)


_state = _State()


def parse_auto_count(value: object, minimum: int, knob: str, count: str) -> Optional[int]:
    """``None`` for ``auto``, else the whole number ``value`` names, at least ``minimum``; a
    ValueError naming ``knob`` (its flag and config key) and what ``count`` it takes otherwise."""
    if str(value) == AUTO:
        return None
    try:
        number = int(str(value))
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"{knob} must be 'auto' or {count}, got {value!r}")
    return number


def parse_threads(value: str) -> Optional[int]:
    """``None`` for ``auto``, else the positive thread count ``value`` names."""
    return parse_auto_count(value, 1, "--fast-threads (fastseq.threads)", "a number of threads of at least 1")


def cpu_times(stat: str) -> Dict[int, Tuple[int, int]]:
    """``{cpu: (idle ticks, all ticks)}`` from the text of ``/proc/stat`` (idle counts iowait;
    the guest columns are already inside user time)."""
    times = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


def free_cores(before: Dict[int, Tuple[int, int]], after: Dict[int, Tuple[int, int]], cpus: Iterable[int]) -> int:
    """How many cores' worth of ``cpus`` were idle between two ``cpu_times``, counting a core
    from ``FREE_SHARE`` of one (summed over cores: a neighbour may move between them)."""
    idle_cores = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            idle, total = (now - then for now, then in zip(after[cpu], before[cpu]))
            idle_cores += idle / total if total > 0 else 0.0
    return int(idle_cores + 1 - FREE_SHARE)


def _measured_free_cores(read_stat: Callable[[], str], sleep: Callable[[float], None]) -> Optional[int]:
    try:
        before = cpu_times(read_stat())
        sleep(SAMPLE_SECONDS)
        after = cpu_times(read_stat())
    except OSError:  # no /proc (not Linux)
        return None
    return free_cores(before, after, usable_cpus())


def usable_cpus() -> Iterable[int]:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return range(os.cpu_count() or 1)


def _read_proc_stat() -> str:
    with open("/proc/stat") as stat:
        return stat.read()


def _users_choice() -> Optional[str]:
    """What the user set the thread count with, if anything."""
    for variable in ENVIRONMENT_VARIABLES:
        if os.environ.get(variable):
            return f"{variable}={os.environ[variable]}"
    now = torch.get_num_threads()
    if now != (_TORCH_DEFAULT if _state.applied is None else _state.applied):
        return f"torch.set_num_threads({now})"
    return None


def _set(threads: int) -> int:
    torch.set_num_threads(threads)
    _state.applied = threads
    return threads


def apply_threads(
    knob: str, read_stat: Callable[[], str] = _read_proc_stat, sleep: Callable[[float], None] = time.sleep
) -> int:
    """Set torch's intra-op threads for the fast generator from ``knob`` (``--fast-threads``)
    and return them. ``read_stat``/``sleep`` read the CPU times (tests pass their own)."""
    threads = parse_threads(knob)
    if threads is not None:
        logger.info("threads: %d intra-op threads (--fast-threads %d)", threads, threads)
        return _set(threads)
    users_choice = _users_choice()
    if users_choice is not None:
        logger.info("threads: %d intra-op threads, as set by %s", torch.get_num_threads(), users_choice)
        return torch.get_num_threads()
    if _state.auto is None:
        free = _measured_free_cores(read_stat, sleep)
        _state.auto = _TORCH_DEFAULT if free is None else max(1, min(_TORCH_DEFAULT, free))
        logger.info(
            "threads: %d intra-op threads (--fast-threads auto: %s of %d cores free, torch's default %d; "
            "--fast-threads N or OMP_NUM_THREADS=N to choose)",
            _state.auto, "unknown" if free is None else free, len(list(usable_cpus())), _TORCH_DEFAULT,
        )  # fmt: skip
    return _set(_state.auto)
