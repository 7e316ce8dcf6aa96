// The linear layers of `--fast-kernels exact` with MKL's own order of operations, faster.
//
// Each output element of MKL's single-precision product (`addmm`, `mm`) follows one of two
// orders, found by cancelling pairs of terms (BENCHMARKS.md):
// - blocks (`linear_into`): the bias (or nothing), then for each block of the inner dimension
//   in turn the block's dot product, summed from zero by fused multiply-adds in index order,
//   added to the element (the AMD EPYC of BENCHMARKS.md; an Intel Xeon from 11-16 rows on).
//   Which blocks is calibrated per inner dimension against MKL on the machine. Where MKL
//   splits the inner dimension over two threads, the blocks after `split` are a second
//   such chain from zero, added to the first at the end.
// - sixteen lanes (`lanes_into`, an Intel Xeon at 2-10 rows, 2-15 from 512 inner terms on):
//   lane j sums the products of inner indices j, j + 16, ... in turn by fused multiply-adds;
//   the lanes' four quarters are added in turn, the quarter's four sums as (0 + 1) + (2 + 3),
//   and the bias added last. (One row is another order again: MKL there.)
// Which order a shape follows is found against MKL (`exact_gemm.py`): every shape is checked
// bit for bit before it is used. The order of operations per element is all that fixes the
// bits: how elements are tiled, which thread computes which columns, and the weight's layout
// (packed once here, per call in MKL) are free, and that is where the time goes.
//
// Compiled without any fast-math flag: every multiply-add and add below is one rounding,
// in the order written.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kPanel = 32;  // output columns per packed panel: two 16-float vectors
constexpr int kRowsPerTile = 8; // 8 rows x 2 vectors = 16 accumulators (6 rows: 3-9% slower, BENCHMARKS.md)
// Panels go to threads in chunks of at least this many multiply-adds (tens of microseconds):
// a parallel region costs microseconds, and far more where another process holds a core.
constexpr int64_t kWorkPerThread = int64_t{1} << 22;

}  // namespace

// What the decoder layer does to a linear layer's output next, each its own rounding, as
// ATen's pass over the output would make it (`mul_` by a float, `relu_` = `clamp_min_(0)`,
// `add_` of the residual): applied to each element once its product is whole, while it is
// still in a register, instead of in another pass over memory (exact_layer.cpp).
struct Epilogue {
  bool scaled = false;
  float scale = 1.0f;
  bool relu = false;
  const float* residual = nullptr;  // rows `residual_stride` apart, the output's columns
  int64_t residual_stride = 0;

  __m512 operator()(__m512 value, const float* residual_row, __mmask16 lanes) const {
    if (scaled) value = _mm512_mul_ps(value, _mm512_set1_ps(scale));
    if (relu) value = _mm512_max_ps(_mm512_setzero_ps(), value);  // NaN and -0.0 kept, as clamp_min
    if (residual_row != nullptr) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(lanes, residual_row));
    return value;
  }
  float operator()(float value, const float* residual_element) const {
    if (scaled) value = value * scale;
    if (relu) value = 0.0f > value ? 0.0f : value;
    if (residual_element != nullptr) value = value + *residual_element;
    return value;
  }
  const float* residual_at(int64_t row, int64_t column) const {
    return residual == nullptr ? nullptr : residual + row * residual_stride + column;
  }
};

// The epilogue of an output `out`: times `scale` (as a float, as ATen's `mul_` takes a
// Python float), ReLU, plus `residual` (out's shape, columns contiguous), in that order.
Epilogue epilogue_of(const c10::optional<double>& scale, bool relu, const c10::optional<torch::Tensor>& residual, const torch::Tensor& out) {
  Epilogue finish;
  finish.scaled = scale.has_value();
  finish.scale = static_cast<float>(scale.value_or(1.0));
  finish.relu = relu;
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->sizes() == out.sizes() && residual->stride(1) == 1 &&
                residual->scalar_type() == torch::kFloat32, "exact_gemm: the residual has the output's shape, columns contiguous");
    finish.residual = residual->data_ptr<float>();
    finish.residual_stride = residual->stride(0);
  }
  return finish;
}

namespace {

// One tile: rows [0, R) of x against one panel, over inner indices [k0, k1); the block's sums
// are added to c (or, for the first block, to the bias or to nothing).
// `finish` (the element's last block, no second chain): the epilogue too, its residual rows
// starting at `residual`.
template <int R>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1, float* c, int64_t ldc,
                 bool first, const float* bias, __mmask16 low, __mmask16 high, const Epilogue* finish, const float* residual) {
  __m512 sum[R][2];
  for (int r = 0; r < R; ++r) {
    sum[r][0] = _mm512_setzero_ps();
    sum[r][1] = _mm512_setzero_ps();
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel), w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      sum[r][0] = _mm512_fmadd_ps(a, w0, sum[r][0]);
      sum[r][1] = _mm512_fmadd_ps(a, w1, sum[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    __m512 c0 = sum[r][0], c1 = sum[r][1];
    if (!first) {
      c0 = _mm512_add_ps(_mm512_maskz_loadu_ps(low, row), c0);
      c1 = _mm512_add_ps(_mm512_maskz_loadu_ps(high, row + 16), c1);
    } else if (bias != nullptr) {
      c0 = _mm512_add_ps(_mm512_maskz_loadu_ps(low, bias), c0);
      c1 = _mm512_add_ps(_mm512_maskz_loadu_ps(high, bias + 16), c1);
    }
    if (finish != nullptr) {
      const float* residual_row = residual == nullptr ? nullptr : residual + r * finish->residual_stride;
      c0 = (*finish)(c0, residual_row, low);
      c1 = (*finish)(c1, residual_row == nullptr ? nullptr : residual_row + 16, high);
    }
    _mm512_mask_storeu_ps(row, low, c0);
    _mm512_mask_storeu_ps(row + 16, high, c1);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool, const float*,
                      __mmask16, __mmask16, const Epilogue*, const float*);
constexpr Tile kTiles[kRowsPerTile + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

__mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// Lanes' quarters in turn, then (0 + 1) + (2 + 3).
inline float by_quarters(__m512 v) {
  __m128 s = _mm512_castps512_ps128(v);
  for (int quarter = 1; quarter < 4; ++quarter)
    s = _mm_add_ps(s, quarter == 1 ? _mm512_extractf32x4_ps(v, 1) : quarter == 2 ? _mm512_extractf32x4_ps(v, 2)
                                                                                   : _mm512_extractf32x4_ps(v, 3));
  const __m128 pairs = _mm_add_ps(s, _mm_shuffle_ps(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehl_ps(pairs, pairs)));
}

// Rows [0, R) of x against output features [0, O) of weight (rows `ldw` apart): sixteen lanes each.
template <int R, int O>
inline void lanes_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, const float* bias, float* c,
                       int64_t ldc, const Epilogue& finish, int64_t row0, int64_t column0) {
  __m512 sum[R][O];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) sum[r][o] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __m512 weights[O];
    for (int o = 0; o < O; ++o) weights[o] = _mm512_loadu_ps(w + o * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_loadu_ps(x + r * ldx + i);
      for (int o = 0; o < O; ++o) sum[r][o] = _mm512_fmadd_ps(a, weights[o], sum[r][o]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) {
      const float total = by_quarters(sum[r][o]);
      c[r * ldc + o] = finish(bias != nullptr ? bias[o] + total : total, finish.residual_at(row0 + r, column0 + o));
    }
}

constexpr int kLaneRows = 4, kLaneOutputs = 4;
using LanesTile = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t, const Epilogue&,
                           int64_t, int64_t);
constexpr LanesTile kLanesTiles[2][kLaneRows + 1] = {
    {nullptr, lanes_tile<1, 1>, lanes_tile<2, 1>, lanes_tile<3, 1>, lanes_tile<4, 1>},
    {nullptr, lanes_tile<1, kLaneOutputs>, lanes_tile<2, kLaneOutputs>, lanes_tile<3, kLaneOutputs>, lanes_tile<4, kLaneOutputs>}};

}  // namespace

// weight (out_features, in_features) -> (panels, in_features, 32), the columns of panel p
// being output features [32p, 32p + 32), zero past the last.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu(),
              "exact_gemm.pack: a 2-D CPU float32 weight");
  const auto source = weight.contiguous();
  const int64_t n = source.size(0), k = source.size(1), panels = (n + kPanel - 1) / kPanel;
  auto packed = torch::zeros({panels, k, kPanel}, source.options());
  const float* w = source.data_ptr<float>();
  float* p = packed.data_ptr<float>();
  for (int64_t column = 0; column < n; ++column)
    for (int64_t i = 0; i < k; ++i) p[((column / kPanel) * k + i) * kPanel + column % kPanel] = w[column * k + i];
  return packed;
}

// out (rows, out_features) = bias + x (rows, in_features) @ weight.T, with x's and out's rows
// at any stride (columns contiguous), in the blocks of the inner dimension that `bounds` gives
// (0 = b0 < b1 < ... = in_features); blocks from index `split` on (0: none) as a second chain;
// then `finish` on each element.
void linear_into(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                 const std::vector<int64_t>& bounds, int64_t split, torch::Tensor& out, const Epilogue& finish = Epilogue()) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1, "exact_gemm.linear_into: 2-D rows");
  const int64_t rows = x.size(0), k = x.size(1), n = out.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == k && out.size(0) == rows && (n + kPanel - 1) / kPanel == panels, "exact_gemm.linear_into: shapes");
  const int64_t blocks = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK(blocks >= 1 && bounds.front() == 0 && bounds.back() == k && split >= 0 && split < blocks,
              "exact_gemm.linear_into: blocks");
  const float* xs = x.data_ptr<float>();
  const float* ws = packed.data_ptr<float>();
  const float* bs = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* cs = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldc = out.stride(0);
  // Panels apart on threads: each element is computed whole by one thread, in the same order.
  const int64_t grain = std::max<int64_t>(1, kWorkPerThread / std::max<int64_t>(1, rows * k * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> second(split > 0 ? rows * kPanel : 0);  // the second chain's sums, this panel's columns
    for (int64_t p = begin; p < end; ++p) {
      const int64_t column = p * kPanel, width = std::min(kPanel, n - column);
      const __mmask16 low = lanes(width), high = lanes(width - 16);
      const float* panel = ws + p * k * kPanel;
      const float* panel_bias = bs != nullptr ? bs + column : nullptr;
      for (int64_t block = 0; block < blocks; ++block) {
        const bool chained = split > 0 && block >= split;
        float* target = chained ? second.data() : cs + column;
        const int64_t ld = chained ? kPanel : ldc;
        for (int64_t row = 0; row < rows; row += kRowsPerTile) {
          const int64_t tile_rows = std::min<int64_t>(kRowsPerTile, rows - row);
          const bool last = split == 0 && block == blocks - 1;
          kTiles[tile_rows](xs + row * ldx, ldx, panel, bounds[block], bounds[block + 1], target + row * ld, ld,
                            block == 0 || block == split, chained ? nullptr : panel_bias, low, high, last ? &finish : nullptr,
                            last ? finish.residual_at(row, column) : nullptr);
        }
      }
      for (int64_t row = 0; split > 0 && row < rows; ++row) {  // first chain + second chain
        float* c = cs + row * ldc + column;
        const float* t = second.data() + row * kPanel;
        const float* residual = finish.residual_at(row, column);
        const __m512 c0 = _mm512_add_ps(_mm512_maskz_loadu_ps(low, c), _mm512_maskz_loadu_ps(low, t));
        const __m512 c1 = _mm512_add_ps(_mm512_maskz_loadu_ps(high, c + 16), _mm512_maskz_loadu_ps(high, t + 16));
        _mm512_mask_storeu_ps(c, low, finish(c0, residual, low));
        _mm512_mask_storeu_ps(c + 16, high, finish(c1, residual == nullptr ? nullptr : residual + 16, high));
      }
    }
  });
}

// out (rows, out_features) = bias + x @ weight.T in sixteen lanes of the inner dimension (a
// multiple of 16); the weight as it is (unpacked); then `finish` on each element.
void lanes_into(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                torch::Tensor& out, const Epilogue& finish = Epilogue()) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && weight.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1 &&
              weight.stride(1) == 1, "exact_gemm.lanes_into: 2-D rows");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && k % 16 == 0 && out.size(0) == rows && out.size(1) == n, "exact_gemm.lanes_into: shapes");
  const float* xs = x.data_ptr<float>();
  const float* ws = weight.data_ptr<float>();
  const float* bs = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* cs = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldw = weight.stride(0), ldc = out.stride(0);
  const int64_t groups = (n + kLaneOutputs - 1) / kLaneOutputs;
  const int64_t grain = std::max<int64_t>(1, kWorkPerThread / std::max<int64_t>(1, rows * k * kLaneOutputs));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t o = g * kLaneOutputs; o < std::min(n, (g + 1) * kLaneOutputs);) {
        const bool whole = o + kLaneOutputs <= n;
        for (int64_t row = 0; row < rows; row += kLaneRows)
          kLanesTiles[whole][std::min<int64_t>(kLaneRows, rows - row)](xs + row * ldx, ldx, ws + o * ldw, ldw, k,
                                                                        bs != nullptr ? bs + o : nullptr, cs + row * ldc + o, ldc,
                                                                        finish, row, o);
        o += whole ? kLaneOutputs : 1;
      }
  });
}

// How many of torch's threads at::parallel_for gives `tasks` single-task chunks: more than one
// only where the extensions are compiled with OpenMP (native/__init__.py), else silently one.
int64_t threads_used(int64_t tasks) {
  std::vector<char> ran(at::get_num_threads(), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

#ifndef FASTSEQ_EMBEDDED  // exact_layer.cpp includes this file for its functions, with a module of its own
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("threads_used", &threads_used, "how many threads at::parallel_for spreads `tasks` chunks of one over");
  m.def("pack", &pack, "weight (out, in) -> panels of 32 output features (panels, in, 32)");
  using pybind11::arg;
  const auto none = pybind11::none();
  m.def(
      "lanes_into",
      [](const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
         const c10::optional<double>& scale, bool relu, const c10::optional<torch::Tensor>& residual) {
        lanes_into(x, weight, bias, out, epilogue_of(scale, relu, residual, out));
      },
      "out = bias + x @ weight.T in sixteen fused lanes of the inner dimension; then times `scale`, ReLU, plus `residual`",
      arg("x"), arg("weight"), arg("bias"), arg("out"), arg("scale") = none, arg("relu") = false, arg("residual") = none);
  m.def(
      "linear_into",
      [](const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias, const std::vector<int64_t>& bounds,
         int64_t split, torch::Tensor& out, const c10::optional<double>& scale, bool relu, const c10::optional<torch::Tensor>& residual) {
        linear_into(x, packed, bias, bounds, split, out, epilogue_of(scale, relu, residual, out));
      },
      "out = bias + x @ weight.T in MKL's order of operations, blocks of the inner dimension given, a second chain from `split`; "
      "then times `scale`, ReLU, plus `residual`",
      arg("x"), arg("packed"), arg("bias"), arg("bounds"), arg("split"), arg("out"), arg("scale") = none, arg("relu") = false,
      arg("residual") = none);
}
#endif
