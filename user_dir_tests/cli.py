"""Run the real fairseq command-line tools in a subprocess, as a user would."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .conftest import PLUGIN_DIR

BIN_DIR = Path(sys.executable).parent
# The lines fairseq-generate writes for results (not its log lines).
RESULT_LINE = re.compile(r"^([STHDPAIE]-\d|Generate )")


def fairseq(
    tool: str, args: Sequence[object], timeout: int = 300, input: Optional[str] = None
) -> subprocess.CompletedProcess:
    """Run ``fairseq-<tool>`` (the installed console script) and capture its output.

    Without the plugin, stock fairseq 0.12 cannot load a checkpoint under torch >= 2.6
    unless the safe unpickler is switched off, which is what stock users do; with the
    plugin, the safe unpickler stays on.
    """
    args = [str(arg) for arg in args]
    env = tool_environment(args)
    return subprocess.run(
        [str(BIN_DIR / f"fairseq-{tool}"), *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def one_thread_environment(**more: str) -> Dict[str, str]:
    """This process's environment with one intra-op thread (OpenMP and MKL), plus ``more``."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **more)


def tool_environment(args: Sequence[str]) -> Dict[str, str]:
    """One intra-op thread; the safe unpickler switched off only for stock runs (no plugin)."""
    env = one_thread_environment()
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    if "--user-dir" not in args:
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    return env


def with_plugin(*args: str) -> List[str]:
    return ["--user-dir", str(PLUGIN_DIR), *args]


def results(output: str) -> List[str]:
    return [line for line in output.splitlines() if RESULT_LINE.match(line)]


def generate_results(toy_model, *args: str) -> List[str]:
    """fairseq-generate on a toy model's test split; its result lines (fails on error)."""
    run = fairseq(
        "generate",
        [toy_model.data_bin, "--path", toy_model.checkpoint, "--task", toy_model.task, "--cpu", *args],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return results(run.stdout)


def hypotheses_without_scores(lines: Sequence[str]) -> List[Tuple[str, str]]:
    """The H- lines of fairseq-generate's output as (id, text): for a knob whose scores differ
    from stock's in the last bits."""
    return [(line.split("\t")[0], line.split("\t")[-1]) for line in lines if line.startswith("H-")]
