"""Demo: stock vs fast ``fairseq-generate`` on a small model trained here, offline.

    python -m fairseq_fastseq.demo [--workdir DIR] [--beam 5]

Trains a tiny transformer with fairseq's own tools (seconds on a CPU), runs the real
``fairseq-generate`` twice on its test set, once with ``--generator stock`` and once with
``--generator fast``, and prints how many output lines agree and how long each run took.
"""

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

from . import toy

logger = logging.getLogger("fairseq_fastseq.demo")
PLUGIN_DIR = Path(__file__).resolve().parent
RESULT_LINE = re.compile(r"^[HDP]-\d")
SPEED_LINE = re.compile(r"Translated .* in ([0-9.]+)s")


def build_model(workdir: Path) -> Tuple[Path, Path]:
    toy.write_corpus(workdir / "corpus")
    data_bin = toy.preprocess(workdir / "corpus", workdir / "data-bin")
    checkpoint = toy.train(data_bin, workdir / "transformer", toy.TRANSLATION_MODELS["transformer"], "translation")
    return data_bin, checkpoint


def generate(data_bin: Path, checkpoint: Path, generator: str, beam: int) -> Tuple[List[str], float, str]:
    """Run fairseq-generate; return its H/D/P lines, wall seconds and fairseq's speed line."""
    command = [
        str(Path(sys.executable).parent / "fairseq-generate"), str(data_bin), "--path", str(checkpoint),
        "--user-dir", str(PLUGIN_DIR), "--generator", generator, "--beam", str(beam),
        "--batch-size", "16", "--cpu",
    ]  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"fairseq-generate --generator {generator} failed:\n{run.stderr[-3000:]}")
    speed = next((line for line in run.stderr.splitlines() if SPEED_LINE.search(line)), "")
    lines = [line for line in run.stdout.splitlines() if RESULT_LINE.match(line)]
    return lines, seconds, speed


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where to build the model (default: a temp dir)")
    parser.add_argument("--beam", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)

    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        logger.info("training a tiny transformer with fairseq-train in %s ...", workdir)
        data_bin, checkpoint = build_model(workdir)
        outputs = {}
        for generator in ("stock", "fast"):
            lines, seconds, speed = generate(data_bin, checkpoint, generator, args.beam)
            outputs[generator] = lines
            logger.info("--generator %s: %.1fs wall | %s", generator, seconds, speed.split("generate:")[-1].strip())
    same = sum(a == b for a, b in zip(outputs["stock"], outputs["fast"]))
    total = max(len(outputs["stock"]), len(outputs["fast"]))
    logger.info("agreement: %d/%d H/D/P lines identical (beam %d)", same, total, args.beam)
    return 0 if same == total and total > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
