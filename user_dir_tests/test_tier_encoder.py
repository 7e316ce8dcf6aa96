"""The encoder of the ``fused`` and ``int8`` tiers (``step/encoder.py``): fairseq's encoder up
to the tier's rounding, for the encoders it covers; fairseq's own for ``exact`` and for the
others, with the reason in the log."""

import copy
import logging

import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig
from fairseq.modules.layer_drop import LayerDropModuleList

from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.step.decoder import LeanDecoder
from fairseq_fastseq.step.encoder import TierEncoder, encoder_for, why_not_tier_encoder
from fairseq_fastseq.step.kernels import ExactKernels, FusedKernels, Int8Kernels

from .equivalence import load
from .test_lean_step import _fresh_model

# Largest difference to fairseq's encoder output, relative to its largest value: fused rounds
# differently (seen: ~1e-7), int8 quantizes every linear layer (seen: ~1e-2).
TOLERANCE = {"fused": 1e-5, "int8": 0.1}
TIERS = {"fused": FusedKernels, "int8": Int8Kernels}


@pytest.mark.parametrize("tier", sorted(TIERS))
@pytest.mark.parametrize("name", ["transformer", "transformer_prenorm_2heads", "transformer_shared_8heads", "bart"])
def test_tier_encoder_is_fairseqs_encoder_up_to_rounding(toy_models, name, tier):
    model, _, batches = _fresh_model(toy_models[name])
    net_input = batches[0]["net_input"]
    assert net_input["src_tokens"].eq(model.encoder.padding_idx).any()  # padded sources are covered
    assert why_not_tier_encoder(model.encoder) is None
    with torch.no_grad():
        want = model.encoder.forward_torchscript(net_input)
        got = TierEncoder(model.encoder, TIERS[tier]())(net_input)
    assert sorted(got) == sorted(want)
    for key in ("encoder_padding_mask", "encoder_embedding", "src_lengths", "encoder_states", "fc_results", "src_tokens"):
        assert len(got[key]) == len(want[key]) and all(torch.equal(g, w) for g, w in zip(got[key], want[key])), key
    out, reference = got["encoder_out"][0], want["encoder_out"][0]
    assert out.shape == reference.shape
    padded = net_input["src_tokens"].eq(model.encoder.padding_idx).t()  # time-major, as the output
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))  # left out; attention masks them
    out, reference = out[~padded], reference[~padded]
    error = float((out - reference).abs().max())
    assert error <= TOLERANCE[tier] * float(reference.abs().max())
    assert tier == "fused" or error > 0  # int8 is close, not equal


def test_exact_keeps_fairseqs_encoder(toy_models):
    model, _, _ = _fresh_model(toy_models["transformer"])
    assert encoder_for(model, ExactKernels()) == model.encoder.forward_torchscript
    assert isinstance(encoder_for(model, FusedKernels()), TierEncoder)


def _with_encoder_hook(model):
    model.encoder.layers[0].fc1.register_forward_hook(lambda *args: None)
    return "a forward hook is registered on layers.0.fc1"


def _returning_fc(model):
    model.encoder.layers[0].return_fc = True
    return "encoder layer 0 returns its feed-forward output (return_fc)"


def _in_training(model):
    model.encoder.train()
    return "the encoder is in training mode"


@pytest.mark.parametrize("change", [_with_encoder_hook, _returning_fc, _in_training])
def test_an_encoder_outside_it_runs_as_fairseqs(toy_models, change):
    model, _, _ = _fresh_model(toy_models["transformer"])
    reason = change(model)
    assert why_not_tier_encoder(model.encoder) == reason
    assert encoder_for(model, FusedKernels()) == model.encoder.forward_torchscript


def test_encoder_layerdrop_draws_as_fairseqs_encoder(toy_models):
    """fairseq's LayerDropModuleList draws a random number per layer in inference too: what
    runs after the encoder (sampling) sees the same generator state."""
    model, _, batches = _fresh_model(toy_models["transformer"])
    model.encoder.layers = LayerDropModuleList(0.1, list(model.encoder.layers))
    states = []
    for encode in (model.encoder.forward_torchscript, TierEncoder(model.encoder, FusedKernels())):
        torch.manual_seed(5)
        with torch.no_grad():
            encode(batches[0]["net_input"])
        states.append(torch.get_rng_state())
    assert torch.equal(*states)


@pytest.mark.parametrize(
    "tier, hook, said",
    [
        ("fused", False, "kernels: encoder on the fused kernels too"),
        ("int8", False, "kernels: encoder on the int8 kernels too"),
        ("fused", True, "kernels: fairseq's encoder and kernels (a forward hook is registered on layers.0.fc1)"),
    ],
)
def test_the_log_says_which_encoder_runs(toy_models, caplog, tier, hook, said):
    toy_model = toy_models["transformer"]
    models, task, _ = load((str(toy_model.checkpoint),), str(toy_model.data_bin), 16)
    models = [copy.deepcopy(models[0])]  # the loaded models are shared by the other tests
    if hook:
        _with_encoder_hook(models[0])
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        accelerate(task.build_generator(models, GenerationConfig(beam=2)), FastGeneratorConfig(kernels=tier))
    assert said in caplog.text


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_position_wise_work_takes_the_real_source_positions_only(toy_models, tier):
    """The tiers' linear layers in the encoder and the decoder's encoder keys/values see one
    row per source token, none per padded position (``source_rows.py``)."""
    model, _, batches = _fresh_model(toy_models["transformer"])
    src_tokens = batches[0]["net_input"]["src_tokens"]
    real = int(src_tokens.ne(model.encoder.padding_idx).sum())
    assert real < src_tokens.numel()
    kernels, rows_seen = TIERS[tier](), []

    def counting(project):
        return lambda x: rows_seen.append(x.numel() // x.size(-1)) or project(x)

    for method in ("linear", "feed_forward_in"):
        made = getattr(kernels, method)
        setattr(kernels, method, lambda *args, made=made: counting(made(*args)))
    with torch.no_grad():
        encoder_out = TierEncoder(model.encoder, kernels)(batches[0]["net_input"])
        assert len(rows_seen) >= 4 * len(model.encoder.layers) and set(rows_seen) == {real}
        rows_seen.clear()
        LeanDecoder(model, kernels).start(encoder_out, 2, 8)
    assert len(rows_seen) == 2 * len(model.decoder.layers) and set(rows_seen) == {real}  # keys and values
