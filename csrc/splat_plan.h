// The CUDA splat's work plan (permutohedral_cuda.cu), in ATen operations that run on any device, so the CPU build
// exposes it too and the tests check it without a GPU.
//
// Splatting sums, for every lattice vertex, the (point, simplex vertex) entries that land on it. A flat image
// region puts thousands of entries on one vertex (14k on a 500x375 photo, against a median of 3), so one thread
// per vertex would sum them alone while the rest of the GPU waits. The plan sorts the entries by vertex and cuts
// each vertex's run into chunks of at most C entries (C about the square root of the largest run): one pass sums
// each chunk, a second each vertex's chunks in order. No thread adds more than about 2 sqrt(largest run) terms,
// and the order of every sum is fixed, so results stay deterministic.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>

namespace toco {

struct SplatPlan {
  torch::Tensor order;          // (E,) entry ids sorted by vertex (stable)
  torch::Tensor chunk_start;    // (T,) int32: chunk c covers sorted positions [chunk_start[c], chunk_end[c])
  torch::Tensor chunk_end;      // (T,) int32
  torch::Tensor vertex_chunks;  // (M+1,) int32: vertex m owns chunks [vertex_chunks[m], vertex_chunks[m+1])
  int64_t chunk_size = 0;       // C
  int64_t max_entries = 0;      // the largest number of entries on one vertex
};

// vertex_row (E,) holds each entry's vertex as 1..M (0 is the lattice's empty row). max_chunk > 0 fixes C.
inline SplatPlan make_splat_plan(const torch::Tensor& vertex_row, int64_t M, int64_t max_chunk) {
  SplatPlan plan;
  plan.order = std::get<1>(torch::sort(vertex_row, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const torch::Tensor counts = torch::bincount(vertex_row, {}, M + 1).slice(0, 1);  // (M,) entries per vertex
  plan.max_entries = M > 0 ? counts.max().item<int64_t>() : 0;
  plan.chunk_size = max_chunk > 0
                        ? max_chunk
                        : std::max<int64_t>(16, int64_t(std::ceil(std::sqrt(double(plan.max_entries)))));
  const int64_t C = plan.chunk_size;
  const torch::Tensor entry_end = counts.cumsum(0);  // (M,)
  const torch::Tensor entry_start = entry_end - counts;
  const torch::Tensor chunks = counts.add(C - 1).div(C, "floor");  // (M,) chunks per vertex
  const torch::Tensor chunks_end = chunks.cumsum(0);
  plan.vertex_chunks = torch::cat({torch::zeros({1}, chunks.options()), chunks_end}).to(torch::kInt32);
  const torch::Tensor vertex = torch::repeat_interleave(chunks);  // (T,) the vertex of every chunk
  const torch::Tensor rank =
      torch::arange(vertex.numel(), chunks.options()) - (chunks_end - chunks).index_select(0, vertex);
  const torch::Tensor begin = entry_start.index_select(0, vertex) + rank * C;
  plan.chunk_start = begin.to(torch::kInt32);
  plan.chunk_end = torch::minimum(begin + C, entry_end.index_select(0, vertex)).to(torch::kInt32);
  return plan;
}

}  // namespace toco
