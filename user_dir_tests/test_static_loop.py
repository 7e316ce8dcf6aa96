"""The static-shape search loop of ``--fast-cuda-graphs`` on CPU (``static_loop.py``,
``graphs.py``, ``step/static.py``): stock's tokens with finished sentences masked instead of
dropped, a host sync every few steps instead of every step, and the decoder step run as it
is captured on a GPU (warm-up, then the step); its fallbacks and their log lines."""

import contextlib
import logging

import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig
from fairseq.modules.layer_drop import LayerDropModuleList
from fairseq.sequence_generator import EnsembleModel

from benchmarks.host_syncs import counting_host_syncs
from fairseq_fastseq import generator as generator_module
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.graphs import StaticSteps, StepGraph
from fairseq_fastseq.model_steps import LeanSteps
from fairseq_fastseq.search_state import SearchState
from fairseq_fastseq.static_loop import COMPACT_AT, SYNC_EVERY, why_not_static
from fairseq_fastseq.step.static import SPAN, StaticSelfAttentionCache
from testsupport import toy

from .equivalence import assert_fast_matches_stock, generate_all, load
from .naive import with_correct_ngram_blocking
from .test_lean_step import FAMILIES, _drive, _fresh_model

STATIC = FastGeneratorConfig(on_unsupported="error", cuda_graphs="on")
# The self-attention over a bucket of positions sums in another order: scores on the fixtures
# differ from stock's by < 2e-5 (a hypothesis of 200 tokens adds up 200 such differences).
ROUNDING = 1e-4
SEARCHES = {
    "greedy": dict(beam=1),
    "beam5_nbest3": dict(beam=5, nbest=3),
    "beam4_lenpen_minlen_unkpen": dict(beam=4, lenpen=0.6, min_len=3, unkpen=0.5),
    "beam3_unnormalized_temperature": dict(beam=3, unnormalized=True, temperature=0.7),
}


@pytest.fixture
def static_searches(monkeypatch):
    """How many batches the static-shape loop searched (0 would mean the test ran the other loop)."""
    calls = []
    original = generator_module.static_search

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generator_module, "static_search", counted)
    return calls


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("model", [name for name in [*toy.TRANSLATION_MODELS, *toy.LANGUAGE_MODELS] if name != "lstm"])
def test_static_loop_gives_stocks_tokens(toy_models, static_searches, model, search):
    assert_fast_matches_stock(toy_models[model], knobs=STATIC, atol=ROUNDING, **SEARCHES[search])
    assert static_searches


@pytest.mark.parametrize(
    "options",
    [
        dict(beam=4, no_repeat_ngram_size=2, reference=with_correct_ngram_blocking),
        dict(beam=3, prefix_size=2),  # forced without boolean indexing
        dict(beam=5, prefix_size=40),  # the prefix ends in EOS: the beams copy the first
        dict(beam=3, print_alignment="hard"),  # the attention over the source is kept
        dict(beam=1, max_len_b=3),  # every sentence stops at the length limit
    ],
    ids=["ngram", "prefix", "prefix_with_eos", "alignment", "max_len"],
)
def test_static_loop_runs_the_search_options_it_covers(toy_models, static_searches, options):
    assert_fast_matches_stock(toy_models["transformer"], knobs=STATIC, atol=ROUNDING, **options)
    assert static_searches


def test_static_loop_runs_ensembles_and_the_fused_tier(toy_models, static_searches):
    assert_fast_matches_stock(toy_models["transformer"], ensemble_with=[toy_models["transformer_prenorm_2heads"]], knobs=STATIC, atol=ROUNDING, beam=4)
    fused = FastGeneratorConfig(on_unsupported="error", cuda_graphs="on", kernels="fused")
    assert_fast_matches_stock(toy_models["transformer"], knobs=fused, atol=1e-4, beam=4)
    assert len(static_searches) >= 2


def _syncs_and_steps(toy_model, knobs):
    """(host syncs, decoder steps, batches) of generating the test split with beam 4."""
    models, task, batches = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    generator = accelerate(task.build_generator(models, GenerationConfig(beam=4)), knobs)
    steps = []
    candidates = SearchState.candidates  # once per step, in either loop

    def counted(self, *args):
        steps.append(1)
        return candidates(self, *args)

    SearchState.candidates = counted
    try:
        with counting_host_syncs() as syncs:
            generate_all(generator, task, models, batches, 0, None, None)
    finally:
        SearchState.candidates = candidates
    return syncs.total, len(steps), len(batches)


def test_static_loop_syncs_every_few_steps_not_every_step(toy_models):
    syncs, steps, batches = _syncs_and_steps(toy_models["transformer"], STATIC)
    assert steps > SYNC_EVERY * batches
    # the checks every SYNC_EVERY steps (one more where the batch shrinks), and 8 per batch
    # outside the loop: fairseq's encoder (3) and position tables (2), the encoder padding (1),
    # the results (2)
    assert syncs <= 2 * (steps // SYNC_EVERY) + 8 * batches, (syncs, steps, batches)
    dynamic_syncs, dynamic_steps, _ = _syncs_and_steps(toy_models["transformer"], FastGeneratorConfig())
    assert dynamic_syncs >= 2 * dynamic_steps  # the dynamic loop's: at least one per step


def test_finished_sentences_leave_once_they_are_most_of_the_batch(toy_models, monkeypatch):
    rows = []
    keep_rows = StaticSelfAttentionCache.keep_rows

    def counted(self, order):
        rows.append((self.keys.size(1), order.numel()))
        keep_rows(self, order)

    monkeypatch.setattr(StaticSelfAttentionCache, "keep_rows", counted)
    assert_fast_matches_stock(toy_models["transformer_shared_8heads"], knobs=STATIC, atol=ROUNDING, beam=4)
    assert rows and all(after <= COMPACT_AT * before for before, after in rows)


def test_static_steps_equal_lean_steps_up_to_rounding(toy_models):
    """Step by step through random reorders and padding, across several buckets: the warm-up
    of each new bucket (the identity reorder, then the real one) changes nothing."""
    model, task, batches = _fresh_model(toy_models["transformer"])
    dictionary, beam, num_steps = task.target_dictionary, 3, 2 * SPAN + 5
    args = (batches[0], beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(LeanSteps(EnsembleModel([model]), beam, num_steps, True, 1.0), *args, 7, num_steps, sentences_leave=False)
        static = StaticSteps(EnsembleModel([model]), beam, 100, True, 1.0)  # room for 100 steps, 37 taken
        actual = _drive(static, *args, 7, num_steps, sentences_leave=False)
    assert static.graph.captures == -(-num_steps // SPAN)  # one warm-up per bucket
    # the caches grew a bucket at a time: room for the steps taken, not for max_steps
    first = static.caches[0].self_attention[0]
    assert first.keys.size(0) == static.clock.span == 3 * SPAN < 100
    for step, ((want, want_attention), (got, got_attention)) in enumerate(zip(expected, actual)):
        torch.testing.assert_close(got, want, atol=ROUNDING, rtol=0, msg=f"step {step}")
        torch.testing.assert_close(got_attention, want_attention, atol=ROUNDING, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("name", FAMILIES)
def test_static_steps_follow_sentences_leaving_in_every_family(toy_models, name):
    """As above with sentences leaving at random steps (each time new, smaller caches), for
    every layout of the encoder keys/values (per beam, BART's shared, none)."""
    model, task, batches = _fresh_model(toy_models[name])
    beam, dictionary = 3, task.target_dictionary
    if hasattr(model, "set_beam_size"):
        model.set_beam_size(beam)  # what fairseq's generator does for BART
    args = (batches[0], beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(LeanSteps(EnsembleModel([model]), beam, 40, True, 1.0), *args, 3, SPAN + 8)
        actual = _drive(StaticSteps(EnsembleModel([model]), beam, 40, True, 1.0), *args, 3, SPAN + 8)
    for step, ((want, want_attention), (got, got_attention)) in enumerate(zip(expected, actual)):
        torch.testing.assert_close(got, want, atol=ROUNDING, rtol=0, msg=f"step {step}")
        if want_attention is not None:
            torch.testing.assert_close(got_attention, want_attention, atol=ROUNDING, rtol=0, msg=f"step {step}")


def test_step_graph_warms_up_each_new_bucket_once():
    events = []

    class Rehearsal:
        def __enter__(self):
            events.append("warm-up")

        def __exit__(self, *exc):
            events.append("real order")

    graph = StepGraph(lambda: events.append("step") or (torch.zeros(1), None), Rehearsal, capture=False)
    for bucket in (16, 16, 32):
        graph.run(bucket)
    assert events == ["warm-up", "step", "real order", "step", "step", "warm-up", "step", "real order", "step"]


@pytest.mark.parametrize(
    "model, options, reason",
    [
        ("transformer", dict(beam=2, sampling=True, sampling_topk=3), "Sampling (the static-shape loop runs beam search and greedy search)"),
        ("transformer", dict(beam=4, diverse_beam_groups=2), "DiverseBeamSearch"),
        ("transformer", dict(beam=3, match_source_len=True), "LengthConstrainedBeamSearch"),
        ("lstm", dict(beam=2), "a model or knob outside the lean decoder step"),
    ],
)
def test_a_search_it_does_not_cover_runs_the_dynamic_loop_and_says_why(toy_models, caplog, model, options, reason):
    toy_model = toy_models[model]
    models, task, _ = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq"):
        generator = accelerate(task.build_generator(models, GenerationConfig(**options)), STATIC)
    assert not generator.static_loop
    assert "search loop: dynamic shapes, no CUDA graphs (--fast-cuda-graphs on does not cover " + reason in caplog.text


def test_auto_off_a_gpu_keeps_the_dynamic_loop_without_a_word(toy_models, caplog):
    toy_model = toy_models["transformer"]
    models, task, _ = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        generator = accelerate(task.build_generator(models, GenerationConfig(beam=4)), FastGeneratorConfig(cuda_graphs="auto"))
    assert not generator.static_loop
    assert "search loop" not in caplog.text
    assert FastGeneratorConfig().cuda_graphs == "off"  # until the GPU path is measured


def test_decoder_layerdrop_is_a_reason(toy_models):
    model, task, _ = _fresh_model(toy_models["transformer"])
    model.decoder.layers = LayerDropModuleList(0.1, list(model.decoder.layers))
    generator = accelerate(task.build_generator([model], GenerationConfig(beam=2)), STATIC)
    assert not generator.static_loop
    generator.knobs = FastGeneratorConfig(cuda_graphs="on")
    assert why_not_static(generator, "on", torch.device("cpu")) == "decoder LayerDrop (it draws random numbers on the host at every step)"


def test_command_line_and_hydra_select_the_static_loop(toy_models):
    from .test_hydra import assert_flag_and_override_give_stocks_tokens

    log = assert_flag_and_override_give_stocks_tokens(toy_models["transformer"], ["--fast-cuda-graphs", "on"], "fastseq.cuda_graphs=on")
    assert "search loop: static shapes" in log


def test_a_step_that_cannot_be_captured_runs_uncaptured_and_says_so(monkeypatch, caplog):
    """What CUDA is asked, faked on CPU: streams that need no waiting, a capture that fails."""

    class Stream:
        def wait_stream(self, other):
            pass

    def failing_capture(graph, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    calls = []
    graph = StepGraph(lambda: calls.append(1) or (torch.ones(1), None), contextlib.nullcontext, capture=True)
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq"):
        outputs = [graph.run(bucket) for bucket in (16, 16, 32)]
    assert all(torch.equal(lprobs, torch.ones(1)) for lprobs, _ in outputs)
    assert len(calls) == 2 + 3  # the warm-ups of buckets 16 and 32 (the failed capture ran nothing), the three steps
    assert caplog.text.count("cuda graphs: capturing the decoder step failed (operation not permitted") == 1
