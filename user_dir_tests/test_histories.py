"""Self-attention histories read where they were written (``step/histories.py``): the table
of which cache row holds each row's entry of each slice, and the tiers' reorders, which copy
no keys or values."""

import pytest
import torch
from fairseq.sequence_generator import EnsembleModel

from fairseq_fastseq.model_steps import LeanSteps
from fairseq_fastseq.step import caches, kernels, native, slots
from fairseq_fastseq.step.histories import Histories

from .test_lean_step import _drive, _fresh_model


def test_a_row_reads_its_own_newest_entry_and_its_ancestors_older_ones():
    histories = Histories(max_steps=5)
    histories.open_step(2, torch.device("cpu"))  # step 0: one row per sentence
    histories.follow(torch.tensor([0, 0, 1, 1]))  # their beams
    histories.open_step(4, torch.device("cpu"))
    assert histories.table().tolist() == [[0, 0, 1, 1], [0, 1, 2, 3]]
    histories.follow(torch.tensor([1, 1, 3]))  # beams 1 and 3 continue; the rest leave
    histories.open_step(3, torch.device("cpu"))
    assert histories.table().tolist() == [[0, 0, 1], [1, 1, 3], [0, 1, 2]]
    assert histories.table().stride(1) == 1  # as the kernel takes it


@pytest.mark.skipif(native.compiled() is None, reason="the native kernels could not be built here")
@pytest.mark.parametrize("tier", [kernels.FusedKernels, kernels.Int8Kernels])
def test_the_tiers_reorders_copy_no_keys_or_values(toy_models, monkeypatch, tier):
    """Beams reordered, sentences leaving, padded inputs: the C++ self-attention reads every
    history through the table (its values against exact's: ``test_kernel_tiers``)."""

    def no_copy(*args, **kwargs):
        raise AssertionError("a reorder copied self-attention keys or values")

    for cls, method in ((caches.SelfAttentionCache, "move"), (caches.SelfAttentionCache, "reorder"), (slots.RowSlots, "follow")):
        monkeypatch.setattr(cls, method, no_copy)
    model, task, batches = _fresh_model(toy_models["transformer"])
    dictionary = task.target_dictionary
    steps = LeanSteps(EnsembleModel([model]), 3, 15, False, 1.0, tier())
    with torch.no_grad():
        outputs = _drive(steps, batches[0], 3, dictionary.eos(), dictionary.pad(), len(dictionary), seed=4)
    assert steps.caches[0].histories is not None and steps.caches[0].slots is None
    assert len(outputs) == 14 and all(bool(torch.isfinite(lprobs).any(dim=1).all()) for lprobs, _ in outputs)
