"""C++ kernels of the kernel tiers that round differently (``fused``, ``int8``): the
self-attention of one query per (row, head) over the time-major cache (``attention.cpp``).

Compiled once per machine and source by ``torch.utils.cpp_extension`` (g++ and ninja) into
PyTorch's extension cache; ``install.sh`` builds it ahead (``python -m
fairseq_fastseq.step.native``), so a search only loads it. Where it cannot be built, the
tiers run the same attention through ``bmm`` (slower, the same class of rounding) and one
log line says why. Figures: ``BENCHMARKS.md`` ("Native attention and the int8 output
projection in row chunks", "the tiers' attention with sums in registers and its own softmax").
"""

import functools
import logging
from pathlib import Path
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.cpp")
EXTENSION = "fairseq_fastseq_attention"
# Sums may be reassociated (vectorized reductions); no other fast-math (the masked scores are -inf).
FLAGS = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


@functools.lru_cache(maxsize=None)
def compiled() -> Optional[ModuleType]:
    """The compiled kernels (built on first use where the cache lacks them), or None with a
    log line naming why not."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not (Path(_get_build_directory(EXTENSION, False)) / f"{EXTENSION}.so").exists():
            logger.info("kernels: compiling the native kernels for this machine (once, about a minute)")
        return load(EXTENSION, [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as error:  # no compiler, no ninja, no Python headers, a failed build
        logger.warning(
            "kernels: the native self-attention kernel is unavailable (%s: %s); the kernel tiers run it "
            "through bmm instead (slower, outputs as before). Install g++ and ninja and run "
            "'python -m fairseq_fastseq.step.native' to build it.",
            type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "no message",
        )  # fmt: skip
        return None


def main() -> None:
    """Build (or find) the kernels; exit 1 where they cannot be built."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kernels = compiled()
    if kernels is None:
        raise SystemExit(1)
    logger.info("native kernels ready: %s", kernels.__file__)


if __name__ == "__main__":
    main()
