// CUDA permutohedral-lattice bilateral filter: the same lattice, layout and filter modes as
// permutohedral_cpu.cpp (see permutohedral.h), built in parallel on the GPU.
//
// Building differs from the CPU only in how vertices are deduplicated: every (point, simplex vertex) entry is
// inserted into one global open-addressing table with atomicCAS. The table stores the id of the entry that
// claimed a slot; the keys themselves live in the per-entry key array written by the previous kernel, so
// comparing against another thread's key only reads memory finished before this kernel started. The image
// index salts the hash and is compared too, so images of a batch never share vertices.
// Splatting is a segmented sum over the entries sorted by vertex, in chunks (splat_plan.h), so no float atomics
// are needed and results are deterministic, like the CPU's.
#include <torch/extension.h>
// c10 only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a bare nvcc toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "permutohedral.h"
#include "splat_plan.h"

namespace {

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

template <int D>
__global__ void embed_kernel(const float* __restrict__ features, int64_t num_points, int32_t* __restrict__ keys,
                             float* __restrict__ weights) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= num_points) return;
  toco::embed_point<D>(features + p * D, keys + p * (D + 1) * D, weights + p * (D + 1));
}

template <int D>
__global__ void insert_kernel(const int32_t* __restrict__ keys, int64_t num_entries, int64_t entries_per_image,
                              int32_t* table, uint32_t mask, int32_t* __restrict__ slot_of) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= num_entries) return;
  const int64_t image = e / entries_per_image;
  const int32_t* key = keys + e * D;
  for (uint32_t h = toco::hash_key<D>(key, uint32_t(image)) & mask;; h = (h + 1) & mask) {
    // A claimed slot never changes, so a plain read that finds it claimed is final: the many entries of one
    // vertex then compare keys without queueing on one address for an atomic.
    int32_t owner = __ldcg(table + h);
    if (owner == -1) owner = atomicCAS(table + h, -1, int32_t(e));
    if (owner == -1 || (owner / entries_per_image == image && toco::keys_equal<D>(keys + int64_t(owner) * D, key))) {
      slot_of[e] = int32_t(h);
      return;
    }
  }
}

template <int D>
__device__ int32_t find_row(const int32_t* __restrict__ keys, const int32_t* __restrict__ table,
                            const int32_t* __restrict__ slot_vertex, uint32_t mask, int64_t image,
                            int64_t entries_per_image, const int32_t* key) {
  for (uint32_t h = toco::hash_key<D>(key, uint32_t(image)) & mask;; h = (h + 1) & mask) {
    const int32_t owner = table[h];
    if (owner == -1) return 0;
    if (owner / entries_per_image == image && toco::keys_equal<D>(keys + int64_t(owner) * D, key))
      return slot_vertex[h] + 1;
  }
}

template <int D>
__global__ void neighbour_kernel(const int32_t* __restrict__ keys, const int32_t* __restrict__ vertex_entry,
                                 int64_t M, int64_t entries_per_image, const int32_t* __restrict__ table,
                                 const int32_t* __restrict__ slot_vertex, uint32_t mask,
                                 int32_t* __restrict__ neighbours) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= (D + 1) * M) return;
  const int j = int(idx / M);
  const int64_t m = idx % M;
  const int64_t e = vertex_entry[m];
  const int64_t image = e / entries_per_image;
  int32_t nkey[D];
  for (int s = 0; s < 2; ++s) {
    toco::neighbour_key<D>(keys + e * D, j, s == 0 ? 1 : -1, nkey);
    neighbours[idx * 2 + s] = find_row<D>(keys, table, slot_vertex, mask, image, entries_per_image, nkey);
  }
}

// Lattice buffers are vertex-major (M+1, K); values and outputs channels-first (B, K, N) like torch's.

// Pass 1: the sum of one chunk of sorted entries (at most C), per channel.
__global__ void splat_chunk_kernel(const int32_t* __restrict__ chunk_start, const int32_t* __restrict__ chunk_end,
                                   const int32_t* __restrict__ point, const float* __restrict__ weight,
                                   const float* __restrict__ x, const float* __restrict__ pre, int64_t chunks,
                                   int64_t K, int64_t N, float* __restrict__ partial) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= chunks * K) return;
  const int64_t c = idx / K, k = idx % K;
  float acc = 0.0f;
  for (int32_t e = chunk_start[c]; e < chunk_end[c]; ++e) {
    const int64_t p = point[e], b = p / N;
    acc += weight[e] * x[(b * K + k) * N + (p - b * N)] * (pre ? pre[p] : 1.0f);
  }
  partial[idx] = acc;
}

// Pass 2: a vertex's value is the sum of its chunks, in order.
__global__ void splat_vertex_kernel(const int32_t* __restrict__ vertex_chunks, const float* __restrict__ partial,
                                    int64_t M, int64_t K, float* __restrict__ lattice) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * K) return;
  const int64_t m = idx / K, k = idx % K;
  float acc = 0.0f;
  for (int32_t c = vertex_chunks[m]; c < vertex_chunks[m + 1]; ++c) acc += partial[int64_t(c) * K + k];
  lattice[(m + 1) * K + k] = acc;
}

__global__ void blur_kernel(const float* __restrict__ in, float* __restrict__ out,
                            const int32_t* __restrict__ neighbours, int64_t M, int64_t K) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * K) return;
  const int64_t m = idx / K, k = idx % K;
  out[(m + 1) * K + k] =
      in[(m + 1) * K + k] + 0.5f * (in[int64_t(neighbours[2 * m]) * K + k] + in[int64_t(neighbours[2 * m + 1]) * K + k]);
}

// One thread per output element, in the output's memory order (points fastest) so the writes are coalesced.
template <int D>
__global__ void slice_kernel(const int32_t* __restrict__ row, const float* __restrict__ weight,
                             const float* __restrict__ lattice, const float* __restrict__ post, int64_t B,
                             int64_t K, int64_t N, float alpha, bool accumulate, float* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * K * N) return;
  const int64_t k = (idx / N) % K, p = (idx / (N * K)) * N + idx % N;
  const int64_t e = p * (D + 1);
  float acc = 0.0f;
#pragma unroll
  for (int r = 0; r <= D; ++r) acc += weight[e + r] * lattice[int64_t(row[e + r]) * K + k];
  acc *= alpha * (post ? post[p] : 1.0f);
  out[idx] = accumulate ? out[idx] + acc : acc;
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

struct Lattice {
  int64_t batch = 0, num_points = 0, dim = 0, num_vertices = 0, chunk_size = 0, max_entries = 0;
  // the splat plan (splat_plan.h), with the sorted entries' points and weights
  torch::Tensor vertex_row, vertex_weight, neighbours, splat_point, splat_weight, chunk_start, chunk_end,
      vertex_chunks;

  torch::Tensor filter(const torch::Tensor& values, int64_t mode, double scale, const c10::optional<torch::Tensor>& pre,
                       const c10::optional<torch::Tensor>& post, c10::optional<torch::Tensor> out) const;
};

// Optional per-point (B, N) multiplier as a float32 contiguous tensor on `device` (undefined when absent).
torch::Tensor point_scale(const c10::optional<torch::Tensor>& t, int64_t B, int64_t N, const c10::Device& device,
                          const char* name) {
  if (!t.has_value() || !t->defined()) return torch::Tensor();
  TORCH_CHECK(t->device() == device && t->numel() == B * N, "permutohedral: ", name, " must have ", B * N,
              " elements (B, N) on ", device);
  return t->to(torch::kFloat32).contiguous();
}

template <int D>
Lattice build_lattice(const torch::Tensor& features, int64_t max_chunk) {
  const int64_t B = features.size(0), N = features.size(1), P = B * N, E = P * (D + 1);
  TORCH_CHECK(E < (int64_t(1) << 30), "permutohedral: too many points for int32 indices");
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto i32 = features.options().dtype(torch::kInt32);

  torch::Tensor keys = torch::empty({E, D}, i32);
  torch::Tensor weights = torch::empty({E}, features.options());
  if (P > 0)
    embed_kernel<D><<<grid_for(P), kThreads, 0, stream>>>(features.data_ptr<float>(), P, keys.data_ptr<int32_t>(),
                                                          weights.data_ptr<float>());
  check_launch();

  // Load factor <= 1/2 keeps linear probing short.
  int64_t capacity = 1024;
  while (capacity < 2 * E) capacity *= 2;
  const uint32_t mask = uint32_t(capacity - 1);
  torch::Tensor table = torch::full({capacity}, -1, i32);
  torch::Tensor slot_of = torch::empty({E}, i32);
  if (E > 0)
    insert_kernel<D><<<grid_for(E), kThreads, 0, stream>>>(keys.data_ptr<int32_t>(), E, N * (D + 1),
                                                           table.data_ptr<int32_t>(), mask,
                                                           slot_of.data_ptr<int32_t>());
  check_launch();

  // Number the occupied slots: vertex ids in slot order, and the entry that owns each vertex's key.
  torch::Tensor occupied = table.ge(0);
  torch::Tensor slot_vertex = occupied.to(torch::kInt32).cumsum(0, torch::kInt32).sub_(1);
  torch::Tensor vertex_entry = table.masked_select(occupied);
  const int64_t M = vertex_entry.numel();

  Lattice lat;
  lat.batch = B;
  lat.num_points = N;
  lat.dim = D;
  lat.num_vertices = M;
  lat.vertex_row = slot_vertex.index_select(0, slot_of).add_(1);
  lat.vertex_weight = weights;
  lat.neighbours = torch::empty({D + 1, M, 2}, i32);
  if (M > 0)
    neighbour_kernel<D><<<grid_for((D + 1) * M), kThreads, 0, stream>>>(
        keys.data_ptr<int32_t>(), vertex_entry.data_ptr<int32_t>(), M, N * (D + 1), table.data_ptr<int32_t>(),
        slot_vertex.data_ptr<int32_t>(), mask, lat.neighbours.data_ptr<int32_t>());
  check_launch();

  const toco::SplatPlan plan = toco::make_splat_plan(lat.vertex_row, M, max_chunk);
  lat.splat_point = torch::div(plan.order, D + 1, "floor").to(torch::kInt32);
  lat.splat_weight = weights.index_select(0, plan.order);
  lat.chunk_start = plan.chunk_start;
  lat.chunk_end = plan.chunk_end;
  lat.vertex_chunks = plan.vertex_chunks;
  lat.chunk_size = plan.chunk_size;
  lat.max_entries = plan.max_entries;
  return lat;
}

// scale * post * L(pre * values), written to a new tensor or added into `out`.
torch::Tensor Lattice::filter(const torch::Tensor& values_in, int64_t mode, double scale,
                              const c10::optional<torch::Tensor>& pre_in,
                              const c10::optional<torch::Tensor>& post_in, c10::optional<torch::Tensor> out_in) const {
  TORCH_CHECK(values_in.dim() == 3 && values_in.size(0) == batch && values_in.size(2) == num_points,
              "permutohedral: values must be (B, K, N) = (", batch, ", K, ", num_points, ")");
  TORCH_CHECK(values_in.device() == vertex_row.device(), "permutohedral: values are on ", values_in.device(),
              ", the lattice on ", vertex_row.device());
  TORCH_CHECK(mode >= toco::kForward && mode <= toco::kSymmetric, "permutohedral: bad filter mode ", mode);
  const c10::cuda::CUDAGuard guard(values_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const torch::Tensor values = values_in.to(torch::kFloat32).contiguous();
  const int64_t K = values.size(1), M = num_vertices, D = dim, N = num_points;
  const bool accumulate = out_in.has_value() && out_in->defined();
  torch::Tensor out = accumulate ? *out_in : torch::zeros_like(values);
  if (accumulate)
    TORCH_CHECK(out.sizes() == values.sizes() && out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                    out.device() == values.device(),
                "permutohedral: out must be a contiguous float32 tensor shaped like values, on its device");
  const torch::Tensor pre = point_scale(pre_in, batch, N, values.device(), "pre");
  const torch::Tensor post = point_scale(post_in, batch, N, values.device(), "post");
  if (M == 0 || K == 0) return out;

  const int64_t chunks = chunk_start.numel();
  torch::Tensor partial = torch::empty({chunks, K}, values.options());
  splat_chunk_kernel<<<grid_for(chunks * K), kThreads, 0, stream>>>(
      chunk_start.data_ptr<int32_t>(), chunk_end.data_ptr<int32_t>(), splat_point.data_ptr<int32_t>(),
      splat_weight.data_ptr<float>(), values.data_ptr<float>(), pre.defined() ? pre.data_ptr<float>() : nullptr,
      chunks, K, N, partial.data_ptr<float>());
  check_launch();
  torch::Tensor splat = torch::zeros({M + 1, K}, values.options());
  splat_vertex_kernel<<<grid_for(M * K), kThreads, 0, stream>>>(vertex_chunks.data_ptr<int32_t>(),
                                                               partial.data_ptr<float>(), M, K, splat.data_ptr<float>());
  check_launch();

  auto blur_all = [&](torch::Tensor a, bool reverse) {
    torch::Tensor b = torch::zeros_like(a);  // row 0 must stay zero in both buffers
    for (int64_t step = 0; step <= D; ++step) {
      const int64_t j = reverse ? D - step : step;
      blur_kernel<<<grid_for(M * K), kThreads, 0, stream>>>(
          a.data_ptr<float>(), b.data_ptr<float>(), neighbours.data_ptr<int32_t>() + j * M * 2, M, K);
      check_launch();
      std::swap(a, b);
    }
    return a;
  };
  torch::Tensor blurred;
  if (mode == toco::kSymmetric) {
    // Both orders from the same splat; the average is symmetric because the reverse order is the transpose.
    torch::Tensor forward = blur_all(splat.clone(), false);
    torch::Tensor reverse = blur_all(splat, true);
    blurred = forward.add_(reverse).mul_(0.5f);
  } else {
    blurred = blur_all(splat, mode == toco::kReverse);
  }

  const float alpha = toco::lattice_alpha(int(D)) * float(scale);
  switch (D) {
#define TOCO_SLICE(DIM)                                                                                       \
  case DIM:                                                                                                   \
    slice_kernel<DIM><<<grid_for(batch * K * N), kThreads, 0, stream>>>(                                     \
        vertex_row.data_ptr<int32_t>(), vertex_weight.data_ptr<float>(), blurred.data_ptr<float>(),           \
        post.defined() ? post.data_ptr<float>() : nullptr, batch, K, N, alpha, accumulate, out.data_ptr<float>()); \
    break;
    TOCO_SLICE(1) TOCO_SLICE(2) TOCO_SLICE(3) TOCO_SLICE(4) TOCO_SLICE(5) TOCO_SLICE(6)
#undef TOCO_SLICE
  }
  check_launch();
  return out;
}

Lattice build(const torch::Tensor& features_in, int64_t max_chunk) {
  TORCH_CHECK(features_in.dim() == 3, "permutohedral: features must be (B, N, D)");
  TORCH_CHECK(features_in.is_cuda(), "permutohedral (cuda build): features must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(features_in.device());
  const torch::Tensor features = features_in.to(torch::kFloat32).contiguous();
  TORCH_CHECK(features.isfinite().all().item<bool>(), "permutohedral: features must be finite");
  TORCH_CHECK(features.numel() == 0 || features.abs().max().item<float>() < 1e6f,
              "permutohedral: feature magnitudes above 1e6 (divide positions/colours by their sigmas)");
  switch (features.size(2)) {
    case 1: return build_lattice<1>(features, max_chunk);
    case 2: return build_lattice<2>(features, max_chunk);
    case 3: return build_lattice<3>(features, max_chunk);
    case 4: return build_lattice<4>(features, max_chunk);
    case 5: return build_lattice<5>(features, max_chunk);
    case 6: return build_lattice<6>(features, max_chunk);
    default: TORCH_CHECK(false, "permutohedral: feature dimension must be 1..6, got ", features.size(2));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Permutohedral-lattice Gaussian filter (CUDA)";
  pybind11::class_<Lattice>(m, "Lattice")
      .def("filter", &Lattice::filter, pybind11::arg("values"), pybind11::arg("mode") = 0,
           pybind11::arg("scale") = 1.0, pybind11::arg("pre") = pybind11::none(),
           pybind11::arg("post") = pybind11::none(), pybind11::arg("out") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>(),
           "scale * post * alpha S B S^T (pre * values) for values (B, K, N) and optional pre/post (B, N); "
           "mode 0 forward, 1 reverse (its transpose), 2 symmetric (their mean); added into `out` if given")
      .def_readonly("num_vertices", &Lattice::num_vertices)
      .def_readonly("max_entries", &Lattice::max_entries)
      .def_readonly("chunk_size", &Lattice::chunk_size);
  m.def("build", &build, pybind11::arg("features"), pybind11::arg("max_chunk") = 0,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Build the lattice of features (B, N, D) float32 on a CUDA device, D in 1..6; the splat sums at most "
        "max_chunk entries per thread (0: about the square root of the largest vertex's count)");
}
