// The attention of the kernel tiers that round differently (fused, int8): fairseq's bmm /
// softmax / bmm, without the bmm. Self-attention: one query per (row, head) against the
// time-major cache. Encoder attention: a sentence's beams against its one copy of the keys
// and values (grouped queries), straight into the (rows, heads * head_dim) output.
//
// The cache holds keys and values time-major, (steps, rows * heads, head_dim): a (row, head)
// history is a column of 256-byte pieces one time slice apart, which MKL's bmm reads matrix by
// matrix (a jump of a whole time slice per key, no prefetching) at a per-matrix call cost.
// Here every loop runs over time slices, and within a slice over its (row, head) pieces in
// memory order: the cache is read as the stream it is. The sums are the same up to their
// order (rounding). Figures: BENCHMARKS.md, "Native self-attention for the kernel tiers".
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSEQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSEQ_CLONES
#endif

// scores[m * length + t] = q[m] . keys[t][m] for m in [begin, end), every t.
FASTSEQ_CLONES void dot_products(const float* q, int64_t q_stride, const float* keys, int64_t time_stride,
                                 int64_t length, int64_t head_dim, int64_t begin, int64_t end, float* scores) {
  for (int64_t t = 0; t < length; ++t) {
    const float* slice = keys + t * time_stride;
    for (int64_t m = begin; m < end; ++m) {
      const float* a = q + m * q_stride;
      const float* b = slice + m * head_dim;
      float sum = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) sum += a[d] * b[d];
      scores[m * length + t] = sum;
    }
  }
}

// out[m] = sum over t of probs[m * length + t] * values[t][m], for m in [begin, end).
FASTSEQ_CLONES void weighted_sums(const float* probs, const float* values, int64_t time_stride, int64_t length,
                                  int64_t head_dim, int64_t begin, int64_t end, float* out) {
  for (int64_t m = begin; m < end; ++m)
    for (int64_t d = 0; d < head_dim; ++d) out[m * head_dim + d] = 0.f;
  for (int64_t t = 0; t < length; ++t) {
    const float* slice = values + t * time_stride;
    for (int64_t m = begin; m < end; ++m) {
      const float p = probs[m * length + t];
      const float* v = slice + m * head_dim;
      float* o = out + m * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
    }
  }
}

// For sentence-head unit u: scores[(u * beams + b) * src_len + j] = q(b) . keys[u][j], where
// q(b) is beam b's query of that head (rows sentence-major, beams within).
FASTSEQ_CLONES void grouped_dot_products(const float* queries, int64_t row_stride, const float* keys, int64_t heads,
                                         int64_t beams, int64_t src_len, int64_t head_dim, int64_t begin, int64_t end,
                                         float* scores) {
  for (int64_t u = begin; u < end; ++u) {
    const int64_t sentence = u / heads, head = u % heads;
    const float* k = keys + u * src_len * head_dim;
    for (int64_t j = 0; j < src_len; ++j) {
      const float* key = k + j * head_dim;
      for (int64_t b = 0; b < beams; ++b) {
        const float* q = queries + (sentence * beams + b) * row_stride + head * head_dim;
        float sum = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) sum += q[d] * key[d];
        scores[(u * beams + b) * src_len + j] = sum;
      }
    }
  }
}

// out[(sentence * beams + b)][head * head_dim + d] = sum over j of probs[u, b, j] * values[u][j][d].
FASTSEQ_CLONES void grouped_weighted_sums(const float* probs, const float* values, int64_t heads, int64_t beams,
                                          int64_t src_len, int64_t head_dim, int64_t begin, int64_t end, float* out) {
  const int64_t row_width = heads * head_dim;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t sentence = u / heads, head = u % heads;
    const float* v = values + u * src_len * head_dim;
    for (int64_t b = 0; b < beams; ++b) {
      float* o = out + (sentence * beams + b) * row_width + head * head_dim;
      const float* p = probs + (u * beams + b) * src_len;
      for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.f;
      for (int64_t j = 0; j < src_len; ++j) {
        const float weight = p[j];
        const float* value = v + j * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] += weight * value[d];
      }
    }
  }
}

// Enough (row, head) pieces per task that a thread's share of a time slice is a long run.
constexpr int64_t kGrain = 64;

// The kernels read float32 CPU memory through raw pointers: anything else is an error.
void check_float32_cpu(const char* kernel, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(queries.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              kernel, " takes float32 tensors");
  TORCH_CHECK(queries.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(), kernel, " runs on the CPU");
}

}  // namespace

// queries (rows * heads, head_dim), scaled; keys, values (length, rows * heads, head_dim)
// time-major views of the cache (pieces contiguous within a slice); padding: undefined, or
// (length, rows) bool, true where that row's input at that step was padding (masked).
// Returns the attention output (rows * heads, head_dim), i.e. (rows, heads * head_dim).
at::Tensor self_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                          const c10::optional<at::Tensor>& padding, int64_t heads) {
  check_float32_cpu("native self-attention", queries, keys, values);
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 3 && values.sizes() == keys.sizes(), "native self-attention: unexpected shapes");
  const int64_t length = keys.size(0), pieces = keys.size(1), head_dim = keys.size(2);
  TORCH_CHECK(queries.size(0) == pieces && queries.size(1) == head_dim && queries.stride(1) == 1,
              "native self-attention: queries must be (rows * heads, head_dim), contiguous per row");
  for (const at::Tensor* cache : {&keys, &values})
    TORCH_CHECK(cache->stride(2) == 1 && cache->stride(1) == head_dim, "native self-attention: time slices must be contiguous");
  auto scores = at::empty({pieces, length}, queries.options());
  const float* q = queries.data_ptr<float>();
  float* s = scores.data_ptr<float>();
  at::parallel_for(0, pieces, kGrain, [&](int64_t begin, int64_t end) {
    dot_products(q, queries.stride(0), keys.data_ptr<float>(), keys.stride(0), length, head_dim, begin, end, s);
  });
  if (padding.has_value() && padding->defined()) {
    const at::Tensor& pad = *padding;
    TORCH_CHECK(pad.scalar_type() == at::kBool && pad.dim() == 2 && pad.size(0) == length && pad.size(1) * heads == pieces,
                "native self-attention: padding must be (length, rows) bool");
    const bool* p = pad.data_ptr<bool>();
    const float masked = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t)
      for (int64_t row = 0; row < pad.size(1); ++row)
        if (p[t * pad.stride(0) + row * pad.stride(1)])
          for (int64_t h = 0; h < heads; ++h) s[(row * heads + h) * length + t] = masked;
  }
  auto probs = at::softmax(scores, -1);
  auto out = at::empty({pieces, head_dim}, queries.options());
  const float* pr = probs.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, pieces, kGrain, [&](int64_t begin, int64_t end) {
    weighted_sums(pr, values.data_ptr<float>(), values.stride(0), length, head_dim, begin, end, o);
  });
  return out;
}

// queries (rows, heads * head_dim), scaled, rows sentence-major (a sentence's beams
// together); keys, values (sentences * heads, src_len, head_dim) contiguous; padding:
// undefined, or (sentences, src_len) bool (true: masked). Each sentence's beams attend to its
// one copy of the keys and values. Returns the attention output (rows, heads * head_dim).
at::Tensor grouped_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                             const c10::optional<at::Tensor>& padding, int64_t heads) {
  check_float32_cpu("native grouped attention", queries, keys, values);
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 3 && values.sizes() == keys.sizes() && keys.is_contiguous() && values.is_contiguous(),
              "native grouped attention: keys and values must be contiguous (sentences * heads, src_len, head_dim)");
  const int64_t units = keys.size(0), src_len = keys.size(1), head_dim = keys.size(2);
  const int64_t sentences = units / heads, rows = queries.size(0), beams = sentences > 0 ? rows / sentences : 0;
  TORCH_CHECK(units == sentences * heads && rows == sentences * beams && queries.size(1) == heads * head_dim && queries.stride(1) == 1,
              "native grouped attention: queries must be (sentences * beams, heads * head_dim)");
  auto scores = at::empty({units, beams, src_len}, queries.options());
  float* s = scores.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    grouped_dot_products(queries.data_ptr<float>(), queries.stride(0), keys.data_ptr<float>(), heads, beams, src_len, head_dim, begin, end, s);
  });
  if (padding.has_value() && padding->defined()) {
    const at::Tensor& pad = *padding;
    TORCH_CHECK(pad.scalar_type() == at::kBool && pad.dim() == 2 && pad.size(0) == sentences && pad.size(1) == src_len,
                "native grouped attention: padding must be (sentences, src_len) bool");
    const bool* p = pad.data_ptr<bool>();
    const float masked = -std::numeric_limits<float>::infinity();
    for (int64_t u = 0; u < units; ++u)
      for (int64_t j = 0; j < src_len; ++j)
        if (p[(u / heads) * pad.stride(0) + j * pad.stride(1)])
          for (int64_t b = 0; b < beams; ++b) s[(u * beams + b) * src_len + j] = masked;
  }
  auto probs = at::softmax(scores, -1);
  auto out = at::empty({rows, heads * head_dim}, queries.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    grouped_weighted_sums(probs.data_ptr<float>(), values.data_ptr<float>(), heads, beams, src_len, head_dim, begin, end, o);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("self_attention", &self_attention, "one query per (row, head) against a time-major cache");
  m.def("grouped_attention", &grouped_attention, "a sentence's beams against its one copy of the encoder keys/values");
}
