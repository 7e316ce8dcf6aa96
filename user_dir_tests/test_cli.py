"""The user's one-line change: fairseq-generate --user-dir fairseq_fastseq --generator fast."""

import subprocess
import sys

import pytest

from fairseq_fastseq.config import FastGeneratorConfig, knob_names
from fairseq_fastseq.registry import GENERATOR_HELP, knob_flag

from .cli import BIN_DIR, fairseq, generate_results, one_thread_environment, results, with_plugin
from .conftest import PLUGIN_DIR


def test_help_describes_the_generator_choice_and_every_knob():
    run = fairseq("generate", with_plugin("--help"))
    assert run.returncode == 0
    text = " ".join(run.stdout.split())  # argparse wraps the help lines
    assert f"--generator {{stock,fast}} {GENERATOR_HELP}" in text
    for name in knob_names():
        description = " ".join(FastGeneratorConfig.__dataclass_fields__[name].metadata["help"].split()[:6])
        assert f"{knob_flag(name)} " in text and description in text, name


@pytest.mark.parametrize(
    "args, message",
    [
        (with_plugin("--generator", "turbo", "/x"), "argument --generator: invalid choice: 'turbo'"),
        (["/x", "--generator", "fast"], "unrecognized arguments: --generator fast"),  # no plugin
        (
            with_plugin("--fast-encoder-projection", "grouped", "/x"),
            "--fast-encoder-projection: the fast generator's knobs need --generator fast",
        ),
        (
            with_plugin("--generator", "fast", "--fast-on-unsupported", "maybe", "/x"),
            "argument --fast-on-unsupported: invalid choice: 'maybe'",
        ),
    ],
)
def test_bad_generator_flags_are_argparse_errors(args, message):
    run = fairseq("generate", args)
    assert run.returncode == 2
    assert message in run.stderr


@pytest.mark.parametrize("model", ["transformer", "bart"])
def test_fast_output_is_identical_to_stock_command(toy_models, model):
    options = ["--beam", "5", "--nbest", "3", "--batch-size", "16"]
    stock = generate_results(toy_models[model], *options)
    run = fairseq(
        "generate",
        [toy_models[model].data_bin, "--path", toy_models[model].checkpoint, "--cpu", *options]
        + with_plugin("--generator", "fast"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator: fast (FastSequenceGenerator)" in run.stderr
    assert len([line for line in stock if line.startswith("H-")]) == 3 * 48
    assert results(run.stdout) == stock


def test_print_alignment_output_is_identical(toy_models):
    options = ["--beam", "4", "--print-alignment", "hard", "--batch-size", "16"]
    stock = generate_results(toy_models["transformer"], *options)
    fast = generate_results(toy_models["transformer"], *options, *with_plugin("--generator", "fast"))
    assert any(line.startswith("A-") for line in stock)
    assert fast == stock


def _repeated_bigrams(result_lines):
    hypotheses = [line.split("\t")[2].split() for line in result_lines if line.startswith("H-")]
    return sum(len(h) - 1 - len(set(zip(h, h[1:]))) for h in hypotheses)


def test_no_repeat_ngram_blocks_on_cpu_unlike_stock(toy_models):
    """fairseq 0.12's CPU blocker bans nothing; ours blocks (README: known stock issues)."""
    options = ["--beam", "4", "--no-repeat-ngram-size", "2", "--batch-size", "16"]
    stock = generate_results(toy_models["transformer"], *options)
    fast = generate_results(toy_models["transformer"], *options, *with_plugin("--generator", "fast"))
    assert _repeated_bigrams(stock) > 0
    assert _repeated_bigrams(fast) == 0


def test_language_model_generation_through_cli(toy_models):
    options = ["--beam", "4", "--batch-size", "8", "--max-len-b", "20", "--sample-break-mode", "eos", "--tokens-per-sample", "64"]
    stock = generate_results(toy_models["transformer_lm"], *options)
    fast = generate_results(toy_models["transformer_lm"], *options, *with_plugin("--generator", "fast"))
    assert stock and fast == stock


def test_python_dash_m_entry_point_routes_too(toy_models):
    """``python -m fairseq_cli.generate`` runs the module as __main__; routing must not depend on it."""
    model = toy_models["transformer"]
    run = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.generate", model.data_bin, "--path", model.checkpoint,
         "--cpu", "--beam", "2", *with_plugin("--generator", "fast")],
        capture_output=True, text=True, timeout=300, env=one_thread_environment(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator: fast" in run.stderr
    assert results(run.stdout) == generate_results(model, "--beam", "2")


def test_results_path_file_is_identical(toy_models, tmp_path):
    model = toy_models["transformer"]
    for name, extra in [("stock", []), ("fast", with_plugin("--generator", "fast"))]:
        generate_results(model, "--beam", "3", "--results-path", tmp_path / name, *extra)
    stock = results((tmp_path / "stock" / "generate-test.txt").read_text())
    fast = results((tmp_path / "fast" / "generate-test.txt").read_text())
    assert stock and fast == stock


def test_stock_choice_keeps_stock_generator(toy_models):
    run = fairseq(
        "generate",
        [toy_models["transformer"].data_bin, "--path", toy_models["transformer"].checkpoint, "--cpu"]
        + with_plugin("--generator", "stock"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator: fast" not in run.stderr


def test_unsupported_option_falls_back_with_one_log_line(toy_models):
    model = toy_models["transformer"]
    stock = generate_results(model, "--score-reference")
    run = fairseq(
        "generate",
        [model.data_bin, "--path", model.checkpoint, "--cpu", "--score-reference"]
        + with_plugin("--generator", "fast"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fallback_lines = [line for line in run.stderr.splitlines() if "fallback for --score-reference" in line]
    assert len(fallback_lines) == 1
    assert results(run.stdout) == stock


def test_unsupported_option_with_error_knob_stops_with_clear_message(toy_models):
    model = toy_models["transformer"]
    run = fairseq(
        "generate",
        [model.data_bin, "--path", model.checkpoint, "--cpu", "--score-reference"]
        + with_plugin("--generator", "fast", "--fast-on-unsupported", "error"),
    )
    assert run.returncode != 0
    assert "--generator fast cannot handle --score-reference" in run.stderr
    assert not results(run.stdout)
