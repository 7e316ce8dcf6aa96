"""Clear errors: a checkpoint that does not fit the data-bin, a batch too big for memory,
exclusive search options, a source longer than the model accepts."""

import subprocess
import sys
import time

import pytest

from fairseq_fastseq.errors import CheckpointMismatchError, CheckpointNotFoundError, GenerationOutOfMemoryError
from testsupport import toy

from .cli import fairseq, generate_results, one_thread_environment, with_plugin
from .conftest import REPO

SELECTIONS = {"pipeline": ["--task", "translation_fast"], "fast-generator": ["--generator", "fast"]}


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_checkpoint_of_other_dictionaries_names_the_problem(toy_models, selection):
    model, other = toy_models["transformer"], toy_models["transformer_sentencepiece"]
    run = fairseq("generate", [other.data_bin, "--path", model.checkpoint, "--cpu", *with_plugin(*SELECTIONS[selection])])
    assert run.returncode != 0
    assert CheckpointMismatchError.__name__ in run.stderr
    assert f"does not match the dictionaries of data-bin {other.data_bin}" in run.stderr
    assert "--srcdict/--tgtdict" in run.stderr


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_missing_checkpoint_names_the_flag(toy_models, tmp_path, selection):
    model = toy_models["transformer"]
    missing = f"{model.checkpoint}:{tmp_path / 'nowhere.pt'}"
    run = fairseq("generate", [model.data_bin, "--path", missing, "--cpu", *with_plugin(*SELECTIONS[selection])])
    assert run.returncode != 0
    assert CheckpointNotFoundError.__name__ in run.stderr
    assert f"Model file not found: {tmp_path / 'nowhere.pt'}. Check --path" in run.stderr


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_batch_too_big_for_memory_names_the_flags(toy_models, selection):
    model = toy_models["transformer"]
    args = [model.data_bin, "--path", model.checkpoint, "--cpu", "--gen-subset", "train", "--beam", "30"]
    args += ["--batch-size", "3000", "--max-tokens", "10000000", *with_plugin(*SELECTIONS[selection])]
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "user_dir_tests.memory_limited", "600", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=one_thread_environment(),
    )  # fmt: skip
    assert time.monotonic() - started < 120
    assert run.returncode != 0
    assert GenerationOutOfMemoryError.__name__ in run.stderr, run.stderr[-3000:]
    assert "lower --max-tokens or --batch-size" in run.stderr


def test_exclusive_search_options_are_named(toy_models):
    model = toy_models["transformer"]
    args = [model.data_bin, "--path", model.checkpoint, "--cpu", "--beam", "4", "--nbest", "4"]
    run = fairseq("generate", [*args, "--sampling", "--diverse-beam-groups", "2", *with_plugin("--generator", "fast")])
    assert run.returncode != 0
    assert "This run sets --sampling, --diverse-beam-groups; keep one of them" in run.stderr


def test_source_longer_than_max_positions_keeps_fairseqs_behaviour(toy_models):
    """fairseq stops and names --skip-invalid-size-inputs-valid-test; with it, the long line is skipped."""
    model = toy_models["transformer"]
    too_short = [model.data_bin, "--path", model.checkpoint, "--cpu", "--max-source-positions", "30"]
    run = fairseq("generate", [*too_short, *with_plugin("--task", "translation_fast", "--generator", "fast")])
    assert run.returncode != 0
    assert "skip this example with --skip-invalid-size-inputs-valid-test" in run.stderr
    # --required-batch-size-multiple 1: stock would also drop a last batch (see test_pipeline.py)
    skip = [*too_short[4:], "--skip-invalid-size-inputs-valid-test", "--required-batch-size-multiple", "1"]
    stock = generate_results(model, *skip)
    fast = generate_results(model, *skip, *with_plugin("--task", "translation_fast", "--generator", "fast"))
    assert fast == stock
    sources = [line.split("\t")[0] for line in stock if line.startswith("S-")]
    assert "S-1" not in sources and len(sources) < toy.SPLIT_SIZES["test"]  # id 1 is the 40-word line
