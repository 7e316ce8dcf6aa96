// The decoder layers' incremental step for `--fast-kernels exact` in one call from Python.
//
// The Python step (`layer.py`) makes about fifty operator calls per layer around its
// kernels; each costs microseconds of interpreter and dispatch, a fifth of the step at
// batch 32 on the bundled model (BENCHMARKS.md, "One call per layer"). This file makes the
// same calls, in the same order, on the same operands, from C++: the linear layers through
// `exact_gemm.cpp`'s kernel in the order Python found to give MKL's bits at this shape (or
// MKL's own `addmm` where none did), both attention products through `exact_attention.cpp`
// (checked at this length), and ATen's own layer norm and softmax; the queries' scaling, the
// ReLU and the residual adds in the kernels' registers, each the same rounding as ATen's
// pass (`Then`). So its bits are the Python step's, which are fairseq's. Python decides per
// call whether every shape is already checked (`exact_layer.py`); if not, the Python step
// runs and checks them.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#define FASTSEQ_EMBEDDED  // the kernels' files without their own Python modules
namespace gemm {
#include "exact_gemm.cpp"
}
namespace attention {
#include "exact_attention.cpp"
}

namespace {

using torch::Tensor;
using Optional = c10::optional<Tensor>;
// How a linear layer runs at this call's shape: kMkl (`addmm`, or `mm` without a bias),
// kBlocks (bounds, split) or kLanes, as `exact_gemm.py` recorded it.
enum Mode : int64_t { kMkl = 0, kBlocks = 1, kLanes = 2 };
using Order = std::tuple<int64_t, std::vector<int64_t>, int64_t>;

// What follows a linear layer in the Python step, each its own pass there: `mul_(scale)` of
// the queries, `relu_()` of the first feed-forward layer, `add_(residual)` of a sublayer's
// output. The kernels apply it to each element while it is in a register (the same
// roundings: `gemm::Epilogue`); after MKL's product, the same ATen calls as the Python step.
struct Then {
  c10::optional<double> scale;
  bool relu = false;
  Optional residual;
};

struct Linear {
  Tensor weight, transposed, packed;
  Optional bias;

  Tensor operator()(const Tensor& x, const Order& order, Tensor out, const Then& then = Then()) const {
    const auto& [mode, bounds, split] = order;
    if (!out.defined()) out = torch::empty({x.size(0), weight.size(0)}, x.options());
    if (mode == kBlocks || mode == kLanes) {
      const gemm::Epilogue finish = gemm::epilogue_of(then.scale, then.relu, then.residual, out);
      if (mode == kBlocks) gemm::linear_into(x, packed, bias, bounds, split, out, finish);
      else gemm::lanes_into(x, weight, bias, out, finish);
      return out;
    }
    TORCH_CHECK(mode == kMkl, "exact_layer: a linear layer's mode");
    if (bias.has_value()) at::addmm_out(out, *bias, x, transposed);
    else at::mm_out(out, x, transposed);
    if (then.scale.has_value()) out.mul_(*then.scale);
    if (then.relu) out.relu_();
    if (then.residual.has_value()) out.add_(*then.residual);
    return out;
  }
};

struct Norm {
  Optional weight, bias;
  double eps;
  Tensor operator()(const Tensor& x) const { return at::layer_norm(x, {x.size(1)}, weight, bias, eps); }
};

Linear linear_of(const std::tuple<Tensor, Optional, Tensor>& parts) {
  const auto& [weight, bias, packed] = parts;
  return {weight, weight.t(), packed, bias};
}

}  // namespace

// The parameters of one `TransformerDecoderLayerBase` (ReLU feed-forward; linear layers in
// the order q, k, v, out of self-attention, q, out of the encoder attention if any, fc1, fc2).
class ExactLayer {
 public:
  ExactLayer(const std::vector<std::tuple<Tensor, Optional, Tensor>>& linears, const std::vector<std::tuple<Optional, Optional, double>>& norms,
             bool normalize_before, int64_t heads, double self_scaling, double cross_scaling)
      : normalize_before_(normalize_before), heads_(heads), self_scaling_(self_scaling), cross_scaling_(cross_scaling) {
    for (const auto& parts : linears) linears_.push_back(linear_of(parts));
    for (const auto& [weight, bias, eps] : norms) norms_.push_back({weight, bias, eps});
    cross_ = linears_.size() == 8;
    TORCH_CHECK((linears_.size() == 8 && norms_.size() == 3) || (linears_.size() == 6 && norms_.size() == 2),
                "exact_layer: 8 linear layers and 3 norms, or 6 and 2 without encoder attention");
  }

  // x (rows, embed_dim) -> the layer's output. Self-attention: this step's keys and values go
  // into `key_slice`/`value_slice` (rows, embed_dim), then all of them are read as `keys`/`values`
  // (rows * heads, length, head_dim) views, masked where `self_mask` (rows, length) is true; with
  // `history` (length, rows), the views hold every cached row and each row's entries are where
  // the table says (`attend_into`).
  // Encoder attention (`PER_SENTENCE`): keys/values (cached sentences * heads, src_len,
  // head_dim), `cross_mask` (cached sentences, src_len), the rows' queries placed by beam
  // into `cross_queries` (beams, cached sentences, embed_dim) at the `live` sentences (None:
  // every cached sentence is live, `cross_queries` undefined). `attention_orders`: scores and
  // context orders (exact_attention.cpp) of the self-attention, then the encoder attention.
  Tensor step(const Tensor& x, const std::vector<Order>& orders, Tensor key_slice, Tensor value_slice, const Tensor& keys,
              const Tensor& values, const Optional& self_mask, const Optional& history, const Optional& cross_keys, const Optional& cross_values,
              const Optional& cross_mask, int64_t beams, const Optional& live, const Optional& cross_queries,
              const std::vector<int64_t>& attention_orders) const {
    TORCH_CHECK(orders.size() == linears_.size() && attention_orders.size() == (cross_keys.has_value() ? 4u : 2u), "exact_layer.step: orders");
    const int64_t rows = x.size(0), embed = x.size(1), head_dim = embed / heads_;
    Tensor out = sublayer(x, norms_[0], [&](const Tensor& h, const Tensor& residual) {
      linears_[1](h, orders[1], key_slice);
      linears_[2](h, orders[2], value_slice);
      Tensor q = linears_[0](h, orders[0], Tensor(), {self_scaling_});
      Tensor context = torch::empty({rows * heads_, 1, head_dim}, x.options());
      attend(q.view({rows * heads_, 1, head_dim}), keys, values, self_mask, context, attention_orders[0], attention_orders[1], history);
      return linears_[3](context.view({rows, embed}), orders[3], Tensor(), {c10::nullopt, false, residual});
    });
    if (cross_ && cross_keys.has_value()) {
      out = sublayer(out, norms_[1], [&](const Tensor& h, const Tensor& residual) {
        Tensor q = linears_[4](h, orders[4], Tensor(), {cross_scaling_});
        const Tensor per_beam = q.view({-1, beams, embed}).transpose(0, 1);  // (beams, live sentences, embed_dim)
        const Tensor by_beam = live.has_value() ? cross_queries->index_copy_(1, *live, per_beam) : per_beam.contiguous();
        const int64_t cached = by_beam.size(1), matrices = cached * heads_;
        Tensor context = torch::empty({beams, matrices, 1, head_dim}, x.options());
        attend(by_beam.view({beams, matrices, head_dim}).transpose(0, 1), *cross_keys, *cross_values, cross_mask,
               context.select(2, 0).transpose(0, 1), attention_orders[2], attention_orders[3], c10::nullopt);
        Tensor live_context = context.view({beams, cached, embed});
        if (live.has_value()) live_context = live_context.index_select(1, *live);
        return linears_[5](live_context.transpose(0, 1).reshape({rows, embed}), orders[5], Tensor(), {c10::nullopt, false, residual});
      });
    }
    const size_t fc = cross_ ? 6 : 4;
    return sublayer(out, norms_.back(), [&](const Tensor& h, const Tensor& residual) {
      Tensor hidden = linears_[fc](h, orders[fc], Tensor(), {c10::nullopt, true});
      return linears_[fc + 1](hidden, orders[fc + 1], Tensor(), {c10::nullopt, false, residual});
    });
  }

 private:
  // fairseq's sublayer: (norm before) -> block -> + residual -> (norm after); the block's last
  // linear layer adds the residual it is given.
  template <class Block>
  Tensor sublayer(const Tensor& x, const Norm& norm, Block block) const {
    Tensor out = block(normalize_before_ ? norm(x) : x, x);
    return normalize_before_ ? out : norm(out);
  }

  void attend(const Tensor& queries, const Tensor& keys, const Tensor& values, const Optional& mask, Tensor context,
              int64_t scores_order, int64_t context_order, const Optional& history) const {
    TORCH_CHECK(attention::attend_into(queries, keys, values, mask, heads_, context, scores_order, context_order, history),
                "exact_layer: attention operands off the 16-byte alignment (exact_layer.py checks it first)");
  }

  std::vector<Linear> linears_;
  std::vector<Norm> norms_;
  bool normalize_before_, cross_ = false;
  int64_t heads_;
  double self_scaling_, cross_scaling_;
};

// A run of a decoder's layers (`ExactLayer`s of one shape) stepped in one call: the views of
// each layer's caches that the Python caches hand to a layer step (`caches.py`: this step's
// time slice, every slice so far as (rows * heads, length, head_dim); `encoder_caches.py`:
// the padding as (cached sentences, src_len), the queries' buffer by beam) are made here, so
// that a decoder step costs one call from Python instead of one per layer, each with its
// views and argument conversions (about 100 microseconds a layer: BENCHMARKS.md, "One call
// per decoder step").
class ExactStack {
 public:
  explicit ExactStack(std::vector<ExactLayer> layers) : layers_(std::move(layers)) {}

  // Layers [first, stop) on x (rows, embed_dim); the lists hold those layers' caches, in
  // order. Self-attention: keys and values buffers (capacity, cached rows, heads, head_dim),
  // this step's slice at `length - 1` for the first `rows` rows, the `attended` rows of slices
  // [0, length) read, masked where `self_mask` is true, through `history` where given.
  // Encoder attention (`PER_SENTENCE`; empty lists without): keys, values, padding (cached
  // sentences, 1, 1, src_len) or None, the live sentences or None, the queries' buffer
  // (beams, cached sentences, heads, head_dim) or None. `orders`, `attention_orders`: as for
  // `ExactLayer::step`, the same for every layer.
  Tensor step(const Tensor& x, int64_t first, int64_t stop, const std::vector<Order>& orders, const std::vector<int64_t>& attention_orders,
              const std::vector<Tensor>& keys, const std::vector<Tensor>& values, int64_t length, int64_t attended, const Optional& self_mask,
              const Optional& history, const std::vector<Tensor>& cross_keys, const std::vector<Tensor>& cross_values,
              const std::vector<Optional>& cross_padding, int64_t beams, const std::vector<Optional>& live,
              const std::vector<Optional>& cross_queries) const {
    const size_t count = stop - first;
    TORCH_CHECK(0 <= first && first <= stop && stop <= static_cast<int64_t>(layers_.size()) && keys.size() == count && values.size() == count,
                "exact_layer.ExactStack.step: one cache per layer");
    const bool cross = !cross_keys.empty();
    TORCH_CHECK(!cross || (cross_keys.size() == count && cross_values.size() == count && cross_padding.size() == count && live.size() == count &&
                           cross_queries.size() == count),
                "exact_layer.ExactStack.step: one encoder-attention cache per layer");
    const int64_t rows = x.size(0), embed = x.size(1);
    Tensor out = x;
    for (size_t i = 0; i < count; ++i) {
      const int64_t head_dim = keys[i].size(3), width = attended * keys[i].size(2);
      const auto slice = [&](const Tensor& buffer) { return buffer.select(0, length - 1).view({buffer.size(1), embed}).narrow(0, 0, rows); };
      const auto so_far = [&](const Tensor& buffer) {
        return buffer.narrow(0, 0, length).view({length, -1, head_dim}).narrow(1, 0, width).transpose(0, 1);
      };
      Optional cross_key, cross_value, cross_mask, live_sentences, queries;
      if (cross) {
        cross_key = cross_keys[i], cross_value = cross_values[i], live_sentences = live[i];
        if (cross_padding[i].has_value()) cross_mask = cross_padding[i]->view({-1, cross_keys[i].size(1)});
        if (cross_queries[i].has_value()) queries = cross_queries[i]->view({beams, -1, embed});
      }
      out = layers_[first + i].step(out, orders, slice(keys[i]), slice(values[i]), so_far(keys[i]), so_far(values[i]), self_mask, history,
                                    cross_key, cross_value, cross_mask, beams, live_sentences, queries, attention_orders);
    }
    return out;
  }

 private:
  std::vector<ExactLayer> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<ExactLayer>(m, "ExactLayer")
      .def(pybind11::init<const std::vector<std::tuple<Tensor, Optional, Tensor>>&, const std::vector<std::tuple<Optional, Optional, double>>&,
                          bool, int64_t, double, double>());
  pybind11::class_<ExactStack>(m, "ExactStack")
      .def(pybind11::init<std::vector<ExactLayer>>())
      .def("step", &ExactStack::step, "a run of a decoder's layers stepped in one call, the caches' views made here");
}
