"""fairseq-fastseq-generate: Hydra configs and overrides, same output as fairseq-generate."""

import subprocess
import sys

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from .cli import BIN_DIR, generate_results, hypotheses_without_scores, one_thread_environment, results, with_plugin


def hydra_generate(*overrides, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairseq_fastseq.cli", *map(str, overrides)],
        capture_output=True, text=True, timeout=timeout, env=one_thread_environment(),
    )  # fmt: skip


def _model_keys(toy_model):
    return [f"task.data={toy_model.data_bin}", f"common_eval.path={toy_model.checkpoint}", "common.cpu=true"]


def assert_flag_and_override_give_stocks_tokens(toy_model, flag, override) -> str:
    """fairseq-generate at beam 4 with ``flag`` (e.g. ``["--fast-kernels", "fused"]``) and the
    Hydra entry point with ``override`` give stock's hypotheses (scores aside: such a knob
    rounds differently); returns the Hydra run's log."""
    stock = hypotheses_without_scores(generate_results(toy_model, "--beam", "4"))
    flags = generate_results(toy_model, "--beam", "4", "--user-dir", "fairseq_fastseq", "--generator", "fast", *flag)
    hydra = hydra_generate(*_model_keys(toy_model), "generator=fast", override, "generation.beam=4")
    assert hydra.returncode == 0, hydra.stderr[-3000:]
    assert stock and hypotheses_without_scores(flags) == stock == hypotheses_without_scores(results(hydra.stdout))
    return hydra.stderr


def test_hydra_path_writes_the_same_file_as_the_cli_path(toy_models, tmp_path):
    model = toy_models["transformer"]
    run = hydra_generate(
        *_model_keys(model), "generator=fast", "generation.beam=5", "generation.nbest=2",
        "dataset.batch_size=16", f"common_eval.results_path={tmp_path / 'hydra'}",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator: fast (FastSequenceGenerator)" in run.stderr
    generate_results(
        model, "--beam", "5", "--nbest", "2", "--batch-size", "16", "--results-path", tmp_path / "cli",
        *with_plugin("--generator", "fast"),
    )  # fmt: skip
    hydra_file = (tmp_path / "hydra" / "generate-test.txt").read_text()
    cli_file = (tmp_path / "cli" / "generate-test.txt").read_text()
    assert results(hydra_file) and results(hydra_file) == results(cli_file)


def test_default_config_is_stock_and_matches_plain_fairseq_generate(toy_models):
    model = toy_models["transformer"]
    run = hydra_generate(*_model_keys(model), "dataset.batch_size=16")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator: fast" not in run.stderr
    assert results(run.stdout) == generate_results(model, "--batch-size", "16")


@pytest.mark.parametrize(
    "preset, model, extra",
    [
        ("mt_beam5", "transformer", []),
        ("summarize_beam4_ngram3", "transformer", ["dataset.batch_size=16"]),
        ("lm_sampling", "transformer_lm", ["task.sample_break_mode=eos", "task.tokens_per_sample=64", "generation.max_len_b=10"]),
    ],
)
def test_presets_compose_and_run(toy_models, preset, model, extra):
    composed = hydra_generate(f"preset={preset}", "--cfg", "job")
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "generator: fast" in composed.stdout
    run = hydra_generate(f"preset={preset}", *_model_keys(toy_models[model]), *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(line.startswith("H-") for line in results(run.stdout))


def test_attention_group_selects_the_model_variant(toy_models):
    model = toy_models["transformer"]
    composed = hydra_generate("generator=fast", "attention=stock", "--cfg", "job")
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "self_attn_cache: stock" in composed.stdout and "encoder_projection: per_beam" in composed.stdout
    runs = [
        hydra_generate(*_model_keys(model), "generator=fast", f"attention={variant}", "generation.beam=4")
        for variant in ("fast", "stock")
    ]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    assert results(runs[0].stdout) and results(runs[0].stdout) == results(runs[1].stdout)


@pytest.mark.parametrize(
    "override, message",
    [
        ("generation.beam=five", "Value 'five' of type 'str' could not be converted to Integer"),
        ("generation.bogus=1", "Key 'bogus' not in 'GenerationConfig'"),
        ("generator=turbo", "Could not find 'generator/turbo'"),
        ("fastseq.self_attn_cache=sometimes", "Invalid value 'sometimes'"),
    ],
)
def test_bad_override_fails_with_hydras_message(override, message):
    run = hydra_generate(override, "--cfg", "job")
    assert run.returncode != 0
    assert message in run.stderr


def test_console_script_is_installed():
    run = subprocess.run(
        [str(BIN_DIR / "fairseq-fastseq-generate"), "--cfg", "job"], capture_output=True, text=True, env=one_thread_environment()
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator: stock" in run.stdout


def test_importing_the_entry_point_leaves_fairseqs_own_config_conversion_working(toy_models):
    """fairseq converts command lines with Hydra 1.1's API, which a Hydra 1.3 version base
    (set by ``hydra.main``) breaks: ``ImportError: hydra.experimental.initialize() is no
    longer experimental``."""
    import fairseq_fastseq.cli  # noqa: F401

    argv = [str(toy_models["transformer"].data_bin), *with_plugin("--generator", "fast")]
    args = options.parse_args_and_arch(options.get_generation_parser(), argv)
    assert convert_namespace_to_omegaconf(args).generator == "fast"
