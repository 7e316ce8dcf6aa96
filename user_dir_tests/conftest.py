"""Session fixtures: tiny real fairseq models trained once per test session (see toy.py)."""

import concurrent.futures
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from filelock import FileLock
from hypothesis import HealthCheck, settings

import fairseq_fastseq  # noqa: F401  (the plugin registered, as a user's import does: safe checkpoint loading)
from testsupport import toy

# Property-based tests: seeded and bounded for CI; `pytest --slow` for a long local run.
_FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, **_FUZZ)
settings.register_profile("slow", max_examples=2000, **_FUZZ)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the long profile of the property-based tests")


def pytest_configure(config):
    settings.load_profile("slow" if config.getoption("--slow") else "ci")

# One intra-op thread in every test process (subprocess tests set OMP_NUM_THREADS=1): the
# thread count is part of the arithmetic (threads.py), so a stock and a fast run compared in
# one process must not run with different counts, whatever --fast-threads auto would pick.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "fairseq_fastseq"


# A transformer_lm on the translation models' target dictionary: the LM of shallow fusion.
FUSION_LM = "transformer_lm_fusion"


@dataclass(frozen=True)
class ToyModel:
    name: str
    checkpoint: Path
    data_bin: Path
    task: str
    bpe_model: Optional[Path] = None  # subword-nmt codes or sentencepiece model of a BPE data-bin


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> Dict[str, ToyModel]:
    """Built fresh in a temp dir; FASTSEQ_TOY_CACHE=DIR reuses a previous build (local runs).

    Under pytest-xdist (``-n 2``) the workers share one build: the first builds it under a
    file lock, the others wait for it and then reuse it (each step skips what exists).
    """
    cache = os.environ.get("FASTSEQ_TOY_CACHE")
    if cache:
        root = Path(cache)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "toy"  # the run's folder, shared by its workers
    else:
        root = tmp_path_factory.mktemp("toy")
    with FileLock(f"{root}.lock"):
        return _build_toy_models(root)


def _build_toy_models(root: Path) -> Dict[str, ToyModel]:
    corpus = root / "corpus"
    toy.write_corpus(corpus)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        mt_bin = pool.submit(toy.preprocess, corpus, root / "bin")
        lm_bin = pool.submit(toy.preprocess_language_model, corpus, root / "bin_lm")
        bpe_bins = {kind: pool.submit(toy.preprocess_bpe, corpus, root, kind) for kind in toy.BPE_KINDS}
        # The LM again, on the translation models' dictionary: the LM of shallow fusion (--lm-path).
        target_dictionary = mt_bin.result() / f"dict.{toy.TARGET_LANG}.txt"
        fusion_bin = pool.submit(toy.preprocess_language_model, corpus, root / "bin_lm_fusion", target_dictionary)
        jobs = {}  # name -> (training, task, data-bin, BPE model)

        def train(name: str, args: List[str], task: str, data_bin: Path, bpe_model: Optional[Path] = None) -> None:
            jobs[name] = (pool.submit(toy.train, data_bin, root / name, args, task), task, data_bin, bpe_model)

        for name, args in toy.TRANSLATION_MODELS.items():
            train(name, args, "translation", mt_bin.result())
        for name, args in toy.LANGUAGE_MODELS.items():
            train(name, args, "language_modeling", lm_bin.result())
        train(FUSION_LM, toy.LANGUAGE_MODELS["transformer_lm"], "language_modeling", fusion_bin.result())
        # The plain transformer again, trained on BPE-encoded text (for the pipeline's BPE tests).
        for kind, job in bpe_bins.items():
            train(f"transformer_{kind}", toy.TRANSLATION_MODELS["transformer"], "translation", *job.result())
        return {
            name: ToyModel(name=name, checkpoint=training.result(), data_bin=data_bin, task=task, bpe_model=bpe_model)
            for name, (training, task, data_bin, bpe_model) in jobs.items()
        }


@pytest.fixture
def failing_build(monkeypatch):
    """Every native build fails as without a compiler; the native loaders' caches cleared
    before and after (they remember a loaded or a failed build)."""
    import torch.utils.cpp_extension

    from fairseq_fastseq.step import native

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    loaders = (native.compiled, native.exact_gemm, native.exact_attention, native.split_bf16)
    for loader in loaders:
        loader.cache_clear()
    yield
    for loader in loaders:
        loader.cache_clear()
