// CPU permutohedral-lattice Gaussian filter (see permutohedral.h for the algorithm).
//
// Work is split into independent tasks, one per (image, block of channels): each task splats, blurs and
// slices on its own lattice buffers, so a whole filter call is a single parallel region with no
// synchronisation (the images of a batch never share lattice vertices). Values are channels-first (B, K, N)
// like torch's (B, K, H, W); tasks move them through small point-major blocks so the lattice buffers, which
// are point-major (K channels of a vertex contiguous), are read and written with vectorised inner loops.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "permutohedral.h"
#include "splat_plan.h"

namespace {

// Open-addressing (linear probing) table from lattice key to vertex id. One per image, filled by one thread;
// it grows, so a small lattice (the usual case: thousands of vertices) stays in cache. Keys live in the slots,
// so a probe reads one array.
template <int D>
class KeyTable {
 public:
  struct Slot {
    int32_t key[D];
    int32_t id;  // -1: empty
  };

  KeyTable() : slots_(1024, empty_slot()), mask_(1023) {}

  int32_t find_or_insert(const int32_t* key) {
    if (2 * size_ >= int64_t(slots_.size())) grow();
    Slot& slot = probe(key);
    if (slot.id < 0) {
      std::copy(key, key + D, slot.key);
      slot.id = size_++;
    }
    return slot.id;
  }

  // Vertex id of key, or -1.
  int32_t find(const int32_t* key) const { return const_cast<KeyTable*>(this)->probe(key).id; }

  int32_t size() const { return size_; }
  const std::vector<Slot>& slots() const { return slots_; }

 private:
  static Slot empty_slot() {
    Slot s{};
    s.id = -1;
    return s;
  }

  // The slot holding key, or the empty slot where it would go.
  Slot& probe(const int32_t* key) {
    for (uint32_t h = toco::hash_key<D>(key, 0) & mask_;; h = (h + 1) & mask_) {
      Slot& slot = slots_[h];
      if (slot.id < 0 || toco::keys_equal<D>(slot.key, key)) return slot;
    }
  }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2, empty_slot());
    slots_.swap(old);
    mask_ = uint32_t(slots_.size() - 1);
    for (const Slot& slot : old)
      if (slot.id >= 0) probe(slot.key) = slot;
  }

  std::vector<Slot> slots_;
  uint32_t mask_;
  int32_t size_ = 0;
};

// The lattice of one image. Rows are vertex id + 1; row 0 is an always-zero row standing for "no such
// neighbour", so the blur needs no branches.
struct ImageLattice {
  int32_t num_vertices = 0;
  std::vector<int32_t> row;     // (N, D+1): row of each point's simplex vertices
  std::vector<float> weight;    // (N, D+1): barycentric weights
  std::vector<int32_t> nbr;     // (D+1, M, 2): rows of each vertex's two neighbours along each direction
};

template <int D>
ImageLattice build_image(const float* feat, int64_t N) {
  ImageLattice lat;
  lat.row.resize(N * (D + 1));
  lat.weight.resize(N * (D + 1));
  KeyTable<D> table;
  // Neighbouring pixels mostly fall in the same simplex (sigmas span many pixels): remembering the previous
  // point's vertices skips most hash lookups.
  int32_t keys[(D + 1) * D], prev_keys[(D + 1) * D], prev_rows[D + 1];
  for (int64_t i = 0; i < N; ++i) {
    toco::embed_point<D>(feat + i * D, keys, &lat.weight[i * (D + 1)]);
    for (int r = 0; r <= D; ++r) {
      const int32_t* key = keys + r * D;
      if (i == 0 || !toco::keys_equal<D>(key, prev_keys + r * D)) prev_rows[r] = table.find_or_insert(key) + 1;
      lat.row[i * (D + 1) + r] = prev_rows[r];
    }
    std::copy(keys, keys + (D + 1) * D, prev_keys);
  }
  const int32_t M = lat.num_vertices = table.size();
  lat.nbr.resize(size_t(D + 1) * M * 2);
  int32_t nkey[D];
  for (const auto& slot : table.slots()) {
    if (slot.id < 0) continue;
    for (int j = 0; j <= D; ++j)
      for (int s = 0; s < 2; ++s) {
        toco::neighbour_key<D>(slot.key, j, s == 0 ? 1 : -1, nkey);
        lat.nbr[(size_t(j) * M + slot.id) * 2 + s] = table.find(nkey) + 1;
      }
  }
  return lat;
}

constexpr int64_t kBlock = 64;  // points per transpose block
constexpr int64_t kLanes = 8;   // channels are padded to a multiple of this: every inner loop is full AVX vectors

// a[0:n] += w * b[0:n], n a multiple of kLanes (the fixed inner trip count lets the compiler emit pure SIMD).
inline void axpy(float* __restrict__ a, float w, const float* __restrict__ b, int64_t n) {
  for (int64_t g = 0; g < n; g += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) a[g + k] += w * b[g + k];
}

// What one task reads and writes: channels [k0, k1) of one image's values and output, both (K, N).
struct TaskIO {
  const float* x;
  float* out;
  const float* pre;    // optional (N,): input multiplied by it before splatting
  const float* post;   // optional (N,): output multiplied by it after slicing
  bool accumulate;     // out += result, else out = result
  float scale;
};

// Splat, blur and slice channels [k0, k1) of one image on private lattice buffers (KP channels per vertex, the
// count padded to a multiple of kLanes); points move through a small point-major block.
void filter_task(const ImageLattice& lat, int64_t D, int64_t N, const TaskIO& io, int64_t k0, int64_t k1,
                 int64_t mode) {
  const int64_t KC = k1 - k0, KP = (KC + kLanes - 1) / kLanes * kLanes, M = lat.num_vertices, V = D + 1;
  std::vector<float> splat((M + 1) * KP, 0.0f), work((M + 1) * KP, 0.0f), block(kBlock * KP, 0.0f);
  const int32_t* row = lat.row.data();
  const float* weight = lat.weight.data();

  // Splat (padding channels of the block stay zero).
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t n = std::min(kBlock, N - i0);
    for (int64_t k = 0; k < KC; ++k) {
      const float* src = io.x + (k0 + k) * N + i0;
      for (int64_t j = 0; j < n; ++j) block[j * KP + k] = src[j];
    }
    if (io.pre)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < KP; ++k) block[j * KP + k] *= io.pre[i0 + j];
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = (i0 + j) * V;
      for (int64_t r = 0; r < V; ++r) axpy(&splat[int64_t(row[e + r]) * KP], weight[e + r], &block[j * KP], KP);
    }
  }

  // Blur along the D+1 directions: b[row] = a[row] + (a[n1] + a[n2]) / 2. Row 0 stays zero in both buffers.
  auto blur_all = [&](std::vector<float>& a, std::vector<float>& b, bool reverse) -> std::vector<float>& {
    std::vector<float>*in = &a, *res = &b;
    for (int64_t step = 0; step < V; ++step) {
      const int32_t* nbr = lat.nbr.data() + (reverse ? D - step : step) * M * 2;
      const float* src = in->data();
      float* dst = res->data();
      for (int64_t m = 0; m < M; ++m) {
        const float* self = src + (m + 1) * KP;
        const float* n1 = src + int64_t(nbr[2 * m]) * KP;
        const float* n2 = src + int64_t(nbr[2 * m + 1]) * KP;
        float* o = dst + (m + 1) * KP;
        for (int64_t g = 0; g < KP; g += kLanes)
          for (int64_t k = 0; k < kLanes; ++k) o[g + k] = self[g + k] + 0.5f * (n1[g + k] + n2[g + k]);
      }
      std::swap(in, res);
    }
    return *in;
  };
  const float* blurred;
  std::vector<float> splat2, work2;
  if (mode == toco::kSymmetric) {
    // Both orders from the same splat; the average is symmetric because the reverse order is the transpose.
    splat2 = splat;
    work2.assign(work.size(), 0.0f);
    std::vector<float>& fwd = blur_all(splat, work, false);
    const std::vector<float>& rev = blur_all(splat2, work2, true);
    for (size_t i = 0; i < fwd.size(); ++i) fwd[i] = 0.5f * (fwd[i] + rev[i]);
    blurred = fwd.data();
  } else {
    blurred = blur_all(splat, work, mode == toco::kReverse).data();
  }

  // Slice, scaled by alpha and the caller's gain.
  const float alpha = toco::lattice_alpha(int(D)) * io.scale;
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t n = std::min(kBlock, N - i0);
    std::fill(block.begin(), block.end(), 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = (i0 + j) * V;
      for (int64_t r = 0; r < V; ++r)
        axpy(&block[j * KP], alpha * weight[e + r], blurred + int64_t(row[e + r]) * KP, KP);
    }
    if (io.post)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < KP; ++k) block[j * KP + k] *= io.post[i0 + j];
    for (int64_t k = 0; k < KC; ++k) {
      float* dst = io.out + (k0 + k) * N + i0;
      if (io.accumulate)
        for (int64_t j = 0; j < n; ++j) dst[j] += block[j * KP + k];
      else
        for (int64_t j = 0; j < n; ++j) dst[j] = block[j * KP + k];
    }
  }
}

// Optional per-point (B, N) multiplier as a float32 contiguous CPU tensor (undefined when absent).
torch::Tensor point_scale(const c10::optional<torch::Tensor>& t, int64_t B, int64_t N, const char* name) {
  if (!t.has_value() || !t->defined()) return torch::Tensor();
  TORCH_CHECK(t->device().is_cpu() && t->numel() == B * N, "permutohedral: ", name, " must be a CPU tensor of ",
              B * N, " elements (B, N)");
  return t->to(torch::kFloat32).contiguous();
}

struct Lattice {
  int64_t batch = 0, num_points = 0, dim = 0;
  std::vector<ImageLattice> images;

  int64_t num_vertices() const {
    int64_t total = 0;
    for (const auto& im : images) total += im.num_vertices;
    return total;
  }

  // Image b's vertex row (1..M) of every (point, simplex vertex) entry, (N*(D+1),): what the CUDA splat plans over.
  torch::Tensor entry_rows(int64_t b) const {
    TORCH_CHECK(b >= 0 && b < batch, "permutohedral: image ", b, " of ", batch);
    const auto& row = images[b].row;
    return torch::from_blob(const_cast<int32_t*>(row.data()), {int64_t(row.size())}, torch::kInt32).clone();
  }

  // scale * post * L(pre * values), written to a new tensor or added into `out`.
  torch::Tensor filter(const torch::Tensor& values_in, int64_t mode, double scale,
                       const c10::optional<torch::Tensor>& pre_in, const c10::optional<torch::Tensor>& post_in,
                       c10::optional<torch::Tensor> out_in) const {
    TORCH_CHECK(values_in.dim() == 3 && values_in.size(0) == batch && values_in.size(2) == num_points,
                "permutohedral: values must be (B, K, N) = (", batch, ", K, ", num_points, ")");
    TORCH_CHECK(values_in.device().is_cpu(), "permutohedral (cpu build): values must be on the CPU");
    TORCH_CHECK(mode >= toco::kForward && mode <= toco::kSymmetric, "permutohedral: bad filter mode ", mode);
    const torch::Tensor values = values_in.to(torch::kFloat32).contiguous();
    const int64_t K = values.size(1), N = num_points;
    const bool accumulate = out_in.has_value() && out_in->defined();
    torch::Tensor out = accumulate ? *out_in : torch::empty_like(values);
    if (accumulate)
      TORCH_CHECK(out.sizes() == values.sizes() && out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                      out.device().is_cpu(),
                  "permutohedral: out must be a contiguous float32 CPU tensor shaped like values");
    const torch::Tensor pre = point_scale(pre_in, batch, N, "pre"), post = point_scale(post_in, batch, N, "post");
    if (K == 0 || N == 0) return out;
    // Tasks are (image, block of channels). A task's cost is dominated by walking the lattice's index arrays,
    // not by its channel count, so split the channels only as far as needed to give every thread a task.
    const int64_t chunks = std::max<int64_t>(
        1, std::min<int64_t>((at::get_num_threads() + batch - 1) / batch, (K + kLanes - 1) / kLanes));
    const float* x = values.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / chunks, c = t % chunks;
        const TaskIO io{x + b * K * N, o + b * K * N, pre.defined() ? pre.data_ptr<float>() + b * N : nullptr,
                        post.defined() ? post.data_ptr<float>() + b * N : nullptr, accumulate, float(scale)};
        const int64_t k0 = c * K / chunks, k1 = (c + 1) * K / chunks;
        filter_task(images[b], dim, N, io, k0, k1, mode);
      }
    });
    return out;
  }
};

template <int D>
Lattice build_lattice(const torch::Tensor& features) {
  Lattice lat;
  lat.batch = features.size(0);
  lat.num_points = features.size(1);
  lat.dim = D;
  lat.images.resize(lat.batch);
  TORCH_CHECK(lat.num_points * (D + 1) < (int64_t(1) << 31), "permutohedral: too many points for int32 indices");
  const float* feat = features.data_ptr<float>();
  at::parallel_for(0, lat.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) lat.images[b] = build_image<D>(feat + b * lat.num_points * D, lat.num_points);
  });
  return lat;
}

Lattice build(const torch::Tensor& features_in) {
  TORCH_CHECK(features_in.dim() == 3, "permutohedral: features must be (B, N, D)");
  TORCH_CHECK(features_in.device().is_cpu(), "permutohedral (cpu build): features must be on the CPU");
  const torch::Tensor features = features_in.to(torch::kFloat32).contiguous();
  TORCH_CHECK(features.isfinite().all().item<bool>(), "permutohedral: features must be finite");
  // Keys are int32 and the elevated coordinates grow like (D+1)^2 |f|: stay far from overflow.
  TORCH_CHECK(features.numel() == 0 || features.abs().max().item<float>() < 1e6f,
              "permutohedral: feature magnitudes above 1e6 (divide positions/colours by their sigmas)");
  switch (features.size(2)) {
    case 1: return build_lattice<1>(features);
    case 2: return build_lattice<2>(features);
    case 3: return build_lattice<3>(features);
    case 4: return build_lattice<4>(features);
    case 5: return build_lattice<5>(features);
    case 6: return build_lattice<6>(features);
    default: TORCH_CHECK(false, "permutohedral: feature dimension must be 1..6, got ", features.size(2));
  }
}

// out (+)= scale * post * G (pre * values) for values (B, K, H, W), with G the 2-D Gaussian of standard deviation
// sigma pixels, truncated at radius pixels and zero outside the image: the exact sum the permutohedral lattice
// approximates for position-only features. The CRF's spatial kernel (sigma 1 px) is the lattice's worst
// case (more vertices than pixels); this separable convolution is exact and several times faster.
torch::Tensor gaussian_blur(const torch::Tensor& values_in, double sigma, int64_t radius, double scale,
                            const c10::optional<torch::Tensor>& pre_in, const c10::optional<torch::Tensor>& post_in,
                            c10::optional<torch::Tensor> out_in) {
  TORCH_CHECK(values_in.dim() == 4 && values_in.device().is_cpu(), "gaussian_blur: values must be (B, K, H, W) on CPU");
  TORCH_CHECK(sigma > 0 && radius >= 0, "gaussian_blur: sigma must be > 0 and radius >= 0");
  const torch::Tensor values = values_in.to(torch::kFloat32).contiguous();
  const int64_t B = values.size(0), K = values.size(1), H = values.size(2), W = values.size(3), R = radius;
  const bool accumulate = out_in.has_value() && out_in->defined();
  torch::Tensor out = accumulate ? *out_in : torch::empty_like(values);
  if (accumulate)
    TORCH_CHECK(out.sizes() == values.sizes() && out.scalar_type() == torch::kFloat32 && out.is_contiguous(),
                "gaussian_blur: out must be a contiguous float32 tensor shaped like values");
  const torch::Tensor pre = point_scale(pre_in, B, H * W, "pre"), post = point_scale(post_in, B, H * W, "post");
  std::vector<float> taps(2 * R + 1);
  for (int64_t d = -R; d <= R; ++d) taps[d + R] = float(std::exp(-0.5 * double(d * d) / (sigma * sigma)));
  const float* x = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * K, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> padded(W + 2 * R, 0.0f), horizontal(H * W), acc(W);
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t b = plane / K;
      const float* src = x + plane * H * W;
      const float* pre_b = pre.defined() ? pre.data_ptr<float>() + b * H * W : nullptr;
      const float* post_b = post.defined() ? post.data_ptr<float>() + b * H * W : nullptr;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t i = 0; i < W; ++i) padded[R + i] = pre_b ? src[y * W + i] * pre_b[y * W + i] : src[y * W + i];
        float* h = &horizontal[y * W];
        std::fill(h, h + W, 0.0f);
        for (int64_t d = 0; d <= 2 * R; ++d)
          for (int64_t i = 0; i < W; ++i) h[i] += taps[d] * padded[i + d];
      }
      float* dst = o + plane * H * W;
      for (int64_t y = 0; y < H; ++y) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t d = std::max<int64_t>(-R, -y); d <= std::min<int64_t>(R, H - 1 - y); ++d) {
          const float* h = &horizontal[(y + d) * W];
          for (int64_t i = 0; i < W; ++i) acc[i] += taps[d + R] * h[i];
        }
        float* row = dst + y * W;
        for (int64_t i = 0; i < W; ++i) {
          const float v = float(scale) * (post_b ? post_b[y * W + i] : 1.0f) * acc[i];
          row[i] = accumulate ? row[i] + v : v;
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Permutohedral-lattice Gaussian filter (CPU)";
  pybind11::class_<Lattice>(m, "Lattice")
      .def("filter", &Lattice::filter, pybind11::arg("values"), pybind11::arg("mode") = 0,
           pybind11::arg("scale") = 1.0, pybind11::arg("pre") = pybind11::none(),
           pybind11::arg("post") = pybind11::none(), pybind11::arg("out") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>(),
           "scale * post * alpha S B S^T (pre * values) for values (B, K, N) and optional pre/post (B, N); "
           "mode 0 forward, 1 reverse (its transpose), 2 symmetric (their mean); added into `out` if given")
      .def_property_readonly("num_vertices", &Lattice::num_vertices)
      .def("entry_rows", &Lattice::entry_rows, pybind11::arg("image") = 0);
  m.def(
      "splat_plan",
      [](const torch::Tensor& vertex_row, int64_t num_vertices, int64_t max_chunk) {
        const toco::SplatPlan plan = toco::make_splat_plan(vertex_row, num_vertices, max_chunk);
        return pybind11::make_tuple(plan.order, plan.chunk_start, plan.chunk_end, plan.vertex_chunks, plan.chunk_size);
      },
      pybind11::arg("vertex_row"), pybind11::arg("num_vertices"), pybind11::arg("max_chunk") = 0,
      "The CUDA build's splat plan (splat_plan.h) for entries on vertices 1..num_vertices: (order, chunk_start, "
      "chunk_end, vertex_chunks, chunk_size)");
  m.def("gaussian_blur", &gaussian_blur, pybind11::arg("values"), pybind11::arg("sigma"), pybind11::arg("radius"),
        pybind11::arg("scale") = 1.0, pybind11::arg("pre") = pybind11::none(), pybind11::arg("post") = pybind11::none(),
        pybind11::arg("out") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "scale * post * G(pre * values), G the truncated separable Gaussian, for values (B, K, H, W); "
        "added into `out` if given");
  m.def("build", &build, pybind11::arg("features"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Build the lattice of features (B, N, D) float32, D in 1..6");
}
