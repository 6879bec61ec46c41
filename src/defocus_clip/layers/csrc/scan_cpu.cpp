// Fused CPU selective scan of (De-focus) Mamba: h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y_t = C_t . h_t.
//
// Why a kernel: an eager scan materialises Bt*D*L*N tensors (decays, inputs, states) and is memory-bound; here one
// pass over L per (batch, channel) keeps the N states in registers. The backward recomputes the states of one
// channel into a thread-local L*N buffer instead of storing them for the whole batch.
//
// Four pairs of entry points, float32:
//  * scan_fwd / scan_bwd: the plain scan. u, delta (Bt, D, L); A (D, N); B, C (Bt, L, N) (token-major, so that
//    the N states of one token are contiguous and vectorise).
//  * conv_fwd / conv_bwd: causal depthwise conv (kernel K) + bias + SiLU along L in the (Bt, L, D) layout of the
//    linears (x may be the u half of the in_proj output: rows of stride 2D). Replaces conv1d on a transposed copy.
//    conv_bwd may write dx into a given view (the u half of the in_proj output's gradient).
//  * defocus_fwd / defocus_bwd: the whole chain of a De-focus Mamba mixer between the projections, per block of
//    whole groups of G channels of one image (the group RMS norm couples the channels of a group):
//        delta = softplus(dt) / delta_scale                    u, dt, z, out: (Bt, L, D) (the layout of the linears)
//        y = scan(u, delta, A, B, C)
//        out = (group_rms_norm(y) + D u) * silu(z)            G = 0: no group norm (the plain Mamba baseline)
//    A block of channels of one image is copied into thread-local token-major (L, width) buffers; the scan then runs
//    kW channels at a time, one per vector lane (see grp_fwd; kW = 16 with AVX-512, else 8), while global memory is
//    only touched in the (Bt, L, D) layout, row by row; the next block's rows are prefetched during a block's scan
//    (RowPrefetch). defocus_fwd returns out, the scan output y and the group norm's rstd, which defocus_bwd takes
//    back. defocus_bwd may write dz into a given view (the z half of the in_proj output's gradient) and also returns
//    the sums of ddt over images and tokens (dt_proj's bias gradient).
//    Optionally the learnable RoPE of B and C is applied first (freq non-empty), as layers/rope.py defines it:
//        theta_tn = (t / rope_scale) freq_n,  x'_2i = x_2i cos theta_2i - x_2i+1 sin theta_2i,
//                                              x'_2i+1 = x_2i+1 cos theta_2i+1 + x_2i sin theta_2i+1
//    B and C may be strided slices (unit inner stride) of the x_proj output; B, C are tiny (Bt, L, N), so the
//    rotation runs once, serially, outside the parallel region (tens of eager ops fewer per layer).
//    With dt_weight (D, R) and dt_bias (D,) given, dt is dt_proj's rank-R input (Bt, L, R) instead (a slice of the
//    x_proj output): the kernel computes dt = dt_in dt_weight^T + dt_bias per block (DtSource), and defocus_bwd
//    returns the gradients of dt_in and dt_weight in place of ddt, so no (Bt, L, D) dt or ddt ever exists.
//  * rms_fwd / rms_bwd: the pre-norm of every Mamba block, RMSNorm over the last dim of (R, C), one pass each way.
// And, for the benchmarks only, scan_core_ticks: the cost of the chain's scan core alone (bench.towers --scan-cycles).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>  // __rdtsc (scan_core_ticks)
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <atomic>
#include <chrono>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

// DEFOCUS_ABLATE, for the benchmarks only (`python -m defocus_clip.bench.towers --ablate`): 1 leaves the selective
// scan core out of the chain (forward and backward), 2 the whole chain. Such builds compute wrong results; they measure
// what the rest of a layer costs, i.e. how fast the tower could be if those parts were free.
#ifndef DEFOCUS_ABLATE
#define DEFOCUS_ABLATE 0
#endif
constexpr int kAblate = DEFOCUS_ABLATE;

namespace {

constexpr float kGroupEps = 1e-6f;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// Vector types (GCC/Clang vector extensions). The plain scan keeps the N states of one channel in NV vectors of 8
// floats (v8f). The fused chain and the conv put one channel per lane, kW channels per vector (vf): 16 with
// AVX-512 (one zmm register; 32 of them hold the 16 states with room to spare), else 8 (one AVX2 register, or a
// pair of SSE registers without AVX).
typedef float v8f __attribute__((vector_size(32)));
#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float vf __attribute__((vector_size(kW * 4)));
template <int Bytes> struct IntVec;
template <> struct IntVec<32> { typedef int32_t type __attribute__((vector_size(32))); };
template <> struct IntVec<64> { typedef int32_t type __attribute__((vector_size(64))); };

template <class V> inline V vld(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V> inline void vst(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
inline v8f vload(const float* p) { return vld<v8f>(p); }
inline void vstore(float* p, v8f v) { vst(p, v); }
template <class V> inline float hsum(V v) {
  if constexpr (sizeof(V) == 64) {  // fold the halves, then as 8 lanes
    v8f lo, hi;
    std::memcpy(&lo, &v, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    return hsum(lo + hi);
  } else {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
  }
}

// max(lo, x) and min(hi, x) that return x when x is NaN (the operand order of the x86 max/min instructions).
template <class V> inline V vmax_keep_nan(V lo, V x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return (V)_mm512_max_ps((__m512)lo, (__m512)x);
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_max_ps((__m256)lo, (__m256)x);
#endif
  return x < lo ? lo : x;
}
template <class V> inline V vmin_keep_nan(V hi, V x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return (V)_mm512_min_ps((__m512)hi, (__m512)x);
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_min_ps((__m256)hi, (__m256)x);
#endif
  return x > hi ? hi : x;
}

// exp in plain arithmetic, all lanes (libm's expf per element would dominate the element-wise passes): 2^k * p(r),
// k = round(x log2 e) (read from the mantissa of x log2 e + 1.5 2^23), r = x - k ln2 in [-ln2/2, ln2/2] with ln2 in
// two parts, p a degree-6 minimax polynomial (relative error 1e-7, float32 rounding level). Arguments clamped to
// [-87, 88]; NaN stays NaN. Needs IEEE arithmetic: no -ffast-math (the rounding trick).
template <class V> inline V vexp(V x) {
  using I = typename IntVec<sizeof(V)>::type;
  x = vmin_keep_nan(V{} + 88.f, vmax_keep_nan(V{} - 87.f, x));
  const V t = x * 1.44269504088896341f + 12582912.f;
  const V k = t - 12582912.f;
  const V r = x - k * 0.693145751953125f - k * 1.428606820309417e-06f;
  V p = r * 1.3836835e-3f + 8.3748158e-3f;
  p = p * r + 4.1668225e-2f;
  p = p * r + 1.6666420e-1f;
  p = p * r + 4.9999991e-1f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const I bits = ((I)t - (0x4B400000 - 127)) << 23;  // 2^k: (k + 127) in the exponent field
  return p * (V)bits;
}

// 2^x in place for G vectors x_j = delta A log2(e) <= 0, the decays of the chain: cheaper than vexp (no ln2 range
// reduction), and each step of the polynomial runs across the G vectors before the next, so that G independent
// dependency chains overlap (one exp after another leaves the core waiting on each chain's latency: the forward's
// scan ran 20% faster with G = 8). x below -126 gives 2^-126 (a decay that is zero for every purpose, and no
// denormals, which cost microcode assists in the FMAs that follow); NaN stays NaN. A is scaled by log2(e) once per
// channel group (gather_a). Always inlined: called from lambdas deep in the parallel regions, where GCC's inliner
// otherwise gives up and passes the vectors through memory.
// With AVX-512: 2^x = 2^f 2^floor(x), f = x - floor(x) in [0, 1) in one instruction (vreduceps) and the scaling by
// 2^floor(x) in another (vscalefps): 8 instructions per vector instead of 12 (the forward scan: 9.5 -> 7.6 cycles
// per state vector and token).
template <int G> __attribute__((always_inline)) inline void vexp2_n(vf* x) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (sizeof(vf) == 64) {
    __m512 k[G], f[G], p[G];
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j) k[j] = _mm512_max_ps(_mm512_set1_ps(-126.f), (__m512)x[j]);  // NaN stays NaN
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j) f[j] = _mm512_reduce_ps(k[j], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
      p[j] = _mm512_fmadd_ps(f[j], _mm512_set1_ps(1.87757274e-3f), _mm512_set1_ps(8.98934435e-3f));
    for (const float c : {5.58263175e-2f, 2.40153611e-1f, 6.93153083e-1f, 9.99999940e-1f})
#pragma GCC unroll 16
      for (int j = 0; j < G; ++j) p[j] = _mm512_fmadd_ps(p[j], f[j], _mm512_set1_ps(c));  // 2^f: rel. error 1.6e-7
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j) x[j] = (vf)_mm512_scalef_ps(p[j], k[j]);
    return;
  }
#endif
  using I = typename IntVec<sizeof(vf)>::type;
  vf t[G], p[G];
#pragma GCC unroll 16
  for (int j = 0; j < G; ++j) x[j] = vmax_keep_nan(vf{} - 126.f, x[j]);
#pragma GCC unroll 16
  for (int j = 0; j < G; ++j) t[j] = x[j] + 12582912.f;  // 1.5 2^23: k = round(x) sits in the low mantissa bits
#pragma GCC unroll 16
  for (int j = 0; j < G; ++j) x[j] -= t[j] - 12582912.f;  // f = x - k in [-1/2, 1/2]
#pragma GCC unroll 16
  for (int j = 0; j < G; ++j) p[j] = x[j] * 1.3276444e-3f + 9.6755354e-3f;
  for (const float c : {5.5507135e-2f, 2.4022120e-1f, 6.9314694e-1f, 1.0000001f})
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j) p[j] = p[j] * x[j] + c;  // 2^f: degree-5 minimax, relative error 2.4e-7
#pragma GCC unroll 16
  for (int j = 0; j < G; ++j) x[j] = p[j] * (vf)(((I)t[j] - (0x4B400000 - 127)) << 23);  // 2^k: (k + 127) << 23
}

// Thread-local scratch aligned to cache lines: a vector load or store that straddles two lines costs two accesses
// (std::vector gives 16-byte alignment only); rows of the block buffers are whole vectors wide, so all are aligned.
template <class T> struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U> Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U> bool operator==(const Aligned64<U>&) const { return true; }
};
using fvec = std::vector<float, Aligned64<float>>;

// Element-wise maths written once for a float or a vector (T = float or vf): the channel loops of the chain, the conv
// and the norm run kW channels at a time with a scalar tail.
template <class T> inline T ld(const float* p);
template <> inline float ld<float>(const float* p) { return *p; }
template <> inline vf ld<vf>(const float* p) { return vld<vf>(p); }
inline void st(float* p, float v) { *p = v; }
inline void st(float* p, vf v) { vst(p, v); }
inline float ex(float x) { return std::exp(x); }
inline vf ex(vf x) { return vexp(x); }

// 1 / x: for vectors the hardware's reciprocal estimate and one Newton step, r (2 - x r) (relative error ~1e-7 with
// AVX-512's 14-bit estimate, ~3e-7 with AVX's 12-bit one), where a division occupies the divider for 10-16 cycles
// (Skylake-X: vdivps zmm 10 cycles per instruction): the element-wise passes, fed from L2 once the next item's rows
// are prefetched, were bound by their two divisions per vector. For x in [1, 1e38] (the callers' range: 1 + exp(-x),
// (1 + e)(2 + e)); NaN stays NaN.
template <class T> inline T recip_t(T x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 64) {
    const __m512 r = _mm512_rcp14_ps((__m512)x);
    return (T)_mm512_fmadd_ps(r, _mm512_fnmadd_ps((__m512)x, r, _mm512_set1_ps(1.f)), r);
  }
#endif
#if defined(__AVX__) && defined(__FMA__)
  if constexpr (sizeof(T) == 32) {
    const __m256 r = _mm256_rcp_ps((__m256)x);
    return (T)_mm256_fmadd_ps(r, _mm256_fnmadd_ps((__m256)x, r, _mm256_set1_ps(1.f)), r);
  }
#endif
  return (T{} + 1.f) / x;
}

template <class T> inline T sigmoid_t(T x) { return recip_t(ex(-x) + 1.f); }

// log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3 for e in (0, 1], by its odd series up to s^15 (truncation < 2e-9
// relative): full relative precision also for small e, unlike log(1 + e).
template <class T> inline T log1p_from_s(T s) {
  const T s2 = s * s;
  T p = s2 * (1.f / 15) + 1.f / 13;
  p = p * s2 + 1.f / 11;
  p = p * s2 + 1.f / 9;
  p = p * s2 + 1.f / 7;
  p = p * s2 + 1.f / 5;
  p = p * s2 + 1.f / 3;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1].
template <class T> inline T softplus_t(T x) {
  const T e = ex(x < 0.f ? x : -x);
  return (x > 0.f ? x : T{}) + log1p_from_s(e * recip_t(e + 2.f));
}

// softplus_t(x) and its derivative sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e) from one exp and one division.
template <class T> inline T softplus_sigmoid_t(T x, T& sig) {
  const T e = ex(x < 0.f ? x : -x), e1 = e + 1.f, e2 = e + 2.f;
  const T q = recip_t(e1 * e2);  // s = e / e2 = e e1 q, sigmoid = (1 or e) / e1 = (1 or e) e2 q
  sig = (x < 0.f ? e : T{} + 1.f) * e2 * q;
  return (x > 0.f ? x : T{}) + log1p_from_s(e * e1 * q);
}

// f(c, T{}) for c in [c0, c1): kW channels at a time (T = vf), then one at a time (T = float).
template <class F> inline void for_lanes(int64_t c0, int64_t c1, F&& f) {
  int64_t c = c0;
  for (; c + kW <= c1; c += kW) f(c, vf{});
  for (; c < c1; ++c) f(c, 0.f);
}

// Sum of squares of [c0, c1) of a row, vector part and scalar tail.
inline float sum_squares(const float* x, int64_t c0, int64_t c1) {
  vf sv{};
  float ss = 0.f;
  for_lanes(c0, c1, [&](int64_t c, auto tag) {
    using T = decltype(tag);
    const T v = ld<T>(x + c);
    if constexpr (std::is_same_v<T, vf>) sv += v * v; else ss += v * v;
  });
  return hsum(sv) + ss;
}

// A store that bypasses the caches (whole aligned vectors only; else a plain store), for outputs written once and read
// only much later (the saved scan output): no read-for-ownership of the line, no eviction of the working set.
// The parallel region ends with stream_fence().
inline void st_stream(float* p, float v) { *p = v; }
inline void st_stream(float* p, vf v) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, (__m256)v);
#endif
  vst(p, v);
}
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Software prefetch of a row segment [p, p + n) (one instruction per 64-byte line): the element-wise passes walk
// rows ~1 KB long at a stride of D floats, too short for the hardware prefetchers to ramp up on each.
inline void prefetch(const float* p, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) __builtin_prefetch(p + k);
}

// The next item's rows, prefetched into L2 a few lines at a time from within the scan's token loops. Why: the chain's
// element-wise passes read 2 (forward) to 4 (backward) rows of global memory per token and vector, and one core pulls
// only ~11 GB/s from memory (the fill buffers it can keep in flight), so those passes waited on memory for half of
// their time; the scan that runs before them is bound by arithmetic and leaves memory idle. aim(): columns [c0, c1)
// of tokens 0..L-1 of one image of up to kMax arrays (ArrayRows); step() issues the next two lines.
struct ArrayRows {
  const float* base;                // image 0, column 0; nullptr: no such array (skipped)
  int64_t image_stride, row_stride;  // floats
};

struct RowPrefetch {
  static constexpr int kMax = 5;
  const char* base[kMax];
  int64_t stride[kMax];  // bytes
  int arrays = 0, lines = 0, L = 0, a = 0, t = 0, l = 0;
  const char* p = nullptr;
  void aim(int64_t L_, int64_t b, int64_t c0, int64_t c1, std::initializer_list<ArrayRows> rows) {
    L = (int)L_;
    lines = (int)((c1 - c0 + 15) / 16);
    arrays = a = t = l = 0;
    for (const ArrayRows& r : rows) {
      if (!r.base || arrays == kMax) continue;
      base[arrays] = reinterpret_cast<const char*>(r.base + b * r.image_stride + c0);
      stride[arrays++] = r.row_stride * (int64_t)sizeof(float);
    }
    p = arrays ? base[0] : nullptr;
  }
  __attribute__((always_inline)) inline void step() {
    if (a >= arrays) return;
    __builtin_prefetch(p, 0, 2);  // prefetcht1: into L2, not the scan's L1
    __builtin_prefetch(p + 64, 0, 2);
    p += 128;
    if ((l += 2) < lines) return;
    l = 0;
    if (++t < L) {
      p = base[a] + t * stride[a];
    } else {
      t = 0;
      if (++a < arrays) p = base[a];
    }
  }
};

// One channel, forward. a: A row (N). Bl, Cl: (L, N). Writes y (L, stride ys); if hs != nullptr also the states
// into rows 1..L of hs ((L + 1, N), row 0 = the zero initial state) and the decays exp(delta_t A) into as (L, N).
// kY = false (the backward's recompute): skip the outputs, only the states and decays are needed.
template <int NV, bool kY = true>
inline void chan_fwd(const float* u, const float* dl, const float* a, const float* Bl, const float* Cl, int L, int N,
                     float* y, int64_t ys, float* hs, float* as) {
  if (hs)
    for (int n = 0; n < N; ++n) hs[n] = 0.f;
  if constexpr (NV > 0) {
    v8f h[NV], av[NV];
    for (int j = 0; j < NV; ++j) { h[j] = v8f{}; av[j] = vload(a + 8 * j); }
    for (int t = 0; t < L; ++t) {
      const float d = dl[t], du = d * u[t];
      v8f acc{};
      for (int j = 0; j < NV; ++j) {
        const v8f at = vexp(av[j] * d);
        h[j] = at * h[j] + du * vload(Bl + (long)t * N + 8 * j);
        if constexpr (kY) acc += h[j] * vload(Cl + (long)t * N + 8 * j);
        if (hs) {
          vstore(hs + (long)(t + 1) * N + 8 * j, h[j]);
          vstore(as + (long)t * N + 8 * j, at);
        }
      }
      if constexpr (kY) y[t * ys] = hsum(acc);
    }
  } else {
    float h[256];
    for (int n = 0; n < N; ++n) h[n] = 0.f;
    for (int t = 0; t < L; ++t) {
      const float d = dl[t], du = d * u[t];
      float acc = 0.f;
      for (int n = 0; n < N; ++n) {
        const float at = std::exp(d * a[n]);
        h[n] = at * h[n] + du * Bl[(long)t * N + n];
        acc += h[n] * Cl[(long)t * N + n];
        if (hs) {
          hs[(long)(t + 1) * N + n] = h[n];
          as[(long)t * N + n] = at;
        }
      }
      if constexpr (kY) y[t * ys] = acc;
    }
  }
}

// One channel, backward, given dy (L). hs: scratch (L + 1, N), as: scratch (L, N), yb: scratch (L).
// Writes du, ddelta (L); accumulates dA (N), dB, dC (L, N).
//   g_t = C_t dy_t + a_{t+1} g_{t+1} (adjoint of h_t);  d loss / d(delta_t A) = g_t h_{t-1} a_t
template <int NV>
inline void chan_bwd(const float* u, const float* dl, const float* a, const float* Bl, const float* Cl, int L, int N,
                     const float* dy, float* hs, float* as, float* yb, float* du, float* ddl, float* dA, float* dB,
                     float* dC) {
  chan_fwd<NV, false>(u, dl, a, Bl, Cl, L, N, yb, 1, hs, as);
  if constexpr (NV > 0) {
    v8f g[NV], an[NV], dAl[NV], av[NV], hc[NV];  // hc: h_t, carried from the previous (later) step's h_{t-1} load
    for (int j = 0; j < NV; ++j) {
      g[j] = an[j] = dAl[j] = v8f{};
      av[j] = vload(a + 8 * j);
      hc[j] = vload(hs + (long)L * N + 8 * j);
    }
    for (int t = L - 1; t >= 0; --t) {
      const float d = dl[t], ut = u[t], dyt = dy[t], dut = d * ut;
      v8f s_ad{}, s_gb{};
      for (int j = 0; j < NV; ++j) {
        const long o = (long)t * N + 8 * j;
        const v8f at = vload(as + o), b = vload(Bl + o);
        const v8f gn = g[j] * an[j] + vload(Cl + o) * dyt;
        g[j] = gn;
        an[j] = at;
        const v8f hp = vload(hs + o);  // h_{t-1}
        vstore(dC + o, vload(dC + o) + hc[j] * dyt);
        hc[j] = hp;
        const v8f dla = gn * hp * at;
        dAl[j] += dla * d;
        s_ad += dla * av[j];
        s_gb += gn * b;
        vstore(dB + o, vload(dB + o) + gn * dut);
      }
      const float sgb = hsum(s_gb);
      ddl[t] = hsum(s_ad) + sgb * ut;
      du[t] = sgb * d;
    }
    for (int j = 0; j < NV; ++j) vstore(dA + 8 * j, vload(dA + 8 * j) + dAl[j]);
  } else {
    float g[256], an[256];
    for (int n = 0; n < N; ++n) g[n] = an[n] = 0.f;
    for (int t = L - 1; t >= 0; --t) {
      const float d = dl[t], ut = u[t], dyt = dy[t], dut = d * ut;
      float s_ad = 0.f, s_gb = 0.f;
      for (int n = 0; n < N; ++n) {
        const long o = (long)t * N + n;
        const float at = as[o];
        const float gn = g[n] * an[n] + Cl[o] * dyt;
        g[n] = gn;
        an[n] = at;
        dC[o] += dyt * hs[o + N];
        const float dla = gn * hs[o] * at;
        dA[n] += dla * d;
        s_ad += dla * a[n];
        s_gb += gn * Bl[o];
        dB[o] += gn * dut;
      }
      ddl[t] = s_ad + s_gb * ut;
      du[t] = s_gb * d;
    }
  }
}

void check(const torch::Tensor& t, const char* name, int dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == dim,
              name, " must be a contiguous float32 CPU tensor with ", dim, " dims");
}

// Per-thread accumulation of the (Bt, L, N) / (D, N) gradients that are sums over channels / images: a chunk of the
// flattened (image, channel-or-group) range touches a few images only, so its buffer is small; chunks add theirs
// into the output under a lock at the end.
struct Accum {
  std::mutex mu;
};

template <int NV>
std::vector<torch::Tensor> scan_fwd_impl(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bl,
                                         torch::Tensor Cl) {
  const int64_t Bt = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1);
  auto y = torch::empty_like(u);
  const float *pu = u.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = Bl.data_ptr<float>(), *pC = Cl.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, Bt * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / D, d = i % D;
      chan_fwd<NV>(pu + i * L, pd + i * L, pA + d * N, pB + b * L * N, pC + b * L * N, L, N, py + i * L, 1, nullptr,
                   nullptr);
    }
  });
  return {y};
}

template <int NV>
std::vector<torch::Tensor> scan_bwd_impl(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bl,
                                         torch::Tensor Cl, torch::Tensor dy) {
  const int64_t Bt = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1);
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u);
  auto dA = torch::zeros_like(A), dB = torch::zeros_like(Bl), dC = torch::zeros_like(Cl);
  const float *pu = u.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = Bl.data_ptr<float>(), *pC = Cl.data_ptr<float>(), *pdy = dy.data_ptr<float>();
  float *pdu = du.data_ptr<float>(), *pdd = ddelta.data_ptr<float>();
  float *pdA = dA.data_ptr<float>(), *pdB = dB.data_ptr<float>(), *pdC = dC.data_ptr<float>();
  std::mutex mu;
  at::parallel_for(0, Bt * D, 1, [&](int64_t begin, int64_t end) {
    const int64_t b0 = begin / D, b1 = (end - 1) / D;
    std::vector<float> hs((L + 1) * N), as(L * N), yb(L), lA(D * N, 0.f), lB((b1 - b0 + 1) * L * N, 0.f), lC((b1 - b0 + 1) * L * N, 0.f);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / D, d = i % D;
      const int64_t off = (b - b0) * L * N;
      chan_bwd<NV>(pu + i * L, pd + i * L, pA + d * N, pB + b * L * N, pC + b * L * N, L, N, pdy + i * L, hs.data(),
                   as.data(), yb.data(), pdu + i * L, pdd + i * L, lA.data() + d * N, lB.data() + off, lC.data() + off);
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t k = 0; k < D * N; ++k) pdA[k] += lA[k];
    for (int64_t k = 0; k < (b1 - b0 + 1) * L * N; ++k) {
      pdB[b0 * L * N + k] += lB[k];
      pdC[b0 * L * N + k] += lC[k];
    }
  });
  return {du, ddelta, dA, dB, dC};
}

// ---- small matrix products: dt_proj inside the chain, x_proj's inside the conv's forward and backward ----

// c[i, v] = init[i * is + v] + sum_k a[i * as + k * ak] b[k * bs + v] for MM rows i and NV vectors v of columns, k <
// K (init may be c itself, or one row for all with is = 0): the small products of dt_proj inside the chain and of
// x_proj inside the conv kernels, with MM x NV accumulators in registers and one vector load of b per MM x NV FMAs.
template <int MM, int NV>
inline void gemm_tile(const float* a, int64_t as, int64_t ak, const float* b, int64_t bs, int64_t K, const float* init,
                      int64_t is, float* c, int64_t cs) {
  vf acc[MM][NV];
  for (int i = 0; i < MM; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vld<vf>(init + i * is + v * kW);
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vld<vf>(b + k * bs + v * kW);
    for (int i = 0; i < MM; ++i) {
      const float ai = a[i * as + k * ak];
      for (int v = 0; v < NV; ++v) acc[i][v] += bv[v] * ai;
    }
  }
  for (int i = 0; i < MM; ++i)
    for (int v = 0; v < NV; ++v) vst(c + i * cs + v * kW, acc[i][v]);
}

// gemm_tile<R, NV> for R = rows < MM rows, R known at compile time (the row tail of small_gemm).
template <int MM, int NV, int R = MM - 1>
inline void row_tail(int64_t rows, const float* a, int64_t as, int64_t ak, const float* b, int64_t bs, int64_t K,
                     const float* init, int64_t is, float* c, int64_t cs) {
  if constexpr (R >= 1) {
    if (rows == R) return gemm_tile<R, NV>(a, as, ak, b, bs, K, init, is, c, cs);
    row_tail<MM, NV, R - 1>(rows, a, as, ak, b, bs, K, init, is, c, cs);
  }
}

// c = init + a b for M rows and nv vectors of columns (strides as gemm_tile), in tiles of MM rows x NV vectors; the
// row tail in one tile of its exact height, the vector tail one vector at a time. Vector tiles outer, row tiles inner:
// a tile's K x NV panel of b then stays in L1 while all M rows pass (rows outer re-read b from L2 per row tile; dt_proj
// in the chain, K = R = 48 rows of D + kW floats: 34 -> 44 flop per cycle, single thread); tails of exact height: a
// one-row tile per tail row is bound by its loads (dx_lr, L = 50 rows in tiles of 8: 38 -> 44 flop per cycle).
template <int MM, int NV>
inline void small_gemm(const float* a, int64_t as, int64_t ak, int64_t M, const float* b, int64_t bs, int64_t K,
                       int64_t nv, const float* init, int64_t is, float* c, int64_t cs) {
  for (int64_t v = 0; v < nv; v += NV) {
    const int64_t vecs = std::min<int64_t>(NV, nv - v);
    for (int64_t i = 0; i < M; i += MM) {
      const int64_t rows = std::min<int64_t>(MM, M - i);
      const float *ai = a + i * as, *bv = b + v * kW, *ci0 = init + i * is + v * kW;
      float* ci = c + i * cs + v * kW;
      for (int64_t u = 0; u < vecs; u += vecs == NV ? NV : 1) {
        if (vecs == NV && rows == MM) gemm_tile<MM, NV>(ai, as, ak, bv, bs, K, ci0, is, ci, cs);
        else if (vecs == NV) row_tail<MM, NV>(rows, ai, as, ak, bv, bs, K, ci0, is, ci, cs);
        else if (rows == MM) gemm_tile<MM, 1>(ai, as, ak, bv + u * kW, bs, K, ci0 + u * kW, is, ci + u * kW, cs);
        else row_tail<MM, 1>(rows, ai, as, ak, bv + u * kW, bs, K, ci0 + u * kW, is, ci + u * kW, cs);
      }
    }
  }
}

// ---- causal depthwise conv + bias + SiLU, (Bt, L, D) ----
//   pre_t = bias + sum_k w_k x_{t + k - (K - 1)} (x_j = 0 for j < 0),  out_t = silu(pre_t)
// Parallel over blocks of kW channels: every thread owns its channels, so dw and dbias need no reduction. KC: K at
// compile time (4: the Mamba models; the taps unroll), 0: any K up to kMaxConv.
// The forward runs token-major (rows of the block are contiguous: the hardware prefetchers follow them). The backward
// sweeps columns (kW channels of one image) with the last K inputs and gradients in registers: g, dw, dbias and dx in
// one pass, where token-major passes through a (L, 256) buffer of g ran at 140 cycles per vector (B/32 shapes,
// 1 thread: 9.5 -> 6.3 ms; column sweeps in the forward were slower than its rows). It sweeps all columns over a span
// of kConvSpan tokens, then all over the next span (the sweep's state carried in per-column buffers), not one column
// over all L tokens: the rows of a column lie 6 or 12 KB apart, a multiple of 4 KB, so they all fall into one set of
// the L1 cache, and one column's 50 rows of three arrays overflowed its 12 ways while each row's next line was only
// read a whole sweep later; over 8 tokens the rows of all columns stream by (B/32 conv backward, 2 threads, cold
// caches: 3.33 -> 1.71 ms; spans of 4, 6, 8, 10, 12, 16, 50 tokens: 1.82, 1.94, 1.71, 3.28, 2.74, 3.16, 3.10 ms).

// FN<FIXED>(...) when value == FIXED (the size the Mamba models use, unrolled at compile time), else FN<0>(...) (any
// size, at run time): the kernels' templates on N (states) and K (conv taps).
#define DISPATCH_FIXED(value, FIXED, FN, ...) ((value) == (FIXED) ? FN<FIXED>(__VA_ARGS__) : FN<0>(__VA_ARGS__))

constexpr int kMaxConv = 64;
constexpr int64_t kConvSpan = 8;  // tokens per span of the backward's column sweeps (below)
// tokens per product of the linear layer's weight gradient (below): its (P, channels) accumulators pass through L2
// once per product; x_proj's at B/32 shapes, conv backward with it, 2 threads, cold: 16 tokens 4.70 ms, 32 4.44, 48
// 4.45; MKL's product from the saved u plus the conv backward 5.35 against 4.70 with 32
constexpr int64_t kConvDwRows = 4 * kConvSpan;

// pre_t of kW channels (T = vf) or one (T = float) at c; Full: all K taps exist (t >= K - 1), else only k >= K - 1 - t.
template <int KC, bool Full, class T>
inline T conv_pre(const float* x, int64_t sl, const float* wt, const float* bias, int64_t D, int Krt, int64_t t,
                  int64_t c) {
  const int K = KC > 0 ? KC : Krt;
  T acc = ld<T>(bias + c);
  for (int k = Full ? 0 : std::max<int>(0, K - 1 - (int)t); k < K; ++k)
    acc += ld<T>(wt + k * D + c) * ld<T>(x + (t + k - (K - 1)) * sl + c);
  return acc;
}

// Backward of tokens [t0, t1) of one column (kW channels of one image, T = vf; or one, T = float), t1 <= L + K - 1:
// g_t = d loss / d pre_t; dbias += g_t, dw_k += g_t x_{t + k - (K - 1)}, and dx_{t - (K - 1)} = sum_k w_k g_{t - k},
// complete once g_t is known (g_t = 0 for t >= L). A sweep over one image continues from span to span: the last K - 1
// gradients g_{t0 - 1}, ..., g_{t0 - K + 1} come in gw_mem (at stride gs) and go out there; dw and db are carried.
// dout: d loss / d out, rows of stride dol. uo (optional): u_t = out_t written to uo + t * uol.
template <int KC, class T>
inline void conv_bwd_span(const float* x, int64_t sl, const float* dout, int64_t dol, const float* wt,
                          const float* bias, int64_t D, int Krt, int64_t L, int64_t t0, int64_t t1, int64_t c,
                          float* dx, int64_t dxl, float* gw_mem, int64_t gs, T* dw, T& db, float* uo = nullptr,
                          int64_t uol = 0) {
  const int K = KC > 0 ? KC : Krt;
  T w[KC > 0 ? KC : kMaxConv], xw[KC > 0 ? KC : kMaxConv], gw[KC > 0 ? KC : kMaxConv];  // gw[k] = g_{t - k}
  for (int k = 0; k < K; ++k) {
    w[k] = ld<T>(wt + k * D + c);
    const int64_t j = t0 + k - K;  // xw[k] = x_{t + k - (K - 1)}: the window before the first step
    xw[k] = k > 0 && j >= 0 && j < L ? ld<T>(x + j * sl + c) : T{};
    gw[k] = k + 1 < K ? ld<T>(gw_mem + k * gs) : T{};  // before the step's shift: gw[k] = g_{t0 - 1 - k}
  }
  const T b = ld<T>(bias + c);
  for (int64_t t = t0; t < t1; ++t) {
    T g{};
    for (int k = 0; k + 1 < K; ++k) xw[k] = xw[k + 1];
    if (t < L) {
      xw[K - 1] = ld<T>(x + t * sl + c);
      T pre = b;
      for (int k = 0; k < K; ++k) pre += w[k] * xw[k];
      const T s = sigmoid_t(pre);
      g = ld<T>(dout + t * dol + c) * s * (pre * (1.f - s) + 1.f);
      if (uo) st(uo + t * uol + c, pre * s);  // the conv's output u, recomputed
      db += g;
      for (int k = 0; k < K; ++k) dw[k] += g * xw[k];
    }
    for (int k = K - 1; k > 0; --k) gw[k] = gw[k - 1];
    gw[0] = g;
    if (t >= K - 1) {
      T acc{};
      for (int k = 0; k < K; ++k) acc += w[k] * gw[k];
      st(dx + (t - (K - 1)) * dxl + c, acc);
    }
  }
  for (int k = 0; k + 1 < K; ++k) st(gw_mem + k * gs, gw[k]);
}

void check_conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1,
              "x must be a float32 CPU (Bt, L, D) tensor with unit channel stride");
  check(w, "conv weight", 2);
  check(bias, "conv bias", 1);
  TORCH_CHECK(w.size(0) == x.size(2) && bias.size(0) == x.size(2), "conv weight must be (D, K) and bias (D,)");
  TORCH_CHECK(w.size(1) >= 1 && w.size(1) <= kMaxConv, "conv kernel size must be in [1, ", kMaxConv, "], got ",
              w.size(1));
}

// With lw (D, Pp) given (a linear layer's weight transposed, columns zero-padded to Pp, a multiple of kW), also the
// layer's output: partial sums over each thread's channels into part ((threads, Bt, L, Pp)), kConvFwdRows tokens at a
// time while the conv's fresh rows are in cache. The mixer's x_proj, (Bt L, D) x (D, 80), ran in MKL at ~220 GFLOP/s
// reading u back from memory. The products run over blocks of kConvFwdK channels: lw's block (40 KB at Pp = 80)
// stays in L1 while the rows pass.
constexpr int64_t kConvFwdRows = 10, kConvFwdK = 128;
// Register tiles of the conv kernels' products (rows x vectors): 25 of the 32 zmm registers in the forward, 24 (AVX-512)
// or 12 (AVX2: 16 ymm) in the backward. With AVX2 the forward's product is MKL's matmul after the conv instead: the
// best AVX2 tile (6 x 2) took 4.27 ms against 3.69 for the conv and MKL (B/32 shapes, 2 threads, cold); its backward's
// products still gain (the conv backward with x_proj's parts 8.98 -> 7.45 ms).
constexpr int kConvFwdMM = 5, kConvFwdNV = 5, kConvBwdMM = kW == 16 ? 8 : 4;

template <int KC>
void conv_fwd_impl(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias, torch::Tensor& out,
                   const float* lw, int64_t Pp, float* part) {
  const int64_t Bt = x.size(0), L = x.size(1), D = x.size(2), sb = x.stride(0), sl = x.stride(1);
  const int K = (int)wt.size(0);
  const float *px = x.data_ptr<float>(), *pw = wt.data_ptr<float>(), *pb = bias.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t nvec = (D + kW - 1) / kW, parts = std::min<int64_t>(at::get_num_threads(), nvec);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; ++q) {  // the q-th of `parts` channel ranges
      const int64_t c0 = nvec * q / parts * kW, c1 = std::min(D, nvec * (q + 1) / parts * kW);
      for (int64_t b = 0; b < Bt; ++b)
        for (int64_t t0 = 0; t0 < L; t0 += kConvFwdRows) {
          const int64_t t1 = std::min(L, t0 + kConvFwdRows);
          for (int64_t t = t0; t < t1; ++t)
            for_lanes(c0, c1, [&](int64_t c, auto tag) {
              using T = decltype(tag);
              const T pre = t >= K - 1 ? conv_pre<KC, true, T>(px + b * sb, sl, pw, pb, D, K, t, c)
                                       : conv_pre<KC, false, T>(px + b * sb, sl, pw, pb, D, K, t, c);
              st(po + (b * L + t) * D + c, pre * sigmoid_t(pre));
            });
          if (!lw) continue;
          float* pr = part + ((q * Bt + b) * L + t0) * Pp;
          for (int64_t k0 = c0; k0 < c1; k0 += kConvFwdK) {
            const int64_t k1 = std::min(c1, k0 + kConvFwdK);
            static const fvec zeros(256, 0.f);  // the first block's init (is = 0: one row for all); Pp <= 256
            small_gemm<kConvFwdMM, kConvFwdNV>(po + (b * L + t0) * D + k0, D, 1, t1 - t0, lw + k0 * Pp, Pp, k1 - k0,
                                               Pp / kW, k0 == c0 ? zeros.data() : pr, k0 == c0 ? 0 : Pp, pr, Pp);
          }
        }
    }
  });
}

std::vector<torch::Tensor> conv_fwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias,
                                    c10::optional<torch::Tensor> lin_weight) {
  check_conv(x, w, bias);
  auto wt = w.t().contiguous();  // (K, D): the channels of one tap are contiguous
  auto out = torch::empty(x.sizes(), x.options().memory_format(c10::MemoryFormat::Contiguous));
  if (!lin_weight.has_value()) {
    DISPATCH_FIXED(w.size(1), 4, conv_fwd_impl, x, wt, bias, out, nullptr, 0, nullptr);
    return {out};
  }
  check(*lin_weight, "lin_weight", 2);
  const int64_t P = lin_weight->size(0), D = x.size(2), Pp = (P + kW - 1) / kW * kW;
  TORCH_CHECK(lin_weight->size(1) == D, "conv_fwd: lin_weight must be (P, D) for x (Bt, L, D)");
  TORCH_CHECK(Pp <= 256, "conv_fwd: lin_weight may have at most 256 rows, got ", P);
  if (kW != 16) {  // see kConvFwdMM
    DISPATCH_FIXED(w.size(1), 4, conv_fwd_impl, x, wt, bias, out, nullptr, 0, nullptr);
    return {out, at::matmul(out, lin_weight->t())};
  }
  auto lw = torch::zeros({D, Pp}, x.options());
  lw.narrow(1, 0, P).copy_(lin_weight->t());
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), (D + kW - 1) / kW);
  auto part = torch::empty({parts, x.size(0), x.size(1), Pp}, x.options());
  DISPATCH_FIXED(w.size(1), 4, conv_fwd_impl, x, wt, bias, out, lw.data_ptr<float>(), Pp, part.data_ptr<float>());
  auto lin = part.sum(0);
  return {out, Pp == P ? lin : lin.narrow(2, 0, P).contiguous()};
}

// An output the caller may provide as a view into a wider buffer (float32, (Bt, L, D), unit inner stride), e.g. one
// half of the gradient of the in_proj output; else a new contiguous tensor.
torch::Tensor output_like(const c10::optional<torch::Tensor>& given, const torch::Tensor& like, const char* name) {
  if (!given.has_value()) return torch::empty(like.sizes(), like.options().memory_format(c10::MemoryFormat::Contiguous));
  const torch::Tensor& t = *given;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.sizes() == like.sizes() && t.stride(2) == 1,
              name, " must be a float32 CPU tensor of the input's shape with unit inner stride");
  return t;
}

// The gradient of a linear layer that also reads the conv's output (x_proj in the mixer), added to the conv's output
// gradient span by span: dout + g wlin, g (Bt, L, P) contiguous, wlin (P, D) contiguous; g == nullptr: none. With dw,
// also the layer's weight gradient g^T out, from the output rows the sweep recomputes (the products of kConvDwRows
// tokens at a time): no pass over a saved u.
struct LinearGrad {
  const float* g = nullptr;
  const float* w = nullptr;
  int64_t P = 0;
  float* dw = nullptr;  // (P, D): the layer's weight gradient g^T out is formed here too (nullptr: not)
};

template <int KC>
void conv_bwd_impl(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias, const torch::Tensor& dout,
                   const LinearGrad& lin, torch::Tensor& dx, torch::Tensor& dwt, torch::Tensor& db) {
  const int64_t Bt = x.size(0), L = x.size(1), D = x.size(2), sb = x.stride(0), sl = x.stride(1);
  const int K = (int)wt.size(0);
  const int64_t dxb = dx.stride(0), dxl = dx.stride(1), P = lin.P;
  const float *px = x.data_ptr<float>(), *pw = wt.data_ptr<float>(), *pb = bias.data_ptr<float>();
  const float* pdo = dout.data_ptr<float>();
  float *pdx = dx.data_ptr<float>(), *pdw = dwt.data_ptr<float>(), *pdb = db.data_ptr<float>();
  at::parallel_for(0, (D + kW - 1) / kW, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * kW, c1 = std::min(D, end * kW), gs = end * kW - c0;
    const int64_t full = (c1 - c0) / kW * kW;  // channels in whole vectors; the rest (the last range only) one by one
    fvec gwin(std::max(K - 1, 1) * gs);  // per column: the last K - 1 gradients of the sweep so far
    fvec dsum(lin.g ? kConvSpan * gs : 0);  // with lin: the span's dout + g wlin, (kConvSpan, gs)
    // with lin.dw: the layer's weight gradient g^T u of the range's channels, (P, gs), from the recomputed u rows of
    // kConvDwRows tokens at a time (ub)
    fvec dwl(lin.dw ? P * gs : 0, 0.f), ub(lin.dw ? kConvDwRows * gs : 0);
    for (int64_t b = 0; b < Bt; ++b) {
      std::fill(gwin.begin(), gwin.end(), 0.f);
      for (int64_t t0 = 0; t0 < L + K - 1; t0 += kConvSpan) {
        const int64_t t1 = std::min(t0 + kConvSpan, L + K - 1), rows = std::min(t1, L) - t0;
        const float* drows = pdo + b * L * D;  // row t of the gradient the sweep reads: drows + t * dol
        int64_t dol = D;
        if (lin.g && rows > 0) {
          const float *gr = lin.g + (b * L + t0) * P, *dr = pdo + (b * L + t0) * D;
          small_gemm<kConvBwdMM, 3>(gr, P, 1, rows, lin.w + c0, D, P, full / kW, dr + c0, D, dsum.data(), gs);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t c = c0 + full; c < c1; ++c) {
              float acc = dr[i * D + c];
              for (int64_t p = 0; p < P; ++p) acc += gr[i * P + p] * lin.w[p * D + c];
              dsum[i * gs + (c - c0)] = acc;
            }
          drows = dsum.data() - t0 * gs - c0;
          dol = gs;
        }
        for_lanes(c0, c1, [&](int64_t c, auto tag) {
          using T = decltype(tag);
          T dw[KC > 0 ? KC : kMaxConv], dbv = ld<T>(pdb + c);
          for (int k = 0; k < K; ++k) dw[k] = ld<T>(pdw + k * D + c);
          conv_bwd_span<KC, T>(px + b * sb, sl, drows, dol, pw, pb, D, K, L, t0, t1, c, pdx + b * dxb, dxl,
                               gwin.data() + (c - c0), gs, dw, dbv,
                               lin.dw ? ub.data() + (t0 % kConvDwRows - t0) * gs - c0 : nullptr, gs);
          for (int k = 0; k < K; ++k) st(pdw + k * D + c, dw[k]);
          st(pdb + c, dbv);
        });
        // ub holds rows [u0, min(t1, L)) of u: its products once full, or at the image's last rows
        const int64_t u0 = t0 / kConvDwRows * kConvDwRows, uend = std::min(t1, L);
        if (lin.dw && uend > u0 && (uend - u0 == kConvDwRows || uend == L)) {
          const float* gr = lin.g + (b * L + u0) * P;  // dw[p, c] += sum_t g[t, p] u[t, c]
          small_gemm<kConvBwdMM, 3>(gr, 1, P, P, ub.data(), gs, uend - u0, full / kW, dwl.data(), gs, dwl.data(), gs);
          for (int64_t p = 0; p < P; ++p)
            for (int64_t c = full; c < c1 - c0; ++c)
              for (int64_t t = 0; t < uend - u0; ++t) dwl[p * gs + c] += gr[t * P + p] * ub[t * gs + c];
        }
      }
    }
    if (lin.dw)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t c = c0; c < c1; ++c) lin.dw[p * D + c] = dwl[p * gs + (c - c0)];
  });
}

std::vector<torch::Tensor> conv_bwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor dout,
                                    c10::optional<torch::Tensor> dx_out, c10::optional<torch::Tensor> lin_grad,
                                    c10::optional<torch::Tensor> lin_weight, bool lin_weight_grad) {
  check_conv(x, w, bias);
  check(dout, "dout", 3);
  TORCH_CHECK(dout.sizes() == x.sizes(), "conv dout must be (Bt, L, D) like x");
  TORCH_CHECK(lin_grad.has_value() == lin_weight.has_value(), "conv_bwd takes lin_grad and lin_weight together");
  TORCH_CHECK(lin_grad.has_value() || !lin_weight_grad, "conv_bwd: lin_weight_grad needs lin_grad and lin_weight");
  LinearGrad lin;
  if (lin_grad.has_value()) {
    check(*lin_grad, "lin_grad", 3);
    check(*lin_weight, "lin_weight", 2);
    TORCH_CHECK(lin_grad->size(0) == x.size(0) && lin_grad->size(1) == x.size(1) &&
                    lin_weight->size(0) == lin_grad->size(2) && lin_weight->size(1) == x.size(2),
                "conv_bwd: lin_grad must be (Bt, L, P) and lin_weight (P, D) for x (Bt, L, D)");
    lin = {lin_grad->data_ptr<float>(), lin_weight->data_ptr<float>(), lin_grad->size(2)};
  }
  torch::Tensor lin_dw;
  if (lin.g && lin_weight_grad) {
    lin_dw = torch::empty_like(*lin_weight);
    lin.dw = lin_dw.data_ptr<float>();
  }
  auto wt = w.t().contiguous();
  auto dx = output_like(dx_out, x, "conv dx");
  auto dwt = torch::zeros({w.size(1), w.size(0)}, x.options());
  auto db = torch::zeros({w.size(0)}, x.options());
  DISPATCH_FIXED(w.size(1), 4, conv_bwd_impl, x, wt, bias, dout, lin, dx, dwt, db);
  if (lin.dw) return {dx, dwt.t().contiguous(), db, lin_dw};
  return {dx, dwt.t().contiguous(), db};
}

// ---- fused De-focus chain ----

// B, C (any strides, unit inner stride) -> contiguous (Bt, L, N), rotated when cs/sn (L, N) are given.
torch::Tensor rope_rotate(const torch::Tensor& x, const std::vector<float>& cs, const std::vector<float>& sn) {
  const int64_t Bt = x.size(0), L = x.size(1), N = x.size(2), sb = x.stride(0), sl = x.stride(1);
  auto out = torch::empty({Bt, L, N}, x.options());
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t b = 0; b < Bt; ++b)
    for (int64_t t = 0; t < L; ++t) {
      const float* xt = px + b * sb + t * sl;
      float* ot = po + (b * L + t) * N;
      if (cs.empty()) {
        for (int64_t n = 0; n < N; ++n) ot[n] = xt[n];
        continue;
      }
      const float *c = cs.data() + t * N, *s = sn.data() + t * N;
      for (int64_t n = 0; n < N; n += 2) {
        ot[n] = xt[n] * c[n] - xt[n + 1] * s[n];
        ot[n + 1] = xt[n + 1] * c[n + 1] + xt[n] * s[n + 1];
      }
    }
  return out;
}

// cos / sin of theta_tn = (t / rope_scale) freq_n in float32 (the arithmetic of layers/rope.py); empty without RoPE.
void rope_tables(const torch::Tensor& freq, int64_t L, double rope_scale, std::vector<float>& cs, std::vector<float>& sn) {
  if (freq.numel() == 0) return;
  const int64_t N = freq.size(0);
  const float* pf = freq.data_ptr<float>();
  cs.resize(L * N);
  sn.resize(L * N);
  for (int64_t t = 0; t < L; ++t) {
    const float pos = (float)t / (float)rope_scale;
    for (int64_t n = 0; n < N; ++n) {
      const float a = pos * pf[n];
      cs[t * N + n] = std::cos(a);
      sn[t * N + n] = std::sin(a);
    }
  }
}

// Gradients of the rotation: d x (contiguous (Bt, L, N)) from d x' (in place) and d freq += sum_t pos_t d theta_t.
void rope_backward(const torch::Tensor& x, torch::Tensor& dx, const std::vector<float>& cs,
                   const std::vector<float>& sn, double rope_scale, std::vector<double>& dfreq) {
  if (cs.empty()) return;
  const int64_t Bt = x.size(0), L = x.size(1), N = x.size(2), sb = x.stride(0), sl = x.stride(1);
  const float* px = x.data_ptr<float>();
  float* pd = dx.data_ptr<float>();
  for (int64_t b = 0; b < Bt; ++b)
    for (int64_t t = 0; t < L; ++t) {
      const float* xt = px + b * sb + t * sl;
      float* dt = pd + (b * L + t) * N;
      const float *c = cs.data() + t * N, *s = sn.data() + t * N;
      const double pos = (double)((float)t / (float)rope_scale);
      for (int64_t n = 0; n < N; n += 2) {
        const float g0 = dt[n], g1 = dt[n + 1], x0 = xt[n], x1 = xt[n + 1];
        dfreq[n] += pos * (double)(g0 * (-x0 * s[n] - x1 * c[n]));
        dfreq[n + 1] += pos * (double)(g1 * (x0 * c[n + 1] - x1 * s[n + 1]));
        dt[n] = g0 * c[n] + g1 * s[n + 1];
        dt[n + 1] = g1 * c[n + 1] - g0 * s[n];
      }
    }
}

// Channel blocks of the chain. The element-wise passes read and write rows of the (Bt, L, D) tensors; a block is
// as wide as the per-thread buffers allow (whole groups: the group norm couples a group's channels), so that each
// row segment is ~1 KB of contiguous memory that the hardware prefetchers stream (64-channel tiles, 256 B at a
// 6 KB stride, left them waiting on memory for half of the chain's time). Blocks are balanced, and narrower when
// Bt alone gives the threads too little work.
struct Blocks {
  int64_t width, count, padded;  // channels per block (the last may be narrower), blocks per image, width rounded to kW
};
constexpr int64_t kBlockFloats = 12800;  // per (L, width) buffer: 50 KB, 256 channels at L = 50

inline Blocks chain_blocks(int64_t Bt, int64_t L, int64_t D, int64_t G) {
  const int64_t unit = G > 0 ? G : kW, units = (D + unit - 1) / unit;
  const int64_t fit = std::max<int64_t>(1, kBlockFloats / (std::max<int64_t>(L, 1) * unit));
  int64_t count = (units + fit - 1) / fit;
  const int64_t want = (4 * (int64_t)at::get_num_threads() + Bt - 1) / Bt;  // >= 4 items per thread if possible
  count = std::min(units, std::max(count, want));
  const int64_t width = std::min(D, (units + count - 1) / count * unit);
  return {width, (D + width - 1) / width, (width + kW - 1) / kW * kW};
}

// pf aimed at the rows of item j (image j / count, its block of channels) of the given arrays, or nullptr when there
// is no item j: the chain claims the next item before running the current one's scan, during which it prefetches.
inline RowPrefetch* aim_at_item(RowPrefetch& pf, int64_t j, int64_t items, const Blocks& blk, int64_t L, int64_t D,
                                std::initializer_list<ArrayRows> rows) {
  if (j >= items) return nullptr;
  const int64_t c0 = (j % blk.count) * blk.width;
  pf.aim(L, j / blk.count, c0, std::min(D, c0 + blk.width), rows);
  return &pf;
}

// The chain's scan runs kW channels at a time, one channel per vector lane, over token-major (L, padded) block
// buffers (pad lanes hold u = delta = dy = 0 and contribute exactly nothing). Every per-channel quantity (y, du,
// ddelta, dA) is then lane-wise, with no horizontal sums in the token loop; the sums over channels (dB, dC) are
// accumulated as vectors per (token, state) and reduced once per image.
// NC: N at compile time (16: the Mamba models, loops unrolled), 0: any N (runtime, <= 256).
// av: A log2(e) of the kW channels, (N, kW) (gather_a). Bl, Cl: (L, N) of the image. s: the row stride of u, dl, y,
// dy, du, ddl. kStore: also write the states h_1..h_L into rows 1..L of hs ((L + 1, N, kW), row 0 zeros) and the
// decays into as ((L, N, kW)) for the backward. pf (optional): the next item's rows, two lines per token.
template <int NC, bool kY, bool kStore>
inline void grp_fwd(const float* u, const float* dl, int64_t s, const float* av, const float* Bl, const float* Cl,
                    int L, int Nrt, float* y, float* hs, float* as, RowPrefetch* pf = nullptr) {
  const int N = NC > 0 ? NC : Nrt;
  vf h[NC > 0 ? NC : 256];
  for (int n = 0; n < N; ++n) h[n] = vf{};
  if constexpr (kStore)
    for (int n = 0; n < N; ++n) vst(hs + kW * n, vf{});
  for (int t = 0; t < L; ++t) {
    if (pf) pf->step();
    const vf d = vld<vf>(dl + t * s), du = d * vld<vf>(u + t * s);
    const float *Bt = Bl + (long)t * N, *Ct = Cl + (long)t * N;
    vf acc[2] = {};  // two sums: half the dependency chain of the y reduction
    // decays of G states at a time (8 in the forward; the recompute, bound by its stores, gained nothing from it)
    constexpr int G = !kStore && NC > 0 && NC % 8 == 0 ? 8 : 1;
#pragma GCC unroll 16  // N = 16 fully unrolled: 25-30% faster than the loop (the compiler schedules across states)
    for (int n0 = 0; n0 < N; n0 += G) {
      vf at[G];
#pragma GCC unroll 16
      for (int j = 0; j < G; ++j) at[j] = vld<vf>(av + kW * (n0 + j)) * d;
      vexp2_n<G>(at);
#pragma GCC unroll 16
      for (int j = 0; j < G; ++j) {
        const int n = n0 + j;
        h[n] = at[j] * h[n] + du * Bt[n];
        if constexpr (kY) acc[n & 1] += h[n] * Ct[n];
        if constexpr (kStore) {
          vst(hs + ((long)(t + 1) * N + n) * kW, h[n]);
          vst(as + ((long)t * N + n) * kW, at[j]);
        }
      }
    }
    if constexpr (kY) vst(y + t * s, acc[0] + acc[1]);
  }
}

// Backward of grp_fwd given dy: recomputes the states, then the reverse pass
//   g_t = C_t dy_t + a_{t+1} g_{t+1} (adjoint of h_t);  d loss / d(delta_t A) = g_t h_{t-1} a_t.
// Writes du, ddl (rows of stride s; they may be dy and dl themselves: row t is written after its last read);
// accumulates dA into dAv ((N, kW)) and dB, dC into dBv, dCv ((L, N, kW)).
template <int NC>
inline void grp_bwd(const float* u, const float* dl, const float* dy, int64_t s, const float* av, const float* Bl,
                    const float* Cl, int L, int Nrt, float* hs, float* as, float* du, float* ddl, float* dAv,
                    float* dBv, float* dCv) {
  const int N = NC > 0 ? NC : Nrt;
  grp_fwd<NC, false, true>(u, dl, s, av, Bl, Cl, L, Nrt, nullptr, hs, as);
  vf g[NC > 0 ? NC : 256], an[NC > 0 ? NC : 256], dA[NC > 0 ? NC : 256];
  for (int n = 0; n < N; ++n) g[n] = an[n] = dA[n] = vf{};
  for (int t = L - 1; t >= 0; --t) {
    const vf d = vld<vf>(dl + t * s), ut = vld<vf>(u + t * s), dyt = vld<vf>(dy + t * s), dut = d * ut;
    const float *Bt = Bl + (long)t * N, *Ct = Cl + (long)t * N;
    vf s_ad{}, s_gb{};
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      const long o = ((long)t * N + n) * kW;
      const vf at = vld<vf>(as + o);
      const vf gn = g[n] * an[n] + dyt * Ct[n];
      g[n] = gn;
      an[n] = at;
      vst(dCv + o, vld<vf>(dCv + o) + vld<vf>(hs + o + kW * N) * dyt);  // h_t
      const vf dla = gn * vld<vf>(hs + o) * at;                         // h_{t-1}
      dA[n] += dla * d;
      s_ad += dla * vld<vf>(av + kW * n);
      s_gb += gn * Bt[n];
      vst(dBv + o, vld<vf>(dBv + o) + gn * dut);
    }
    vst(ddl + t * s, s_ad * kLn2 + s_gb * ut);  // av holds A log2(e)
    vst(du + t * s, s_gb * d);
  }
  for (int n = 0; n < N; ++n) vst(dAv + kW * n, vld<vf>(dAv + kW * n) + dA[n]);
}

#if defined(__AVX512F__)
// One step of a tree that sums the lanes of 16 vectors into one vector (lane j = the sum of the lanes of vector j):
// lane j of fold<S>(a, b) is a[j] + a[j + S] when bit S of j is clear, else b[j] + b[j - S]. fold<1> of (v0, v1),
// fold<2> of two of those, then fold<4> and fold<8>: 15 steps of 3 instructions for 16 vectors.
template <int S> __attribute__((always_inline)) inline __m512 fold(__m512 a, __m512 b) {
  alignas(64) int32_t idx[16];
  for (int j = 0; j < 16; ++j) idx[j] = (j & S) ? 16 + j - S : j + S;
  __mmask16 m = 0;
  for (int j = 0; j < 16; ++j) m |= (__mmask16)((j & S) ? 1u << j : 0u);
  return _mm512_add_ps(_mm512_mask_blend_ps(m, a, b), _mm512_permutex2var_ps(a, _mm512_load_si512(idx), b));
}

// Feeds the 16 vectors p_0..p_15 of one token in order (n = 0..15, known at compile time after unrolling) into the
// tree; after n = 15, r holds the 16 lane sums.
struct LaneSums16 {
  __m512 e, q1[8], q2[4], q3[2], r;
  template <int n> __attribute__((always_inline)) inline void add(__m512 p) {
    if constexpr ((n & 1) == 0) {
      e = p;
    } else {
      q1[n >> 1] = fold<1>(e, p);
      if constexpr ((n >> 1) & 1) q2[n >> 2] = fold<2>(q1[(n >> 1) - 1], q1[n >> 1]);
      if constexpr (((n >> 1) & 1) && ((n >> 2) & 1)) q3[n >> 3] = fold<4>(q2[(n >> 2) - 1], q2[n >> 2]);
      if constexpr (n == 15) r = fold<8>(q3[0], q3[1]);
    }
  }
};

template <int n, class F> __attribute__((always_inline)) inline void static_for16(F&& f) {
  if constexpr (n < 16) {
    f(std::integral_constant<int, n>{});
    static_for16<n + 1>(f);
  }
}

// grp_bwd for N = 16 states with AVX-512 (16 channels per vector). The sums over channels of dB and dC are taken
// across the lanes per token in registers (LaneSums16) and added into the (L, N) rows of the image; grp_bwd instead
// accumulates (L, N, kW) vectors in memory and sums their lanes once per image, but that buffer (50 KB at L = 50)
// lives in L2, and its loads and stores, two per state and token, bounded the reverse pass. dC is summed in the
// recompute, where h_t is in registers. Recompute + reverse: 23.6 instead of 29.6 cycles per state vector and token
// (B/32 shapes, in the kernel). The recompute stores the decays (as, (L, N, kW)) for the reverse pass: one more store
// per state there, the nine instructions of an exp fewer in the reverse: recompute + reverse 23.1 -> 22.1 cycles per
// state vector and token (25.6 -> 24.3 with the prefetches below, which compete with the passes' L2 traffic of the
// 50 KB state and decay buffers for the core's fill buffers).
// dB, dC: the (L, N) rows of the image, accumulated; pf: the next item's rows, two lines per token of each pass (all
// in the reverse pass cost the scan more); the rest as grp_bwd.
__attribute__((always_inline)) inline void grp_bwd16(const float* u, const float* dl, const float* dy, int64_t s,
                                                     const float* av, const float* Bl, const float* Cl, int L,
                                                     float* hs, float* as, float* du, float* ddl, float* dAv,
                                                     float* dB, float* dC, RowPrefetch* pf) {
  constexpr int N = 16, G = 8;
  {
    __m512 h[N];
    for (int n = 0; n < N; ++n) {
      h[n] = _mm512_setzero_ps();
      _mm512_storeu_ps(hs + kW * n, h[n]);
    }
    for (int t = 0; t < L; ++t) {
      if (pf) pf->step();
      const vf d = vld<vf>(dl + t * s), dut = d * vld<vf>(u + t * s), dyt = vld<vf>(dy + t * s);
      const float* Bt = Bl + (long)t * N;
      LaneSums16 sc;
      static_for16<0>([&](auto nc) __attribute__((always_inline)) {
        constexpr int n = decltype(nc)::value;
        if constexpr (n % G == 0) {
          vf at[G];
          for (int j = 0; j < G; ++j) at[j] = vld<vf>(av + kW * (n + j)) * d;
          vexp2_n<G>(at);
          for (int j = 0; j < G; ++j) {
            h[n + j] = (__m512)(at[j] * (vf)h[n + j] + dut * Bt[n + j]);
            _mm512_storeu_ps(hs + ((long)(t + 1) * N + n + j) * kW, h[n + j]);
            _mm512_storeu_ps(as + ((long)t * N + n + j) * kW, (__m512)at[j]);
          }
        }
        sc.add<n>((__m512)((vf)h[n] * dyt));
      });
      _mm512_storeu_ps(dC + (long)t * N, _mm512_add_ps(_mm512_loadu_ps(dC + (long)t * N), sc.r));
    }
  }
  vf g[N], dAr[N];
  for (int n = 0; n < N; ++n) g[n] = dAr[n] = vf{};
  for (int t = L - 1; t >= 0; --t) {
    if (pf) pf->step();
    const vf d = vld<vf>(dl + t * s), ut = vld<vf>(u + t * s), dyt = vld<vf>(dy + t * s), dut = d * ut;
    const float *Bt = Bl + (long)t * N, *Ct = Cl + (long)t * N;
    vf s_ad{}, s_gb{};
    LaneSums16 sb;
    static_for16<0>([&](auto nc) __attribute__((always_inline)) {
      constexpr int n = decltype(nc)::value;
      const vf a = vld<vf>(as + ((long)t * N + n) * kW);
      const vf gn = g[n] + dyt * Ct[n];  // g[n] holds a_{t+1} g_{t+1}
      const vf dla = gn * vld<vf>(hs + ((long)t * N + n) * kW) * a;  // h_{t-1}
      dAr[n] += dla * d;
      s_ad += dla * vld<vf>(av + kW * n);
      s_gb += gn * Bt[n];
      sb.add<n>((__m512)(gn * dut));
      g[n] = gn * a;
    });
    _mm512_storeu_ps(dB + (long)t * N, _mm512_add_ps(_mm512_loadu_ps(dB + (long)t * N), sb.r));
    vst(ddl + t * s, s_ad * kLn2 + s_gb * ut);  // av holds A log2(e)
    vst(du + t * s, s_gb * d);
  }
  for (int n = 0; n < N; ++n) vst(dAv + kW * n, vld<vf>(dAv + kW * n) + dAr[n]);
}
#endif

// A log2(e) of channels [c, c + kW) (those below c1; 0 beyond) as (N, kW) lanes: the argument of vexp2.
inline void gather_a(const float* pA, int64_t c, int64_t c1, int64_t N, float* av) {
  for (int64_t n = 0; n < N; ++n)
    for (int k = 0; k < kW; ++k) av[n * kW + k] = c + k < c1 ? pA[(c + k) * N + n] * kLog2e : 0.f;
}

// Zero the pad lanes [c1, c0 + round_up(c1 - c0, kW)) of a block row: the last vector of the scan reads them.
inline void zero_pad(float* row, int64_t c0, int64_t c1) {
  for (int64_t c = c1; c < c0 + (c1 - c0 + kW - 1) / kW * kW; ++c) row[c] = 0.f;
}

// Where the chain reads dt (before softplus): the (Bt, L, D) tensor, or, with dt_proj given, computed per block into
// the block's delta buffer from the low-rank input (Bt, L, R) (the first R columns of the x_proj output) and dt_proj's
// weight (D, R) and bias. Why: dt_proj's output is the widest tensor of the mixer that only the chain reads; as an
// MKL matmul with K = R = 48 it ran at a third of the speed of the other linears, its (Bt, L, D) output was written
// once and read twice (forward, backward), and saved for the backward.
struct DtSource {
  const float* full = nullptr;  // (Bt, L, D), contiguous; nullptr: low rank
  const float* x = nullptr;     // (Bt, L, R), rows of stride xs, images of stride xsb
  int64_t xsb = 0, xs = 0, R = 0, ws = 0, rp = 0;
  fvec wt, bias;  // weight transposed (R, ws), bias (ws): zero-padded to ws = D + kW columns (vector tails)
  fvec w;         // backward only: weight (D, rp), rows zero-padded to rp = R rounded up to kW (its products)
};

DtSource dt_source(const torch::Tensor& dt, const torch::Tensor& w, const torch::Tensor& bias, bool backward) {
  DtSource src;
  if (w.numel() == 0) {
    src.full = dt.data_ptr<float>();
    return src;
  }
  const int64_t D = w.size(0), R = w.size(1);
  src.x = dt.data_ptr<float>();
  src.xsb = dt.stride(0);
  src.xs = dt.stride(1);
  src.R = R;
  src.ws = D + kW;
  src.wt.assign(R * src.ws, 0.f);
  src.bias.assign(src.ws, 0.f);
  const float *pw = w.data_ptr<float>(), *pb = bias.data_ptr<float>();
  src.rp = (R + kW - 1) / kW * kW;
  if (backward) src.w.assign(D * src.rp, 0.f);
  for (int64_t c = 0; c < D; ++c) {
    for (int64_t r = 0; r < R; ++r) src.wt[r * src.ws + c] = pw[c * R + r];
    if (backward)
      for (int64_t r = 0; r < R; ++r) src.w[c * src.rp + r] = pw[c * R + r];
    src.bias[c] = pb[c];
  }
  return src;
}

// dt of channels [c0, c1) of image b, all L tokens, into the (L, W) block buffer (whole vectors: the pad lanes get
// the next channels' values or zeros, and are zeroed after the softplus like every pad lane).
inline void dt_block(const DtSource& src, int64_t b, int64_t L, int64_t c0, int64_t c1, float* out, int64_t W) {
  constexpr int TT = kW == 16 ? 6 : 4, VV = kW == 16 ? 4 : 2;  // 24 of 32 zmm / 8 of 16 ymm accumulators
  small_gemm<TT, VV>(src.x + b * src.xsb, src.xs, 1, L, src.wt.data() + c0, src.ws, src.R, (c1 - c0 + kW - 1) / kW,
                     src.bias.data() + c0, 0, out, W);
}

// The chain's items (blocks of channels of one image) go to the threads one at a time, in increasing order per
// thread, instead of as one contiguous range each: on a shared machine one of two threads often runs 5-10% slower,
// and with a static split the other then waits at the end of every call. f(next, items) takes items from next.
template <class F> inline void for_items_dynamic(int64_t items, F&& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) { f(next); });
}

template <int NC>
std::vector<torch::Tensor> defocus_fwd_impl(torch::Tensor u, const DtSource& dts, torch::Tensor A, torch::Tensor Bl,
                                            torch::Tensor Cl, torch::Tensor Dskip, torch::Tensor z, int64_t G,
                                            double delta_scale) {
  const int64_t Bt = u.size(0), L = u.size(1), D = u.size(2), N = A.size(1);
  const Blocks blk = chain_blocks(Bt, L, D, G);
  const int64_t W = blk.padded;
  auto out = torch::empty({Bt, L, D}, u.options());
  auto yraw = torch::empty({Bt, L, D}, u.options());  // the scan output: saved for the backward
  // the group norm's 1 / rms per (image, token, group), saved for the backward (empty without the norm)
  auto rstd = torch::empty({G > 0 ? Bt : 0, L, G > 0 ? D / G : 0}, u.options());
  const float *pu = u.data_ptr<float>(), *pdt = dts.full, *pA = A.data_ptr<float>();
  const float *pB = Bl.data_ptr<float>(), *pC = Cl.data_ptr<float>(), *pD = Dskip.data_ptr<float>();
  const float* pz = z.data_ptr<float>();
  const int64_t zsb = z.stride(0), zs = z.stride(1);  // z may be a view of the in_proj output (rows of stride 2D)
  float *po = out.data_ptr<float>(), *py = yraw.data_ptr<float>(), *pr = rstd.data_ptr<float>();
  if constexpr (kAblate >= 2) return {out.zero_(), yraw.zero_(), rstd.fill_(1.f)};
  const float inv_scale = 1.f / (float)delta_scale;
  const int64_t items = Bt * blk.count;
  for_items_dynamic(items, [&](std::atomic<int64_t>& next) {
    fvec ub(L * W), dlb(L * W), yb(L * W), av(N * kW);  // (L, W) block buffers
    RowPrefetch pf;
    for (int64_t i = next++, j; i < items; i = j) {
      const int64_t b = i / blk.count, c0 = (i % blk.count) * blk.width, c1 = std::min(D, c0 + blk.width);
      const int64_t seg = G > 0 ? G : c1 - c0;  // group-norm segments of the block (one without the norm)
      j = next++;  // the next item, claimed now: its rows of u, z (and dt) are prefetched during this item's scan
      RowPrefetch* next_rows = aim_at_item(pf, j, items, blk, L, D, {{pu, L * D, D}, {pz, zsb, zs}, {pdt, L * D, D}});
      if (!pdt) dt_block(dts, b, L, c0, c1, dlb.data(), W);  // softplus'ed in place below
      for (int64_t t = 0; t < L; ++t) {
        float *ubt = ub.data() + t * W - c0, *dlt = dlb.data() + t * W - c0;
        const float *ut = pu + (b * L + t) * D, *dtt = pdt ? pdt + (b * L + t) * D : dlt;
        if (t + 2 < L) {
          prefetch(ut + 2 * D + c0, c1 - c0);
          if (pdt) prefetch(dtt + 2 * D + c0, c1 - c0);
        }
        for_lanes(c0, c1, [&](int64_t c, auto tag) {
          using T = decltype(tag);
          st(dlt + c, softplus_t(ld<T>(dtt + c)) * inv_scale);
          st(ubt + c, ld<T>(ut + c));
        });
        zero_pad(ubt, c0, c1);
        zero_pad(dlt, c0, c1);
      }
      for (int64_t c = c0; c < c1 && kAblate < 1; c += kW) {
        gather_a(pA, c, c1, N, av.data());
        grp_fwd<NC, true, false>(ub.data() + (c - c0), dlb.data() + (c - c0), W, av.data(), pB + b * L * N,
                                 pC + b * L * N, L, N, yb.data() + (c - c0), nullptr, nullptr, next_rows);
      }
      for (int64_t t = 0; t < L; ++t) {  // u from the block buffer: one pass over u in global memory, not two
        const float *ybt = yb.data() + t * W - c0, *ut = ub.data() + t * W - c0, *zt = pz + b * zsb + t * zs;
        float *ot = po + (b * L + t) * D, *yt = py + (b * L + t) * D;
        if (t + 2 < L) prefetch(zt + 2 * zs + c0, c1 - c0);
        for (int64_t s0 = c0; s0 < c1; s0 += seg) {
          const int64_t s1 = std::min(c1, s0 + seg);
          const float r = G > 0 ? 1.f / std::sqrt(sum_squares(ybt, s0, s1) / (float)(s1 - s0) + kGroupEps) : 1.f;
          if (G > 0) pr[(b * L + t) * (D / G) + s0 / G] = r;
          for_lanes(s0, s1, [&](int64_t c, auto tag) {
            using T = decltype(tag);
            const T y = ld<T>(ybt + c), zz = ld<T>(zt + c);
            st_stream(yt + c, y);
            st(ot + c, (y * r + ld<T>(pD + c) * ld<T>(ut + c)) * zz * sigmoid_t(zz));
          });
        }
      }
    }
    stream_fence();
  });
  return {out, yraw, rstd};
}

template <int NC>
std::vector<torch::Tensor> defocus_bwd_impl(torch::Tensor u, const DtSource& dts, torch::Tensor A, torch::Tensor Bl,
                                            torch::Tensor Cl, torch::Tensor Dskip, torch::Tensor z, torch::Tensor yraw,
                                            torch::Tensor dout, int64_t G, double delta_scale, torch::Tensor dz,
                                            torch::Tensor rstd) {
  const int64_t Bt = u.size(0), L = u.size(1), D = u.size(2), N = A.size(1);
  const Blocks blk = chain_blocks(Bt, L, D, G);
  const int64_t W = blk.padded;
  auto du = torch::empty({Bt, L, D}, u.options());
  // with dt_proj in the kernel, ddt stays in the block buffers: its products with dt_proj's input and weight are
  // formed here (dx_lr (Bt, L, R), dw_lr (D, R)) instead of by two MKL matmuls reading a (Bt, L, D) ddt
  const bool lowrank = dts.full == nullptr;
  const int64_t R = dts.R, rp = dts.rp;
  auto ddt = lowrank ? torch::empty({0}, u.options()) : torch::empty({Bt, L, D}, u.options());
  auto dx_lr = torch::zeros({lowrank ? Bt : 0, L, R}, u.options());
  auto dw_lr = torch::zeros({lowrank ? D : 0, R}, u.options());
  auto dA = torch::zeros_like(A), dB = torch::zeros_like(Bl), dC = torch::zeros_like(Cl);
  auto dD = torch::zeros_like(Dskip), ddt_sum = torch::zeros_like(Dskip);  // ddt summed over images and tokens
  const int64_t dzsb = dz.stride(0), dzs = dz.stride(1);
  const float *pu = u.data_ptr<float>(), *pdt = dts.full, *pA = A.data_ptr<float>();
  const float *pB = Bl.data_ptr<float>(), *pC = Cl.data_ptr<float>(), *pD = Dskip.data_ptr<float>();
  const float *pz = z.data_ptr<float>(), *py = yraw.data_ptr<float>(), *pdo = dout.data_ptr<float>();
  const float* pr = rstd.numel() ? rstd.data_ptr<float>() : nullptr;  // the forward's group rstd, else recomputed
  const int64_t zsb = z.stride(0), zs = z.stride(1);
  float *pdu = du.data_ptr<float>(), *pddt = ddt.data_ptr<float>(), *pdz = dz.data_ptr<float>();
  float *pdA = dA.data_ptr<float>(), *pdB = dB.data_ptr<float>(), *pdC = dC.data_ptr<float>();
  float *pdD = dD.data_ptr<float>(), *pds = ddt_sum.data_ptr<float>();
  if constexpr (kAblate >= 2)
    return {du.zero_(), ddt.zero_(), dA, dB, dC, dD, dz.zero_(), ddt_sum, dx_lr, dw_lr};
  const float inv_scale = 1.f / (float)delta_scale;
#if defined(__AVX512F__)
  constexpr bool kLaneSums = NC == 16 && kW == 16;  // grp_bwd16: dB, dC summed across lanes per token
#else
  constexpr bool kLaneSums = false;
#endif
  std::mutex mu;
  const int64_t items = Bt * blk.count;
  for_items_dynamic(items, [&](std::atomic<int64_t>& next) {
    // (L, W) block buffers: u; delta, then the scan's d delta; d loss / d y, then the scan's du; and, from the
    // element-wise pass, delta' = sigmoid(dt) / delta_scale and the D-skip part of du
    fvec ub(L * W), dlb(L * W), dyb(L * W), sgb(L * W), dsk(L * W);
    fvec hs((L + 1) * N * kW), as(L * N * kW), av(N * kW), dAv(N * kW),
        dBv(kLaneSums ? 0 : L * N * kW, 0.f), dCv(kLaneSums ? 0 : L * N * kW, 0.f);
    // per-thread sums over images / channels; lB, lC: (Bt, L, N), images b_lo..b_hi touched
    std::vector<float> lA(D * N, 0.f), lD(D, 0.f), ls(D, 0.f), lB(Bt * L * N, 0.f), lC(Bt * L * N, 0.f);
    fvec lX(lowrank ? Bt * L * rp : 0, 0.f), lW(lowrank ? D * rp : 0, 0.f), xr(lowrank ? L * rp : 0, 0.f);
    int64_t b_lo = Bt, b_hi = -1, xr_b = -1;  // xr holds x_lr of image xr_b
    RowPrefetch pf;
    for (int64_t i = next++, j; i < items; i = j) {
      const int64_t b = i / blk.count, c0 = (i % blk.count) * blk.width, c1 = std::min(D, c0 + blk.width);
      const int64_t seg = G > 0 ? G : c1 - c0;
      j = next++;  // the next item, claimed now: its rows of yraw, u, dout, z (and dt) are prefetched during the scan
      RowPrefetch* next_rows = aim_at_item(pf, j, items, blk, L, D,
                                           {{py, L * D, D}, {pu, L * D, D}, {pdo, L * D, D}, {pz, zsb, zs},
                                            {pdt, L * D, D}});
      if (!pdt) dt_block(dts, b, L, c0, c1, dlb.data(), W);  // read, then overwritten by delta, below
      // out = (yn + D u) * s, s = silu(z); yn = y * r: gradients of the element-wise chain, per token and segment
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * D, o = t * W - c0;
        float *dzt = pdz + b * dzsb + t * dzs, *dskt = dsk.data() + o, *sgt = sgb.data() + o;
        float *ubt = ub.data() + o, *dlt = dlb.data() + o, *dyt = dyb.data() + o;
        const float *yt = py + row, *ut = pu + row, *dtt = pdt ? pdt + row : dlt, *dot_ = pdo + row;
        const float* zt = pz + b * zsb + t * zs;
        if (t + 2 < L)
          for (const float* p : {yt, ut, pdt ? dtt : nullptr, dot_})
            if (p) prefetch(p + 2 * D + c0, c1 - c0);
        if (t + 2 < L) prefetch(zt + 2 * zs + c0, c1 - c0);
        for (int64_t s0 = c0; s0 < c1; s0 += seg) {
          const int64_t s1 = std::min(c1, s0 + seg);
          const float r = G == 0 ? 1.f
                          : pr ? pr[(b * L + t) * (D / G) + s0 / G]
                               : 1.f / std::sqrt(sum_squares(yt, s0, s1) / (float)(s1 - s0) + kGroupEps);
          vf dotv{};
          float dots = 0.f;
          for_lanes(s0, s1, [&](int64_t c, auto tag) {
            using T = decltype(tag);
            const T zz = ld<T>(zt + c), sg = sigmoid_t(zz), s = zz * sg, uu = ld<T>(ut + c), dk = ld<T>(pD + c);
            const T yn = ld<T>(yt + c) * r, pre = yn + dk * uu, dd = ld<T>(dot_ + c), dpre = dd * s;
            st_stream(dzt + c, dd * pre * sg * (zz * (1.f - sg) + 1.f));
            st(lD.data() + c, ld<T>(lD.data() + c) + dpre * uu);
            st(dskt + c, dpre * dk);  // the D-skip part of du; the scan part is added below
            if constexpr (std::is_same_v<T, vf>) dotv += dpre * yn; else dots += dpre * yn;
            st(dyt + c, dpre);  // d loss / d yn for now
            st(ubt + c, uu);
            T sig;
            st(dlt + c, softplus_sigmoid_t(ld<T>(dtt + c), sig) * inv_scale);
            st(sgt + c, sig * inv_scale);
          });
          if (G > 0) {  // d y = r (d yn - yn mean(d yn * yn))
            const float m = (hsum(dotv) + dots) / (float)(s1 - s0);
            for_lanes(s0, s1, [&](int64_t c, auto tag) {
              using T = decltype(tag);
              st(dyt + c, (ld<T>(dyt + c) - ld<T>(yt + c) * (r * m)) * r);
            });
          }
        }
        zero_pad(ubt, c0, c1);
        zero_pad(dlt, c0, c1);
        zero_pad(dyt, c0, c1);
      }
      // the scan's du and d delta overwrite dy and delta in place
      for (int64_t c = c0; c < c1 && kAblate < 1; c += kW) {
        const int64_t o = c - c0;
        gather_a(pA, c, c1, N, av.data());
        std::fill(dAv.begin(), dAv.end(), 0.f);
#if defined(__AVX512F__)
        if constexpr (kLaneSums)
          grp_bwd16(ub.data() + o, dlb.data() + o, dyb.data() + o, W, av.data(), pB + b * L * N, pC + b * L * N, L,
                    hs.data(), as.data(), dyb.data() + o, dlb.data() + o, dAv.data(), lB.data() + b * L * N,
                    lC.data() + b * L * N, next_rows);
        else
#endif
          grp_bwd<NC>(ub.data() + o, dlb.data() + o, dyb.data() + o, W, av.data(), pB + b * L * N, pC + b * L * N,
                      L, N, hs.data(), as.data(), dyb.data() + o, dlb.data() + o, dAv.data(), dBv.data(), dCv.data());
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < kW && c + k < c1; ++k) lA[(c + k) * N + n] += dAv[n * kW + k];
      }
      b_lo = std::min(b_lo, b);
      b_hi = std::max(b_hi, b);
      // the thread's last block of this image: sum the lanes once (grp_bwd16 summed them already)
      if (!kLaneSums && (j >= items || j / blk.count != b)) {
        const int64_t off = b * L * N;
        for (int64_t k = 0; k < L * N; ++k) {
          lB[off + k] += hsum(vld<vf>(dBv.data() + kW * k));
          lC[off + k] += hsum(vld<vf>(dCv.data() + kW * k));
        }
        std::fill(dBv.begin(), dBv.end(), 0.f);
        std::fill(dCv.begin(), dCv.end(), 0.f);
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * D, o = t * W - c0;
        const float *duct = dyb.data() + o, *ddlt = dlb.data() + o, *dskt = dsk.data() + o;
        float *dut = pdu + row, *ddtt = lowrank ? sgb.data() + o : pddt + row, *sgt = sgb.data() + o;
        for_lanes(c0, c1, [&](int64_t c, auto tag) {
          using T = decltype(tag);
          st_stream(dut + c, ld<T>(dskt + c) + ld<T>(duct + c));
          const T g = ld<T>(ddlt + c) * ld<T>(sgt + c);
          if (lowrank) st(ddtt + c, g); else st_stream(ddtt + c, g);  // in place of sigmoid(dt), or out
          st(ls.data() + c, ld<T>(ls.data() + c) + g);
        });
      }
      if (lowrank) {  // ddt of the block, (L, c1 - c0) in sgb: d x_lr[t] += ddt[t] w,  d w[c] += ddt[:, c]^T x_lr
        if (xr_b != b) {  // once per image: a thread often takes several blocks of one image in a row
          for (int64_t t = 0; t < L; ++t)
            for (int64_t r = 0; r < R; ++r) xr[t * rp + r] = dts.x[b * dts.xsb + t * dts.xs + r];
          xr_b = b;
        }
        float *dx = lX.data() + b * L * rp, *dw = lW.data() + c0 * rp;
        // tiles of 24 (AVX-512: 32 registers) or 12 (AVX2: 16) accumulators
        constexpr int kDxRows = kW == 16 ? 8 : 4, kDwRows = kW == 16 ? 6 : 4;
        small_gemm<kDxRows, 3>(sgb.data(), W, 1, L, dts.w.data() + c0 * rp, rp, c1 - c0, rp / kW, dx, rp, dx, rp);
        small_gemm<kDwRows, 3>(sgb.data(), 1, W, c1 - c0, xr.data(), rp, L, rp / kW, dw, rp, dw, rp);
      }
    }
    stream_fence();
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t k = 0; k < D * N; ++k) pdA[k] += lA[k];
    for (int64_t k = 0; k < D; ++k) {
      pdD[k] += lD[k];
      pds[k] += ls[k];
    }
    for (int64_t k = b_lo * L * N; k < (b_hi + 1) * L * N; ++k) {
      pdB[k] += lB[k];
      pdC[k] += lC[k];
    }
    if (lowrank) {
      float *px = dx_lr.data_ptr<float>(), *pw = dw_lr.data_ptr<float>();
      for (int64_t k = b_lo * L; k < (b_hi + 1) * L; ++k)
        for (int64_t r = 0; r < R; ++r) px[k * R + r] += lX[k * rp + r];
      for (int64_t c = 0; c < D; ++c)
        for (int64_t r = 0; r < R; ++r) pw[c * R + r] += lW[c * rp + r];
    }
  });
  return {du, ddt, dA, dB, dC, dD, dz, ddt_sum, dx_lr, dw_lr};
}

// ---- RMSNorm over the last dim, (R, C) rows: y = x rstd w, rstd = 1 / sqrt(mean(x^2) + eps) ----
// The eager composition (pow, mean, add, rsqrt, two muls and their backward) makes ~10 passes over the activations of
// every layer; here forward and backward are one pass each (two reads in the backward).

std::vector<torch::Tensor> rms_fwd(torch::Tensor x, torch::Tensor w, double eps) {
  check(x, "x", 2);
  check(w, "weight", 1);
  TORCH_CHECK(w.size(0) == x.size(1), "RMSNorm weight must have ", x.size(1), " elements");
  const int64_t R = x.size(0), C = x.size(1);
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({R}, x.options());
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
  float *py = y.data_ptr<float>(), *pr = rstd.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = px + r * C;
      const float rs = 1.f / std::sqrt(sum_squares(xr, 0, C) / (float)C + (float)eps);
      pr[r] = rs;
      for_lanes(0, C, [&](int64_t c, auto tag) {
        using T = decltype(tag);
        st(py + r * C + c, ld<T>(xr + c) * rs * ld<T>(pw + c));
      });
    }
  });
  return {y, rstd};
}

// dx = rstd (g - x rstd^2 mean(g x)), g = dy w;  dw = sum over rows of dy x rstd. dres (optional, like x): the
// gradient x receives from the residual connection, added in the same pass (the block's two gradients of x, without
// autograd's separate sum).
std::vector<torch::Tensor> rms_bwd(torch::Tensor dy, torch::Tensor x, torch::Tensor w, torch::Tensor rstd,
                                   c10::optional<torch::Tensor> dres) {
  check(dy, "dy", 2);
  check(x, "x", 2);
  check(w, "weight", 1);
  check(rstd, "rstd", 1);
  TORCH_CHECK(dy.sizes() == x.sizes() && w.size(0) == x.size(1) && rstd.size(0) == x.size(0), "RMSNorm shapes");
  if (dres.has_value()) {
    check(*dres, "dres", 2);
    TORCH_CHECK(dres->sizes() == x.sizes(), "RMSNorm dres must be shaped like x");
  }
  const int64_t R = x.size(0), C = x.size(1);
  auto dx = torch::empty_like(x);
  auto dw = torch::zeros_like(w);
  const float *pdy = dy.data_ptr<float>(), *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
  const float* pr = rstd.data_ptr<float>();
  const float* pres = dres.has_value() ? dres->data_ptr<float>() : nullptr;
  float *pdx = dx.data_ptr<float>(), *pdw = dw.data_ptr<float>();
  std::mutex mu;
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> lw(C, 0.f);
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = px + r * C, *dyr = pdy + r * C;
      const float rs = pr[r];
      vf sv{};
      float ss = 0.f;
      for_lanes(0, C, [&](int64_t c, auto tag) {
        using T = decltype(tag);
        const T d = ld<T>(dyr + c), v = ld<T>(xr + c);
        st(lw.data() + c, ld<T>(lw.data() + c) + d * v * rs);
        if constexpr (std::is_same_v<T, vf>) sv += d * ld<T>(pw + c) * v; else ss += d * ld<T>(pw + c) * v;
      });
      const float k = rs * rs * (hsum(sv) + ss) / (float)C;
      for_lanes(0, C, [&](int64_t c, auto tag) {
        using T = decltype(tag);
        const T d = (ld<T>(dyr + c) * ld<T>(pw + c) - ld<T>(xr + c) * k) * rs;
        st(pdx + r * C + c, pres ? d + ld<T>(pres + r * C + c) : d);
      });
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t c = 0; c < C; ++c) pdw[c] += lw[c];
  });
  return {dx, dw};
}

void check_scan(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& Bl, const torch::Tensor& Cl) {
  check(u, "u", 3);
  check(A, "A", 2);
  check(Bl, "B", 3);
  check(Cl, "C", 3);
  TORCH_CHECK(A.size(0) == u.size(1) && A.size(1) <= 256, "A must be (D, N) with N <= 256");
  TORCH_CHECK(Bl.size(0) == u.size(0) && Bl.size(1) == u.size(2) && Bl.size(2) == A.size(1), "B must be (Bt, L, N)");
  TORCH_CHECK(Cl.sizes() == Bl.sizes(), "C must be (Bt, L, N)");
}

#define DISPATCH_N(N, FN, ...) \
  ((N) == 16 ? FN<2>(__VA_ARGS__) : (N) == 8 ? FN<1>(__VA_ARGS__) : FN<0>(__VA_ARGS__))
#define DISPATCH_NC(N, FN, ...) DISPATCH_FIXED(N, 16, FN, __VA_ARGS__)

std::vector<torch::Tensor> scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bl,
                                    torch::Tensor Cl) {
  check_scan(u, A, Bl, Cl);
  check(delta, "delta", 3);
  return DISPATCH_N(A.size(1), scan_fwd_impl, u, delta, A, Bl, Cl);
}

std::vector<torch::Tensor> scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bl,
                                    torch::Tensor Cl, torch::Tensor dy) {
  check_scan(u, A, Bl, Cl);
  check(delta, "delta", 3);
  check(dy, "dy", 3);
  return DISPATCH_N(A.size(1), scan_bwd_impl, u, delta, A, Bl, Cl, dy);
}

torch::Tensor or_empty(const c10::optional<torch::Tensor>& t, const torch::Tensor& like) {
  return t.has_value() && t->defined() ? *t : torch::empty({0}, like.options());
}

// dt_w, dt_b: empty (dt is (Bt, L, D)), or dt_proj's weight (D, R) and bias (D,), dt then its low-rank input
// (Bt, L, R) with unit inner stride (a slice of the x_proj output).
void check_defocus(const torch::Tensor& u, const torch::Tensor& dt, const torch::Tensor& A, const torch::Tensor& Bx,
                   const torch::Tensor& Cx, const torch::Tensor& Dskip, const torch::Tensor& z, int64_t G,
                   const torch::Tensor& freq, const torch::Tensor& dt_w, const torch::Tensor& dt_b) {
  check(u, "u", 3);
  if (dt_w.numel() == 0) {
    check(dt, "dt", 3);
    TORCH_CHECK(dt.sizes() == u.sizes(), "dt must be (Bt, L, D) like u");
  } else {
    check(dt_w, "dt_proj weight", 2);
    check(dt_b, "dt_proj bias", 1);
    TORCH_CHECK(dt_w.size(0) == u.size(2) && dt_b.size(0) == u.size(2), "dt_proj weight must be (D, R), bias (D,)");
    TORCH_CHECK(dt.device().is_cpu() && dt.scalar_type() == torch::kFloat32 && dt.dim() == 3 && dt.stride(2) == 1 &&
                    dt.size(0) == u.size(0) && dt.size(1) == u.size(1) && dt.size(2) == dt_w.size(1),
                "with dt_proj, dt must be its float32 (Bt, L, R) input with unit inner stride");
  }
  check(A, "A", 2);
  check(Dskip, "D", 1);
  for (const auto* x : {&z, &Bx, &Cx})
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == torch::kFloat32 && x->dim() == 3 && x->stride(2) == 1,
                "z, B and C must be float32 CPU (Bt, L, *) tensors with unit inner stride");
  const int64_t Bt = u.size(0), L = u.size(1), D = u.size(2), N = A.size(1);
  TORCH_CHECK(A.size(0) == D && N <= 256, "A must be (D, N) with N <= 256");
  TORCH_CHECK(Bx.size(0) == Bt && Bx.size(1) == L && Bx.size(2) == N, "B must be (Bt, L, N)");
  TORCH_CHECK(Cx.sizes() == Bx.sizes(), "C must be (Bt, L, N)");
  TORCH_CHECK(z.size(0) == Bt && z.size(1) == L && z.size(2) == D, "z must be (Bt, L, D)");
  TORCH_CHECK(Dskip.size(0) == D, "D must be (D,)");
  TORCH_CHECK(G >= 0 && (G == 0 || D % G == 0), "group size must divide D");
  if (freq.numel() > 0) {
    check(freq, "freq", 1);
    TORCH_CHECK(freq.size(0) == N && N % 2 == 0, "freq must be (N,) with N even (RoPE rotates pairs)");
  }
}

std::vector<torch::Tensor> defocus_fwd(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bx,
                                       torch::Tensor Cx, torch::Tensor Dskip, torch::Tensor z, int64_t G,
                                       double delta_scale, torch::Tensor freq, double rope_scale,
                                       c10::optional<torch::Tensor> dt_weight, c10::optional<torch::Tensor> dt_bias) {
  const auto dt_w = or_empty(dt_weight, u), dt_b = or_empty(dt_bias, u);
  check_defocus(u, dt, A, Bx, Cx, Dskip, z, G, freq, dt_w, dt_b);
  std::vector<float> cs, sn;
  rope_tables(freq, u.size(1), rope_scale, cs, sn);
  auto Bl = rope_rotate(Bx, cs, sn), Cl = rope_rotate(Cx, cs, sn);
  const DtSource dts = dt_source(dt, dt_w, dt_b, false);
  return DISPATCH_NC(A.size(1), defocus_fwd_impl, u, dts, A, Bl, Cl, Dskip, z, G, delta_scale);
}

std::vector<torch::Tensor> defocus_bwd(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bx,
                                       torch::Tensor Cx, torch::Tensor Dskip, torch::Tensor z, torch::Tensor yraw,
                                       torch::Tensor dout, int64_t G, double delta_scale, torch::Tensor freq,
                                       double rope_scale, c10::optional<torch::Tensor> dz_out,
                                       c10::optional<torch::Tensor> dt_weight, c10::optional<torch::Tensor> dt_bias,
                                       c10::optional<torch::Tensor> rstd_saved) {
  const auto dt_w = or_empty(dt_weight, u), dt_b = or_empty(dt_bias, u);
  check_defocus(u, dt, A, Bx, Cx, Dskip, z, G, freq, dt_w, dt_b);
  check(yraw, "yraw", 3);
  check(dout, "dout", 3);
  TORCH_CHECK(yraw.sizes() == u.sizes() && dout.sizes() == u.sizes(), "yraw and dout must be (Bt, L, D) like u");
  const auto rstd = or_empty(rstd_saved, u);
  if (rstd.numel() > 0) {
    check(rstd, "rstd", 3);
    TORCH_CHECK(G > 0 && rstd.size(0) == u.size(0) && rstd.size(1) == u.size(1) && rstd.size(2) == u.size(2) / G,
                "rstd must be the forward's (Bt, L, D / group_size) group rstd");
  }
  auto dz = output_like(dz_out, u, "dz");
  std::vector<float> cs, sn;
  rope_tables(freq, u.size(1), rope_scale, cs, sn);
  auto Bl = rope_rotate(Bx, cs, sn), Cl = rope_rotate(Cx, cs, sn);
  const DtSource dts = dt_source(dt, dt_w, dt_b, true);
  auto g = DISPATCH_NC(A.size(1), defocus_bwd_impl, u, dts, A, Bl, Cl, Dskip, z, yraw, dout, G, delta_scale, dz,
                       rstd);
  std::vector<double> df(A.size(1), 0.0);
  rope_backward(Bx, g[3], cs, sn, rope_scale, df);
  rope_backward(Cx, g[4], cs, sn, rope_scale, df);
  auto dfreq = torch::empty({freq.numel()}, u.options());
  for (int64_t n = 0; n < freq.numel(); ++n) dfreq.data_ptr<float>()[n] = (float)df[n];
  g.insert(g.begin() + 8, dfreq);
  // du, ddt, dA, dB, dC, dD, dz, ddt summed over (Bt, L), dfreq (empty without RoPE); with dt_proj: ddt empty, then
  // the gradients of its input (Bt, L, R) and weight (D, R) (else empty)
  return g;
}

// For the benchmarks only (`python -m defocus_clip.bench.towers --scan-cycles`): the scan core of one group of kW
// channels with N = 16 states (grp_fwd with outputs; the backward's recompute + reverse, grp_bwd16 with AVX-512, else
// grp_bwd), `reps` times on buffers that stay in L1/L2; the best of 5 runs in time-stamp-counter ticks (x86; else
// nanoseconds) per state vector and token. pass: 0 forward, 1 backward. The cost of the core without the element-wise
// passes and memory traffic around it, comparable between kernel sources.
double scan_core_ticks(int64_t pass, int64_t L, int64_t reps) {
  TORCH_CHECK((pass == 0 || pass == 1) && L >= 1 && reps >= 1, "scan_core_ticks: pass 0 or 1, L >= 1, reps >= 1");
  constexpr int N = 16;
  const int64_t s = kW;
  fvec u(L * kW, 0.5f), dl(L * kW, 0.05f), dy(L * kW, 0.3f), y(L * kW), du(L * kW), ddl(L * kW), av(N * kW), dAv(N * kW),
      hs((L + 1) * N * kW), as(L * N * kW), dB(L * N, 0.f), dC(L * N, 0.f), Bl(L * N, 0.2f), Cl(L * N, 0.1f),
      dBv(L * N * kW, 0.f), dCv(L * N * kW, 0.f);
  for (int i = 0; i < N * kW; ++i) av[i] = -(float)(1 + i / kW) * kLog2e;  // A = -(n + 1), the Mamba initialisation
  const auto now = [] {
#if defined(__x86_64__) || defined(__i386__)
    return (double)__rdtsc();
#else
    return (double)std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
#endif
  };
  double best = 0.;
  for (int run = 0; run < 5; ++run) {
    const double t0 = now();
    for (int64_t k = 0; k < reps; ++k) {
      if (pass == 0) {
        grp_fwd<N, true, false>(u.data(), dl.data(), s, av.data(), Bl.data(), Cl.data(), (int)L, N, y.data(), nullptr,
                                nullptr);
      } else {
#if defined(__AVX512F__)
        if constexpr (kW == 16) {
          grp_bwd16(u.data(), dl.data(), dy.data(), s, av.data(), Bl.data(), Cl.data(), (int)L, hs.data(), as.data(),
                    du.data(), ddl.data(), dAv.data(), dB.data(), dC.data(), nullptr);
          continue;
        }
#endif
        grp_bwd<N>(u.data(), dl.data(), dy.data(), s, av.data(), Bl.data(), Cl.data(), (int)L, N, hs.data(), as.data(),
                   du.data(), ddl.data(), dAv.data(), dBv.data(), dCv.data());
      }
    }
    const double t = (now() - t0) / ((double)reps * (double)L * N);
    best = run == 0 ? t : std::min(best, t);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // 2: conv_bwd / defocus_bwd write into given buffers; 3: the chain computes dt from dt_proj; 4: and returns its
  // gradients instead of ddt; 5: rms_bwd adds the residual's gradient (dres); 6: defocus_fwd also returns the group
  // rstd, which defocus_bwd takes (rstd=); 7: conv_bwd adds a linear layer's input gradient (lin_grad, lin_weight),
  // conv_fwd also returns that layer's output (lin_weight) (layers/scan_cpu.py)
  m.attr("KERNEL_VERSION") = 7;
  m.attr("ABLATE") = kAblate;     // DEFOCUS_ABLATE: 0 in every build that computes
  m.def("scan_core_ticks", &scan_core_ticks, "benchmarks only: the scan core's ticks per state vector and token",
        py::arg("pass"), py::arg("L"), py::arg("reps"));
  m.def("scan_fwd", &scan_fwd, "selective scan forward");
  m.def("scan_bwd", &scan_bwd, "selective scan backward (recomputes the states)");
  m.def("conv_fwd", &conv_fwd,
        "causal depthwise conv + bias + SiLU in the (Bt, L, D) layout: forward; returns (out,), or (out, out @ "
        "lin_weight^T) when given (a linear layer reading the output)",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("lin_weight") = py::none());
  m.def("conv_bwd", &conv_bwd,
        "causal depthwise conv + bias + SiLU in the (Bt, L, D) layout: backward; the output's gradient is dout, plus "
        "lin_grad @ lin_weight when given (a linear layer reading the output), and with lin_weight_grad also that "
        "layer's weight gradient lin_grad^T @ out (a fourth output)",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("dout"), py::arg("dx") = py::none(),
        py::arg("lin_grad") = py::none(), py::arg("lin_weight") = py::none(), py::arg("lin_weight_grad") = false);
  m.def("defocus_fwd", &defocus_fwd,
        "fused softplus, scan, group RMS norm, D skip, SiLU gate: forward, returns (out, yraw, group rstd)",
        py::arg("u"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("group_size"), py::arg("delta_scale"), py::arg("freq"), py::arg("rope_scale"),
        py::arg("dt_weight") = py::none(), py::arg("dt_bias") = py::none());
  m.def("defocus_bwd", &defocus_bwd, "fused softplus, scan, group RMS norm, D skip, SiLU gate: backward",
        py::arg("u"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("yraw"), py::arg("dout"), py::arg("group_size"), py::arg("delta_scale"), py::arg("freq"),
        py::arg("rope_scale"), py::arg("dz") = py::none(), py::arg("dt_weight") = py::none(),
        py::arg("dt_bias") = py::none(), py::arg("rstd") = py::none());
  m.def("rms_fwd", &rms_fwd, "RMSNorm over the last dim of (R, C): forward, returns (y, rstd)");
  m.def("rms_bwd", &rms_bwd, "RMSNorm over the last dim of (R, C): backward, returns (dx, dweight)", py::arg("dy"),
        py::arg("x"), py::arg("w"), py::arg("rstd"), py::arg("dres") = py::none());
}
