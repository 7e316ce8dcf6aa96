"""Work no requested output needs: where the caller reads no attention (fairseq-generate and
fairseq-interactive without ``--print-alignment``), the search keeps none; elsewhere the
hypotheses carry fairseq's attention."""

from argparse import Namespace

import fairseq_cli.generate
import fairseq_cli.interactive
import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig

from fairseq_fastseq import hook
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate, attention_unread

from .equivalence import load


@pytest.mark.parametrize("decoder_step", ["lean", "fairseq"])
def test_unread_attention_is_left_out_with_the_same_hypotheses(toy_models, decoder_step):
    toy = toy_models["transformer"]
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    knobs = FastGeneratorConfig(decoder_step=decoder_step)
    kept = accelerate(task.build_generator(models, GenerationConfig(beam=3)), knobs)
    with attention_unread():
        unread = accelerate(task.build_generator(models, GenerationConfig(beam=3)), knobs)
    assert kept.need_attention and not unread.need_attention
    with torch.no_grad():
        want = task.inference_step(kept, models, batches[0])
        got = task.inference_step(unread, models, batches[0])
    for want_hypotheses, got_hypotheses in zip(want, got):
        for w, g in zip(want_hypotheses, got_hypotheses):
            assert torch.equal(w["tokens"], g["tokens"]) and torch.equal(w["positional_scores"], g["positional_scores"])
            assert w["attention"].numel() > 0 and g["attention"].numel() == 0


def test_the_alignment_generator_keeps_its_attention(toy_models):
    toy = toy_models["transformer"]
    models, task, _ = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    with attention_unread():
        generator = accelerate(task.build_generator(models, GenerationConfig(beam=3, print_alignment="hard")), FastGeneratorConfig())
    assert generator.need_attention


@pytest.mark.parametrize("route", [hook._route_generate_main, hook._route_interactive_main])
@pytest.mark.parametrize("choice, read", [("fast", False), ("stock", True), (None, True)])
def test_the_cli_wrappers_run_fast_generation_with_attention_unread(route, choice, read):
    from fairseq_fastseq.choice import _ATTENTION_READ

    seen = []
    routed = route(lambda cfg: seen.append(_ATTENTION_READ.get()))
    routed(Namespace(generator=choice, task="translation", path="x.pt", data="bin"))
    assert seen == [read] and _ATTENTION_READ.get()


def test_both_clis_are_routed():
    assert getattr(fairseq_cli.generate.main, hook._MARK, False)
    assert getattr(fairseq_cli.interactive.main, hook._MARK, False)
