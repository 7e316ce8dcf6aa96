"""torchrun: sharded generation with one merged output, identical to a single process; the
picklable translator for other engines."""

import logging
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fairseq import options
from fairseq.models.transformer import TransformerModel
from fairseq_cli import generate

from fairseq_fastseq.distributed import UnshardedRunError
from fairseq_fastseq.library import FastGenerator

from .cli import BIN_DIR, fairseq, tool_environment, with_plugin

PIPELINE = with_plugin("--task", "translation_fast", "--generator", "fast")


def torchrun(*args, processes=2) -> subprocess.Popen:
    command = [str(BIN_DIR / "torchrun"), "--standalone", f"--nproc-per-node={processes}", str(BIN_DIR / "fairseq-generate")]
    args = [str(arg) for arg in args]
    return subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_environment(args),
        start_new_session=True,
    )  # fmt: skip


def test_two_ranks_write_what_one_process_writes(toy_models, tmp_path):
    model = toy_models["transformer"]
    common = [model.data_bin, "--path", model.checkpoint, "--cpu", "--beam", "4", "--batch-size", "8", "--nbest", "2"]
    process = torchrun(*common, "--results-path", tmp_path / "two", *PIPELINE)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "rank 1 of 2 generates batches 1, 1 + 2, ..." in stderr
    single = fairseq("generate", [*common, "--results-path", tmp_path / "stock"])
    assert single.returncode == 0, single.stderr[-3000:]
    two = (tmp_path / "two" / "generate-test.txt").read_text()
    assert two == (tmp_path / "stock" / "generate-test.txt").read_text()
    assert two.count("\nH-") >= 2 * 48 - 1 and "Generate test with beam=4" in two


def test_fast_generator_under_torchrun_with_a_task_that_does_not_shard_stops_before_loading(
    toy_models, tmp_path, monkeypatch
):
    """Stock's generate loop under torchrun: every rank would write the whole output."""
    model = toy_models["transformer"]
    missing = tmp_path / "not-loaded.pt"  # stopping before the load is what makes it quick
    argv = [str(model.data_bin), "--path", str(missing), "--cpu", "--task", "translation"]
    args = options.parse_args_and_arch(options.get_generation_parser(), [*argv, *with_plugin("--generator", "fast")])
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for each rank
    with pytest.raises(UnshardedRunError, match="--task translation runs under torchrun .* Use --task translation_fast"):
        generate.main(args)


def _rank_process(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        parent_pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if parent_pid == parent and f"RANK={rank}".encode() in environ:
            return pid
    raise LookupError(f"no rank {rank} under pid {parent}")


def test_a_killed_rank_ends_the_run_with_an_error_naming_it(toy_models, tmp_path):
    model = toy_models["transformer"]
    slow = ["--gen-subset", "train", "--batch-size", "1", "--beam", "8"]  # 3,000 sentences: minutes
    process = torchrun(model.data_bin, "--path", model.checkpoint, "--cpu", *slow, "--results-path", tmp_path, *PIPELINE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "generate-train.txt.incomplete").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(3)  # both ranks are generating, their post-processing workers started
    os.kill(_rank_process(process.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = process.communicate(timeout=120)  # returns once no process holds its pipes
    assert time.monotonic() - killed < 60
    assert process.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in stderr and "exitcode  : -9" in stderr, stderr[-3000:]
    assert not (tmp_path / "generate-train.txt").exists()


def test_library_translator_pickles_and_matches_the_stock_hub(toy_models, caplog):
    model = toy_models["transformer"]
    translator = FastGenerator.from_checkpoint(model.checkpoint, model.data_bin, beam=5)
    sources = (model.data_bin.parent / "corpus" / "test.src").read_text().splitlines()[1:7]
    shipped = pickle.loads(pickle.dumps(translator))  # as an engine ships it to a worker
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        translations = shipped.generate({f"id{i}": source for i, source in enumerate(sources)})
    assert "generator: fast (FastSequenceGenerator)" in caplog.text
    stock_hub = TransformerModel.from_pretrained(
        str(model.checkpoint.parent), checkpoint_file=model.checkpoint.name, data_name_or_path=str(model.data_bin)
    )
    assert translations == {f"id{i}": text for i, text in enumerate(stock_hub.translate(sources, beam=5))}
    assert pickle.loads(pickle.dumps(shipped))._hub is None  # the loaded model never travels
    assert shipped.generate(sources[:2]) == {0: translations["id0"], 1: translations["id1"]}
