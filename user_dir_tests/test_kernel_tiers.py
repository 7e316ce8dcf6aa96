"""``--fast-kernels``: ``exact`` is stock bitwise (the rest of the suite); ``fused`` gives stock's
tokens where no near-tie exists, with scores within rounding; ``int8`` runs every option and
stays close to stock; the kernels themselves against fairseq's float arithmetic."""

import logging

import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.sequence_generator import EnsembleModel
from torch import nn

from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.generator import FastSequenceGenerator
from fairseq_fastseq.model_steps import LeanSteps
from fairseq_fastseq.step import kernels, native, prepared
from fairseq_fastseq.step.cpu import HAS_AMX_INT8

from .equivalence import assert_fast_matches_stock, generate_all, load
from .naive import WithoutSampleIds, with_correct_ngram_blocking
from .test_lean_step import _drive, _fresh_model

ROUNDING = 1e-4  # scores of the fused tier on the fixtures differ by < 1e-6
FUSED = FastGeneratorConfig(on_unsupported="error", kernels="fused")
INT8 = FastGeneratorConfig(on_unsupported="error", kernels="int8")
SEARCHES = {
    "beam5_nbest3": dict(beam=5, nbest=3),
    "greedy": dict(beam=1),
    "diverse_beams": dict(beam=4, diverse_beam_groups=2, batch_size=8),
    "prefix": dict(beam=3, prefix_size=2),
}
# Sampling draws among the top-k in their order, and on the tiny fixture models the top-k
# holds near-ties, so the last bit can swap two of them: it is run, not compared.
EVERY_OPTION = {**SEARCHES, "sampling": dict(sampling=True, sampling_topk=3, beam=2), "ngram": dict(beam=4, no_repeat_ngram_size=2)}


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("model", ["transformer", "transformer_shared_8heads", "bart", "transformer_lm"])
def test_fused_gives_stocks_tokens(toy_models, model, search):
    options = dict(SEARCHES[search])
    prefix = options.pop("prefix_size", 0)
    # stock's diverse beam search indexes by dataset id: the reference indexes by batch row
    reference = WithoutSampleIds if options.get("diverse_beam_groups") else None
    assert_fast_matches_stock(toy_models[model], prefix_size=prefix, reference=reference, knobs=FUSED, atol=ROUNDING, **options)


def test_fused_blocks_ngrams_as_the_correct_blocker(toy_models):
    assert_fast_matches_stock(
        toy_models["transformer"], reference=with_correct_ngram_blocking, knobs=FUSED, atol=ROUNDING, beam=4, no_repeat_ngram_size=2
    )


@pytest.mark.parametrize("search", EVERY_OPTION)
@pytest.mark.parametrize("knobs", [FUSED, INT8], ids=["fused", "int8"])
def test_every_tier_runs_every_search_option(toy_models, knobs, search):
    """Hypotheses for every sentence (and stock's error where stock raises for a batch)."""
    toy_model = toy_models["transformer"]
    options = dict(EVERY_OPTION[search])
    prefix = options.pop("prefix_size", 0)
    models, task, batches = load((str(toy_model.checkpoint),), str(toy_model.data_bin), options.pop("batch_size", 16))
    reference = task.build_generator(models, GenerationConfig(**options))
    if options.get("diverse_beam_groups"):  # stock's diverse beam search indexes by dataset id
        reference = WithoutSampleIds(reference)
    stock = generate_all(reference, task, models, batches, prefix, 3, None)
    generator = accelerate(task.build_generator(models, GenerationConfig(**options)), knobs)
    hypotheses = generate_all(generator, task, models, batches, prefix, 3, None)
    assert len(hypotheses) == len(stock)
    for want, sentence in zip(stock, hypotheses):
        if isinstance(want, tuple) or isinstance(sentence, tuple):
            assert sentence == want
            continue
        assert len(sentence) == len(want)
        for hypothesis in sentence:
            assert hypothesis["tokens"][-1] == task.target_dictionary.eos()
            assert torch.isfinite(hypothesis["positional_scores"]).all()


def test_int8_agrees_with_stock_on_most_sentences(toy_models):
    """The fixture model's outputs with int8 linear layers; stock's on 36 of 48 when measured."""
    toy_model = toy_models["transformer"]
    models, task, batches = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    stock = generate_all(task.build_generator(models, GenerationConfig(beam=5)), task, models, batches, 0, None, None)
    int8 = generate_all(accelerate(task.build_generator(models, GenerationConfig(beam=5)), INT8), task, models, batches, 0, None, None)
    same = sum(s[0]["tokens"].tolist() == q[0]["tokens"].tolist() for s, q in zip(stock, int8))
    assert same >= 0.6 * len(stock)


@pytest.fixture
def float32_linear_layers(monkeypatch):
    """fused's linear layers in float32 (oneDNN, MKL) even on a CPU with AMX, where they are
    three bfloat16 products otherwise (``test_split_bf16.py``): for the tests of what the tier
    does around them, at float32's tolerances."""
    monkeypatch.setattr(native, "split_bf16", lambda: None)


def _attention(heads=4, dim=16, **kwargs):
    torch.manual_seed(0)
    return MultiheadAttention(dim, heads, **kwargs).eval()


def test_fused_projection_is_the_three_projections_in_one(float32_linear_layers):
    attention = _attention(self_attention=True)
    x = torch.randn(7, 16)
    with torch.no_grad():
        q, k, v = kernels.FusedKernels().self_projections(attention)(x)
        want_q, want_k, want_v = kernels.ExactKernels().self_projections(attention)(x)
    for got, want in ((q, want_q), (k, want_k), (v, want_v)):
        assert got.shape == want.shape == (7, 4, 4)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_int8_linear_is_within_its_quantization_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(10, 64)
    with torch.no_grad():
        got, want = kernels.Int8Kernels().linear(linear)(x), linear(x)
    error = (got - want).abs().max()
    assert error < 0.05 * want.abs().max() and error > 0  # quantized: close, not equal


def test_int8_feed_forward_in_applies_its_relu():
    """oneDNN's ``linear_relu_dynamic`` (the engine on CPUs with AMX) returns the product
    without the ReLU in torch 2.13: the tier applies it itself there."""
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 96), torch.randn(10, 64)
    tier = kernels.Int8Kernels()
    with torch.no_grad():
        got, plain = tier.feed_forward_in(linear, torch.nn.functional.relu)(x), tier.linear(linear)(x)
    assert (plain < 0).any() and torch.equal(got, torch.relu(plain))


@pytest.mark.parametrize("engine", [None, "onednn", "fbgemm"])
def test_int8_weights_are_packed_for_their_engine_and_the_global_choice_kept(monkeypatch, engine):
    seen, pack = [], torch.ops.quantized.linear_prepack
    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", lambda *args: seen.append(torch.backends.quantized.engine) or pack(*args))
    before = torch.backends.quantized.engine
    prepared.int8_packed(torch.randn(8, 16), torch.randn(8), engine)
    assert seen == [engine or before] and torch.backends.quantized.engine == before


def test_int8_runs_onednn_where_the_cpu_has_amx():
    assert prepared.INT8_ENGINE == ("onednn" if HAS_AMX_INT8 else None)


@pytest.mark.parametrize("name", ["transformer", "bart"])
def test_grouped_encoder_attention_is_per_beam_attention_up_to_rounding(toy_models, name, float32_linear_layers):
    model, task, batches = _fresh_model(toy_models[name])
    dictionary = task.target_dictionary
    args = (batches[0], 3, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        exact = _drive(LeanSteps(EnsembleModel([model]), 3, 15, True, 1.0, kernels.ExactKernels()), *args, seed=2)
        fused = _drive(LeanSteps(EnsembleModel([model]), 3, 15, True, 1.0, kernels.FusedKernels()), *args, seed=2)
    for (want, want_attention), (got, got_attention) in zip(exact, fused):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_attention, want_attention, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(native.compiled() is None, reason="the native kernels could not be built here")
def test_grouped_encoder_attention_with_its_weights_asked_for_stays_in_cpp(toy_models, monkeypatch):
    """A caller that reads the attention (``--print-alignment``, the hub) keeps the C++ kernel,
    which averages the weights over heads itself (their values: the test above)."""
    model, task, batches = _fresh_model(toy_models["transformer"])
    dictionary = task.target_dictionary

    def no_bmm(*args, **kwargs):
        raise AssertionError("the encoder attention fell back to bmm")

    monkeypatch.setattr(torch, "bmm", no_bmm)
    with torch.no_grad():
        steps = LeanSteps(EnsembleModel([model]), 3, 15, True, 1.0, kernels.FusedKernels())
        outputs = _drive(steps, batches[0], 3, dictionary.eos(), dictionary.pad(), len(dictionary), seed=2)
    assert all(attention is not None and attention.size(0) == lprobs.size(0) for lprobs, attention in outputs)


@pytest.mark.parametrize("tier, rows_per_sentence", [(kernels.ExactKernels, 3), (kernels.FusedKernels, 1)], ids=["exact", "fused"])
def test_the_tiers_run_step_0_once_per_sentence(toy_models, tier, rows_per_sentence):
    """A sentence's beams read the same first token: the tiers that round differently decode it
    once and expand it to the beams (their values against exact's: the test above)."""
    model, task, batches = _fresh_model(toy_models["transformer"])
    dictionary = task.target_dictionary
    steps = LeanSteps(EnsembleModel([model]), 3, 15, True, 1.0, tier())
    rows_seen = []
    decoder_step = steps.decoders[0].step
    steps.decoders[0].step = lambda tokens, *args: rows_seen.append(tokens.size(0)) or decoder_step(tokens, *args)
    with torch.no_grad():
        outputs = _drive(steps, batches[0], 3, dictionary.eos(), dictionary.pad(), len(dictionary), seed=2, num_steps=3, sentences_leave=False)
    sentences = batches[0]["net_input"]["src_tokens"].size(0)
    assert rows_seen == [sentences * rows_per_sentence, sentences * 3, sentences * 3]
    assert all(lprobs.size(0) == sentences * 3 for lprobs, _ in outputs)


def test_prepared_weights_are_made_once_and_again_after_a_weight_changes(float32_linear_layers):
    attention = _attention(self_attention=True)
    tier = kernels.FusedKernels()
    tier.self_projections(attention)
    made = len(tier._prepared)  # the fused projection, and its prepacked copy
    tier.self_projections(attention)
    assert len(tier._prepared) == made
    with torch.no_grad():
        attention.k_proj.weight.mul_(2)  # bumps the parameter's version
    x = torch.randn(3, 16)
    with torch.no_grad():
        _, k, _ = tier.self_projections(attention)(x)
        torch.testing.assert_close(k, attention.k_proj(x).view(3, 4, 4), atol=1e-6, rtol=1e-5)
    assert len(tier._prepared) == 2 * made


@pytest.mark.parametrize("tier, said", [("fused", "kernels: fused (outputs can differ from stock's"), ("int8", "kernels: int8 (outputs can differ")])
def test_a_tier_that_rounds_differently_says_so(toy_models, caplog, tier, said):
    toy_model = toy_models["transformer"]
    models, task, _ = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        generator = accelerate(task.build_generator(models, GenerationConfig(beam=2)), FastGeneratorConfig(kernels=tier))
    assert said in caplog.text and generator.kernels.name == tier


@pytest.mark.parametrize("model", [nn.Linear(2, 2).to("meta"), nn.Linear(2, 2).half()], ids=["off_the_cpu", "half_precision"])
def test_int8_without_a_float32_cpu_model_runs_fused_and_says_so(caplog, model):
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq"):
        assert kernels.kernel_tier("int8", [model]).name == "fused"
    assert "kernels: fused instead of int8 (its int8 kernels take a float32 model on the CPU only)" in caplog.text


def test_a_model_outside_the_lean_step_keeps_exact_kernels_and_says_so(toy_models, caplog):
    toy_model = toy_models["lstm"]
    models, task, _ = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq"):
        generator = accelerate(task.build_generator(models, GenerationConfig(beam=2)), FastGeneratorConfig(kernels="fused"))
    assert isinstance(generator, FastSequenceGenerator) and generator.kernels.name == "exact"
    assert "kernels: exact (--fast-kernels fused needs the lean decoder step)" in caplog.text


def test_command_line_and_hydra_select_the_tier(toy_models):
    from .test_hydra import assert_flag_and_override_give_stocks_tokens

    log = assert_flag_and_override_give_stocks_tokens(toy_models["transformer"], ["--fast-kernels", "fused"], "kernels=fused")
    assert "kernels: fused (outputs can differ from stock's" in log


# rows -> whether oneDNN's prepacked kernel takes a (rows x 64) @ (64 x 512) product, on an Intel
# CPU and on another vendor's (where MKL's generic path was slower at every size with at least
# ~0.5M multiply-adds: BENCHMARKS.md, "Kernel tiers").
PREPACKED_ROWS = {"GenuineIntel": {1: False, 64: True, 400: False}, "AuthenticAMD": {1: False, 64: True, 400: True}}


@pytest.mark.parametrize("vendor", sorted(PREPACKED_ROWS))
@pytest.mark.parametrize("rows", [1, 64, 400])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_fused_linear_layers_are_float_linear_layers_up_to_rounding(rows, activation, vendor, monkeypatch, float32_linear_layers):
    monkeypatch.setattr(kernels, "CPU_VENDOR", vendor)
    torch.manual_seed(0)
    linear = nn.Linear(64, 512)
    x = torch.randn(rows, 64)
    tier = kernels.FusedKernels()
    assert kernels.prepacked_is_faster(rows, 64, 512) == PREPACKED_ROWS[vendor][rows]
    with torch.no_grad():
        got = tier.feed_forward_in(linear, torch.nn.functional.relu)(x) if activation == "relu" else tier.linear(linear)(x)
        want = torch.relu(linear(x)) if activation == "relu" else linear(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
