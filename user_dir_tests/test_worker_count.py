"""--postprocess-workers: 'auto' starts a worker only where the decoder leaves a core free."""

import pytest

from fairseq_fastseq import worker_count
from fairseq_fastseq.worker_count import parse_workers, postprocess_workers

from .cli import fairseq, with_plugin


@pytest.mark.parametrize("value, want", [("auto", None), ("0", 0), (2, 2), ("3", 3)])
def test_parse_workers(value, want):
    assert parse_workers(value) == want


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_a_bad_count_is_an_error_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"--postprocess-workers .*'auto' or a number of workers"):
        parse_workers(value)


def test_an_explicit_count_is_kept():
    assert postprocess_workers("0", on_gpu=True) == (0, "--postprocess-workers 0")
    assert postprocess_workers(2, on_gpu=False, cores=1, threads=1) == (2, "--postprocess-workers 2")


def test_auto_overlaps_where_a_core_is_free():
    assert postprocess_workers("auto", on_gpu=True, cores=1, threads=1)[0] == 1
    count, why = postprocess_workers("auto", on_gpu=False, cores=4, threads=2)
    assert count == 1 and "leave a core of 4 free" in why


def test_auto_post_processes_inline_where_the_decoder_takes_every_core():
    count, why = postprocess_workers("auto", on_gpu=False, cores=2, threads=2)
    assert count == 0 and "use all 2 core(s)" in why and "--postprocess-workers 1" in why


def test_auto_shares_the_cores_among_torchruns_ranks_on_the_machine(monkeypatch):
    monkeypatch.setattr(worker_count, "usable_cpus", lambda: range(4))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert postprocess_workers("auto", on_gpu=False, threads=1)[0] == 1  # 2 cores each, 1 thread
    assert postprocess_workers("auto", on_gpu=False, threads=2)[0] == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert postprocess_workers("auto", on_gpu=False, threads=1)[0] == 0


def test_a_bad_count_stops_fairseq_generate_before_it_writes(toy_models, tmp_path):
    model = toy_models["transformer"]
    args = [model.data_bin, "--path", model.checkpoint, "--cpu", "--results-path", tmp_path]
    run = fairseq("generate", [*args, *with_plugin("--task", "translation_fast", "--postprocess-workers", "many")])
    assert run.returncode != 0
    assert "--postprocess-workers (task.postprocess_workers) must be 'auto' or a number of workers" in run.stderr
    assert list(tmp_path.iterdir()) == []
