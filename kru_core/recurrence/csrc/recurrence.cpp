// The KRU recurrence h_t = act(W h_{t-1} + u_t) over a whole sequence, on the CPU, in one call
// (kru_core/recurrence/cpu.py builds and loads this file; docs/benchmarks.md has the numbers).
//
// W = kron(M_0, ..., M_{K-1}) is never materialised: factor k maps the state laid out as
// (R_k, Q_k, S_k) to (R_k, P_k, S_k), with R_k = prod_{j<k} P_j and S_k = prod_{j>k} Q_j
// (torch.kron order: factor 0 acts on the most significant index). The batch is cut into tiles
// of TILE rows (one row when the batch is small), each tile's state in a small scratch buffer
// that stays in L1 across the factor passes (element-major: the lanes of a tile are the
// innermost, contiguous index); tiles are split into one chunk per thread (at::parallel_for).
// 2x2 factors (the default) run as in-place butterflies, two consecutive ones of a complex
// tile in one radix-4 pass, other shapes as generic loops. Complex numbers are held as
// separate real and imaginary arrays in the scratch (the inner loops then vectorise); tensors
// are interleaved (re, im) as PyTorch stores them, and a full tile moves between the two
// layouts by 8x8 transposes in registers.
//
// The backward is BPTT over the whole sequence. It saves nothing from the forward but the
// states (the output): each step's factor inputs are recomputed from h_{t-1}, which costs one
// more forward pass but keeps the memory at the output's size. Gradients follow PyTorch's
// convention for complex tensors (dL/dRe + i dL/dIm): for y = M x, grad_M = gy x^H and
// grad_x = M^H gy. Factor gradients are accumulated per chunk (and per lane) and summed at the
// end, so the result does not depend on thread timing.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/view_as_complex.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

enum Activation : int64_t { MODRELU = 0, SPLIT_RELU = 1, TANH = 2, IDENTITY = 3 };
constexpr double MODRELU_EPS = 1e-5;  // kru_core.activations.MODRELU_EPS

struct Factor {
  int64_t R, P, Q, S;
};

std::vector<Factor> chain(const std::vector<at::Tensor>& mats) {
  std::vector<Factor> f(mats.size());
  int64_t rows = 1;
  for (size_t k = 0; k < mats.size(); ++k) {
    int64_t s = 1;
    for (size_t j = k + 1; j < mats.size(); ++j) s *= mats[j].size(1);
    f[k] = {rows, mats[k].size(0), mats[k].size(1), s};
    rows *= mats[k].size(0);
  }
  return f;
}

// Factor matrices as split real / imaginary arrays (imaginary empty when real).
template <typename T>
struct Mats {
  std::vector<std::vector<T>> re, im;
};

template <typename T, bool C>
Mats<T> split_mats(const std::vector<at::Tensor>& mats) {
  Mats<T> m;
  for (const auto& w : mats) {
    const int64_t n = w.size(0) * w.size(1);
    std::vector<T> re(n), im(C ? n : 0);
    auto wc = w.contiguous();
    if (C) {
      const T* p = at::view_as_real(wc).data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        re[i] = p[2 * i];
        im[i] = p[2 * i + 1];
      }
    } else {
      const T* p = wc.data_ptr<T>();
      std::copy(p, p + n, re.begin());
    }
    m.re.push_back(std::move(re));
    m.im.push_back(std::move(im));
  }
  return m;
}

// The scratch of a tile of L batch rows holds element i of row l at i * L + l (split real and
// imaginary arrays), so every factor's innermost loop runs over S * L contiguous numbers, long
// enough to vectorise even for the last factors (S = 1). L = 1 (small batches) keeps one row.

// y = M_k x for one tile.
template <typename T, bool C, int L>
inline void apply_factor(const Factor& f, const T* __restrict wr, const T* __restrict wi,
                         const T* __restrict xr, const T* __restrict xi, T* __restrict yr,
                         T* __restrict yi) {
  const int64_t P = f.P, Q = f.Q, SL = f.S * L;
  for (int64_t r = 0; r < f.R; ++r) {
    const T* xr_r = xr + r * Q * SL;
    const T* xi_r = C ? xi + r * Q * SL : nullptr;
    for (int64_t p = 0; p < P; ++p) {
      T* yr_p = yr + (r * P + p) * SL;
      T* yi_p = C ? yi + (r * P + p) * SL : nullptr;
      if (L == 1 && SL == 1) {
        T ar = 0, ai = 0;
        const T* wr_p = wr + p * Q;
        if (C) {
          const T* wi_p = wi + p * Q;
#pragma omp simd reduction(+ : ar, ai)
          for (int64_t q = 0; q < Q; ++q) {
            ar += wr_p[q] * xr_r[q] - wi_p[q] * xi_r[q];
            ai += wr_p[q] * xi_r[q] + wi_p[q] * xr_r[q];
          }
          *yi_p = ai;
        } else {
#pragma omp simd reduction(+ : ar)
          for (int64_t q = 0; q < Q; ++q) ar += wr_p[q] * xr_r[q];
        }
        *yr_p = ar;
        continue;
      }
      {
        const T a = wr[p * Q];
        const T* xq = xr_r;
        if (C) {
          const T b = wi[p * Q];
          const T* xiq = xi_r;
#pragma omp simd
          for (int64_t s = 0; s < SL; ++s) {
            yr_p[s] = a * xq[s] - b * xiq[s];
            yi_p[s] = a * xiq[s] + b * xq[s];
          }
        } else {
#pragma omp simd
          for (int64_t s = 0; s < SL; ++s) yr_p[s] = a * xq[s];
        }
      }
      for (int64_t q = 1; q < Q; ++q) {
        const T a = wr[p * Q + q];
        const T* xq = xr_r + q * SL;
        if (C) {
          const T b = wi[p * Q + q];
          const T* xiq = xi_r + q * SL;
#pragma omp simd
          for (int64_t s = 0; s < SL; ++s) {
            yr_p[s] += a * xq[s] - b * xiq[s];
            yi_p[s] += a * xiq[s] + b * xq[s];
          }
        } else {
#pragma omp simd
          for (int64_t s = 0; s < SL; ++s) yr_p[s] += a * xq[s];
        }
      }
    }
  }
}

// The two rows of a 2x2 factor's axis in an array laid out (R, 2, SL): base + o and SL further.
template <typename P>
inline std::pair<P*, P*> rows2(P* base, int64_t o, int64_t SL) {
  return {base + o, base + o + SL};
}

// A complex 2x2 factor's entries, split (entry e = p * 2 + q), and its two products on one
// pair of numbers: y = M x, and h = M^H g (the adjoint). Every butterfly below is built from
// these two.
template <typename T>
struct Cx2 {
  T r[4], i[4];
  Cx2(const T* wr, const T* wi) {
    for (int e = 0; e < 4; ++e) {
      r[e] = wr[e];
      i[e] = wi ? wi[e] : T(0);
    }
  }
};

template <typename T>
inline void mul(const Cx2<T>& m, T pr, T pi, T qr, T qi, T& y0r, T& y0i, T& y1r, T& y1i) {
  y0r = m.r[0] * pr - m.i[0] * pi + m.r[1] * qr - m.i[1] * qi;
  y0i = m.r[0] * pi + m.i[0] * pr + m.r[1] * qi + m.i[1] * qr;
  y1r = m.r[2] * pr - m.i[2] * pi + m.r[3] * qr - m.i[3] * qi;
  y1i = m.r[2] * pi + m.i[2] * pr + m.r[3] * qi + m.i[3] * qr;
}

template <typename T>
inline void mul_adjoint(const Cx2<T>& m, T er, T ei, T fr, T fi, T& h0r, T& h0i, T& h1r, T& h1i) {
  h0r = m.r[0] * er + m.i[0] * ei + m.r[2] * fr + m.i[2] * fi;
  h0i = m.r[0] * ei - m.i[0] * er + m.r[2] * fi - m.i[2] * fr;
  h1r = m.r[1] * er + m.i[1] * ei + m.r[3] * fr + m.i[3] * fi;
  h1i = m.r[1] * ei - m.i[1] * er + m.r[3] * fi - m.i[3] * fr;
}

// gacc[e] += g conj(x) per lane for the four entries of a 2x2 factor (layout of adjoint2's
// gacc: entry e = p * 2 + q, real part at e * L + l, imaginary part at (4 + e) * L + l).
template <typename T>
inline void acc_outer(T* acc, int64_t L, int64_t l, T g0r, T g0i, T g1r, T g1i, T x0r, T x0i,
                      T x1r, T x1i) {
  acc[0 * L + l] += g0r * x0r + g0i * x0i;
  acc[4 * L + l] += g0i * x0r - g0r * x0i;
  acc[1 * L + l] += g0r * x1r + g0i * x1i;
  acc[5 * L + l] += g0i * x1r - g0r * x1i;
  acc[2 * L + l] += g1r * x0r + g1i * x0i;
  acc[6 * L + l] += g1i * x0r - g1r * x0i;
  acc[3 * L + l] += g1r * x1r + g1i * x1i;
  acc[7 * L + l] += g1i * x1r - g1r * x1i;
}

// y = M_k x for a 2x2 factor, as butterflies: each output pair reads its input pair once.
// y may be x (in place: every iteration reads and writes only its own index s).
template <typename T, bool C, int L>
inline void apply2(const Factor& f, const T* wr, const T* wi, const T* xr, const T* xi, T* yr,
                   T* yi) {
  const int64_t SL = f.S * L;
  const Cx2<T> m(wr, C ? wi : nullptr);
  const T ar = wr[0], br = wr[1], cr = wr[2], dr = wr[3];
  for (int64_t r = 0; r < f.R; ++r) {
    const int64_t o = 2 * r * SL;
    const auto [x0r, x1r] = rows2(xr, o, SL);
    const auto [y0r, y1r] = rows2(yr, o, SL);
    if (C) {
      const auto [x0i, x1i] = rows2(xi, o, SL);
      const auto [y0i, y1i] = rows2(yi, o, SL);
#pragma omp simd
      for (int64_t s = 0; s < SL; ++s)
        mul(m, x0r[s], x0i[s], x1r[s], x1i[s], y0r[s], y0i[s], y1r[s], y1i[s]);
    } else {
#pragma omp simd
      for (int64_t s = 0; s < SL; ++s) {
        const T p = x0r[s], v = x1r[s];
        y0r[s] = ar * p + br * v;
        y1r[s] = cr * p + dr * v;
      }
    }
  }
}

// The adjoint of apply2: gx = M^H gy (gx may be gy, in place) and, when NW, the factor's
// gradient gy x^H accumulated per lane into gacc ([4 entries][re, im][L]; summed over lanes at
// the end, so no horizontal reduction per step).
template <typename T, bool C, int L, bool NW>
inline void adjoint2(const Factor& f, const T* wr, const T* wi, const T* __restrict xr,
                     const T* __restrict xi, const T* gyr, const T* gyi, T* __restrict gacc,
                     T* gxr, T* gxi) {
  const int64_t S = f.S, SL = S * L;
  const Cx2<T> m(wr, C ? wi : nullptr);
  const T ar = wr[0], br = wr[1], cr = wr[2], dr = wr[3];
  T acc[8 * L];  // gacc's layout
  for (int j = 0; j < 8 * L; ++j) acc[j] = T(0);
  for (int64_t r = 0; r < f.R; ++r) {
    for (int64_t sb = 0; sb < S; ++sb) {
      const int64_t o = 2 * r * SL + sb * L;
      const auto [x0r, x1r] = rows2(xr, o, SL);
      const auto [g0r, g1r] = rows2(gyr, o, SL);
      const auto [h0r, h1r] = rows2(gxr, o, SL);
      if (C) {
        const auto [x0i, x1i] = rows2(xi, o, SL);
        const auto [g0i, g1i] = rows2(gyi, o, SL);
        const auto [h0i, h1i] = rows2(gxi, o, SL);
#pragma omp simd
        for (int l = 0; l < L; ++l) {
          const T er = g0r[l], ei = g0i[l], fr = g1r[l], fi = g1i[l];
          if (NW) acc_outer(acc, L, l, er, ei, fr, fi, x0r[l], x0i[l], x1r[l], x1i[l]);
          mul_adjoint(m, er, ei, fr, fi, h0r[l], h0i[l], h1r[l], h1i[l]);
        }
      } else {
#pragma omp simd
        for (int l = 0; l < L; ++l) {
          const T p = x0r[l], v = x1r[l], er = g0r[l], fr = g1r[l];
          if (NW) {
            acc[0 * L + l] += er * p;
            acc[1 * L + l] += er * v;
            acc[2 * L + l] += fr * p;
            acc[3 * L + l] += fr * v;
          }
          h0r[l] = ar * er + cr * fr;
          h1r[l] = br * er + dr * fr;
        }
      }
    }
  }
  if (NW)
    for (int j = 0; j < (C ? 8 : 4) * L; ++j) gacc[j] += acc[j];
}

inline bool is2x2(const Factor& f) { return f.P == 2 && f.Q == 2; }

// Two consecutive 2x2 factors k (A) and k + 1 (B) of a complex tile in one pass (a radix-4
// butterfly): the state is laid out (R_k, 2, 2, S_{k+1} L) and each group of four numbers is
// read once, multiplied by A on the first axis and by B on the second in registers, and
// written once; two radix-2 passes read and write it twice. The passes were bound by their
// loads and stores: pairing them made the forward's factor passes and the backward's
// recomputation and adjoint cheaper (docs/benchmarks.md). y may be x (in place).
template <typename T, int L>
inline void apply4(const Factor& fa, const T* war, const T* wai, const T* wbr, const T* wbi,
                   const T* xr, const T* xi, T* yr, T* yi) {
  const int64_t SL = fa.S / 2 * L;  // the second factor's S times L
  const Cx2<T> a(war, wai), b(wbr, wbi);
  for (int64_t r = 0; r < fa.R; ++r) {
    const int64_t o = 4 * r * SL;
    const T *x00r = xr + o, *x01r = x00r + SL, *x10r = x01r + SL, *x11r = x10r + SL;
    const T *x00i = xi + o, *x01i = x00i + SL, *x10i = x01i + SL, *x11i = x10i + SL;
    T *y00r = yr + o, *y01r = y00r + SL, *y10r = y01r + SL, *y11r = y10r + SL;
    T *y00i = yi + o, *y01i = y00i + SL, *y10i = y01i + SL, *y11i = y10i + SL;
#pragma omp simd
    for (int64_t s = 0; s < SL; ++s) {
      // m = A on the first axis (for each b), then y = B on the second (for each a)
      T m00r, m00i, m10r, m10i, m01r, m01i, m11r, m11i;
      mul(a, x00r[s], x00i[s], x10r[s], x10i[s], m00r, m00i, m10r, m10i);
      mul(a, x01r[s], x01i[s], x11r[s], x11i[s], m01r, m01i, m11r, m11i);
      mul(b, m00r, m00i, m01r, m01i, y00r[s], y00i[s], y01r[s], y01i[s]);
      mul(b, m10r, m10i, m11r, m11i, y10r[s], y10i[s], y11r[s], y11i[s]);
    }
  }
}


// The adjoint of apply4: gx = A^H B^H gy on the two axes (gx may be gy, in place), the
// intermediate m = A x recomputed in registers; when NW, both factors' gradients (B's from gy
// and m, A's from A^H-free gm = B^H gy and x) accumulated per lane into gacc_a and gacc_b.
template <typename T, int L, bool NW>
inline void adjoint4(const Factor& fa, const T* war, const T* wai, const T* wbr, const T* wbi,
                     const T* __restrict xr, const T* __restrict xi, const T* gyr, const T* gyi,
                     T* __restrict gacc_a, T* __restrict gacc_b, T* gxr, T* gxi) {
  const int64_t S = fa.S / 2, SL = S * L;
  const Cx2<T> a(war, wai), b(wbr, wbi);
  T acc_a[8 * L], acc_b[8 * L];
  for (int j = 0; j < 8 * L; ++j) acc_a[j] = acc_b[j] = T(0);
  for (int64_t r = 0; r < fa.R; ++r) {
    for (int64_t sb = 0; sb < S; ++sb) {
      const int64_t o = 4 * r * SL + sb * L;
      const T *x00r = xr + o, *x01r = x00r + SL, *x10r = x01r + SL, *x11r = x10r + SL;
      const T *x00i = xi + o, *x01i = x00i + SL, *x10i = x01i + SL, *x11i = x10i + SL;
      const T *g00r = gyr + o, *g01r = g00r + SL, *g10r = g01r + SL, *g11r = g10r + SL;
      const T *g00i = gyi + o, *g01i = g00i + SL, *g10i = g01i + SL, *g11i = g10i + SL;
      T *h00r = gxr + o, *h01r = h00r + SL, *h10r = h01r + SL, *h11r = h10r + SL;
      T *h00i = gxi + o, *h01i = h00i + SL, *h10i = h01i + SL, *h11i = h10i + SL;
      // First B's half (m = A x recomputed, B's gradient, gm = B^H gy written over gy), then A's
      // (A's gradient from gm and x, gx = A^H gm): two lane loops, so that each keeps only
      // its own factor's eight accumulators in registers.
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const T e0r = g00r[l], e0i = g00i[l], e1r = g01r[l], e1i = g01i[l];  // a = 0
        const T f0r = g10r[l], f0i = g10i[l], f1r = g11r[l], f1i = g11i[l];  // a = 1
        if (NW) {
          // m = A x on the first axis (the second factor's input)
          T m00r, m00i, m10r, m10i, m01r, m01i, m11r, m11i;
          mul(a, x00r[l], x00i[l], x10r[l], x10i[l], m00r, m00i, m10r, m10i);
          mul(a, x01r[l], x01i[l], x11r[l], x11i[l], m01r, m01i, m11r, m11i);
          // B's gradient: gy_(a, p) conj(m_(a, q)), summed over a
          acc_outer(acc_b, L, l, e0r, e0i, e1r, e1i, m00r, m00i, m01r, m01i);
          acc_outer(acc_b, L, l, f0r, f0i, f1r, f1i, m10r, m10i, m11r, m11i);
        }
        // gm = B^H gy on the second axis, for a = 0 (from e) and a = 1 (from f)
        mul_adjoint(b, e0r, e0i, e1r, e1i, h00r[l], h00i[l], h01r[l], h01i[l]);
        mul_adjoint(b, f0r, f0i, f1r, f1i, h10r[l], h10i[l], h11r[l], h11i[l]);
      }
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const T u0r = h00r[l], u0i = h00i[l], u1r = h01r[l], u1i = h01i[l];  // gm, a = 0
        const T v0r = h10r[l], v0i = h10i[l], v1r = h11r[l], v1i = h11i[l];  // gm, a = 1
        if (NW) {
          // A's gradient: gm_(p, b) conj(x_(q, b)), summed over b
          acc_outer(acc_a, L, l, u0r, u0i, v0r, v0i, x00r[l], x00i[l], x10r[l], x10i[l]);
          acc_outer(acc_a, L, l, u1r, u1i, v1r, v1i, x01r[l], x01i[l], x11r[l], x11i[l]);
        }
        // gx = A^H gm on the first axis, for b = 0 (u0, v0) and b = 1 (u1, v1)
        mul_adjoint(a, u0r, u0i, v0r, v0i, h00r[l], h00i[l], h10r[l], h10i[l]);
        mul_adjoint(a, u1r, u1i, v1r, v1i, h01r[l], h01i[l], h11r[l], h11i[l]);
      }
    }
  }
  if (NW)
    for (int j = 0; j < 8 * L; ++j) {
      gacc_a[j] += acc_a[j];
      gacc_b[j] += acc_b[j];
    }
}

// How many factors from k on one pass takes: 2 for two consecutive 2x2 factors of a complex
// tile of several rows (apply4 / adjoint4), else 1.
template <bool C, int L>
inline size_t pass_width(const std::vector<Factor>& f, size_t k) {
  return (C && L > 1 && k + 1 < f.size() && is2x2(f[k]) && is2x2(f[k + 1])) ? 2 : 1;
}

// gW += gy x^H and gx = M^H gy for one tile (gW split, accumulated into lane 0 of the per-lane
// layout of adjoint2; gx overwritten).
template <typename T, bool C, int L>
inline void adjoint_factor(const Factor& f, const T* __restrict wr, const T* __restrict wi,
                           const T* __restrict xr, const T* __restrict xi,
                           const T* __restrict gyr, const T* __restrict gyi, T* __restrict gwr,
                           T* __restrict gwi, T* __restrict gxr, T* __restrict gxi,
                           bool need_w) {
  const int64_t P = f.P, Q = f.Q, SL = f.S * L;
  for (int64_t r = 0; r < f.R; ++r) {
    const T* xr_r = xr + r * Q * SL;
    const T* xi_r = C ? xi + r * Q * SL : nullptr;
    T* gxr_r = gxr + r * Q * SL;
    T* gxi_r = C ? gxi + r * Q * SL : nullptr;
    for (int64_t i = 0; i < Q * SL; ++i) gxr_r[i] = 0;
    if (C)
      for (int64_t i = 0; i < Q * SL; ++i) gxi_r[i] = 0;
    for (int64_t p = 0; p < P; ++p) {
      const T* gr = gyr + (r * P + p) * SL;
      const T* gi = C ? gyi + (r * P + p) * SL : nullptr;
      for (int64_t q = 0; q < Q; ++q) {
        const T* xq = xr_r + q * SL;
        const T* xiq = C ? xi_r + q * SL : nullptr;
        if (need_w) {
          // sum_s g_s conj(x_s)
          T ar = 0, ai = 0;
          if (C) {
#pragma omp simd reduction(+ : ar, ai)
            for (int64_t s = 0; s < SL; ++s) {
              ar += gr[s] * xq[s] + gi[s] * xiq[s];
              ai += gi[s] * xq[s] - gr[s] * xiq[s];
            }
            gwi[(p * Q + q) * L] += ai;
          } else {
#pragma omp simd reduction(+ : ar)
            for (int64_t s = 0; s < SL; ++s) ar += gr[s] * xq[s];
          }
          gwr[(p * Q + q) * L] += ar;
        }
        // gx_q += conj(M[p, q]) g
        const T a = wr[p * Q + q];
        T* gq = gxr_r + q * SL;
        if (C) {
          const T b = wi[p * Q + q];
          T* giq = gxi_r + q * SL;
#pragma omp simd
          for (int64_t s = 0; s < SL; ++s) {
            gq[s] += a * gr[s] + b * gi[s];
            giq[s] += a * gi[s] - b * gr[s];
          }
        } else {
#pragma omp simd
          for (int64_t s = 0; s < SL; ++s) gq[s] += a * gr[s];
        }
      }
    }
  }
}

// Moving a tile between the tensors' layout (row-major, complex interleaved) and the scratch's
// (element-major, split). For a full tile of 8 rows the rows are cut into blocks of 8 numbers
// and each 8x8 block is transposed in registers (GCC / Clang vector extensions: one load and
// one store per row and per lane vector, 24 shuffles); the scalar loops after it were 40% of
// the forward at N=512, B=128 (every number a strided scalar access). Other tiles (small
// batches, the last partial tile) and row remainders take the scalar loops.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define KRU_VECTOR_TRANSPOSE 1
// (8 doubles is wider than AVX2's registers: GCC warns that passing one by value would change
// the ABI; every use here is inlined.)
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T>
struct Vec8 {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
};

// r[l][c] -> r[c][l] for an 8x8 block held as 8 vectors.
template <typename V>
inline void transpose8(V r[8]) {
  V t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shufflevector(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[k + 1] = __builtin_shufflevector(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shufflevector(t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[k + 1] = __builtin_shufflevector(t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[k + 2] = __builtin_shufflevector(t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[k + 3] = __builtin_shufflevector(t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Number c of a row (interleaved when C) in the split scratch: its lane vector.
template <typename T, bool C, int L>
inline T* lanes(T* re, T* im, int64_t c) {
  return C ? ((c & 1) ? im : re) + (c >> 1) * L : re + c * L;
}
#endif

// Mode of a row -> tile move: overwrite the scratch, or add to it.
enum class Into { SET, ADD };

// rows [b0, b0 + nb) of a (B, n) slab -> tile (padding rows zero); rows are `rs` numbers apart
// (default: contiguous rows).
template <typename T, bool C, int L, Into mode = Into::SET>
inline void load(const T* src, int64_t n, int64_t nb, T* re, T* im, int64_t rs = -1) {
  const int64_t E = C ? 2 : 1;
  if (rs < 0) rs = n * E;
  int64_t done = 0;  // numbers of each row handled by the blocked path
#ifdef KRU_VECTOR_TRANSPOSE
  if constexpr (L % 8 == 0) {
    using V = typename Vec8<T>::type;
    if (nb == L) {
      for (; done + 8 <= n * E; done += 8) {
        for (int g = 0; g < L; g += 8) {  // rows g .. g + 7 -> lanes g .. g + 7
          V r[8];
          for (int l = 0; l < 8; ++l) r[l] = vload<V>(src + (g + l) * rs + done);
          transpose8(r);
          for (int c = 0; c < 8; ++c) {
            T* dst = lanes<T, C, L>(re, im, done + c) + g;
            vstore(dst, mode == Into::ADD ? vload<V>(dst) + r[c] : r[c]);
          }
        }
      }
    }
  }
#endif
  const int64_t first = done / E;  // the first element left for the scalar loops
  for (int64_t l = 0; l < L; ++l) {
    const T* row = src + l * rs;
    for (int64_t i = first; i < n; ++i) {
      const T vr = l < nb ? row[i * E] : T(0);
      const T vi = (C && l < nb) ? row[2 * i + 1] : T(0);
      if (mode == Into::ADD) {
        re[i * L + l] += vr;
        if (C) im[i * L + l] += vi;
      } else {
        re[i * L + l] = vr;
        if (C) im[i * L + l] = vi;
      }
    }
  }
}

// tile -> rows [b0, b0 + nb) of a (B, n) slab (contiguous rows).
template <typename T, bool C, int L>
inline void store(T* dst, int64_t n, int64_t nb, const T* re, const T* im) {
  const int64_t E = C ? 2 : 1;
  int64_t done = 0;
#ifdef KRU_VECTOR_TRANSPOSE
  if constexpr (L % 8 == 0) {
    using V = typename Vec8<T>::type;
    if (nb == L) {
      for (; done + 8 <= n * E; done += 8) {
        for (int g = 0; g < L; g += 8) {  // lanes g .. g + 7 -> rows g .. g + 7
          V r[8];
          for (int c = 0; c < 8; ++c)
            r[c] = vload<V>(lanes<T, C, L>(const_cast<T*>(re), const_cast<T*>(im), done + c) + g);
          transpose8(r);
          for (int l = 0; l < 8; ++l) vstore(dst + (g + l) * n * E + done, r[l]);
        }
      }
    }
  }
#endif
  const int64_t first = done / E;
  for (int64_t l = 0; l < nb; ++l) {
    T* row = dst + l * n * E;
    for (int64_t i = first; i < n; ++i) {
      row[i * E] = re[i * L + l];
      if (C) row[2 * i + 1] = im[i * L + l];
    }
  }
}

// h = act(z) in place (split tile); the caller stores it.
// (The activation is a template parameter, so that the lane loop vectorises.)
template <typename T, bool C, int L, int64_t act>
inline void activate_t(int64_t n, T* zr, T* zi, const T* bias) {
  const T eps = static_cast<T>(MODRELU_EPS);
  if (act == IDENTITY) return;
  for (int64_t i = 0; i < n; ++i) {
    const T bi = bias ? bias[i] : T(0);
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const int64_t j = i * L + l;
      T hr = zr[j], hi = C ? zi[j] : T(0);
      if (act == MODRELU) {
        // Divide unconditionally, then select (r + eps > 0): a division under a condition
        // may trap, so the compiler would not vectorise the loop.
        const T r = C ? std::sqrt(hr * hr + hi * hi) : std::abs(hr);
        const T m = r + bi;
        const T ratio = m / (r + eps);
        const T scale = m > 0 ? ratio : T(0);
        hr *= scale;
        hi *= scale;
      } else if (act == SPLIT_RELU) {
        hr = hr > 0 ? hr : T(0);
        hi = hi > 0 ? hi : T(0);
      } else if (act == TANH) {
        hr = std::tanh(hr);
      }
      zr[j] = hr;
      if (C) zi[j] = hi;
    }
  }
}

// grad of h = act(z) (split tiles): g -> gz; gb[i] += bias gradient (summed over the tile).
template <typename T, bool C, int L, int64_t act>
inline void activate_backward_t(int64_t n, const T* zr, const T* zi, const T* bias, const T* gr,
                                const T* gi, T* gzr, T* gzi, T* gb) {
  const T eps = static_cast<T>(MODRELU_EPS);
  for (int64_t i = 0; i < n; ++i) {
    const T bi = bias ? bias[i] : T(0);
    T gbi = 0;
#pragma omp simd reduction(+ : gbi)
    for (int64_t l = 0; l < L; ++l) {
      const int64_t j = i * L + l;
      if (act == MODRELU) {
        const T a = zr[j], b = C ? zi[j] : T(0);
        // Every division unconditional, then a select (see activate_t).
        const T r = C ? std::sqrt(a * a + b * b) : std::abs(a);
        const T m = r + bi;
        const bool active = m > 0;
        const T den = r + eps;
        const T inv = T(1) / den;
        const T g = active ? m * inv : T(0);
        const T dg = active ? (den - m) * inv * inv : T(0);
        const T proj = C ? gr[j] * a + gi[j] * b : gr[j] * a;
        const T over_r = dg * proj / (r > 0 ? r : T(1));
        const T coef = r > 0 ? over_r : T(0);
        gzr[j] = gr[j] * g + a * coef;
        if (C) gzi[j] = gi[j] * g + b * coef;
        gbi += active ? proj * inv : T(0);
      } else if (act == SPLIT_RELU) {
        gzr[j] = zr[j] > 0 ? gr[j] : T(0);
        if (C) gzi[j] = zi[j] > 0 ? gi[j] : T(0);
      } else if (act == TANH) {
        const T hv = std::tanh(zr[j]);
        gzr[j] = gr[j] * (T(1) - hv * hv);
      } else {
        gzr[j] = gr[j];
        if (C) gzi[j] = gi[j];
      }
    }
    if (gb) gb[i] += gbi;
  }
}

template <typename T, bool C, int L>
inline void activate(int64_t act, int64_t n, T* zr, T* zi, const T* bias) {
  switch (act) {
    case MODRELU: return activate_t<T, C, L, MODRELU>(n, zr, zi, bias);
    case SPLIT_RELU: return activate_t<T, C, L, SPLIT_RELU>(n, zr, zi, bias);
    case TANH: return activate_t<T, C, L, TANH>(n, zr, zi, bias);
    default: return;
  }
}

template <typename T, bool C, int L>
inline void activate_backward(int64_t act, int64_t n, const T* zr, const T* zi, const T* bias,
                              const T* gr, const T* gi, T* gzr, T* gzi, T* gb) {
  switch (act) {
    case MODRELU:
      return activate_backward_t<T, C, L, MODRELU>(n, zr, zi, bias, gr, gi, gzr, gzi, gb);
    case SPLIT_RELU:
      return activate_backward_t<T, C, L, SPLIT_RELU>(n, zr, zi, bias, gr, gi, gzr, gzi, gb);
    case TANH:
      return activate_backward_t<T, C, L, TANH>(n, zr, zi, bias, gr, gi, gzr, gzi, gb);
    default:
      return activate_backward_t<T, C, L, IDENTITY>(n, zr, zi, bias, gr, gi, gzr, gzi, gb);
  }
}

// Scratch of one tile (split real / imaginary arrays of `big * L` numbers each): the forward
// keeps the state in `a` (2x2 factors in place, others ping-pong with `b`); the backward also
// keeps every factor's input x_0..x_K (x_K: W x_0, then z) and three gradient buffers.
template <typename T>
struct Scratch {
  std::vector<T> buf;
  std::vector<T*> xr, xi;  // x_k, k = 0..K (backward only)
  T* gr[3];
  T* gi[3];
  int64_t big;
  Scratch(const std::vector<Factor>& f, int64_t n, bool cplx, int64_t L, bool inputs) {
    const size_t K = f.size();
    std::vector<int64_t> sizes(K + 1);
    big = n;
    for (size_t k = 0; k < K; ++k) {
      sizes[k] = f[k].R * f[k].Q * f[k].S;
      big = std::max(big, sizes[k]);
    }
    sizes[K] = n;
    int64_t total = 0;
    if (inputs)
      for (auto s : sizes) total += s;
    const int64_t parts = cplx ? 2 : 1;
    buf.assign(static_cast<size_t>(parts * L * (total + 3 * big)), T(0));
    T* p = buf.data();
    if (inputs)
      for (size_t k = 0; k <= K; ++k) {
        xr.push_back(p);
        p += sizes[k] * L;
        xi.push_back(cplx ? p : nullptr);
        if (cplx) p += sizes[k] * L;
      }
    for (int s = 0; s < 3; ++s) {
      gr[s] = p;
      p += big * L;
      gi[s] = cplx ? p : nullptr;
      if (cplx) p += big * L;
    }
  }
};

// z += u_t for the tile's nb rows.
template <typename T, bool C, int L>
inline void add_input(T* zr, T* zi, const T* u_t, int64_t n, int64_t nb) {
  const int64_t E = C ? 2 : 1;
  if (nb == L) return load<T, C, L, Into::ADD>(u_t, n, nb, zr, zi);
  for (int64_t l = 0; l < nb; ++l) {
    const T* row = u_t + l * n * E;
    for (int64_t i = 0; i < n; ++i) {
      zr[i * L + l] += row[i * E];
      if (C) zi[i * L + l] += row[2 * i + 1];
    }
  }
}

// x_0 (in scratch) -> the input of every pass kept (x_k at the first factor k of each pass; a
// paired pass skips x_{k+1}), x_K = W x_0; then z = x_K + u_t in x_K.
template <typename T, bool C, int L>
inline void forward_step(const std::vector<Factor>& f, const Mats<T>& m, Scratch<T>& sc,
                         const T* u_t, int64_t n, int64_t nb) {
  const size_t K = f.size();
  for (size_t k = 0; k < K;) {
    const size_t w = pass_width<C, L>(f, k);
    const T* wi = C ? m.im[k].data() : nullptr;
    if (w == 2)
      apply4<T, L>(f[k], m.re[k].data(), wi, m.re[k + 1].data(), m.im[k + 1].data(), sc.xr[k],
                   sc.xi[k], sc.xr[k + 2], sc.xi[k + 2]);
    else if (is2x2(f[k]))
      apply2<T, C, L>(f[k], m.re[k].data(), wi, sc.xr[k], sc.xi[k], sc.xr[k + 1], sc.xi[k + 1]);
    else
      apply_factor<T, C, L>(f[k], m.re[k].data(), wi, sc.xr[k], sc.xi[k], sc.xr[k + 1],
                            sc.xi[k + 1]);
    k += w;
  }
  add_input<T, C, L>(sc.xr[K], sc.xi[K], u_t, n, nb);
}

int64_t chunks_for(int64_t tiles) {
  return std::max<int64_t>(1, std::min<int64_t>(tiles, at::get_num_threads()));
}

template <typename T, bool C, int L>
void forward_impl(const at::Tensor& u, const at::Tensor& h0, const std::vector<at::Tensor>& mats,
                  const T* bias, int64_t act, at::Tensor& out) {
  const int64_t steps = u.size(0), batch = u.size(1), n = u.size(2), E = C ? 2 : 1;
  const size_t K = mats.size();
  const auto f = chain(mats);
  const auto m = split_mats<T, C>(mats);
  const T* up = C ? at::view_as_real(u).data_ptr<T>() : u.data_ptr<T>();
  const T* hp = C ? at::view_as_real(h0).data_ptr<T>() : h0.data_ptr<T>();
  T* op = C ? at::view_as_real(out).data_ptr<T>() : out.data_ptr<T>();
  const int64_t tiles = (batch + L - 1) / L;
  const int64_t chunks = chunks_for(tiles);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Scratch<T> sc(f, n, C, L, false);
      for (int64_t tile = tiles * c / chunks; tile < tiles * (c + 1) / chunks; ++tile) {
        const int64_t b = tile * L, nb = std::min<int64_t>(L, batch - b);
        // The state in (sr, si); non-2x2 factors write to (tr, ti) and the two swap.
        T *sr = sc.gr[0], *si = sc.gi[0], *tr = sc.gr[1], *ti = sc.gi[1];
        load<T, C, L>(hp + b * n * E, n, nb, sr, si);
        for (int64_t t = 0; t < steps; ++t) {
          const int64_t off = (t * batch + b) * n * E;
          for (size_t k = 0; k < K; k += pass_width<C, L>(f, k)) {
            const T* wi = C ? m.im[k].data() : nullptr;
            if (pass_width<C, L>(f, k) == 2) {
              apply4<T, L>(f[k], m.re[k].data(), wi, m.re[k + 1].data(), m.im[k + 1].data(), sr,
                           si, sr, si);
            } else if (is2x2(f[k])) {
              apply2<T, C, L>(f[k], m.re[k].data(), wi, sr, si, sr, si);
            } else {
              apply_factor<T, C, L>(f[k], m.re[k].data(), wi, sr, si, tr, ti);
              std::swap(sr, tr);
              std::swap(si, ti);
            }
          }
          add_input<T, C, L>(sr, si, up + off, n, nb);
          activate<T, C, L>(act, n, sr, si, bias);
          store<T, C, L>(op + off, n, nb, sr, si);
        }
      }
    }
  });
}

template <typename T, bool C, int L>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& out,
                                      const at::Tensor& u, const at::Tensor& h0,
                                      const std::vector<at::Tensor>& mats, const T* bias,
                                      int64_t act, bool need_mats, bool need_bias) {
  const int64_t steps = u.size(0), batch = u.size(1), n = u.size(2), E = C ? 2 : 1;
  const size_t K = mats.size();
  const auto f = chain(mats);
  const auto m = split_mats<T, C>(mats);
  const int64_t tiles = (batch + L - 1) / L;
  const int64_t chunks = chunks_for(tiles);
  // Per-chunk accumulators: every factor's gradient per lane ([P*Q][L] real, then imaginary),
  // then the bias gradient.
  std::vector<int64_t> woff(K + 1, 0);
  for (size_t k = 0; k < K; ++k) woff[k + 1] = woff[k] + f[k].P * f[k].Q * E * L;
  const int64_t wsize = woff[K];
  const int64_t per_chunk = wsize + n;
  std::vector<T> acc(static_cast<size_t>(chunks * per_chunk), T(0));
  // the first factor of every pass (forward_step's passes), walked backwards by the adjoint
  std::vector<size_t> passes;
  for (size_t k = 0; k < K; k += pass_width<C, L>(f, k)) passes.push_back(k);

  auto grad_u = at::empty_like(u);
  auto grad_h0 = at::empty_like(h0);
  // grad_out may be strided over time and batch (the transposed gradient of a batch-first
  // output, read in place instead of copied); elements are contiguous.
  const T* gop = C ? at::view_as_real(grad_out).data_ptr<T>() : grad_out.data_ptr<T>();
  const int64_t gst = grad_out.stride(0) * E, gsb = grad_out.stride(1) * E;
  const T* op = C ? at::view_as_real(out).data_ptr<T>() : out.data_ptr<T>();
  const T* up = C ? at::view_as_real(u).data_ptr<T>() : u.data_ptr<T>();
  const T* hp = C ? at::view_as_real(h0).data_ptr<T>() : h0.data_ptr<T>();
  T* gup = C ? at::view_as_real(grad_u).data_ptr<T>() : grad_u.data_ptr<T>();
  T* ghp = C ? at::view_as_real(grad_h0).data_ptr<T>() : grad_h0.data_ptr<T>();

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Scratch<T> sc(f, n, C, L, true);
      T* gw = acc.data() + c * per_chunk;
      T* gb = need_bias ? gw + wsize : nullptr;
      for (int64_t tile = tiles * c / chunks; tile < tiles * (c + 1) / chunks; ++tile) {
        const int64_t b = tile * L, nb = std::min<int64_t>(L, batch - b);
        // Three gradient buffers: ih holds the running dL/dh_t from the future (zero after the
        // last step), then the step's dL/dh (grad_out[t] added in place); it dL/dz and then
        // the chain's gradients (2x2 in place, others ping-pong with ig, the spare).
        int ih = 0, ig = 1, it = 2;
        std::fill(sc.gr[ih], sc.gr[ih] + n * L, T(0));
        if (C) std::fill(sc.gi[ih], sc.gi[ih] + n * L, T(0));
        for (int64_t t = steps - 1; t >= 0; --t) {
          const int64_t off = (t * batch + b) * n * E;
          const T* prev = t > 0 ? op + ((t - 1) * batch + b) * n * E : hp + b * n * E;
          load<T, C, L>(prev, n, nb, sc.xr[0], sc.xi[0]);
          forward_step<T, C, L>(f, m, sc, up + off, n, nb);
          // g = grad_out[t] + gh, added into gh's buffer (gh is not needed after this)
          T *ggr = sc.gr[ih], *ggi = sc.gi[ih];
          load<T, C, L, Into::ADD>(gop + t * gst + b * gsb, n, nb, ggr, ggi, gsb);
          activate_backward<T, C, L>(act, n, sc.xr[K], sc.xi[K], bias, ggr, ggi, sc.gr[it],
                                     sc.gi[it], gb);
          store<T, C, L>(gup + off, n, nb, sc.gr[it], sc.gi[it]);
          // back through the factors
          int cur = it, spare = ig;
          for (size_t pi = passes.size(); pi-- > 0;) {
            const size_t kk = passes[pi];
            T* gwk = gw + woff[kk];
            T* gwki = C ? gwk + f[kk].P * f[kk].Q * L : nullptr;
            const T* wr = m.re[kk].data();
            const T* wi = C ? m.im[kk].data() : nullptr;
            if (pass_width<C, L>(f, kk) == 2) {
              const T* wr2 = m.re[kk + 1].data();
              const T* wi2 = m.im[kk + 1].data();
              if (need_mats)
                adjoint4<T, L, true>(f[kk], wr, wi, wr2, wi2, sc.xr[kk], sc.xi[kk], sc.gr[cur],
                                     sc.gi[cur], gwk, gw + woff[kk + 1], sc.gr[cur], sc.gi[cur]);
              else
                adjoint4<T, L, false>(f[kk], wr, wi, wr2, wi2, sc.xr[kk], sc.xi[kk], sc.gr[cur],
                                      sc.gi[cur], gwk, gw + woff[kk + 1], sc.gr[cur],
                                      sc.gi[cur]);
            } else if (is2x2(f[kk]) && L > 1) {
              if (need_mats)
                adjoint2<T, C, L, true>(f[kk], wr, wi, sc.xr[kk], sc.xi[kk], sc.gr[cur],
                                        sc.gi[cur], gwk, sc.gr[cur], sc.gi[cur]);
              else
                adjoint2<T, C, L, false>(f[kk], wr, wi, sc.xr[kk], sc.xi[kk], sc.gr[cur],
                                         sc.gi[cur], gwk, sc.gr[cur], sc.gi[cur]);
            } else {
              adjoint_factor<T, C, L>(f[kk], wr, wi, sc.xr[kk], sc.xi[kk], sc.gr[cur],
                                      sc.gi[cur], gwk, gwki, sc.gr[spare], sc.gi[spare],
                                      need_mats);
              std::swap(cur, spare);
            }
          }
          // the chain's result is the new running gradient; the other two buffers are free
          ih = cur;
          ig = (cur + 1) % 3;
          it = (cur + 2) % 3;
        }
        store<T, C, L>(ghp + b * n * E, n, nb, sc.gr[ih], sc.gi[ih]);
      }
    }
  });

  std::vector<at::Tensor> result{grad_u, grad_h0};
  auto real_opts = u.options().dtype(C ? c10::toRealValueType(u.scalar_type()) : u.scalar_type());
  if (need_bias) {
    auto gbias = at::zeros({n}, real_opts);
    T* gbp = gbias.data_ptr<T>();
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < n; ++i) gbp[i] += acc[c * per_chunk + wsize + i];
    result.push_back(gbias);
  } else {
    result.push_back(at::empty({0}, real_opts));
  }
  for (size_t k = 0; k < K; ++k) {
    const int64_t pq = f[k].P * f[k].Q;
    if (!need_mats) {
      result.push_back(at::empty({0}, mats[k].options()));
      continue;
    }
    auto g = at::empty({f[k].P, f[k].Q}, mats[k].options());
    T* gp = C ? at::view_as_real(g).data_ptr<T>() : g.data_ptr<T>();
    for (int64_t i = 0; i < pq; ++i) {
      T sr = 0, si = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const T* base = acc.data() + c * per_chunk + woff[k];
        for (int64_t l = 0; l < L; ++l) {
          sr += base[i * L + l];
          if (C) si += base[(pq + i) * L + l];
        }
      }
      if (C) {
        gp[2 * i] = sr;
        gp[2 * i + 1] = si;
      } else {
        gp[i] = sr;
      }
    }
    result.push_back(g);
  }
  return result;
}

// Rows per tile, once the batch has 8 rows or more (else one row per tile). 8 rows of N=512
// complex64 (32 KB) stay in L1 across the nine 2x2 passes; 8 was 5-10% faster than 16 and 2x
// faster than 32 at N=512, B=32 and 128 (docs/benchmarks.md).
#ifndef KRU_TILE
#define KRU_TILE 8
#endif
constexpr int TILE = KRU_TILE;
inline bool wide(int64_t batch) { return batch >= 8; }

template <typename T, bool C>
void forward_dispatch(const at::Tensor& u, const at::Tensor& h0,
                      const std::vector<at::Tensor>& mats, const T* bias, int64_t act,
                      at::Tensor& out) {
  if (wide(u.size(1)))
    forward_impl<T, C, TILE>(u, h0, mats, bias, act, out);
  else
    forward_impl<T, C, 1>(u, h0, mats, bias, act, out);
}

template <typename T, bool C>
std::vector<at::Tensor> backward_dispatch(const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& u, const at::Tensor& h0,
                                          const std::vector<at::Tensor>& mats, const T* bias,
                                          int64_t act, bool need_mats, bool need_bias) {
  if (wide(u.size(1)))
    return backward_impl<T, C, TILE>(grad_out, out, u, h0, mats, bias, act, need_mats,
                                     need_bias);
  return backward_impl<T, C, 1>(grad_out, out, u, h0, mats, bias, act, need_mats, need_bias);
}

void check_inputs(const at::Tensor& u, const at::Tensor& h0, const std::vector<at::Tensor>& mats,
                  const c10::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(u.dim() == 3, "u: expected (T, B, N), got ", u.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == u.size(1) && h0.size(1) == u.size(2),
              "h0: expected (B, N) matching u, got ", h0.sizes());
  TORCH_CHECK(u.is_contiguous() && h0.is_contiguous(), "u, h0: expected contiguous tensors");
  TORCH_CHECK(h0.scalar_type() == u.scalar_type(), "h0: expected dtype ", u.scalar_type());
  TORCH_CHECK(!mats.empty(), "mats: expected at least one matrix");
  int64_t rows = 1, cols = 1;
  for (const auto& w : mats) {
    TORCH_CHECK(w.dim() == 2, "mats: expected 2-d matrices, got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == u.scalar_type(), "mats: expected dtype ", u.scalar_type());
    TORCH_CHECK(!w.is_conj(), "mats: expected resolved conjugation");
    rows *= w.size(0);
    cols *= w.size(1);
  }
  TORCH_CHECK(rows == u.size(2) && cols == u.size(2), "mats: Kronecker product is ", rows, "x",
              cols, ", expected ", u.size(2), "x", u.size(2));
  TORCH_CHECK(act >= 0 && act <= 3, "activation: unknown code ", act);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == u.size(2) && bias->is_contiguous(),
                "bias: expected a contiguous (N,) tensor");
    TORCH_CHECK(bias->scalar_type() == c10::toRealValueType(u.scalar_type()),
                "bias: expected the real dtype of u");
  }
}

// fn(T{}, std::bool_constant<C>{}) for a tensor's dtype: T the real scalar type, C whether it
// is complex; any other dtype is an error naming op.
template <typename F>
decltype(auto) dispatch_dtype(at::ScalarType dtype, const char* op, F&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{}, std::false_type{});
    case at::kDouble:
      return fn(double{}, std::false_type{});
    case at::kComplexFloat:
      return fn(float{}, std::true_type{});
    case at::kComplexDouble:
      return fn(double{}, std::true_type{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

template <typename T>
const T* bias_ptr(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->data_ptr<T>() : nullptr;
}

at::Tensor recurrence_forward(const at::Tensor& u, const at::Tensor& h0,
                              std::vector<at::Tensor> mats, const c10::optional<at::Tensor>& bias,
                              int64_t activation) {
  check_inputs(u, h0, mats, bias, activation);
  for (auto& w : mats) w = w.contiguous();
  auto out = at::empty_like(u);
  dispatch_dtype(u.scalar_type(), "kru::recurrence_forward", [&](auto real, auto complex) {
    using T = decltype(real);
    forward_dispatch<T, decltype(complex)::value>(u, h0, mats, bias_ptr<T>(bias), activation,
                                                  out);
  });
  return out;
}

std::vector<at::Tensor> recurrence_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                            const at::Tensor& u, const at::Tensor& h0,
                                            std::vector<at::Tensor> mats,
                                            const c10::optional<at::Tensor>& bias,
                                            int64_t activation, bool need_mats) {
  check_inputs(u, h0, mats, bias, activation);
  TORCH_CHECK(grad_out.sizes() == u.sizes() && out.sizes() == u.sizes(),
              "grad_out, out: expected the shape of u");
  auto go = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  auto o = out.contiguous();
  for (auto& w : mats) w = w.contiguous();
  const bool need_bias = bias.has_value() && bias->defined() && activation == MODRELU;
  return dispatch_dtype(u.scalar_type(), "kru::recurrence_backward", [&](auto real, auto complex) {
    using T = decltype(real);
    return backward_dispatch<T, decltype(complex)::value>(go, o, u, h0, mats, bias_ptr<T>(bias),
                                                          activation, need_mats, need_bias);
  });
}

}  // namespace

TORCH_LIBRARY(kru, m) {
  m.def(
      "recurrence_forward(Tensor u, Tensor h0, Tensor[] mats, Tensor? bias, int activation) "
      "-> Tensor");
  m.def(
      "recurrence_backward(Tensor grad_out, Tensor out, Tensor u, Tensor h0, Tensor[] mats, "
      "Tensor? bias, int activation, bool need_mats) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(kru, CPU, m) {
  m.impl("recurrence_forward", &recurrence_forward);
  m.impl("recurrence_backward", &recurrence_backward);
}
