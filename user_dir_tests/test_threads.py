"""--fast-threads: the intra-op thread count of the fast generator (threads.py), and that it
is applied only when the fast generator is chosen. The figures under a competing job are a
benchmark (benchmarks/busy_machine.py), not a test."""

import logging

import pytest
import torch
from fairseq import checkpoint_utils, tasks

from fairseq_fastseq import threads

from .test_config import parse_generate_args

# /proc/stat of a 2-core machine, and the same 0.2 s later: (idle, busy) ticks per core.
STAT = "cpu  {t} 0 0 {i} 0 0 0 0 0 0\ncpu0 {b0} 0 0 {i0} 0 0 0 0 0 0\ncpu1 {b1} 0 0 {i1} 0 0 0 0 0 0\nintr 1 2\n"


def stat(idle0: int, busy0: int, idle1: int, busy1: int) -> str:
    return STAT.format(t=busy0 + busy1, i=idle0 + idle1, b0=busy0, i0=idle0, b1=busy1, i1=idle1)


def readings(*texts: str):
    """A ``read_stat`` that returns ``texts`` in turn."""
    texts = iter(texts)
    return lambda: next(texts)


@pytest.fixture
def default_threads(monkeypatch):
    """A process as a user starts it: no thread variable set, torch at its default (4 here,
    whatever this machine has), no decision made yet. Restores torch's threads afterwards."""
    before = torch.get_num_threads()
    for variable in threads.ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 4)
    monkeypatch.setattr(threads, "_state", threads._State())
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_parse_threads():
    assert threads.parse_threads("auto") is None
    assert threads.parse_threads("3") == 3
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(ValueError, match=f"must be 'auto' or a number of threads of at least 1, got '{bad}'"):
            threads.parse_threads(bad)


def test_cpu_times_and_free_cores():
    before = threads.cpu_times(stat(idle0=100, busy0=100, idle1=100, busy1=100))
    assert before == {0: (100, 200), 1: (100, 200)}
    one_busy = threads.cpu_times(stat(idle0=100, busy0=120, idle1=120, busy1=100))
    assert threads.free_cores(before, one_busy, {0, 1}) == 1
    both_free = threads.cpu_times(stat(idle0=118, busy0=102, idle1=119, busy1=101))
    assert threads.free_cores(before, both_free, {0, 1}) == 2
    assert threads.free_cores(before, both_free, {1}) == 1  # only the cores this process may use
    both_busy = threads.cpu_times(stat(idle0=101, busy0=119, idle1=102, busy1=118))
    assert threads.free_cores(before, both_busy, {0, 1}) == 0


@pytest.mark.parametrize(
    "later, free, expected",
    [
        (stat(idle0=120, busy0=100, idle1=120, busy1=100), 2, 2),  # both cores free
        (stat(idle0=120, busy0=100, idle1=100, busy1=120), 1, 1),  # one busy
        (stat(idle0=100, busy0=120, idle1=100, busy1=120), 0, 1),  # both busy: one thread, not none
    ],
)
def test_auto_counts_the_free_cores(default_threads, monkeypatch, caplog, later, free, expected):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        chosen = threads.apply_threads("auto", readings(stat(100, 100, 100, 100), later), sleep=lambda seconds: None)
    assert chosen == expected == torch.get_num_threads()
    assert f"threads: {expected} intra-op threads (--fast-threads auto: {free} of 2 cores free, torch's default 4" in caplog.text
    # decided once per process: the next generator (the hub builds one per call) measures nothing
    assert threads.apply_threads("auto", read_stat=None) == expected


def test_auto_never_exceeds_torchs_default(default_threads, monkeypatch):
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 1)
    torch.set_num_threads(1)
    assert threads.apply_threads("auto", readings(stat(100, 100, 100, 100), stat(120, 100, 120, 100)), lambda s: None) == 1


@pytest.mark.parametrize("variable", threads.ENVIRONMENT_VARIABLES)
def test_auto_respects_a_thread_variable_in_the_environment(default_threads, monkeypatch, caplog, variable):
    monkeypatch.setenv(variable, "3")
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        assert threads.apply_threads("auto", read_stat=None) == 4  # torch's count, untouched
    assert f"threads: 4 intra-op threads, as set by {variable}=3" in caplog.text


def test_auto_respects_torch_set_num_threads(default_threads, caplog):
    torch.set_num_threads(3)
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        assert threads.apply_threads("auto", read_stat=None) == 3
    assert "as set by torch.set_num_threads(3)" in caplog.text


def test_auto_respects_torch_set_num_threads_after_its_own_choice(default_threads):
    chosen = threads.apply_threads("auto", readings(stat(100, 100, 100, 100), stat(100, 120, 100, 120)), lambda s: None)
    assert chosen == 1
    torch.set_num_threads(4)  # the user, back to torch's default
    assert threads.apply_threads("auto", read_stat=None) == 4


def test_a_number_wins_over_everything(default_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.apply_threads("2") == 2 == torch.get_num_threads()


def _build(toy_model, *argv):
    cfg = parse_generate_args(toy_model.data_bin, "--path", toy_model.checkpoint, *argv)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([str(toy_model.checkpoint)], task=task)
    return task.build_generator(models, cfg.generation)


def test_the_knob_reaches_the_fast_generator_and_only_it(default_threads, toy_models):
    model = toy_models["transformer"]
    _build(model, "--generator", "fast", "--fast-threads", "2")
    assert torch.get_num_threads() == 2
    torch.set_num_threads(4)
    _build(model, "--generator", "stock")
    _build(model, "--generator", "fast", "--score-reference")  # falls back to fairseq's scorer
    assert torch.get_num_threads() == 4


def test_a_bad_thread_count_names_the_flag(default_threads, toy_models):
    with pytest.raises(ValueError, match="--fast-threads .* got 'lots'"):
        _build(toy_models["transformer"], "--generator", "fast", "--fast-threads", "lots")
