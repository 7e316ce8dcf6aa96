"""Every command of the README runs as written, from the repository root, in a shell that
ran the install block (``bash install.sh``, ``source .venv/bin/activate``).

The commands run in a copy of the checkout (links to its files) whose bundled Bible model
has a test split of its first few verses, so that each one takes seconds; everything else
is the checkout's. ``fairseq-fastseq-generate`` is the console script that ``install.sh``
installed into ``.venv``, as a user's is.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from benchmarks.bible import first_verses_data_bin

from .cli import one_thread_environment
from .conftest import REPO

# A multiple of 8: fairseq 0.12's batching drops a last batch of another size (README,
# "fairseq-generate skips sentences"), which would be all of them.
VERSES = 8
FENCED = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Lines of the install block that the test does not run: the install this test environment
# comes from (CI runs it on a fresh clone), and the test suite itself.
NOT_RUN = ("bash install.sh", "-m pytest")


def readme_blocks() -> Dict[str, str]:
    """The README's fenced bash and python blocks, by ``line<N>-<language>``; a python block
    becomes the bash that runs it with the environment's python."""
    text = (REPO / "README.md").read_text()
    blocks = {}
    for found in FENCED.finditer(text):
        line = text.count("\n", 0, found.start()) + 1
        code = found[2] if found[1] == "bash" else f"python - <<'README_PYTHON'\n{found[2]}README_PYTHON\n"
        blocks[f"line{line}-{found[1]}"] = code
    return blocks


def install_block(blocks: Dict[str, str]) -> str:
    (name,) = [name for name, code in blocks.items() if "bash install.sh" in code]
    return name


def setup_lines(blocks: Dict[str, str]) -> List[str]:
    """What a user's shell has run once the install block is done, less ``NOT_RUN``."""
    lines = blocks[install_block(blocks)].splitlines()
    return [line for line in lines if line.strip() and not any(skipped in line for skipped in NOT_RUN)]


BLOCKS = readme_blocks()
CASES = [name for name in BLOCKS if name != install_block(BLOCKS)]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in ("examples", ".venv", ".git"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the environment install.sh made
    model, data = root / "examples" / "bible" / "model", root / "examples" / "bible" / "data"
    model.mkdir(parents=True)
    data.mkdir()
    for name in ("model.pt", "spm.model"):
        (model / name).symlink_to(REPO / "examples" / "bible" / "model" / name)
    for path in (REPO / "examples" / "bible" / "data").glob("test.*"):
        (data / path.name).symlink_to(path)
    verses = first_verses_data_bin(VERSES, tmp_path_factory.mktemp("verses"))
    for path in verses.iterdir():
        if path.name.startswith(("dict.", "test.")):
            shutil.copy(path, model / path.name)
    return root


def test_the_readme_has_commands_to_run():
    assert [line.split("#")[0].strip() for line in setup_lines(BLOCKS)] == ["source .venv/bin/activate"]
    assert len(CASES) >= 6


@pytest.mark.parametrize("name", CASES)
def test_readme_command_runs_as_written(checkout, name):
    # -e: stop at the first failing command (no pipefail: `zcat ... | head` ends zcat early)
    script = "\n".join(["set -eu", *setup_lines(BLOCKS), BLOCKS[name]])
    run = subprocess.run(
        ["bash", "-c", script], cwd=checkout, capture_output=True, text=True, timeout=300, env=one_thread_environment()
    )
    assert run.returncode == 0, f"{BLOCKS[name]}\n{run.stderr[-3000:]}"
    if "fairseq-generate" in BLOCKS[name] or "fairseq-interactive" in BLOCKS[name]:
        assert re.search(r"^D-\d", run.stdout + _results(checkout), re.MULTILINE), run.stdout[-2000:]
    if "sentencepiece" in BLOCKS[name] and "python" in name:
        assert "In the beginning God created" in run.stdout and "▁" not in run.stdout  # text, not pieces


def _results(checkout: Path) -> str:
    """What the commands wrote with --results-path (the torchrun example writes to out/)."""
    return "".join(path.read_text() for path in (checkout / "out").glob("generate-*.txt"))
