"""C++ kernels: the self-attention of the kernel tiers that round differently (``fused``,
``int8``; ``attention.cpp``), ``fused``'s linear layers as three bfloat16 products (for CPUs
with AMX; ``split_bf16.cpp``), and the linear layers and attention products of ``exact`` in
MKL's and ATen's own order of operations (``exact_gemm.cpp``, ``exact_attention.cpp``, for
CPUs with AVX-512).

Compiled once per machine and source by ``torch.utils.cpp_extension`` (g++ and ninja) into
PyTorch's extension cache; ``install.sh`` builds them ahead (``python -m
fairseq_fastseq.step.native``), so a search only loads them. Where one cannot be built, its
users run PyTorch's operators instead (``bmm`` for the tiers' attention, MKL's ``addmm`` for
``exact``, oneDNN's and MKL's float32 linear layers for ``fused``) and one log line says why.
Figures: ``BENCHMARKS.md`` ("Native attention and the int8 output projection in row
chunks", "the tiers' attention with sums in registers and its own softmax", "exact's linear
layers in MKL's order", "exact's attention products in bmm's order", "The fused tier's
linear layers on AMX").
"""

import functools
import hashlib
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Sequence

from ..cpu import HAS_AMX_BF16, HAS_AVX512

logger = logging.getLogger(__name__)

# at::parallel_for splits a kernel over torch's threads only when compiled with OpenMP (without
# it, silently one thread); linked to the libgomp torch itself loaded (the same soname), so
# torch's thread count and pool are the kernels' too. For exact's kernels, whose chunks are
# sized by work; the tiers' attention (fine-grained chunks) stays on the calling thread.
OPENMP = ["-fopenmp"]

SOURCE = Path(__file__).with_name("attention.cpp")
EXTENSION = "fairseq_fastseq_attention"
# Sums may be reassociated (vectorized reductions); no other fast-math (the masked scores are -inf).
FLAGS = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

EXACT_GEMM_SOURCE = Path(__file__).with_name("exact_gemm.cpp")
EXACT_GEMM_EXTENSION = "fairseq_fastseq_exact_gemm"
# No fast-math of any kind: each multiply-add and add is one rounding, in the order written.
EXACT_GEMM_FLAGS = ["-O3", "-mavx512f", "-mfma", *OPENMP]
EXACT_ATTENTION_SOURCE = Path(__file__).with_name("exact_attention.cpp")
EXACT_ATTENTION_EXTENSION = "fairseq_fastseq_exact_attention"
# Multiplies and adds never fused into one rounding: bmm's kernels round each product.
EXACT_ATTENTION_FLAGS = ["-O3", "-mavx512f", "-ffp-contract=off", *OPENMP]
EXACT_LAYER_SOURCE = Path(__file__).with_name("exact_layer.cpp")
EXACT_LAYER_EXTENSION = "fairseq_fastseq_exact_layer"
# It includes both kernels' files: each keeps its own order of operations (intrinsics for
# every fused multiply-add), nothing else fused.
EXACT_LAYER_FLAGS = ["-O3", "-mavx512f", "-mfma", "-ffp-contract=off", *OPENMP]
BEAM_TOP_K_SOURCE = Path(__file__).with_name("beam_top_k.cpp")
BEAM_TOP_K_EXTENSION = "fairseq_fastseq_beam_top_k"
# Each sum one rounding, as ATen's add makes it.
BEAM_TOP_K_FLAGS = ["-O3", "-mavx512f", "-ffp-contract=off", *OPENMP]
SPLIT_BF16_SOURCE = Path(__file__).with_name("split_bf16.cpp")
SPLIT_BF16_EXTENSION = "fairseq_fastseq_split_bf16"
# The tile products' sums are AMX's; nothing else fused or reassociated.
SPLIT_BF16_FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-ffp-contract=off", *OPENMP]
# PyTorch's build lock is a bare file: a build killed while compiling (a timeout, Ctrl-C at
# the wrong moment) leaves it, and every later load waits on it forever. A build takes about
# a minute; a lock older than this is taken for such a leftover and removed.
STALE_LOCK_SECONDS = 600


def _load(extension: str, source: Path, flags: List[str], what: str, instead: str, includes: Sequence[Path] = ()) -> Optional[ModuleType]:
    """The compiled extension (built on first use where the cache lacks it), or None with a
    log line naming ``what`` is missing, why, and what runs ``instead``. PyTorch rebuilds
    when a source changes, not a file it ``includes``: their digest goes into the flags."""
    if includes:
        digest = hashlib.sha1(b"".join(path.read_bytes() for path in includes)).hexdigest()[:12]
        flags = [*flags, f"-DFASTSEQ_INCLUDED_SOURCES={digest}"]
    # One build per copy of the sources: PyTorch's build file names their path, so a checkout
    # and an installed copy sharing one build directory would rebuild it each time the other
    # loaded it (about a minute each). The path is the resolved one, for the name and for the
    # build file alike: a copy reached through a symlink (a linked checkout, a ``--user-dir``
    # through a link) is the same copy, not a rebuild of all five kernels.
    source = source.resolve()
    name = f"{extension}_{hashlib.sha1(str(source.parent).encode()).hexdigest()[:8]}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build = Path(_get_build_directory(name, False))
        _remove_stale_lock(build / "lock")
        if _needs_build(build / f"{name}.so", [source, *includes]):
            logger.info("kernels: compiling the native kernels for this machine (once, about a minute)")
        return load(name, [str(source)], extra_cflags=flags, extra_ldflags=[f for f in flags if f in OPENMP], verbose=False)
    except Exception as error:  # no compiler, no ninja, no Python headers, a failed build
        logger.warning(
            "kernels: the native %s is unavailable (%s: %s); %s. Install g++ and ninja and run "
            "'python -m fairseq_fastseq.step.native' to build it.",
            what, type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "no message", instead,
        )  # fmt: skip
        return None


def _needs_build(library: Path, sources: Sequence[Path]) -> bool:
    """Whether PyTorch will compile: no library yet, or a source newer than it (ninja goes by
    modification times: a reinstalled package's files are newer than the library built from
    the same text before)."""
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(path.stat().st_mtime > built for path in sources)


def _remove_stale_lock(lock: Path) -> None:
    """Remove a build lock left by a killed build (older than ``STALE_LOCK_SECONDS``), saying so."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("kernels: removing %s, a build lock left %d minutes ago by a build that did not finish", lock, age // 60)
        lock.unlink(missing_ok=True)


@functools.lru_cache(maxsize=None)
def compiled() -> Optional[ModuleType]:
    """The tiers' attention kernels, or None (they run ``bmm`` then)."""
    instead = "the kernel tiers run it through bmm instead (slower, outputs as before)"
    return _load(EXTENSION, SOURCE, FLAGS, "self-attention kernel", instead)


@functools.lru_cache(maxsize=None)
def exact_gemm() -> Optional[ModuleType]:
    """``exact``'s linear-layer kernel, or None (MKL's ``addmm`` then): on CPUs without AVX-512
    it is not built at all."""
    if not HAS_AVX512:
        return None
    instead = "exact runs MKL's addmm instead (slower, the same bits)"
    return _load(EXACT_GEMM_EXTENSION, EXACT_GEMM_SOURCE, EXACT_GEMM_FLAGS, "exact linear kernel", instead)


@functools.lru_cache(maxsize=None)
def exact_attention() -> Optional[ModuleType]:
    """``exact``'s attention products, or None (``bmm`` then): not built without AVX-512."""
    if not HAS_AVX512:
        return None
    instead = "exact runs bmm instead (slower, the same bits)"
    return _load(EXACT_ATTENTION_EXTENSION, EXACT_ATTENTION_SOURCE, EXACT_ATTENTION_FLAGS, "exact attention kernel", instead)


@functools.lru_cache(maxsize=None)
def exact_layer() -> Optional[ModuleType]:
    """``exact``'s decoder layers stepped in one call (both kernels inside), or None (the Python
    step then): not built without AVX-512."""
    if not HAS_AVX512:
        return None
    instead = "exact steps each layer from Python instead (slower, the same bits)"
    includes = (EXACT_GEMM_SOURCE, EXACT_ATTENTION_SOURCE)
    return _load(EXACT_LAYER_EXTENSION, EXACT_LAYER_SOURCE, EXACT_LAYER_FLAGS, "exact layer step", instead, includes)


@functools.lru_cache(maxsize=None)
def beam_top_k() -> Optional[ModuleType]:
    """A beam step's candidates in one pass (``beam_step.py``), or None (the add and
    ``torch.topk`` then): not built without AVX-512."""
    if not HAS_AVX512:
        return None
    instead = "beam search adds the scores and takes torch.topk instead (slower, the same candidates)"
    return _load(BEAM_TOP_K_EXTENSION, BEAM_TOP_K_SOURCE, BEAM_TOP_K_FLAGS, "beam top-k kernel", instead)


@functools.lru_cache(maxsize=None)
def split_bf16() -> Optional[ModuleType]:
    """``fused``'s linear layers on AMX as three bfloat16 products, or None (oneDNN's and MKL's
    float32 kernels then): not built without AMX, None where Linux refuses this process AMX."""
    if not HAS_AMX_BF16:
        return None
    instead = "fused runs oneDNN's and MKL's float32 linear layers instead (slower)"
    kernels = _load(SPLIT_BF16_EXTENSION, SPLIT_BF16_SOURCE, SPLIT_BF16_FLAGS, "AMX linear kernel", instead)
    if kernels is not None and not kernels.available():
        logger.warning("kernels: Linux refused this process AMX's tile state (arch_prctl); %s.", instead)
        return None
    return kernels


def main() -> None:
    """Build (or find) the kernels; exit 1 where one that this CPU can run cannot be built."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    unsupported = "not for this CPU (no AVX-512)"
    built = {
        "attention": compiled(),
        "exact linear": exact_gemm() if HAS_AVX512 else unsupported,
        "exact attention": exact_attention() if HAS_AVX512 else unsupported,
        "exact layer step": exact_layer() if HAS_AVX512 else unsupported,
        "beam top-k": beam_top_k() if HAS_AVX512 else unsupported,
        "split bfloat16 linear": split_bf16() if HAS_AMX_BF16 else "not for this CPU (no AMX)",
    }
    if any(kernels is None for kernels in built.values()):
        raise SystemExit(1)
    for name, kernels in built.items():
        logger.info("native kernels, %s: %s", name, getattr(kernels, "__file__", kernels))


if __name__ == "__main__":
    main()
