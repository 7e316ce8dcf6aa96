"""``SearchState.drop``: the kept sentences' hypotheses, attention included, in the buffers
they had (no fresh max_len-sized attention buffer per drop)."""

import torch

from fairseq_fastseq.search_state import SearchState


def test_drop_keeps_the_kept_sentences_attention_in_the_same_buffer():
    bsz, beam, max_len, src_len = 4, 3, 10, 6
    state = SearchState.start(bsz, beam, max_len, 2, 1, torch.full((bsz,), src_len), None, None)
    steps = 3
    for step in range(steps):
        state.record_attention(step, torch.rand(bsz * beam, src_len), max_len)
    written = state.attn[:, :, 1 : steps + 1].clone().view(bsz, beam, src_len, steps)
    buffer = state.attn.data_ptr()
    candidates = state.candidates(
        torch.zeros(bsz, 2 * beam), torch.full((bsz, 2 * beam), 5), torch.zeros(bsz, 2 * beam, dtype=torch.long), eos=2
    )
    done = torch.tensor([False, True, False, True])
    kept, _ = state.drop(steps - 1, done, candidates)
    assert kept.tolist() == [0, 2]
    assert state.attn.data_ptr() == buffer
    assert state.attn.shape == (2 * beam, src_len, max_len + 2)
    assert torch.equal(state.attn[:, :, 1 : steps + 1].view(2, beam, src_len, steps), written[kept])
