// Permutohedral lattice (Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice",
// Eurographics 2010), following the variant in Kraehenbuehl's DenseCRF (the code behind pydensecrf and rloss).
//
// This header holds the per-point arithmetic shared by the CPU (permutohedral_cpu.cpp) and CUDA
// (permutohedral_cuda.cu) builds, so the maths the GPU runs is the maths the CPU tests check.
//
// The filter of a K-channel signal x over points with D-dimensional features f is
//     out = alpha * S * B * S^T * x
// S^T (splat) spreads each point over the D+1 vertices of its enclosing simplex with barycentric weights,
// B (blur) convolves the lattice with [1/2, 1, 1/2] along each of the D+1 lattice directions in turn,
// S (slice) reads the lattice back with the same weights. Each directional blur B_j is symmetric, so the
// transpose of the operator is the same pipeline with the directions blurred in reverse order.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TOCO_HD __host__ __device__ __forceinline__
#else
#define TOCO_HD inline
#endif

namespace toco {

// Filter modes, shared with toco/filters.py.
enum FilterMode : int {
  kForward = 0,    // directions 0..D, the order pydensecrf uses in inference
  kReverse = 1,    // directions D..0: the exact transpose of kForward
  kSymmetric = 2,  // (kForward + kReverse) / 2: exactly symmetric, so it is its own adjoint
};

// The Krähenbühl/Adams normalisation constant applied at slicing.
TOCO_HD float lattice_alpha(int d) { return 1.0f / (1.0f + powf(2.0f, -float(d))); }

// Lattice keys are the first D of the D+1 integer coordinates (they sum to zero, so the last is implied).
template <int D>
TOCO_HD uint32_t hash_key(const int32_t* key, uint32_t salt) {
  uint32_t h = salt * 2654435761u;
  for (int i = 0; i < D; ++i) h = (h + uint32_t(key[i])) * 1664525u;
  return h ^ (h >> 15);  // the multiplicative hash leaves the low bits weak; the table masks them
}

template <int D>
TOCO_HD bool keys_equal(const int32_t* a, const int32_t* b) {
  for (int i = 0; i < D; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Key of the neighbour of `key` one step along lattice direction j (0..D), in direction sign = +1 or -1.
// Direction j moves every coordinate by -1 and coordinate j by +D (sign +1), which keeps the sum at zero.
template <int D>
TOCO_HD void neighbour_key(const int32_t* key, int j, int sign, int32_t* out) {
  for (int i = 0; i < D; ++i) out[i] = key[i] + sign * (i == j ? D : -1);
}

// Locates one feature vector f (D floats, already divided by the kernel's standard deviations) in the lattice:
// writes the keys of the D+1 vertices of its simplex (keys[r*D .. r*D+D-1] for remainder r) and their
// barycentric weights (weights[r], summing to 1).
template <int D>
TOCO_HD void embed_point(const float* f, int32_t* keys, float* weights) {
  // Scale so that the splat-blur-slice pipeline approximates a unit-variance Gaussian (Adams et al. p.6).
  const float inv_std_dev = sqrtf(2.0f / 3.0f) * (D + 1);
  const float down_factor = 1.0f / (D + 1);
  const float up_factor = float(D + 1);

  // Elevate onto the hyperplane sum(x) = 0 (the matrix E of Adams et al. p.5), in O(D).
  // The multiply-adds are explicit fmaf: left to themselves, gcc and nvcc fuse them differently, and the keys
  // (hence the lattice's vertices) must come out bit for bit the same on the CPU and the GPU. After this loop the
  // keys depend only on subtractions, comparisons and exact integer products, which no fusion changes; fusion
  // can still move the barycentric weights by an ulp.
  float elevated[D + 1];
  float sm = 0.0f;
  for (int j = D; j > 0; --j) {
    const float scale = inv_std_dev / sqrtf(float((j + 1) * j));
    elevated[j] = fmaf(-float(j), f[j - 1] * scale, sm);
    sm = fmaf(f[j - 1], scale, sm);
  }
  elevated[0] = sm;

  // Nearest remainder-0 lattice point (coordinates multiples of D+1), then the permutation (rank) that sorts
  // the residual; together they name the simplex containing the point.
  float rem0[D + 1];
  int rank[D + 1];
  int sum = 0;
  for (int i = 0; i <= D; ++i) {
    const float v = down_factor * elevated[i];
    const float up = ceilf(v) * up_factor;
    const float down = floorf(v) * up_factor;
    rem0[i] = (up - elevated[i] < elevated[i] - down) ? up : down;
    sum += int(rem0[i] * down_factor + (rem0[i] >= 0 ? 0.5f : -0.5f));  // exact integer division
    rank[i] = 0;
  }
  for (int i = 0; i < D; ++i) {
    const float di = elevated[i] - rem0[i];
    for (int j = i + 1; j <= D; ++j) {
      if (di < elevated[j] - rem0[j]) ++rank[i];
      else ++rank[j];
    }
  }
  // Rounding each coordinate independently can leave the point off the plane (sum != 0); wrap it back.
  for (int i = 0; i <= D; ++i) {
    rank[i] += sum;
    if (rank[i] < 0) {
      rank[i] += D + 1;
      rem0[i] += D + 1;
    } else if (rank[i] > D) {
      rank[i] -= D + 1;
      rem0[i] -= D + 1;
    }
  }

  // Barycentric coordinates (Adams et al. p.10).
  float bary[D + 2];
  for (int i = 0; i <= D + 1; ++i) bary[i] = 0.0f;
  for (int i = 0; i <= D; ++i) {
    const float v = (elevated[i] - rem0[i]) * down_factor;
    bary[D - rank[i]] += v;
    bary[D - rank[i] + 1] -= v;
  }
  bary[0] += 1.0f + bary[D + 1];

  // Vertex r of the simplex is rem0 plus the canonical simplex's vertex r permuted by rank.
  for (int r = 0; r <= D; ++r) {
    for (int i = 0; i < D; ++i) {
      const int canonical = (rank[i] <= D - r) ? r : r - (D + 1);
      keys[r * D + i] = int32_t(rem0[i]) + canonical;
    }
    weights[r] = bary[r];
  }
}

}  // namespace toco
