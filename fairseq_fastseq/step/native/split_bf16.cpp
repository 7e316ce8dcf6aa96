// The linear layers of `--fast-kernels fused` on Intel AMX: float32 products as three
// bfloat16 products ("split bfloat16").
//
// Each float32 operand v is split into two bfloat16 parts, high = bf16(v) and
// low = bf16(v - high) (round to nearest even; v - high is exact in float32), which hold 16 of
// its 24 significant bits. The product x . w is then summed as
//     x_low . w_high + x_high . w_high + x_high . w_low
// in float32 by AMX tile dot products (each bfloat16 product exact, sums rounded in float32);
// the dropped x_low . w_low and the bits past the 16th are ~2^-17 of each product, where a
// float32 product rounds at 2^-24: a relative error of ~1e-5 on a linear layer's output
// where MKL's float32 gives ~1e-6. Three tile products per float32 product, at sixteen times
// the multiply-adds per cycle of AVX-512: 1.2-3.7x MKL on the decoder's shapes (BENCHMARKS.md,
// "The fused tier's linear layers on AMX").
//
// Layout. The weight is packed once into tiles of 16 output columns x 32 inner terms (16
// pairs: AMX takes the inner dimension in pairs per column), per block of 32 columns and
// per 32 inner terms [high, high, low, low] for the block's two column tiles. The rows are
// split per call into tiles of 16 rows x 32 inner terms, [high, low] per 32 inner terms. A
// block of 32 x 32 outputs keeps its four accumulator tiles in the tile registers for the
// whole inner dimension; the padding (rows to 16, inner terms to 32, columns to 32) is zeros.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTile = 16;                      // output rows and columns of one accumulator tile
constexpr int64_t kDepth = 32;                     // inner terms per tile product (16 pairs)
constexpr int64_t kTileElements = kTile * kDepth;  // bfloat16 per operand tile (1 KiB)
constexpr int64_t kBlockColumns = 2 * kTile;
// Column blocks go to threads in chunks of at least this many multiply-adds (as exact_gemm.cpp).
constexpr int64_t kWorkPerThread = int64_t{1} << 22;

// Registers: accumulators 0-3 (row tile r, column tile c at 2r + c), rows 4-5, weight 6-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process AMX's tile state only when asked (arch_prctl), once per process.
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
}

uint16_t to_bf16(float value) {  // round to nearest even, as _mm512_cvtneps_pbh
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

int64_t blocks_of(int64_t n, int64_t size) { return (n + size - 1) / size; }

__mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// x's rows (rows x inner, rows `stride` apart) -> [row tile][32 inner terms][high, low][16 x 32];
// false where a value is infinite or NaN (its split would make inf - inf, and inf * 0 of a low
// part: not the float32 product's inf).
bool split_rows(const float* x, int64_t rows, int64_t inner, int64_t stride, int64_t steps, uint16_t* tiles) {
  bool finite = true;
  for (int64_t row_tile = 0; row_tile < blocks_of(rows, kTile); ++row_tile)
    for (int64_t step = 0; step < steps; ++step) {
      uint16_t* high = tiles + (row_tile * steps + step) * 2 * kTileElements;
      uint16_t* low = high + kTileElements;
      for (int64_t i = 0; i < kTile; ++i) {
        const int64_t row = row_tile * kTile + i, first = step * kDepth;
        const int64_t terms = row < rows ? std::min(kDepth, inner - first) : 0;
        for (int64_t half = 0; half < 2; ++half) {
          const __mmask16 valid = lanes(terms - half * 16);
          const __m512 v = _mm512_maskz_loadu_ps(valid, valid ? x + row * stride + first + half * 16 : x);
          const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
          const __m512 h_value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
          const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, h_value));
          finite &= _mm512_mask_cmp_ps_mask(valid, _mm512_abs_ps(v), _mm512_set1_ps(INFINITY), _CMP_LT_OQ) == valid;  // NaN: false
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + i * kDepth + half * 16), h);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + i * kDepth + half * 16), l);
        }
      }
    }
  return finite;
}

void configure(int64_t rows_per_tile) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = t < 6 ? rows_per_tile : kTile;
    config.bytes_per_row[t] = 64;  // 16 float32 sums, or 32 bfloat16
  }
  _tile_loadconfig(&config);
}

// Accumulators += the rows' tiles (loaded from `rows`, the second row tile `next_row_tile`
// further) times the weight tiles held in registers 6-7.
template <int RowTiles>
inline void load_and_multiply(const uint16_t* rows, int64_t next_row_tile) {
  _tile_loadd(4, rows, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  if (RowTiles == 2) {
    _tile_loadd(5, rows + next_row_tile, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// One block of RowTiles x 2 accumulator tiles over all inner terms: the accumulators start
// at `start` (each column's bias, or zero: every row of a tile the same 16 floats, loaded with
// a row stride of 0) and are stored to `target`, rows `stride` floats apart.
template <int RowTiles>
void block(const uint16_t* rows, const uint16_t* weight, int64_t steps, const float* start, float* target, int64_t stride) {
  const int64_t next_row_tile = steps * 2 * kTileElements;
  _tile_loadd(0, start, 0);
  _tile_loadd(1, start + kTile, 0);
  if (RowTiles == 2) {
    _tile_loadd(2, start, 0);
    _tile_loadd(3, start + kTile, 0);
  }
  for (int64_t step = 0; step < steps; ++step) {
    const uint16_t* w = weight + step * 4 * kTileElements;
    const uint16_t* high = rows + step * 2 * kTileElements;
    _tile_loadd(6, w, 64);  // weight high
    _tile_loadd(7, w + kTileElements, 64);
    load_and_multiply<RowTiles>(high + kTileElements, next_row_tile);  // x low . w high
    load_and_multiply<RowTiles>(high, next_row_tile);                  // x high . w high
    _tile_loadd(6, w + 2 * kTileElements, 64);                         // x high . w low
    _tile_loadd(7, w + 3 * kTileElements, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (RowTiles == 2) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t bytes = stride * sizeof(float);
  _tile_stored(0, target, bytes);
  _tile_stored(1, target + kTile, bytes);
  if (RowTiles == 2) {
    _tile_stored(2, target + kTile * stride, bytes);
    _tile_stored(3, target + kTile * stride + kTile, bytes);
  }
}

}  // namespace

bool available() { return amx_permitted(); }

// weight (out, in) float32 -> (column blocks, inner steps, 4 tiles, 512) of bfloat16 bits.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32, "split_bf16.pack: a float32 (out, in) weight");
  const auto source = weight.contiguous();
  const int64_t outputs = source.size(0), inner = source.size(1);
  const int64_t columns = blocks_of(outputs, kBlockColumns), steps = blocks_of(inner, kDepth);
  auto packed = torch::zeros({columns, steps, 4, kTileElements}, torch::kInt16);
  auto* tiles = reinterpret_cast<uint16_t*>(packed.data_ptr<int16_t>());
  const float* w = source.data_ptr<float>();
  for (int64_t column = 0; column < outputs; ++column)
    for (int64_t k = 0; k < inner; ++k) {
      const int64_t block = column / kBlockColumns, tile = column % kBlockColumns / kTile, step = k / kDepth;
      const int64_t at = (k % kDepth / 2) * 2 * kTile + 2 * (column % kTile) + k % 2;  // pair row, column, pair member
      uint16_t* high = tiles + ((block * steps + step) * 4 + tile) * kTileElements;
      const uint16_t h = to_bf16(w[column * inner + k]);
      high[at] = h;
      high[2 * kTileElements + at] = to_bf16(w[column * inner + k] - from_bf16(h));
    }
  return packed;
}

// out (..., outputs) = bias + x (..., inner) @ weight.T (the bias summed first), then ReLU if
// `relu`; `packed` from pack(weight) of a finite weight. x's leading dimensions are its rows
// (copied where they are not evenly strided). None where x holds an infinity or NaN: the
// caller's float32 kernel gives those their float32 results.
c10::optional<torch::Tensor> linear(const torch::Tensor& input, const torch::Tensor& packed, int64_t outputs, const c10::optional<torch::Tensor>& bias, bool relu) {
  TORCH_CHECK(amx_permitted(), "split_bf16.linear: this process may not use AMX (see available())");
  TORCH_CHECK(input.dim() >= 1 && input.scalar_type() == torch::kFloat32 && input.device().is_cpu(), "split_bf16.linear: x (..., inner) float32 on the CPU");
  const int64_t inner = input.size(-1), columns = packed.size(0), steps = packed.size(1);
  TORCH_CHECK(packed.dim() == 4 && steps == blocks_of(inner, kDepth) && columns == blocks_of(outputs, kBlockColumns), "split_bf16.linear: shapes");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == outputs && bias->is_contiguous() && bias->scalar_type() == torch::kFloat32), "split_bf16.linear: bias");
  auto x = input.reshape({-1, inner});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t rows = x.size(0);
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = outputs;
  auto out = torch::empty(shape, x.options());
  if (rows == 0) return out;
  const int64_t row_tiles = blocks_of(rows, kTile);
  thread_local std::vector<uint16_t> split;  // reused: no allocation per call
  split.resize(std::max<size_t>(split.size(), row_tiles * steps * 2 * kTileElements));
  if (!split_rows(x.data_ptr<float>(), rows, inner, x.stride(0), steps, split.data())) return c10::nullopt;
  const uint16_t* row_data = split.data();
  const auto* weight = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  thread_local std::vector<float> starts;  // each column's bias (or zero), padded to whole blocks
  starts.assign(columns * kBlockColumns, 0.0f);
  if (bias.has_value()) std::copy_n(bias->data_ptr<float>(), outputs, starts.begin());
  const float* start = starts.data();
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kWorkPerThread / (row_tiles * kTile * steps * kDepth * kBlockColumns));
  at::parallel_for(0, columns, grain, [&](int64_t begin, int64_t end) {
    configure(std::min(rows, kTile));  // per thread: the tile registers' shapes are a thread's state
    alignas(64) float sums[2 * kTile * kBlockColumns];
    for (int64_t column_block = begin; column_block < end; ++column_block) {
      const uint16_t* w = weight + column_block * steps * 4 * kTileElements;
      const int64_t first_column = column_block * kBlockColumns;
      const bool whole_columns = first_column + kBlockColumns <= outputs;
      const __mmask16 low = lanes(outputs - first_column), high = lanes(outputs - first_column - 16);
      for (int64_t row_tile = 0; row_tile < row_tiles; row_tile += 2) {
        const int tiles = row_tile + 1 < row_tiles ? 2 : 1;
        const int64_t first_row = row_tile * kTile, block_rows = std::min(rows - first_row, tiles * kTile);
        const uint16_t* r = row_data + row_tile * steps * 2 * kTileElements;
        // Straight into the output where the block is whole (a tile holds min(rows, 16) rows).
        const bool direct = whole_columns && (block_rows == tiles * kTile || rows < kTile);
        float* target = direct ? o + first_row * outputs + first_column : sums;
        const int64_t stride = direct ? outputs : kBlockColumns;
        tiles == 2 ? block<2>(r, w, steps, start + first_column, target, stride)
                   : block<1>(r, w, steps, start + first_column, target, stride);
        for (int64_t row = 0; !direct && row < block_rows; ++row) {
          _mm512_mask_storeu_ps(o + (first_row + row) * outputs + first_column, low, _mm512_load_ps(sums + row * kBlockColumns));
          _mm512_mask_storeu_ps(o + (first_row + row) * outputs + first_column + 16, high, _mm512_load_ps(sums + row * kBlockColumns + 16));
        }
      }
      for (int64_t row = 0; relu && row < rows; ++row) {  // the column block's outputs, written a while ago
        float* strip = o + row * outputs + first_column;
        _mm512_mask_storeu_ps(strip, low, _mm512_max_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(low, strip)));
        _mm512_mask_storeu_ps(strip + 16, high, _mm512_max_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(high, strip + 16)));
      }
    }
    _tile_release();  // back to the initial state: nothing for the OS to save on a switch
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this process may use AMX (Linux grants it on request)");
  m.def("pack", &pack, "weight (out, in) float32 -> its high and low bfloat16 parts in AMX tiles");
  m.def("linear", &linear, "relu?(x @ weight.T + bias) as three bfloat16 products per float32 product (None: x not finite)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("outputs"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("relu") = false);
}
