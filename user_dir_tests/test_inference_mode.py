"""The fast search runs in ``torch.inference_mode`` (the same kernels with less dispatch per
operator) and hands back ordinary tensors, as stock's generator does."""

import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig
from torch import Tensor

from fairseq_fastseq.choice import accelerate
from fairseq_fastseq import generator as generator_module
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.finished import ordinary_tensors
from fairseq_fastseq.model_steps import LeanSteps

from .equivalence import load


@pytest.mark.parametrize("kernels", ["exact", "int8"])
@pytest.mark.parametrize("copied_by", ["finished hypotheses", "generator"])
def test_the_search_runs_in_inference_mode_and_returns_ordinary_tensors(toy_models, monkeypatch, kernels, copied_by):
    toy = toy_models["transformer"]
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), 4)
    generator = accelerate(
        task.build_generator(models, GenerationConfig(beam=3, print_alignment="hard")),
        FastGeneratorConfig(on_unsupported="error", kernels=kernels),
    )
    modes = []
    decode = LeanSteps.decode

    def recording_decode(self, *args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(LeanSteps, "decode", recording_decode)
    if copied_by == "finished hypotheses":  # the CPU loop's own copies, one per chunk
        monkeypatch.setattr(generator_module, "ordinary_tensors", lambda hypotheses: hypotheses)
    with torch.no_grad():
        # two batches: the second reuses what the first prepared (buffers, int8 weights)
        hypotheses = [nbest for sample in batches[:2] for nbest in task.inference_step(generator, models, sample)]
    assert modes and all(modes)
    tensors = [value for nbest in hypotheses for hypothesis in nbest for value in hypothesis.values() if isinstance(value, Tensor)]
    assert tensors and not any(tensor.is_inference() for tensor in tensors)
    hypotheses[0][0]["tokens"][0] = 0  # a caller may edit them in place, as stock's
    assert not torch.is_inference_mode_enabled()


def test_ordinary_tensors_copies_what_was_made_in_inference_mode():
    ordinary = torch.zeros(2)
    with torch.inference_mode():
        made_there = torch.ones(3)
    [[hypothesis]] = ordinary_tensors([[{"tokens": made_there, "score": ordinary, "alignment": None}]])
    assert not hypothesis["tokens"].is_inference() and torch.equal(hypothesis["tokens"], made_there)
    assert hypothesis["score"] is ordinary and hypothesis["alignment"] is None
