"""The fast search runs in ``torch.inference_mode`` (the same kernels with less dispatch per
operator) and hands back ordinary tensors, as stock's generator does."""

import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig
from torch import Tensor

from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.model_steps import LeanSteps

from .equivalence import load


@pytest.mark.parametrize("kernels", ["exact", "int8"])
def test_the_search_runs_in_inference_mode_and_returns_ordinary_tensors(toy_models, monkeypatch, kernels):
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
    with torch.no_grad():
        # two batches: the second reuses what the first prepared (buffers, int8 weights)
        hypotheses = [nbest for sample in batches[:2] for nbest in task.inference_step(generator, models, sample)]
    assert modes and all(modes)
    tensors = [value for nbest in hypotheses for hypothesis in nbest for value in hypothesis.values() if isinstance(value, Tensor)]
    assert tensors and not any(tensor.is_inference() for tensor in tensors)
    hypotheses[0][0]["tokens"][0] = 0  # a caller may edit them in place, as stock's
    assert not torch.is_inference_mode_enabled()
