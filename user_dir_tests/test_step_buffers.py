"""The fast generator's per-batch output buffers (``ensemble.py``) and its in-place beam step
(``beam_step.py``): the same values as fairseq, without a new (rows x vocabulary) tensor per
step."""

import copy

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.dataclass.configs import GenerationConfig
from fairseq.search import BeamSearch, DiverseBeamSearch, LexicallyConstrainedBeamSearch, Sampling
from fairseq.sequence_generator import EnsembleModel

from fairseq_fastseq.beam_step import adds_in_place, beam_step_in_place
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.ensemble import BufferedEnsembleModel
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.step.output import BufferedOutput

from .equivalence import load


def _decoder_steps(ensemble, model, sample, steps, temperature):
    """Log-probabilities and attention of ``steps`` incremental decoder steps, fed the argmax."""
    net_input = sample["net_input"]
    encoder_outs = ensemble.forward_encoder(net_input) if ensemble.has_encoder() else None
    rows = net_input["src_tokens"].size(0)
    tokens = torch.full((rows, 1), model.decoder.dictionary.eos())
    states = [{}]
    outputs = []
    for _ in range(steps):
        lprobs, attn = ensemble.forward_decoder(tokens, encoder_outs, states, temperature)
        outputs.append((lprobs.clone(), None if attn is None else attn.clone(), lprobs.data_ptr()))
        tokens = torch.cat([tokens, lprobs.argmax(-1, keepdim=True)], dim=1)
    return outputs


@pytest.mark.parametrize("name", ["transformer", "transformer_shared_8heads", "bart", "transformer_lm"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_buffered_steps_equal_fairseqs_and_reuse_one_buffer(toy_models, name, temperature):
    toy = toy_models[name]
    models, _, batches = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    model = copy.deepcopy(models[0])  # a test of its own: no other test's incremental state
    sample = batches[0]
    with torch.no_grad():
        expected = _decoder_steps(EnsembleModel([model]), model, sample, 6, temperature)
        buffered = BufferedEnsembleModel([model])
        with buffered.step_buffers():
            assert buffered.reuses_buffers()
            actual = _decoder_steps(buffered, model, sample, 6, temperature)
        assert not buffered.reuses_buffers()  # outside the block: fairseq's path
    for (want, want_attn, _), (got, got_attn, _) in zip(expected, actual):
        assert torch.equal(got, want)
        assert (got_attn is None) == (want_attn is None)
        assert got_attn is None or torch.equal(got_attn, want_attn)
    assert len({ptr for _, _, ptr in actual}) == 1  # every step wrote the same buffer


def test_a_decoder_that_changes_its_output_layer_keeps_fairseqs_path(toy_models):
    toy = toy_models["transformer"]
    models, _, _ = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    model = copy.deepcopy(models[0])
    decoder_class = type(model.decoder)
    model.decoder.__class__ = type("ScaledOutputDecoder", (decoder_class,), {"output_layer": lambda self, x: 2 * x})
    ensemble = BufferedEnsembleModel([model])
    with ensemble.step_buffers():  # decided once per batch, when the block starts
        assert not ensemble.reuses_buffers()
    model.decoder.__class__ = decoder_class
    with ensemble.step_buffers():
        assert ensemble.reuses_buffers()
    model.decoder.output_projection.bias = torch.nn.Parameter(torch.zeros(model.decoder.output_projection.out_features))
    with ensemble.step_buffers():
        assert not ensemble.reuses_buffers()
    two = BufferedEnsembleModel([models[0], model])
    with two.step_buffers():
        assert not two.reuses_buffers()  # an ensemble averages in fairseq's way


def test_the_fast_generator_wraps_only_fairseqs_plain_ensemble(toy_models):
    toy = toy_models["transformer"]
    models, task, _ = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    knobs = FastGeneratorConfig(on_unsupported="error")
    fast = accelerate(task.build_generator(models, GenerationConfig(beam=2)), knobs)
    assert type(fast.model) is BufferedEnsembleModel
    aligned = accelerate(task.build_generator(models, GenerationConfig(beam=2, print_alignment="hard")), knobs)
    assert type(aligned.model).__name__ == "EnsembleModelWithAlignment"


def _search(kind, dictionary):
    if kind == "beam":
        return BeamSearch(dictionary)
    if kind == "sampling":
        return Sampling(dictionary, sampling_topk=3)
    if kind == "diverse":
        return DiverseBeamSearch(dictionary, num_groups=2, diversity_strength=0.5)
    return LexicallyConstrainedBeamSearch(dictionary, "ordered")


@pytest.mark.parametrize("kind", ["beam", "sampling", "diverse", "constrained"])
def test_only_plain_beam_search_after_step_0_adds_in_place(kind):
    search = _search(kind, Dictionary())
    assert adds_in_place(search, 0) is False
    assert adds_in_place(search, 3) is (kind == "beam")


@pytest.mark.parametrize("bsz, beam, vocab", [(1, 1, 7), (3, 5, 11), (8, 4, 50), (2, 3, 2)])
@pytest.mark.parametrize("step", [1, 4])
def test_in_place_step_gives_fairseqs_candidates(bsz, beam, vocab, step):
    generator = torch.Generator().manual_seed(bsz * 100 + beam * 10 + step)
    # Values from a small set, so that many candidates tie; -inf as the generator masks tokens.
    lprobs = torch.randint(-6, 0, (bsz, beam, vocab), generator=generator).float() / 2
    lprobs[..., 1] = float("-inf")
    scores = torch.randint(-8, 0, (bsz, beam, step), generator=generator).float() / 2
    expected = BeamSearch(Dictionary()).step(step, lprobs.clone(), scores)
    actual = beam_step_in_place(lprobs, scores, step)
    for want, got in zip(expected, actual):
        assert torch.equal(got, want)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probabilities_are_written_over_the_logits_with_fairseqs_values(temperature):
    """One vocabulary-sized buffer per batch: the log-softmax runs in place over the logits
    (the same bits as into a second buffer), and fewer rows reuse the buffer."""
    torch.manual_seed(0)
    weight, features = torch.randn(50, 8), torch.randn(6, 8)
    output = BufferedOutput(weight)
    for rows in (6, 3):
        got = output(features[:rows], temperature)
        logits = torch.mm(features[:rows], weight.t())
        logits.div_(temperature)
        assert torch.equal(got, torch.log_softmax(logits, dim=-1))
        assert got.data_ptr() == output._buffer.data_ptr()
