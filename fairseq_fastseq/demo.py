"""Demo: translate Bible verses from Spanish with the bundled model, stock vs fast, offline.

    python -m fairseq_fastseq.demo [--verses 20] [--beam 5] [--model-dir examples/bible/model]

Runs the real ``fairseq-interactive`` twice on the first test verses of the bundled
Spanish-English model (``examples/bible``: a small transformer trained on the public-domain
Bible, test BLEU 36.75), once with ``--generator stock`` and once with ``--generator fast``,
prints a few translations next to the reference, and how many translations agree.
"""

import argparse
import gzip
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

PLUGIN_DIR = Path(__file__).resolve().parent
BIBLE = PLUGIN_DIR.parent / "examples" / "bible"
HYPOTHESIS_LINE = re.compile(r"^D-(\d+)\t[^\t]*\t(.*)$")
SHOWN = 3


def read_lines(path: Path, count: int) -> List[str]:
    """The first ``count`` lines of a text file, gzipped (``.gz``) or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return lines.read().splitlines()[:count]


def translate(model_dir: Path, sources: Path, generator: str, beam: int) -> Tuple[List[str], float]:
    """Run fairseq-interactive on ``sources``; return the detokenized translations in input order
    and the wall seconds."""
    command = [
        str(Path(sys.executable).parent / "fairseq-interactive"), str(model_dir),
        "--path", str(model_dir / "model.pt"), "--source-lang", "es", "--target-lang", "en",
        "--bpe", "sentencepiece", "--sentencepiece-model", str(model_dir / "spm.model"),
        "--beam", str(beam), "--buffer-size", "16", "--batch-size", "16", "--input", str(sources), "--cpu",
        "--user-dir", str(PLUGIN_DIR), "--generator", generator,
    ]  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"fairseq-interactive --generator {generator} failed:\n{run.stderr[-3000:]}")
    translations = {}
    for line in run.stdout.splitlines():
        found = HYPOTHESIS_LINE.match(line)
        if found:
            translations[int(found[1])] = found[2]
    return [translations[i] for i in sorted(translations)], seconds


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verses", type=int, default=20, help="how many test verses to translate")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=BIBLE / "model")
    args = parser.parse_args(argv)
    if not (args.model_dir / "model.pt").exists():
        parser.error(f"no model.pt in {args.model_dir}: run from a checkout of fairseq_fastseq, or pass --model-dir")

    sources = read_lines(BIBLE / "data" / "test.es.gz", args.verses)
    references = read_lines(BIBLE / "data" / "test.en.gz", args.verses)
    outputs = {}
    with tempfile.TemporaryDirectory() as scratch:
        source_file = Path(scratch) / "test.es"
        source_file.write_text("".join(line + "\n" for line in sources), encoding="utf-8")
        for generator in ("stock", "fast"):
            outputs[generator], seconds = translate(args.model_dir, source_file, generator, args.beam)
            print(f"fairseq-interactive --generator {generator}: {len(sources)} verses in {seconds:.1f} s", flush=True)
    for source, translation, reference in list(zip(sources, outputs["fast"], references))[:SHOWN]:
        print(f"\nes:        {source}\nen (fast): {translation}\nen (ref.): {reference}")
    same = sum(a == b for a, b in zip(outputs["stock"], outputs["fast"]))
    total = max(len(outputs["stock"]), len(outputs["fast"]))
    print(f"\nagreement: {same}/{total} translations identical, stock vs fast (beam {args.beam})")
    return 0 if same == total == len(sources) else 1


if __name__ == "__main__":
    sys.exit(main())
