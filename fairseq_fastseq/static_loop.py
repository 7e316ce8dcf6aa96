"""The static-shape search loop (``--fast-cuda-graphs``): fairseq's beam search with the
batch's shape fixed for the whole search, so that the decoder step can be a CUDA graph
(``graphs.py``) and the host need not wait for the device at every step.

The dynamic loop (``generator.py``) drops finished sentences, which changes the shape of
every tensor, and so must read how many finished at every step (a host sync). Here:

- finished sentences stay in the batch: their rows are computed and ignored (a finished
  sentence has ``beam`` hypotheses, so none of its candidates is accepted any more);
- finished hypotheses go to fixed device buffers (``finished_on_device.py``);
- the host reads how many sentences are live once every ``SYNC_EVERY`` steps: it stops when
  none is (the steps run after the last one finished change nothing), and drops the finished
  ones when they are most of the batch (``COMPACT_AT``), so that a long search does not
  compute mostly dead rows.

The active sentences see the same steps as in the dynamic loop, so the tokens are stock's;
the decoder step's scores equal the lean step's up to rounding (``step/static.py``).
Figures: ``BENCHMARKS.md`` ("Static-shape loop and CUDA graphs").
"""

from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from fairseq.modules.layer_drop import LayerDropModuleList
from fairseq.search import BeamSearch
from torch import Tensor

from .finished_on_device import FinishedOnDevice
from .graphs import StaticSteps
from .logit_edits import edits_for_batch

if TYPE_CHECKING:
    from .generator import FastSequenceGenerator

# Steps between the host's checks whether every sentence is done: at most this many - 1
# steps run after the last one finished, against one host sync per step saved.
SYNC_EVERY = 8
# At a check, the finished sentences leave the batch once the live ones are at most this
# share of it: the batch halves at most log2(bsz) times, each time with new graphs.
COMPACT_AT = 0.5


def why_not_static(generator: "FastSequenceGenerator", cuda_graphs: str, device: torch.device) -> Optional[str]:
    """None if ``--fast-cuda-graphs`` runs this generator's searches on static shapes, else why not."""
    if cuda_graphs == "off":
        return "--fast-cuda-graphs off"
    if cuda_graphs == "auto" and device.type != "cuda":
        return "not on a GPU"
    search = type(generator.search)
    if search is not BeamSearch:
        return f"{search.__name__} (the static-shape loop runs beam search and greedy search)"
    if generator.lm_model is not None:
        return "--lm-path (fairseq's language model steps outside the captured step)"
    lean = generator.why_not_lean()
    if lean is not None:
        return f"a model or knob outside the lean decoder step ({lean})"
    if any(isinstance(model.decoder.layers, LayerDropModuleList) for model in generator.model.models):
        return "decoder LayerDrop (it draws random numbers on the host at every step)"
    return None


def static_search(
    g: "FastSequenceGenerator",
    sample: Dict[str, Dict[str, Tensor]],
    max_len: int,
    steps: StaticSteps,
    prefix_tokens: Optional[Tensor],
    constraints: Optional[Tensor],
    bos_token: Optional[int],
) -> List[List[Dict[str, Tensor]]]:
    """The hypotheses of ``g._search`` (same tokens) for a search ``why_not_static`` allows."""
    state = g._start_search(sample, max_len, prefix_tokens, constraints, bos_token)
    finished = FinishedOnDevice(state.bsz, g.beam_size, max_len, state.scores)
    edits = edits_for_batch(g, max_len, prefix_tokens is not None, prefix_on_device=True)
    steps.start(sample["net_input"], state.bsz)
    done = torch.zeros(state.bsz, dtype=torch.bool, device=state.scores.device)

    for step in range(max_len + 1):  # one extra step for EOS
        lprobs, attention = steps.decode(state.tokens[:, : step + 1], step)
        for edit in edits:
            lprobs = edit(step, lprobs, state)
        state.record_attention(step, attention, max_len)
        candidates = g._candidates(step, lprobs, state)
        done |= g._finish(step, candidates, state, finished, max_len)
        if step == max_len:
            # fairseq's assertion for a sentence still unfinished here (a prefix can cause it)
            assert bool(done.all()), f"{step} < {max_len}"
            break
        kept = None
        if (step + 1) % SYNC_EVERY == 0:
            live = int(done.logical_not().sum())  # the host's check
            if live == 0:
                break
            if live <= COMPACT_AT * state.bsz:  # a smaller batch from here on (and new graphs)
                kept, candidates = state.drop(step, done, candidates)
                g.search.prune_sentences(kept)
                done = done[kept]
        _, parents = state.advance(step, candidates)
        steps.reorder(g._rows_before_drop(parents, kept), kept)
    return finished.to_hypotheses()
