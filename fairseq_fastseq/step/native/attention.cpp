// The attention of the kernel tiers that round differently (fused, int8): fairseq's bmm /
// softmax / bmm, without the bmm. Self-attention: one query per (row, head) against the
// time-major cache. Encoder attention: a sentence's beams against its one copy of the keys
// and values (grouped queries), straight into the (rows, heads * head_dim) output.
//
// The cache holds keys and values time-major, (steps, rows * heads, head_dim): a (row, head)
// history is a column of 256-byte pieces one time slice apart, which MKL's bmm reads matrix by
// matrix (a jump of a whole time slice per key, no prefetching) at a per-matrix call cost.
// Here every loop runs over time slices, and within a slice over a few (row, head) pieces in
// memory order, their queries or sums held in registers. The softmax between the products is
// the kernels' own (ATen's is slow on the short rows of early steps). The results are the
// same up to rounding. Figures: BENCHMARKS.md, "Native attention and the int8 output
// projection in row chunks" and "the tiers' attention with sums in registers and its own softmax".
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSEQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSEQ_CLONES
#endif

// 16 floats as one value (GCC's vector extension): each clone's target lowers it to its widest
// registers (one AVX-512 register, two AVX2 ones, ...). Unaligned, and may alias floats.
typedef float Floats16 __attribute__((vector_size(64), aligned(4), __may_alias__));
typedef float Floats8 __attribute__((vector_size(32), aligned(4), __may_alias__));
typedef float Floats4 __attribute__((vector_size(16), aligned(4), __may_alias__));
#define FASTSEQ_INLINE __attribute__((always_inline)) inline

FASTSEQ_INLINE Floats16 load16(const float* p) { return *reinterpret_cast<const Floats16*>(p); }
FASTSEQ_INLINE void store16(float* p, Floats16 v) { *reinterpret_cast<Floats16*>(p) = v; }
FASTSEQ_INLINE float sum16(Floats16 v) {
  const Floats8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Floats4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The kernels for a head_dim of 32, 64 or 128 (queries or sums in registers: kernel<16 * head_dim>),
// a loop over head_dim otherwise (kernel<0>).
#define FASTSEQ_BY_HEAD_DIM(kernel, head_dim, ...)       \
  switch (head_dim) {                                     \
    case 32: kernel<2>(__VA_ARGS__); break;               \
    case 64: kernel<4>(__VA_ARGS__); break;               \
    case 128: kernel<8>(__VA_ARGS__); break;              \
    default: kernel<0>(__VA_ARGS__); break;               \
  }

// Pieces (row-heads) of the self-attention taken together: their queries or sums stay in
// registers while their keys or values stream past, one time slice after another.
template <int kChunks>
constexpr int64_t kPiecesPerPass = kChunks <= 4 ? 4 : 2;

// Which cache row holds a hypothesis row's entry of each time slice: with `history` null, the
// row itself; else history[t * stride + row] (histories.py: rows that continue another's
// history read it where it was written, and nothing is copied on a beam reorder).
struct SliceRows {
  const int64_t* history;
  int64_t stride;
  int64_t heads;

  // Where piece (row, head)'s entry of time slice t starts, in pieces from the slice's start.
  FASTSEQ_INLINE int64_t piece(int64_t t, int64_t row, int64_t head) const {
    return history == nullptr ? row * heads + head : history[t * stride + row] * heads + head;
  }
};

// scores[m * length + t] = q[m] . keys[t][m] for the kPieces pieces from m.
template <int kChunks, int kPieces>
FASTSEQ_INLINE void dots_in_registers(const float* q, int64_t q_stride, const float* keys, int64_t time_stride,
                                      const SliceRows& rows, int64_t length, int64_t m, float* scores) {
  constexpr int64_t head_dim = 16 * kChunks;
  Floats16 query[kPieces][kChunks];
  int64_t row[kPieces], head[kPieces];
  for (int i = 0; i < kPieces; ++i) {
    row[i] = (m + i) / rows.heads, head[i] = (m + i) % rows.heads;
    for (int c = 0; c < kChunks; ++c) query[i][c] = load16(q + (m + i) * q_stride + 16 * c);
  }
  for (int64_t t = 0; t < length; ++t) {
    for (int i = 0; i < kPieces; ++i) {
      const float* k = keys + t * time_stride + rows.piece(t, row[i], head[i]) * head_dim;
      Floats16 part = query[i][0] * load16(k);
      for (int c = 1; c < kChunks; ++c) part += query[i][c] * load16(k + 16 * c);
      scores[(m + i) * length + t] = sum16(part);
    }
  }
}

// out[m] = sum over t of probs[m * length + t] * values[t][m] for the kPieces pieces from m.
template <int kChunks, int kPieces>
FASTSEQ_INLINE void sums_in_registers(const float* probs, const float* values, int64_t time_stride, const SliceRows& rows,
                                      int64_t length, int64_t m, float* out) {
  constexpr int64_t head_dim = 16 * kChunks;
  Floats16 sum[kPieces][kChunks] = {};
  int64_t row[kPieces], head[kPieces];
  for (int i = 0; i < kPieces; ++i) row[i] = (m + i) / rows.heads, head[i] = (m + i) % rows.heads;
  for (int64_t t = 0; t < length; ++t) {
    for (int i = 0; i < kPieces; ++i) {
      const float p = probs[(m + i) * length + t];
      const float* v = values + t * time_stride + rows.piece(t, row[i], head[i]) * head_dim;
      for (int c = 0; c < kChunks; ++c) sum[i][c] += p * load16(v + 16 * c);
    }
  }
  for (int i = 0; i < kPieces; ++i)
    for (int c = 0; c < kChunks; ++c) store16(out + (m + i) * head_dim + 16 * c, sum[i][c]);
}

// Pieces [begin, end) kPiecesPerPass at a time through `pass(m, n)` (n: pieces of this pass).
template <int kChunks, typename Pass>
FASTSEQ_INLINE void piece_passes(int64_t begin, int64_t end, Pass pass) {
  constexpr int64_t per_pass = kPiecesPerPass<kChunks>;
  int64_t m = begin;
  for (; m + per_pass <= end; m += per_pass) pass(m, std::integral_constant<int, per_pass>());
  for (; m < end; ++m) pass(m, std::integral_constant<int, 1>());
}

// scores[m * length + t] = q[m] . keys[t][m] for m in [begin, end), every t.
template <int kChunks>
FASTSEQ_INLINE void dot_products_of(const float* q, int64_t q_stride, const float* keys, int64_t time_stride,
                                    const SliceRows& rows, int64_t length, int64_t head_dim, int64_t begin, int64_t end,
                                    float* scores) {
  if constexpr (kChunks > 0) {
    piece_passes<kChunks>(begin, end, [&](int64_t m, auto pieces) {
      dots_in_registers<kChunks, decltype(pieces)::value>(q, q_stride, keys, time_stride, rows, length, m, scores);
    });
  } else {
    for (int64_t t = 0; t < length; ++t) {
      const float* slice = keys + t * time_stride;
      for (int64_t m = begin; m < end; ++m) {
        const float* a = q + m * q_stride;
        const float* b = slice + rows.piece(t, m / rows.heads, m % rows.heads) * head_dim;
        float sum = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) sum += a[d] * b[d];
        scores[m * length + t] = sum;
      }
    }
  }
}

// out[m] = sum over t of probs[m * length + t] * values[t][m], for m in [begin, end).
template <int kChunks>
FASTSEQ_INLINE void weighted_sums_of(const float* probs, const float* values, int64_t time_stride, const SliceRows& rows,
                                     int64_t length, int64_t head_dim, int64_t begin, int64_t end, float* out) {
  if constexpr (kChunks > 0) {
    piece_passes<kChunks>(begin, end, [&](int64_t m, auto pieces) {
      sums_in_registers<kChunks, decltype(pieces)::value>(probs, values, time_stride, rows, length, m, out);
    });
  } else {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t d = 0; d < head_dim; ++d) out[m * head_dim + d] = 0.f;
    for (int64_t t = 0; t < length; ++t) {
      const float* slice = values + t * time_stride;
      for (int64_t m = begin; m < end; ++m) {
        const float p = probs[m * length + t];
        const float* v = slice + rows.piece(t, m / rows.heads, m % rows.heads) * head_dim;
        float* o = out + m * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
      }
    }
  }
}

FASTSEQ_CLONES void dot_products(const float* q, int64_t q_stride, const float* keys, int64_t time_stride,
                                 const SliceRows& rows, int64_t length, int64_t head_dim, int64_t begin, int64_t end,
                                 float* scores) {
  FASTSEQ_BY_HEAD_DIM(dot_products_of, head_dim, q, q_stride, keys, time_stride, rows, length, head_dim, begin, end, scores)
}

FASTSEQ_CLONES void weighted_sums(const float* probs, const float* values, int64_t time_stride, const SliceRows& rows,
                                  int64_t length, int64_t head_dim, int64_t begin, int64_t end, float* out) {
  FASTSEQ_BY_HEAD_DIM(weighted_sums_of, head_dim, probs, values, time_stride, rows, length, head_dim, begin, end, out)
}

// exp(x) for x <= 0 (a score minus its row's maximum), 0 below about -87.3 (-inf included):
// Cody-Waite reduction to 2^n * exp(r), |r| <= ln(2) / 2, and Cephes' degree-6 polynomial
// (about 1 ulp), in code the compiler vectorizes (ATen's softmax spends ~20 ns per element
// on rows shorter than 16: BENCHMARKS.md).
FASTSEQ_INLINE float exp_of_nonpositive(float x) {
  const bool underflows = x < -87.3f;
  const float clamped = underflows ? -87.3f : x;
  const float n = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflows ? 0.f : p * scale;
}

// scores (rows, n) -> their softmax over n, in place: each row minus its maximum, exp over all
// rows at once (vectorized whatever n is), each row times the inverse of its sum.
FASTSEQ_CLONES void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t row = 0; row < rows; ++row) {
    float* s = scores + row * n;
    float largest = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) largest = s[j] > largest ? s[j] : largest;
    for (int64_t j = 0; j < n; ++j) s[j] -= largest;
  }
  for (int64_t i = 0; i < rows * n; ++i) scores[i] = exp_of_nonpositive(scores[i]);
  for (int64_t row = 0; row < rows; ++row) {
    float* s = scores + row * n;
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += s[j];
    const float inverse = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) s[j] *= inverse;
  }
}

// Beams of one sentence-head unit taken together by the kernels below: their queries (dot
// products) or their sums (weighted sums) stay in registers while the unit's keys or values
// stream past once (head_dim = 16 * kChunks).
template <int kChunks>
constexpr int64_t kBeamsPerPass = kChunks <= 4 ? 4 : 2;

// scores[b][j] = q[b] . k[j] for kBeams beams, every j < src_len.
template <int kChunks, int kBeams>
FASTSEQ_INLINE void grouped_dots_in_registers(const float* const* q, const float* k, int64_t src_len, float* const* scores) {
  Floats16 query[kBeams][kChunks];
  for (int b = 0; b < kBeams; ++b)
    for (int c = 0; c < kChunks; ++c) query[b][c] = load16(q[b] + 16 * c);
  for (int64_t j = 0; j < src_len; ++j) {
    const float* key = k + j * 16 * kChunks;
    Floats16 part[kBeams];
    for (int b = 0; b < kBeams; ++b) part[b] = query[b][0] * load16(key);
    for (int c = 1; c < kChunks; ++c) {
      const Floats16 piece = load16(key + 16 * c);
      for (int b = 0; b < kBeams; ++b) part[b] += query[b][c] * piece;
    }
    for (int b = 0; b < kBeams; ++b) scores[b][j] = sum16(part[b]);
  }
}

// out[b] = sum over j of probs[b][j] * v[j] for kBeams beams.
template <int kChunks, int kBeams>
FASTSEQ_INLINE void grouped_sums_in_registers(const float* const* probs, const float* v, int64_t src_len, float* const* out) {
  Floats16 sum[kBeams][kChunks] = {};
  for (int64_t j = 0; j < src_len; ++j) {
    const float* value = v + j * 16 * kChunks;
    for (int c = 0; c < kChunks; ++c) {
      const Floats16 piece = load16(value + 16 * c);
      for (int b = 0; b < kBeams; ++b) sum[b][c] += probs[b][j] * piece;
    }
  }
  for (int b = 0; b < kBeams; ++b)
    for (int c = 0; c < kChunks; ++c) store16(out[b] + 16 * c, sum[b][c]);
}

// One unit's beams, kBeamsPerPass at a time, through `Pass<kChunks, n>` (n: the beams of
// this pass): `rows_a` and `rows_b` give the pass's beam rows of the kernel's two row arguments.
template <int kChunks, template <int, int> class Pass, typename RowsA, typename RowsB>
FASTSEQ_INLINE void in_passes(int64_t beams, const float* shared, int64_t src_len, RowsA rows_a, RowsB rows_b) {
  constexpr int64_t per_pass = kBeamsPerPass<kChunks>;
  const float* a[per_pass];
  float* b[per_pass];
  for (int64_t first = 0; first < beams; first += per_pass) {
    const int64_t n = std::min(per_pass, beams - first);
    for (int64_t i = 0; i < n; ++i) a[i] = rows_a(first + i), b[i] = rows_b(first + i);
    switch (n) {
      case 4: Pass<kChunks, 4>::run(a, shared, src_len, b); break;
      case 3: Pass<kChunks, 3>::run(a, shared, src_len, b); break;
      case 2: Pass<kChunks, 2>::run(a, shared, src_len, b); break;
      default: Pass<kChunks, 1>::run(a, shared, src_len, b); break;
    }
  }
}

template <int kChunks, int kBeams>
struct DotsPass {
  static FASTSEQ_INLINE void run(const float* const* q, const float* k, int64_t n, float* const* s) {
    grouped_dots_in_registers<kChunks, kBeams>(q, k, n, s);
  }
};

template <int kChunks, int kBeams>
struct SumsPass {
  static FASTSEQ_INLINE void run(const float* const* p, const float* v, int64_t n, float* const* o) {
    grouped_sums_in_registers<kChunks, kBeams>(p, v, n, o);
  }
};

// The cached sentence-head unit of each live one: with `live` null, the same; else
// live[sentence] is the live sentence's place in the cache (finished ones stay cached).
struct CachedUnits {
  const int64_t* live;
  int64_t heads;

  FASTSEQ_INLINE int64_t of(int64_t u) const { return live == nullptr ? u : live[u / heads] * heads + u % heads; }
};

// For live sentence-head unit u: scores[(u * beams + b) * src_len + j] = q(b) . keys[cached
// unit][j], where q(b) is beam b's query of that head (rows sentence-major, beams within).
template <int kChunks>
FASTSEQ_INLINE void grouped_dot_products_of(const float* queries, int64_t row_stride, const float* keys, const CachedUnits& cached,
                                            int64_t beams, int64_t src_len, int64_t head_dim, int64_t begin,
                                            int64_t end, float* scores) {
  const int64_t heads = cached.heads;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t sentence = u / heads, head = u % heads;
    const float* k = keys + cached.of(u) * src_len * head_dim;
    if constexpr (kChunks > 0) {
      in_passes<kChunks, DotsPass>(
          beams, k, src_len, [&](int64_t b) { return queries + (sentence * beams + b) * row_stride + head * head_dim; },
          [&](int64_t b) { return scores + (u * beams + b) * src_len; });
    } else {
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
}

// out[(sentence * beams + b)][head * head_dim + d] = sum over j of probs[u, b, j] * values[u][j][d].
template <int kChunks>
FASTSEQ_INLINE void grouped_weighted_sums_of(const float* probs, const float* values, const CachedUnits& cached, int64_t beams,
                                             int64_t src_len, int64_t head_dim, int64_t begin, int64_t end, float* out) {
  const int64_t heads = cached.heads, row_width = heads * head_dim;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t sentence = u / heads, head = u % heads;
    const float* v = values + cached.of(u) * src_len * head_dim;
    float* first = out + sentence * beams * row_width + head * head_dim;  // beam b's: b rows further
    if constexpr (kChunks > 0) {
      in_passes<kChunks, SumsPass>(
          beams, v, src_len, [&](int64_t b) { return probs + (u * beams + b) * src_len; },
          [&](int64_t b) { return first + b * row_width; });
    } else {
      for (int64_t b = 0; b < beams; ++b) {
        float* o = first + b * row_width;
        const float* p = probs + (u * beams + b) * src_len;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.f;
        for (int64_t j = 0; j < src_len; ++j)
          for (int64_t d = 0; d < head_dim; ++d) o[d] += p[j] * v[j * head_dim + d];
      }
    }
  }
}

FASTSEQ_CLONES void grouped_dot_products(const float* queries, int64_t row_stride, const float* keys, const CachedUnits& cached,
                                         int64_t beams, int64_t src_len, int64_t head_dim, int64_t begin, int64_t end,
                                         float* scores) {
  FASTSEQ_BY_HEAD_DIM(grouped_dot_products_of, head_dim, queries, row_stride, keys, cached, beams, src_len, head_dim, begin, end, scores)
}

FASTSEQ_CLONES void grouped_weighted_sums(const float* probs, const float* values, const CachedUnits& cached, int64_t beams,
                                          int64_t src_len, int64_t head_dim, int64_t begin, int64_t end, float* out) {
  FASTSEQ_BY_HEAD_DIM(grouped_weighted_sums_of, head_dim, probs, values, cached, beams, src_len, head_dim, begin, end, out)
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

// queries (rows * heads, head_dim), scaled; keys, values (length, cached rows * heads,
// head_dim) time-major views of the cache (pieces contiguous within a slice); padding:
// undefined, or (length, rows) bool, true where that row's input at that step was padding
// (masked); history: undefined (row r's entries are in cache row r), or (length, rows) int64,
// the cache row that holds row r's entry of each time slice (unit stride along rows).
// Returns the attention output (rows * heads, head_dim), i.e. (rows, heads * head_dim).
at::Tensor self_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                          const c10::optional<at::Tensor>& padding, int64_t heads, const c10::optional<at::Tensor>& history) {
  check_float32_cpu("native self-attention", queries, keys, values);
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 3 && values.sizes() == keys.sizes(), "native self-attention: unexpected shapes");
  const int64_t length = keys.size(0), pieces = queries.size(0), head_dim = keys.size(2);
  TORCH_CHECK(queries.size(1) == head_dim && queries.stride(1) == 1 && pieces % heads == 0,
              "native self-attention: queries must be (rows * heads, head_dim), contiguous per row");
  for (const at::Tensor* cache : {&keys, &values})
    TORCH_CHECK(cache->stride(2) == 1 && cache->stride(1) == head_dim, "native self-attention: time slices must be contiguous");
  SliceRows rows{nullptr, 0, heads};
  if (history.has_value() && history->defined()) {
    const at::Tensor& h = *history;
    TORCH_CHECK(h.scalar_type() == at::kLong && h.dim() == 2 && h.size(0) == length && h.size(1) * heads == pieces && h.stride(1) == 1,
                "native self-attention: history must be (length, rows) int64, unit stride along rows");
    const int64_t cached = keys.size(1) / heads;
    for (int64_t t = 0; t < length; ++t)
      for (int64_t row = 0; row < h.size(1); ++row) {
        const int64_t at = h.data_ptr<int64_t>()[t * h.stride(0) + row];
        TORCH_CHECK(at >= 0 && at < cached, "native self-attention: history names cache row ", at, " of ", cached);
      }
    rows = SliceRows{h.data_ptr<int64_t>(), h.stride(0), heads};
  } else {
    TORCH_CHECK(keys.size(1) == pieces, "native self-attention: without a history the cache holds the queries' rows");
  }
  auto scores = at::empty({pieces, length}, queries.options());
  const float* q = queries.data_ptr<float>();
  float* s = scores.data_ptr<float>();
  at::parallel_for(0, pieces, kGrain, [&](int64_t begin, int64_t end) {
    dot_products(q, queries.stride(0), keys.data_ptr<float>(), keys.stride(0), rows, length, head_dim, begin, end, s);
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
  softmax_rows(s, pieces, length);
  auto out = at::empty({pieces, head_dim}, queries.options());
  const float* pr = s;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, pieces, kGrain, [&](int64_t begin, int64_t end) {
    weighted_sums(pr, values.data_ptr<float>(), values.stride(0), rows, length, head_dim, begin, end, o);
  });
  return out;
}

// queries (rows, heads * head_dim), scaled, rows sentence-major (a sentence's beams
// together); keys, values (cached sentences * heads, src_len, head_dim) contiguous; padding:
// undefined, or (cached sentences, src_len) bool (true: masked); live: undefined (every cached
// sentence is live, in order), or (sentences,) int64, each live sentence's place in the cache.
// Each sentence's beams attend to its one copy of the keys and values. Returns the attention
// output (rows, heads * head_dim); with `averaged` (rows, src_len) float32 contiguous, writes
// there each row's attention weights averaged over the heads (fairseq's decoder attention).
at::Tensor grouped_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                             const c10::optional<at::Tensor>& padding, int64_t heads, const c10::optional<at::Tensor>& averaged,
                             const c10::optional<at::Tensor>& live) {
  check_float32_cpu("native grouped attention", queries, keys, values);
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 3 && values.sizes() == keys.sizes() && keys.is_contiguous() && values.is_contiguous(),
              "native grouped attention: keys and values must be contiguous (sentences * heads, src_len, head_dim)");
  const int64_t cached_sentences = keys.size(0) / heads, src_len = keys.size(1), head_dim = keys.size(2);
  CachedUnits cached{nullptr, heads};
  int64_t sentences = cached_sentences;
  if (live.has_value() && live->defined()) {
    TORCH_CHECK(live->scalar_type() == at::kLong && live->dim() == 1 && live->is_contiguous(), "native grouped attention: live must be (sentences,) int64");
    const int64_t* l = live->data_ptr<int64_t>();
    for (int64_t i = 0; i < live->size(0); ++i)
      TORCH_CHECK(l[i] >= 0 && l[i] < cached_sentences, "native grouped attention: live names cached sentence ", l[i], " of ", cached_sentences);
    cached.live = l, sentences = live->size(0);
  }
  const int64_t units = sentences * heads, rows = queries.size(0), beams = sentences > 0 ? rows / sentences : 0;
  TORCH_CHECK(keys.size(0) == cached_sentences * heads && rows == sentences * beams && queries.size(1) == heads * head_dim && queries.stride(1) == 1,
              "native grouped attention: queries must be (sentences * beams, heads * head_dim)");
  auto scores = at::empty({units, beams, src_len}, queries.options());
  float* s = scores.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    grouped_dot_products(queries.data_ptr<float>(), queries.stride(0), keys.data_ptr<float>(), cached, beams, src_len, head_dim, begin, end, s);
  });
  if (padding.has_value() && padding->defined()) {
    const at::Tensor& pad = *padding;
    TORCH_CHECK(pad.scalar_type() == at::kBool && pad.dim() == 2 && pad.size(0) == cached_sentences && pad.size(1) == src_len,
                "native grouped attention: padding must be (cached sentences, src_len) bool");
    const bool* p = pad.data_ptr<bool>();
    const float masked = -std::numeric_limits<float>::infinity();
    for (int64_t u = 0; u < units; ++u)
      for (int64_t j = 0; j < src_len; ++j)
        if (p[(cached.of(u) / heads) * pad.stride(0) + j * pad.stride(1)])
          for (int64_t b = 0; b < beams; ++b) s[(u * beams + b) * src_len + j] = masked;
  }
  softmax_rows(s, units * beams, src_len);
  if (averaged.has_value() && averaged->defined()) {
    const at::Tensor& mean = *averaged;
    TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.is_contiguous() && mean.dim() == 2 && mean.size(0) == rows && mean.size(1) == src_len,
                "native grouped attention: averaged must be (rows, src_len) float32, contiguous");
    float* a = mean.data_ptr<float>();
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t sentence = row / beams, b = row % beams;  // rows > 0: beams > 0 (checked above)
      float* average = a + row * src_len;
      for (int64_t j = 0; j < src_len; ++j) average[j] = 0.f;
      for (int64_t h = 0; h < heads; ++h) {
        const float* p = s + ((sentence * heads + h) * beams + b) * src_len;
        for (int64_t j = 0; j < src_len; ++j) average[j] += p[j];
      }
      for (int64_t j = 0; j < src_len; ++j) average[j] /= static_cast<float>(heads);
    }
  }
  const float* probs = s;
  auto out = at::empty({rows, heads * head_dim}, queries.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    grouped_weighted_sums(probs, values.data_ptr<float>(), cached, beams, src_len, head_dim, begin, end, o);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("self_attention", &self_attention, "one query per (row, head) against a time-major cache",
        py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("padding"), py::arg("heads"), py::arg("history") = py::none());
  m.def("grouped_attention", &grouped_attention, "a sentence's beams against its one copy of the encoder keys/values",
        py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("padding"), py::arg("heads"), py::arg("averaged") = py::none(),
        py::arg("live") = py::none());
}
