"""Peak resident memory (RSS) of this process during a piece of work.

Linux keeps a resettable high-water mark: writing ``5`` to ``/proc/self/clear_refs`` resets
``VmHWM`` in ``/proc/self/status`` to the current RSS, so each generator's run gets its own
peak in one process, with no sampling thread."""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"


def _status_mib(field: str) -> Optional[float]:
    try:
        with open(STATUS) as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


@dataclass
class RssPeak:
    """The peak RSS (MiB) reached inside a block and how far it rose above the RSS at the
    block's start; None where the high-water mark cannot be reset (not Linux, not permitted)."""

    mib: Optional[float] = None
    growth_mib: Optional[float] = None


def highest(peaks: Sequence[RssPeak]) -> RssPeak:
    """The largest peak and growth of several runs (None if any run could not measure)."""
    if not peaks or any(peak.mib is None for peak in peaks):
        return RssPeak()
    return RssPeak(max(peak.mib for peak in peaks), max(peak.growth_mib for peak in peaks))


@contextmanager
def peak_rss() -> Iterator[RssPeak]:
    """Yields an ``RssPeak`` that is filled in when the block ends."""
    peak = RssPeak()
    try:
        with open(CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
        start = _status_mib("VmRSS")
    except OSError:
        start = None
    try:
        yield peak
    finally:
        high = _status_mib("VmHWM") if start is not None else None
        if high is not None:
            peak.mib, peak.growth_mib = high, high - start
