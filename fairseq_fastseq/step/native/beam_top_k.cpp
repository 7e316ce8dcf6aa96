// A beam search step's candidates in one read of the log-probabilities (`beam_step.py`).
//
// fairseq's `BeamSearch.step` adds each hypothesis' running score to its log-probabilities
// (one float add per entry) and takes `torch.topk` of each sentence's beam x vocabulary
// row. The fast loop did the add in place, a pass over the chunks' maxima and a top-k over
// the best chunks (`topk.py`): three passes over a row of 40,040 floats on the bundled model.
// Here each entry's sum is made in a register, compared with the row's current (k+1)-th best
// and kept only if larger: one pass, nothing written. Where the best k + 1 sums are not
// strictly decreasing (a tie decides torch.topk's order, or which entry is in) or a sum is
// NaN, the row is not answered and the caller takes the add and torch.topk as before.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

// The best `size` (value, index) pairs so far, best first; slot size - 1 is the bar to beat.
struct Best {
  std::vector<float> value;
  std::vector<int64_t> index;
  explicit Best(int64_t size) : value(size, -std::numeric_limits<float>::infinity()), index(size, -1) {}
  void offer(float v, int64_t i) {
    int64_t at = static_cast<int64_t>(value.size()) - 1;
    if (!(v > value[at])) return;
    for (; at > 0 && v > value[at - 1]; --at) {
      value[at] = value[at - 1];
      index[at] = index[at - 1];
    }
    value[at] = v;
    index[at] = i;
  }
};

}  // namespace

// lprobs (sentences, beams, vocab) contiguous, running (sentences, beams) -> the k best of
// lprobs[s, b, v] + running[s, b] per sentence, as torch.topk gives them (values best first,
// flat indices b * vocab + v), or None where one sentence's k + 1 best are not strictly
// decreasing or a sum is NaN.
c10::optional<std::tuple<torch::Tensor, torch::Tensor>> added_top_k(const torch::Tensor& lprobs, const torch::Tensor& running, int64_t k) {
  TORCH_CHECK(lprobs.dim() == 3 && lprobs.is_contiguous() && lprobs.scalar_type() == torch::kFloat32 && lprobs.device().is_cpu() &&
              running.dim() == 2 && running.scalar_type() == torch::kFloat32 && running.size(0) == lprobs.size(0) &&
              running.size(1) == lprobs.size(1) && k >= 1,
              "beam_top_k.added_top_k: lprobs (sentences, beams, vocab) contiguous float32, running (sentences, beams)");
  const int64_t sentences = lprobs.size(0), beams = lprobs.size(1), vocab = lprobs.size(2);
  if (beams * vocab < k + 1) return c10::nullopt;
  auto values = torch::empty({sentences, k}, lprobs.options());
  auto indices = torch::empty({sentences, k}, lprobs.options().dtype(torch::kLong));
  const float* x = lprobs.data_ptr<float>();
  const float* r = running.data_ptr<float>();
  const int64_t by_sentence = running.stride(0), by_beam = running.stride(1);
  std::atomic<bool> answered{true};
  at::parallel_for(0, sentences, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end && answered.load(std::memory_order_relaxed); ++s) {
      Best best(k + 1);
      bool nan = false;
      for (int64_t b = 0; b < beams; ++b) {
        const float add = r[s * by_sentence + b * by_beam];
        const float* row = x + (s * beams + b) * vocab;
        const __m512 added = _mm512_set1_ps(add);
        int64_t v = 0;
        for (; v + 16 <= vocab; v += 16) {
          const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(row + v), added);
          nan |= _mm512_cmp_ps_mask(sum, sum, _CMP_UNORD_Q) != 0;
          __mmask16 above = _mm512_cmp_ps_mask(sum, _mm512_set1_ps(best.value[k]), _CMP_GT_OQ);
          if (above == 0) continue;
          alignas(64) float lanes[16];
          _mm512_store_ps(lanes, sum);
          for (; above != 0; above &= above - 1) {
            const int lane = __builtin_ctz(above);
            best.offer(lanes[lane], b * vocab + v + lane);
          }
        }
        for (; v < vocab; ++v) {
          const float sum = row[v] + add;
          nan |= std::isnan(sum);
          best.offer(sum, b * vocab + v);
        }
      }
      bool decreasing = !nan;
      for (int64_t i = 0; decreasing && i < k; ++i) decreasing = best.value[i] > best.value[i + 1];
      if (!decreasing) {
        answered.store(false, std::memory_order_relaxed);
        return;
      }
      std::copy(best.value.begin(), best.value.begin() + k, values.data_ptr<float>() + s * k);
      std::copy(best.index.begin(), best.index.begin() + k, indices.data_ptr<int64_t>() + s * k);
    }
  });
  if (!answered.load()) return c10::nullopt;
  return std::make_tuple(values, indices);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("added_top_k", &added_top_k, "torch.topk of lprobs + running scores per sentence in one pass, or None on a tie or NaN");
}
