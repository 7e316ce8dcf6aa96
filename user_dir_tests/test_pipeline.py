"""--task translation_fast: fairseq-generate's exact output files, post-processing overlapped."""

import os
import signal
import subprocess
import threading
import time
from typing import Tuple

import pytest
from fairseq import options
from fairseq_cli import generate

from fairseq_fastseq import formatting
from fairseq_fastseq.pipeline import INCOMPLETE_SUFFIX
from fairseq_fastseq.workers import OrderedWorkers, PostProcessingError
from testsupport import toy

from .cli import BIN_DIR, fairseq, one_thread_environment, results, with_plugin
from .conftest import PLUGIN_DIR
from .test_hydra import hydra_generate

COMMON = ["--beam", "4", "--batch-size", "8", "--cpu", "--source-lang", "src", "--target-lang", "tgt"]


def _bpe_flags(kind: str, model) -> list:
    return {"subword_nmt": ["--bpe-codes", model.bpe_model], "sentencepiece": ["--sentencepiece-model", model.bpe_model]}[kind]


# name -> (model, options shared by both runs, pipeline-only options)
CASES = {
    "subword-nmt-bpe-moses-sacrebleu": (
        "transformer_subword_nmt",
        lambda m: ["--bpe", "subword_nmt", *_bpe_flags("subword_nmt", m), "--tokenizer", "moses", "--scoring", "sacrebleu"],
        ["--postprocess-workers", "1"],
    ),
    "subword-nmt-post-process-bleu-threads": (
        "transformer_subword_nmt",
        lambda m: ["--post-process", "subword_nmt", "--scoring", "bleu"],
        ["--postprocess-backend", "thread", "--postprocess-workers", "2"],
    ),
    "sentencepiece-bpe-sacrebleu-fast-generator": (
        "transformer_sentencepiece",
        lambda m: ["--bpe", "sentencepiece", *_bpe_flags("sentencepiece", m), "--scoring", "sacrebleu"],
        ["--generator", "fast"],
    ),
    "sentencepiece-post-process-moses-bleu-inline": (
        "transformer_sentencepiece",
        lambda m: ["--post-process", "sentencepiece", "--tokenizer", "moses", "--scoring", "bleu"],
        ["--postprocess-workers", "0"],
    ),
    "nbest-alignment-token-bleu-2-processes": (
        "transformer",
        lambda m: ["--nbest", "2", "--print-alignment", "--scoring", "bleu"],
        ["--postprocess-workers", "2"],
    ),
}


def _generate(model, results_path, *args, subset="test") -> Tuple[str, str]:
    """fairseq-generate with --results-path: (the results file, stderr)."""
    run = fairseq("generate", [model.data_bin, "--path", model.checkpoint, *COMMON, "--results-path", results_path, *args])
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (results_path / f"generate-{subset}.txt{INCOMPLETE_SUFFIX}").exists()
    return (results_path / f"generate-{subset}.txt").read_text(encoding="utf-8"), run.stderr


def _generate_file(model, results_path, *args) -> str:
    return _generate(model, results_path, *args)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_output_file_is_byte_identical_to_fairseq_generate(toy_models, tmp_path, case):
    name, shared, pipeline_only = CASES[case]
    model = toy_models[name]
    stock = _generate_file(model, tmp_path / "stock", *shared(model))
    fast = _generate_file(
        model, tmp_path / "fast", *shared(model), *with_plugin("--task", "translation_fast", *pipeline_only)
    )
    assert fast == stock
    lines = stock.splitlines()
    assert lines[-1].startswith("Generate test with beam=4: ")
    assert len([line for line in lines if line.startswith("D-")]) >= toy.SPLIT_SIZES["test"]
    if model.bpe_model is not None:  # the data really is BPE-encoded, and really decoded
        assert any(marker in model.data_bin.joinpath("dict.tgt.txt").read_text() for marker in ("@@", "\u2581"))
        assert not [line for line in lines if line.startswith("D-") and ("@@" in line or "\u2581" in line)]


def test_sentences_that_fairseqs_batching_drops_are_generated_last(toy_models, tmp_path):
    """Stock fairseq 0.12 drops a last batch whose size is not a multiple of
    --required-batch-size-multiple (8): of the 100 valid sentences it writes 96."""
    model = toy_models["transformer"]
    valid = ["--gen-subset", "valid", "--batch-size", "16"]
    stock, _ = _generate(model, tmp_path / "stock", *valid, subset="valid")
    fast, log = _generate(model, tmp_path / "fast", *valid, *with_plugin("--task", "translation_fast"), subset="valid")
    assert "fairseq's batching drops the last 4 sentences" in log
    ids = lambda text: [line.split("\t")[0][2:] for line in text.splitlines() if line.startswith("S-")]  # noqa: E731
    assert len(ids(stock)) == 96 and sorted(ids(fast), key=int) == [str(i) for i in range(100)]
    stock_results = stock.splitlines()[:-1]  # all but the BLEU line
    assert fast.splitlines()[: len(stock_results)] == stock_results  # then the 4 dropped sentences


def test_hydra_override_selects_the_pipeline(toy_models, tmp_path):
    model = toy_models["transformer"]
    stock = _generate_file(model, tmp_path / "stock")
    run = hydra_generate(
        "task=translation_fast", f"task.data={model.data_bin}", f"common_eval.path={model.checkpoint}",
        "common.cpu=true", "generation.beam=4", "dataset.batch_size=8", "task.postprocess_workers=2",
        f"common_eval.results_path={tmp_path / 'hydra'}",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "hydra" / "generate-test.txt").read_text() == stock


def test_python_m_entry_point_is_routed_too(toy_models, tmp_path):
    """``python -m fairseq_cli.generate`` runs the script as __main__; the hook covers it."""
    model = toy_models["transformer"]
    args = [model.data_bin, "--path", model.checkpoint, *COMMON, *with_plugin("--task", "translation_fast")]
    run = subprocess.run(
        [str(BIN_DIR / "python"), "-m", "fairseq_cli.generate", *map(str, args), "--results-path", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=one_thread_environment(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pipeline: post-processing " in run.stderr
    assert (tmp_path / "generate-test.txt").read_text() == _generate_file(model, tmp_path / "stock")


def test_results_arrive_in_submission_order_when_workers_finish_out_of_order():
    def slow_for_early_items(item):
        time.sleep(0.05 * (5 - item))
        return item

    seen = []
    with OrderedWorkers(slow_for_early_items, workers=4, backend="thread") as workers:
        for item in range(6):
            seen.extend(workers.submit(item))
        seen.extend(workers.drain())
    assert seen == list(range(6))


# --- faults: in-process runs, so that a broken formatter reaches the forked workers --------------


def _run_in_process(model, results_path, *args):
    parser = options.get_generation_parser()
    argv = [model.data_bin, "--path", model.checkpoint, *COMMON, "--results-path", results_path]
    argv += ["--user-dir", PLUGIN_DIR, "--task", "translation_fast", *args]
    return generate.main(options.parse_args_and_arch(parser, input_args=[str(arg) for arg in argv]))


def _fail_on_second_batch(how):
    original = formatting.BatchFormatter.__call__
    calls = []

    def formatter(self, batch):
        calls.append(1)
        if len(calls) == 2:
            how()
        return original(self, batch)

    return formatter


@pytest.mark.parametrize(
    "backend, how, message",
    [
        ("process", lambda: os.kill(os.getpid(), signal.SIGKILL), "worker process died"),
        ("process", lambda: 1 / 0, "failed: ZeroDivisionError"),
        ("thread", lambda: 1 / 0, "failed: ZeroDivisionError"),
    ],
    ids=["process-killed", "process-raises", "thread-raises"],
)
def test_failing_worker_stops_the_run_and_leaves_no_complete_file(toy_models, tmp_path, monkeypatch, backend, how, message):
    monkeypatch.setattr(formatting.BatchFormatter, "__call__", _fail_on_second_batch(how))
    started = time.monotonic()
    with pytest.raises(PostProcessingError, match=message):
        _run_in_process(
            toy_models["transformer"], tmp_path, "--postprocess-workers", "1", "--postprocess-backend", backend
        )
    assert time.monotonic() - started < 60
    assert not (tmp_path / "generate-test.txt").exists()
    assert (tmp_path / f"generate-test.txt{INCOMPLETE_SUFFIX}").exists()


def _sigint_as_in_a_terminal() -> None:
    """SIGINT at its default disposition in the child. A process started in the background of
    a non-interactive shell (``pytest ... &``) ignores SIGINT, its children inherit that, and
    Python then installs no KeyboardInterrupt handler: the run would go on, as any program
    would. Seen as this test "hanging" under a backgrounded pytest (the main process still
    decoding 30 s after SIGINT, no KeyboardInterrupt in its stderr)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_promptly_and_leaves_no_complete_file(toy_models, tmp_path):
    model = toy_models["transformer"]
    args = [model.data_bin, "--path", model.checkpoint, "--cpu", "--batch-size", "1", "--beam", "8"]
    args += ["--min-len", "400", "--max-len-b", "400", "--results-path", tmp_path]  # long enough to interrupt (~40 s)
    process = subprocess.Popen(
        [str(BIN_DIR / "fairseq-generate"), *map(str, args), *with_plugin("--task", "translation_fast")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=one_thread_environment(PYTHONFAULTHANDLER="1"),  # SIGABRT then dumps every thread's stack
        preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    partial = tmp_path / f"generate-test.txt{INCOMPLETE_SUFFIX}"
    deadline = time.monotonic() + 120
    while not (partial.exists() and "H-" in partial.read_text()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    interrupted = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # Seen when SIGINT was ignored (see ``_sigint_as_in_a_terminal``); before that was
        # found, once with a DataLoader worker (started by fairseq's prefetch thread) still
        # waiting for work. Whether the main process had exited is recorded.
        main = process.poll()
        os.killpg(process.pid, signal.SIGABRT)
        state = "still running" if main is None else f"had exited with {main}; a child kept the pipes open"
        pytest.fail(f"no exit within 30 s of SIGINT (main process {state}); stacks:\n{process.communicate()[1][-20000:]}")
    assert time.monotonic() - interrupted < 30
    assert process.returncode != 0
    assert "KeyboardInterrupt" in stderr and "what was written is in" in stderr
    assert not (tmp_path / "generate-test.txt").exists()


def test_an_interrupted_run_terminates_busy_worker_processes_instead_of_waiting():
    with pytest.raises(KeyboardInterrupt):
        with OrderedWorkers(time.sleep, workers=1, backend="process") as workers:
            workers.submit(60)  # a worker busy for a minute
            time.sleep(0.5)
            interrupted = time.monotonic()
            raise KeyboardInterrupt
    assert time.monotonic() - interrupted < 10


def test_ordered_worker_threads_stop_when_the_run_does():
    before = threading.active_count()
    with pytest.raises(PostProcessingError):
        with OrderedWorkers(lambda item: 1 / item, workers=2, backend="thread") as workers:
            workers.submit(1)
            list(workers.drain())
            workers.submit(0)
            list(workers.drain())
    assert threading.active_count() == before
