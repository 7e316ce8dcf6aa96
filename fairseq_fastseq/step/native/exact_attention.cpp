// The attention products of `--fast-kernels exact` with the bits of PyTorch's `bmm`, faster.
//
// For one query per matrix (the decoder step), PyTorch's `bmm` on the CPU takes one of two
// paths per call, and each gives every output element by a fixed order of operations, found
// by making each pair of terms cancel in turn (the size of the sum in which they meet shows
// the tree), with the fused multiply-adds then found on random operands:
//
// - Products of fewer than 400 multiply-adds: ATen's own loop, each output a sequential sum
//   from zero, every product rounded before its add (both orders below).
// - Otherwise MKL, whose order depends on the CPU. Two are implemented (`order`):
//   0, "four lanes" (the AMD EPYC of BENCHMARKS.md, no multiply-add fused). Queries times
//   keys (head_dim 64, the keys' rows as columns): the columns in groups of four, each a dot
//   product whose first four products are summed in turn, then four lanes (d mod 4, lane 0
//   starting from that sum) over d = 4..63, reduced as (lane 0 + lane 2) + (lane 1 + lane 3);
//   the last L mod 4 columns by two other trees (eight lanes over d = 4..59 for the first and
//   third, four for the second; then the last four products in turn). Probabilities times
//   values: a sequential sum over the keys, each product rounded first.
//   1, "sixteen lanes, fused" (an Intel Xeon with AVX-512). Queries times keys: product 0
//   alone, sixteen lanes over d = 1..63 by fused multiply-adds, reduced by halves (lane j +
//   lane j+8, then j + j+4, j + j+2, 0 + 1); grouped columns fold product 0 into lane 0 first
//   and reduce d = 1..48 before d = 49..63 (which start from that sum in lane 0), the last
//   L mod 4 columns add product 0 to the reduced lanes at the end (their first and third
//   column round the products of d = 1..32 before adding them). Probabilities times values:
//   blocks of eight keys, each ((k0*k2 fused) + (k1*k3 fused)) + ((k5*k7 fused) + k4 fused
//   on k6 fused on the running sum) (kA*kB fused: kA's product fused onto kB's rounded one),
//   then the last L mod 8 keys fused onto the sum in turn.
//
// Nothing is fused that the order does not fuse: compiled with `-ffp-contract=off`, fused
// multiply-adds written as intrinsics. Which order this CPU's `bmm` follows is found on
// random operands, and every shape is still checked against `bmm` before use
// (`exact_attention.py`).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t kHeadDim = 64;        // the trees below are for 64 terms
constexpr int64_t kAtenLoopWork = 400;  // below this many multiply-adds, ATen's loop
constexpr int64_t kMatrixBlock = 32;    // matrices taken together through the keys
// Split over threads only calls of at least this many multiply-adds per thread (about 10
// microseconds of work): a parallel region costs microseconds, and a busy core makes every
// region wait for it. At 4M (the linear kernel's) the products of batch 32 (160 x 4 matrices
// of 30 keys) stayed on one thread; at 1M two threads took them 2.0-2.5x faster (BENCHMARKS.md).
constexpr int64_t kWorkPerThread = int64_t{1} << 20;

// at::parallel_for's grain (in matrices) for `work` multiply-adds per matrix.
int64_t grain(int64_t work) {
  return std::max(kMatrixBlock, (kWorkPerThread + work - 1) / std::max<int64_t>(work, 1));
}

struct Strided3 {  // a (matrices, rows, columns) view with contiguous columns
  const float* data;
  int64_t matrix, row;
  // Self-attention keys/values read through a history table (`histories.py`): matrix m is
  // head m % heads of hypothesis row m / heads, whose entry of time slice r is in cache row
  // table[r * table_row + m / heads]; `matrix` then steps from one cached (row, head) piece
  // to the next, `row` from one time slice to the next.
  const int64_t* table = nullptr;
  int64_t table_row = 0, heads = 1;
  const float* at(int64_t m, int64_t r) const {
    if (table == nullptr) return data + m * matrix + r * row;
    return data + r * row + (table[r * table_row + m / heads] * heads + m % heads) * matrix;
  }
};

Strided3 view(const torch::Tensor& t) {
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.scalar_type() == torch::kFloat32 && t.device().is_cpu(),
              "exact_attention: 3-D CPU float32 views with contiguous last dimension");
  return {t.data_ptr<float>(), t.stride(0), t.stride(1)};
}

float sequential(const float* q, const float* k) {
  float sum = 0.0f;
  for (int64_t d = 0; d < kHeadDim; ++d) sum = sum + q[d] * k[d];
  return sum;
}

float first_four(const float* q, const float* k) {
  float sum = 0.0f;
  for (int d = 0; d < 4; ++d) sum = sum + q[d] * k[d];
  return sum;
}

float last_four(float sum, const float* q, const float* k) {
  for (int d = 60; d < 64; ++d) sum = sum + q[d] * k[d];
  return sum;
}

// (lane 0 + lane 2) + (lane 1 + lane 3)
float reduced(__m128 lanes) {
  const __m128 pairs = _mm_add_ps(lanes, _mm_movehl_ps(lanes, lanes));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

// Four lanes (d mod 4) over d in [4, stop), lane 0 starting from the first four's sum,
// reduced as (lane 0 + lane 2) + (lane 1 + lane 3).
float four_lanes(const float* q, const float* k, int stop) {
  __m128 lanes = _mm_set_ss(first_four(q, k));
  for (int d = 4; d < stop; d += 4) lanes = _mm_add_ps(lanes, _mm_mul_ps(_mm_loadu_ps(q + d), _mm_loadu_ps(k + d)));
  return reduced(lanes);
}

// Eight lanes (d mod 8 from 4) over d in [4, 60), lane 0 starting from the first four's sum,
// reduced as ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)).
float eight_lanes(const float* q, const float* k) {
  float lane[8] = {first_four(q, k), 0, 0, 0, 0, 0, 0, 0};
  for (int d = 4; d < 60; d += 8)
    for (int i = 0; i < 8; ++i) lane[i] = lane[i] + q[d + i] * k[d + i];
  const float even = (lane[0] + lane[4]) + (lane[2] + lane[6]), odd = (lane[1] + lane[5]) + (lane[3] + lane[7]);
  return even + odd;
}

// out[0, 16 * vectors) += weights[l] * values[m, l, d + ...] for l in [l0, l1) in turn, each
// product rounded (starting from zero at l0 = 0).
void add_products(const float* weights, const Strided3& v, int64_t m, int64_t l0, int64_t l1, int64_t d, int64_t vectors,
                  float* out) {
  __m512 sum[4];
  for (int64_t j = 0; j < vectors; ++j) sum[j] = l0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out + 16 * j);
  for (int64_t l = l0; l < l1; ++l) {
    const __m512 w = _mm512_set1_ps(weights[l]);
    const float* value = v.at(m, l) + d;
    for (int64_t j = 0; j < vectors; ++j) sum[j] = _mm512_add_ps(sum[j], _mm512_mul_ps(w, _mm512_loadu_ps(value + 16 * j)));
  }
  for (int64_t j = 0; j < vectors; ++j) _mm512_storeu_ps(out + 16 * j, sum[j]);
}

// Order 0, "four lanes" (no multiply-add fused).
struct FourLanes {
  // C grouped columns at once (key c at k[c]): independent chains for the core to overlap.
  template <int C>
  static void columns(const float* q, const float* const* k, float* out) {
    __m128 lanes[C];
    for (int c = 0; c < C; ++c) lanes[c] = _mm_set_ss(first_four(q, k[c]));
    for (int d = 4; d < 64; d += 4) {
      const __m128 query = _mm_loadu_ps(q + d);
      for (int c = 0; c < C; ++c) lanes[c] = _mm_add_ps(lanes[c], _mm_mul_ps(query, _mm_loadu_ps(k[c] + d)));
    }
    for (int c = 0; c < C; ++c) out[c] = reduced(lanes[c]);
  }

  // The last L mod 4 columns: the first and third by eight lanes, the second by four, to d = 60;
  // then the last four products in turn.
  static float remainder(const float* q, const float* k, int64_t position) {
    return last_four(position % 2 == 0 ? eight_lanes(q, k) : four_lanes(q, k, 60), q, k);
  }

  static constexpr auto add_keys = add_products;
};

// Order 1, "sixteen lanes, fused" (MKL's AVX-512 path).
constexpr __mmask16 kTail = 0x7fff;  // d = 49..63

__m512 lane0(float x) { return _mm512_zextps128_ps512(_mm_set_ss(x)); }

// Lanes j + j+8, then j + j+4, j + j+2, 0 + 1.
float by_halves(__m512 v) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(v), high);
  return reduced(_mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1)));
}

struct SixteenLanesFused {
  template <int C>
  static void columns(const float* q, const float* const* k, float* out) {
    const __m512 q1 = _mm512_loadu_ps(q + 1), q17 = _mm512_loadu_ps(q + 17), q33 = _mm512_loadu_ps(q + 33);
    const __m512 q49 = _mm512_maskz_loadu_ps(kTail, q + 49);
    __m512 lanes[C];
    for (int c = 0; c < C; ++c) lanes[c] = lane0(q[0] * k[c][0]);
    for (int c = 0; c < C; ++c) lanes[c] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k[c] + 1), lanes[c]);
    for (int c = 0; c < C; ++c) lanes[c] = _mm512_fmadd_ps(q17, _mm512_loadu_ps(k[c] + 17), lanes[c]);
    for (int c = 0; c < C; ++c) lanes[c] = _mm512_fmadd_ps(q33, _mm512_loadu_ps(k[c] + 33), lanes[c]);
    for (int c = 0; c < C; ++c)
      lanes[c] = _mm512_fmadd_ps(q49, _mm512_maskz_loadu_ps(kTail, k[c] + 49), lane0(by_halves(lanes[c])));
    for (int c = 0; c < C; ++c) out[c] = by_halves(lanes[c]);
  }

  static float remainder(const float* q, const float* k, int64_t position) {
    const __m512 first = _mm512_mul_ps(_mm512_loadu_ps(q + 1), _mm512_loadu_ps(k + 1));
    const __m512 second = _mm512_loadu_ps(q + 17), second_keys = _mm512_loadu_ps(k + 17);
    __m512 lanes = position == 1 ? _mm512_fmadd_ps(second, second_keys, first)
                                 : _mm512_add_ps(first, _mm512_mul_ps(second, second_keys));
    lanes = _mm512_fmadd_ps(_mm512_loadu_ps(q + 33), _mm512_loadu_ps(k + 33), lanes);
    lanes = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(kTail, q + 49), _mm512_maskz_loadu_ps(kTail, k + 49), lanes);
    return q[0] * k[0] + by_halves(lanes);
  }

  static void add_keys(const float* weights, const Strided3& v, int64_t m, int64_t l0, int64_t l1, int64_t d,
                       int64_t vectors, float* out) {
    __m512 sum[4];
    for (int64_t j = 0; j < vectors; ++j) sum[j] = l0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out + 16 * j);
    int64_t l = l0;
    for (; l + 8 <= l1; l += 8) {
      __m512 w[8];
      for (int i = 0; i < 8; ++i) w[i] = _mm512_set1_ps(weights[l + i]);
      for (int64_t j = 0; j < vectors; ++j) {
        __m512 x[8];
        for (int i = 0; i < 8; ++i) x[i] = _mm512_loadu_ps(v.at(m, l + i) + d + 16 * j);
        const __m512 late = _mm512_add_ps(_mm512_fmadd_ps(w[5], x[5], _mm512_mul_ps(w[7], x[7])),
                                          _mm512_fmadd_ps(w[4], x[4], _mm512_fmadd_ps(w[6], x[6], sum[j])));
        const __m512 early = _mm512_add_ps(_mm512_fmadd_ps(w[0], x[0], _mm512_mul_ps(w[2], x[2])),
                                           _mm512_fmadd_ps(w[1], x[1], _mm512_mul_ps(w[3], x[3])));
        sum[j] = _mm512_add_ps(early, late);
      }
    }
    for (; l < l1; ++l) {
      const __m512 w = _mm512_set1_ps(weights[l]);
      for (int64_t j = 0; j < vectors; ++j) sum[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v.at(m, l) + d + 16 * j), sum[j]);
    }
    for (int64_t j = 0; j < vectors; ++j) _mm512_storeu_ps(out + 16 * j, sum[j]);
  }
};

template <class Order>
void scores(const Strided3& q, const Strided3& k, const Strided3& s, int64_t matrices, int64_t rows, int64_t length) {
  const bool aten_loop = kHeadDim * length < kAtenLoopWork;
  const int64_t grouped = length - length % 4;
  auto one = [&](const float* query, const float* key, int64_t l) {
    if (aten_loop) return sequential(query, key);
    float out;
    if (l < grouped) Order::template columns<1>(query, &key, &out);
    return l < grouped ? out : Order::remainder(query, key, l - grouped);
  };
  // A block of matrices at a time, eight keys of each in turn: the keys of the step's
  // time-major cache (a time slice of every matrix contiguous) are then read as a few
  // sequential streams, and each query row serves eight dots.
  const int64_t in_eights = aten_loop ? 0 : grouped - grouped % 8;
  float* out = const_cast<float*>(s.data);
  at::parallel_for(0, matrices, grain(rows * length * kHeadDim), [&](int64_t begin, int64_t end) {
    for (int64_t m0 = begin; m0 < end; m0 += kMatrixBlock) {
      const int64_t m1 = std::min(end, m0 + kMatrixBlock);
      for (int64_t l = 0; l < in_eights; l += 8)
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t i = 0; i < rows; ++i) {
            const float* keys[8];
            for (int c = 0; c < 8; ++c) keys[c] = k.at(m, l + c);
            Order::template columns<8>(q.at(m, i), keys, out + m * s.matrix + i * s.row + l);
          }
      for (int64_t l = in_eights; l < length; ++l)
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t i = 0; i < rows; ++i) out[m * s.matrix + i * s.row + l] = one(q.at(m, i), k.at(m, l), l);
    }
  });
}

template <class Order>
void context(const Strided3& p, const Strided3& v, const Strided3& c, int64_t matrices, int64_t rows, int64_t length,
             int64_t dim) {
  float* out = const_cast<float*>(c.data);
  const bool aten_loop = dim * length < kAtenLoopWork;
  // Each output row is a running sum kept in the output between passes over the keys: for
  // the step's time-major values eight keys (one block of order 1) of a block of matrices at
  // a time, read as a few sequential streams; otherwise all keys in one pass.
  const int64_t keys_per_pass = v.row > v.matrix ? 8 : length;
  at::parallel_for(0, matrices, grain(rows * length * dim), [&](int64_t begin, int64_t end) {
    for (int64_t m0 = begin; m0 < end; m0 += kMatrixBlock) {
      const int64_t m1 = std::min(end, m0 + kMatrixBlock);
      for (int64_t l0 = 0; l0 < length; l0 += keys_per_pass)
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t d = 0; d < dim; d += 64) {
              const int64_t l1 = std::min(l0 + keys_per_pass, length), vectors = std::min<int64_t>(64, dim - d) / 16;
              float* row = out + m * c.matrix + i * c.row + d;
              if (aten_loop) add_products(p.at(m, i), v, m, l0, l1, d, vectors, row);
              else Order::add_keys(p.at(m, i), v, m, l0, l1, d, vectors, row);
            }
    }
  });
}

}  // namespace

// scores[m, i, l] = queries[m, i, :] . keys[m, l, :], as bmm(queries, keys.transpose(1, 2))
// gives it one query row per matrix, in MKL's `order` (0 or 1, see above).
void scores_into(const torch::Tensor& queries, const torch::Tensor& keys, torch::Tensor& out, int64_t order) {
  const Strided3 q = view(queries), k = view(keys), s = view(out);
  const int64_t matrices = queries.size(0), rows = queries.size(1), length = keys.size(1);
  TORCH_CHECK(queries.size(2) == kHeadDim && keys.size(2) == kHeadDim && keys.size(0) == matrices &&
              out.size(0) == matrices && out.size(1) == rows && out.size(2) == length && (order == 0 || order == 1),
              "exact_attention.scores_into: shapes or order");
  (order == 0 ? scores<FourLanes> : scores<SixteenLanesFused>)(q, k, s, matrices, rows, length);
}

// context[m, i, :] = sum over l of probs[m, i, l] * values[m, l, :], as bmm(probs, values)
// gives it one row per matrix, in MKL's `order`.
void context_into(const torch::Tensor& probs, const torch::Tensor& values, torch::Tensor& out, int64_t order) {
  const Strided3 p = view(probs), v = view(values), c = view(out);
  const int64_t matrices = probs.size(0), rows = probs.size(1), length = probs.size(2), dim = values.size(2);
  TORCH_CHECK(values.size(0) == matrices && values.size(1) == length && out.size(0) == matrices &&
              out.size(1) == rows && out.size(2) == dim && dim % 16 == 0 && length > 0 && (order == 0 || order == 1),
              "exact_attention.context_into: shapes or order");
  (order == 0 ? context<FourLanes> : context<SixteenLanesFused>)(p, v, c, matrices, rows, length, dim);
}

// One attention of the decoder step, both products in bmm's bits and fairseq's steps between
// them: scores = queries (matrices, rows, 64) @ keys^T in `scores_order`, -inf where `mask`
// (matrices / group, length) bool is true for the matrix's group (a row's or sentence's
// heads), ATen's own softmax over the keys, then context = probabilities @ values in
// `context_order`, written into `contexts` (matrices, rows, dim). One call where Python made
// about ten operator calls (BENCHMARKS.md, "One call per attention"). With `history` (length,
// matrices / group) int64, the self-attention's keys and values are those of every cached row,
// (cached rows * group, length, 64), and matrix m reads its entry of time slice t from cached
// row history[t, m / group] (`histories.py`). False, with nothing written, where the scores'
// operands are off the 16-byte alignment MKL's order assumes.
bool attend_into(const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& values,
                 const c10::optional<torch::Tensor>& mask, int64_t group, torch::Tensor& contexts, int64_t scores_order,
                 int64_t context_order, const c10::optional<torch::Tensor>& history) {
  Strided3 k = view(keys), v = view(values);
  const Strided3 q = view(queries), c = view(contexts);
  const int64_t matrices = queries.size(0), rows = queries.size(1), length = keys.size(1), dim = values.size(2);
  TORCH_CHECK(queries.size(2) == kHeadDim && keys.size(2) == kHeadDim && values.size(0) == keys.size(0) &&
              values.size(1) == length && contexts.size(0) == matrices && contexts.size(1) == rows && contexts.size(2) == dim &&
              dim % 16 == 0 && length > 0 && group > 0 && matrices % group == 0,
              "exact_attention.attend_into: shapes");
  TORCH_CHECK((scores_order == 0 || scores_order == 1) && (context_order == 0 || context_order == 1), "exact_attention.attend_into: order");
  if (history.has_value()) {
    const torch::Tensor& table = *history;
    TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kLong && table.size(0) == length &&
                table.size(1) * group == matrices && table.stride(1) == 1 && keys.size(0) % group == 0,
                "exact_attention.attend_into: history (length, matrices / group) int64, unit stride along rows");
    const int64_t cached = keys.size(0) / group;
    const int64_t* at = table.data_ptr<int64_t>();
    for (int64_t t = 0; t < length; ++t)
      for (int64_t r = 0; r < table.size(1); ++r)
        TORCH_CHECK(at[t * table.stride(0) + r] >= 0 && at[t * table.stride(0) + r] < cached, "exact_attention.attend_into: history names a row past the cache");
    for (Strided3* s : {&k, &v}) {
      s->table = at;
      s->table_row = table.stride(0);
      s->heads = group;
    }
  } else {
    TORCH_CHECK(keys.size(0) == matrices, "exact_attention.attend_into: a key matrix per query matrix");
  }
  auto aligned = [](const torch::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 4 == 0 && (t.size(1) == 1 || t.stride(1) % 4 == 0);
  };
  if (!aligned(queries) || !aligned(keys)) return false;
  auto weights = torch::empty({matrices, rows, length}, queries.options());
  const Strided3 s = view(weights);
  (scores_order == 0 ? scores<FourLanes> : scores<SixteenLanesFused>)(q, k, s, matrices, rows, length);
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->scalar_type() == torch::kBool && mask->size(0) * group == matrices &&
                mask->size(1) == length, "exact_attention.attend_into: mask (matrices / group, length) bool");
    const bool* masked = mask->data_ptr<bool>();
    const int64_t by_group = mask->stride(0), by_key = mask->stride(1);
    float* out = weights.data_ptr<float>();
    for (int64_t m = 0; m < matrices; ++m)
      for (int64_t l = 0; l < length; ++l)
        if (masked[(m / group) * by_group + l * by_key])
          for (int64_t i = 0; i < rows; ++i) out[(m * rows + i) * length + l] = -std::numeric_limits<float>::infinity();
  }
  const auto probs = at::_softmax(weights, -1, false);  // fairseq's softmax, ATen's kernel
  (context_order == 0 ? context<FourLanes> : context<SixteenLanesFused>)(view(probs), v, c, matrices, rows, length, dim);
  return true;
}

// buffer[t, destinations[i]] = buffer[t, sources[i]] for t < length (a contiguous CPU buffer
// (capacity, rows, ...) of any type; no row both a source and a destination): the beam
// reorder of `exact`'s self-attention histories in slots (`caches.py`), one pass of copies
// where NumPy's fancy indexing made two.
void copy_rows(torch::Tensor& buffer, int64_t length, const torch::Tensor& sources, const torch::Tensor& destinations) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.device().is_cpu() && buffer.dim() >= 2 && length >= 0 && length <= buffer.size(0),
              "exact_attention.copy_rows: a contiguous CPU buffer (capacity, rows, ...) and length <= capacity");
  TORCH_CHECK(sources.scalar_type() == torch::kLong && destinations.scalar_type() == torch::kLong && sources.is_contiguous() &&
              destinations.is_contiguous() && sources.numel() == destinations.numel(),
              "exact_attention.copy_rows: int64 sources and destinations of one size");
  const int64_t rows = buffer.size(1), count = sources.numel();
  const int64_t* from = sources.data_ptr<int64_t>();
  const int64_t* to = destinations.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(from[i] >= 0 && from[i] < rows && to[i] >= 0 && to[i] < rows, "exact_attention.copy_rows: a row out of range");
  char* base = static_cast<char*>(buffer.data_ptr());
  const int64_t row_bytes = buffer.stride(1) * buffer.element_size(), slice_bytes = buffer.stride(0) * buffer.element_size();
  const int64_t grain = std::max<int64_t>(1, kWorkPerThread / std::max<int64_t>(1, count * row_bytes));
  at::parallel_for(0, length, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t i = 0; i < count; ++i) std::memcpy(base + t * slice_bytes + to[i] * row_bytes, base + t * slice_bytes + from[i] * row_bytes, row_bytes);
  });
}

#ifndef FASTSEQ_EMBEDDED  // exact_layer.cpp includes this file for its functions, with a module of its own
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_into", &attend_into, "scores, mask, softmax and context of one attention in bmm's bits (false: operands off alignment)",
        pybind11::arg("queries"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("mask"), pybind11::arg("group"),
        pybind11::arg("contexts"), pybind11::arg("scores_order"), pybind11::arg("context_order"), pybind11::arg("history") = pybind11::none());
  m.def("copy_rows", &copy_rows, "buffer[t, destinations] = buffer[t, sources] for t < length, in one pass of copies");
  m.def("scores_into", &scores_into, "bmm(queries, keys^T)'s bits for one query per matrix (head_dim 64) in MKL's order 0 or 1");
  m.def("context_into", &context_into, "bmm(probs, values)'s bits for one row per matrix in MKL's order 0 or 1");
}
#endif
