"""A pool that applies one function to a stream of items and returns results in order.

The generation pipeline hands each finished batch to it so that post-processing overlaps
decoding, and reads the results back in the order the batches were generated, whatever
order the workers finish in. Processes give real parallelism for pure-Python work (BPE
removal, detokenization) on a second core; threads avoid pickling and suit runs where the
decoder releases the GIL most of the time. Zero workers runs the function inline, as
fairseq-generate does.

Faults end the run with ``PostProcessingError``: a function that raises, or a worker
process that dies (SIGKILL, out of memory), never leaves the caller waiting.
"""

import collections
import ctypes
import ctypes.util
import multiprocessing
import signal
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple

BACKENDS = ("process", "thread")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_worker_function: Optional[Callable[[Any], Any]] = None


class PostProcessingError(RuntimeError):
    """A post-processing worker failed; the run stops and its output is incomplete."""


def _start_worker(function: Callable[[Any], Any]) -> None:
    # Forked workers inherit the function (no pickling of tokenizers or dictionaries). Ctrl-C
    # reaches the whole process group: only the parent reacts, and stops the workers itself.
    # A parent killed outright (SIGKILL, OOM killer, torchrun stopping a rank) cannot stop
    # them: on Linux the kernel does, so no orphan keeps the run's pipes open.
    global _worker_function
    _worker_function = function
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers end when their queue closes
        pass


def _call_worker_function(item: Any) -> Any:
    return _worker_function(item)


def _worker_died(index: int) -> PostProcessingError:
    return PostProcessingError(
        "a post-processing worker process died (killed by a signal, or out of memory) while "
        f"batch {index} or a later one was being post-processed; the output stops before batch "
        f"{index}. Rerun; if it happens again, try --postprocess-workers 0 (post-process on the "
        "main process)."
    )


class OrderedWorkers:
    """``submit`` items, get results back in submission order."""

    def __init__(self, function: Callable[[Any], Any], workers: int, backend: str = "process") -> None:
        if workers < 0:
            raise ValueError(f"the number of post-processing workers must be 0 or more (got {workers})")
        if backend not in BACKENDS:
            raise ValueError(f"post-processing backend must be one of {BACKENDS} (got {backend!r})")
        self.function = function
        self.max_pending = 2 * workers + 2  # bounds memory held by finished batches
        self._pending: Deque[Tuple[int, Future]] = collections.deque()
        self._submitted = 0
        self._executor: Optional[Executor] = None
        if workers > 0 and backend == "process":
            self._executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(function,),
            )
        elif workers > 0:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="postprocess")

    def submit(self, item: Any) -> List[Any]:
        """Queue ``item``; return the results that are ready, oldest first (maybe none)."""
        index = self._submitted
        self._submitted += 1
        if self._executor is None:
            return [self._result(index, lambda: self.function(item))]
        call = _call_worker_function if isinstance(self._executor, ProcessPoolExecutor) else self.function
        try:
            self._pending.append((index, self._executor.submit(call, item)))
        except BrokenProcessPool as error:  # a worker died since the last batch was handed over
            raise _worker_died(index - len(self._pending)) from error
        ready = []
        while self._pending and (self._pending[0][1].done() or len(self._pending) > self.max_pending):
            index, future = self._pending.popleft()
            ready.append(self._result(index, future.result))
        return ready

    def drain(self) -> Iterator[Any]:
        """The remaining results, in order, waiting for each."""
        while self._pending:
            index, future = self._pending.popleft()
            yield self._result(index, future.result)

    def _result(self, index: int, get: Callable[[], Any]) -> Any:
        try:
            return get()
        except BrokenProcessPool as error:
            raise _worker_died(index) from error
        except Exception as error:
            raise PostProcessingError(
                f"post-processing of batch {index} failed: {type(error).__name__}: {error}"
            ) from error

    def close(self, abort: bool = False) -> None:
        """Stop the workers; queued items that have not started are dropped. With ``abort``
        (the run failed or was interrupted, so no result is wanted) worker processes are
        terminated rather than waited for: Ctrl-C never waits on a busy worker."""
        if self._executor is not None:
            # CPython's ProcessPoolExecutor has no public way to stop its processes before 3.14.
            processes = (getattr(self._executor, "_processes", None) or {}).values() if abort else ()
            for process in list(processes):
                process.terminate()  # the pool sees them die and winds down: the wait below is short
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending.clear()

    def __enter__(self) -> "OrderedWorkers":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close(abort=exc_type is not None)
