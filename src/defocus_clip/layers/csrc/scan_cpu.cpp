// Fused CPU selective scan of (De-focus) Mamba: h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y_t = C_t . h_t.
//
// Why a kernel: an eager scan materialises Bt*D*L*N tensors (decays, inputs, states) and is memory-bound; here one
// pass over L per (batch, channel) keeps the N states in registers. The backward recomputes the states of one
// channel into a thread-local L*N buffer instead of storing them for the whole batch.
//
// Two entry points, both float32 and contiguous:
//  * scan_fwd / scan_bwd: the plain scan. u, delta (Bt, D, L); A (D, N); B, C (Bt, L, N) (token-major, so that
//    the N states of one token are contiguous and vectorise).
//  * defocus_fwd / defocus_bwd: the whole chain of a De-focus Mamba mixer between the projections, per group of
//    G channels of one image (the group RMS norm couples the channels of a group):
//        delta = softplus(dt) / delta_scale                    dt, z, out: (Bt, L, D) (the layout of the linears)
//        y = scan(u, delta, A, B, C)                          u: (Bt, D, L) (the layout of the depthwise conv)
//        out = (group_rms_norm(y) + D u) * silu(z)            G = 0: no group norm (the plain Mamba baseline)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

constexpr float kGroupEps = 1e-6f;

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// The N states of a channel live in NV vectors of 8 floats (GCC/Clang vector extensions: AVX2 registers when the
// build enables AVX2, pairs of SSE registers otherwise). NV = 0: a scalar loop for any N.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f vload(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void vstore(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp in plain arithmetic, 8 lanes (libm's expf per state would dominate the kernel): 2^k * p(r),
// r = x - k ln2 in [-ln2/2, ln2/2], degree-7 Taylor polynomial (relative error ~1e-7, float32 rounding level).
// Arguments clamped to [-87, 88]; NaN stays NaN. Needs IEEE arithmetic: no -ffast-math (the rounding trick).
inline v8f vexp(v8f x) {
  x = x < -87.f ? v8f{} - 87.f : x;
  x = x > 88.f ? v8f{} + 88.f : x;
  const v8f k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest integer
  const v8f r = x - k * 0.693145751953125f - k * 1.428606820309417e-06f;  // ln2 in two parts
  v8f p = r * (1.f / 5040.f) + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;
  return p * (v8f)bits;
}

// One channel, forward. a: A row (N). Bl, Cl: (L, N). Writes y (L); if hs != nullptr also the states into rows
// 1..L of hs ((L + 1, N), row 0 = the zero initial state) and the decays exp(delta_t A) into as (L, N).
template <int NV>
inline void chan_fwd(const float* u, const float* dl, const float* a, const float* Bl, const float* Cl, int L, int N,
                     float* y, float* hs, float* as) {
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
        acc += h[j] * vload(Cl + (long)t * N + 8 * j);
        if (hs) {
          vstore(hs + (long)(t + 1) * N + 8 * j, h[j]);
          vstore(as + (long)t * N + 8 * j, at);
        }
      }
      y[t] = hsum(acc);
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
      y[t] = acc;
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
  chan_fwd<NV>(u, dl, a, Bl, Cl, L, N, yb, hs, as);
  if constexpr (NV > 0) {
    v8f g[NV], an[NV], dAl[NV], av[NV];
    for (int j = 0; j < NV; ++j) { g[j] = an[j] = dAl[j] = v8f{}; av[j] = vload(a + 8 * j); }
    for (int t = L - 1; t >= 0; --t) {
      const float d = dl[t], ut = u[t], dyt = dy[t], dut = d * ut;
      v8f s_ad{}, s_gb{};
      for (int j = 0; j < NV; ++j) {
        const long o = (long)t * N + 8 * j;
        const v8f at = vload(as + o), b = vload(Bl + o);
        const v8f gn = g[j] * an[j] + vload(Cl + o) * dyt;
        g[j] = gn;
        an[j] = at;
        vstore(dC + o, vload(dC + o) + vload(hs + o + N) * dyt);
        const v8f dla = gn * vload(hs + o) * at;
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
      chan_fwd<NV>(pu + i * L, pd + i * L, pA + d * N, pB + b * L * N, pC + b * L * N, L, N, py + i * L, nullptr, nullptr);
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

// ---- fused De-focus chain ----

template <int NV>
std::vector<torch::Tensor> defocus_fwd_impl(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bl,
                                            torch::Tensor Cl, torch::Tensor Dskip, torch::Tensor z, int64_t G,
                                            double delta_scale) {
  const int64_t Bt = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t Gs = G > 0 ? G : 1, ngroups = D / Gs;
  auto out = torch::empty({Bt, L, D}, u.options());
  auto yraw = torch::empty_like(u);  // the scan output, (Bt, D, L): saved for the backward
  const float *pu = u.data_ptr<float>(), *pdt = dt.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = Bl.data_ptr<float>(), *pC = Cl.data_ptr<float>(), *pD = Dskip.data_ptr<float>();
  const float* pz = z.data_ptr<float>();
  const int64_t zs = z.stride(1);  // z may be a view of the in_proj output (stride 2D)
  float *po = out.data_ptr<float>(), *py = yraw.data_ptr<float>();
  const float inv_scale = 1.f / (float)delta_scale;
  at::parallel_for(0, Bt * ngroups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dl(L), rms(L);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / ngroups, g0 = (i % ngroups) * Gs;
      for (int64_t c = g0; c < g0 + Gs; ++c) {
        const float* dtc = pdt + b * L * D + c;
        for (int64_t t = 0; t < L; ++t) dl[t] = softplus(dtc[t * D]) * inv_scale;
        const int64_t row = (b * D + c) * L;
        chan_fwd<NV>(pu + row, dl.data(), pA + c * N, pB + b * L * N, pC + b * L * N, L, N, py + row, nullptr, nullptr);
      }
      for (int64_t t = 0; t < L; ++t) {
        float r = 1.f;
        if (G > 0) {
          float ss = 0.f;
          for (int64_t c = g0; c < g0 + Gs; ++c) { const float v = py[(b * D + c) * L + t]; ss += v * v; }
          r = 1.f / std::sqrt(ss / (float)Gs + kGroupEps);
        }
        const float* zt = pz + b * L * zs + t * zs;
        float* ot = po + (b * L + t) * D;
        for (int64_t c = g0; c < g0 + Gs; ++c) {
          const int64_t row = (b * D + c) * L;
          const float zc = zt[c];
          ot[c] = (py[row + t] * r + pD[c] * pu[row + t]) * zc * sigmoid(zc);
        }
      }
    }
  });
  return {out, yraw};
}

template <int NV>
std::vector<torch::Tensor> defocus_bwd_impl(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bl,
                                            torch::Tensor Cl, torch::Tensor Dskip, torch::Tensor z, torch::Tensor yraw,
                                            torch::Tensor dout, int64_t G, double delta_scale) {
  const int64_t Bt = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t Gs = G > 0 ? G : 1, ngroups = D / Gs;
  auto du = torch::empty_like(u);
  auto ddt = torch::empty({Bt, L, D}, u.options());
  auto dz = torch::empty({Bt, L, D}, u.options());
  auto dA = torch::zeros_like(A), dB = torch::zeros_like(Bl), dC = torch::zeros_like(Cl);
  auto dD = torch::zeros_like(Dskip);
  const float *pu = u.data_ptr<float>(), *pdt = dt.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = Bl.data_ptr<float>(), *pC = Cl.data_ptr<float>(), *pD = Dskip.data_ptr<float>();
  const float *pz = z.data_ptr<float>(), *py = yraw.data_ptr<float>(), *pdo = dout.data_ptr<float>();
  const int64_t zs = z.stride(1);
  float *pdu = du.data_ptr<float>(), *pddt = ddt.data_ptr<float>(), *pdz = dz.data_ptr<float>();
  float *pdA = dA.data_ptr<float>(), *pdB = dB.data_ptr<float>(), *pdC = dC.data_ptr<float>();
  float* pdD = dD.data_ptr<float>();
  const float inv_scale = 1.f / (float)delta_scale;
  std::mutex mu;
  at::parallel_for(0, Bt * ngroups, 1, [&](int64_t begin, int64_t end) {
    const int64_t b0 = begin / ngroups, b1 = (end - 1) / ngroups;
    std::vector<float> hs((L + 1) * N), as(L * N), yb(L), dl(L), dy(Gs * L), dyc(L), duc(L), ddl(L), rms(L), lA(D * N, 0.f), lD(D, 0.f);
    std::vector<float> lB((b1 - b0 + 1) * L * N, 0.f), lC((b1 - b0 + 1) * L * N, 0.f);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / ngroups, g0 = (i % ngroups) * Gs;
      // out = (yn + D u) * s, s = silu(z); yn = y * r: gradients of the element-wise chain, per token
      for (int64_t t = 0; t < L; ++t) {
        float r = 1.f, dot = 0.f;
        if (G > 0) {
          float ss = 0.f;
          for (int64_t c = g0; c < g0 + Gs; ++c) { const float v = py[(b * D + c) * L + t]; ss += v * v; }
          r = 1.f / std::sqrt(ss / (float)Gs + kGroupEps);
        }
        const float* zt = pz + b * L * zs + t * zs;
        const float* dot_ = pdo + (b * L + t) * D;
        float* dzt = pdz + (b * L + t) * D;
        for (int64_t c = g0; c < g0 + Gs; ++c) {
          const int64_t row = (b * D + c) * L;
          const float zc = zt[c], sg = sigmoid(zc), s = zc * sg;
          const float yn = py[row + t] * r, pre = yn + pD[c] * pu[row + t];
          const float dpre = dot_[c] * s;
          dzt[c] = dot_[c] * pre * sg * (1.f + zc * (1.f - sg));
          lD[c] += dpre * pu[row + t];
          pdu[row + t] = dpre * pD[c];  // the D-skip part of du; the scan part is added below
          dy[(c - g0) * L + t] = dpre;  // d loss / d yn for now
          dot += dpre * yn;
        }
        if (G > 0) {  // d y = r (d yn - yn mean(d yn * yn))
          const float m = dot / (float)Gs;
          for (int64_t c = g0; c < g0 + Gs; ++c) {
            const float yn = py[(b * D + c) * L + t] * r;
            float& v = dy[(c - g0) * L + t];
            v = r * (v - yn * m);
          }
        }
      }
      const int64_t off = (b - b0) * L * N;
      for (int64_t c = g0; c < g0 + Gs; ++c) {
        const float* dtc = pdt + b * L * D + c;
        for (int64_t t = 0; t < L; ++t) dl[t] = softplus(dtc[t * D]) * inv_scale;
        const int64_t row = (b * D + c) * L;
        chan_bwd<NV>(pu + row, dl.data(), pA + c * N, pB + b * L * N, pC + b * L * N, L, N, dy.data() + (c - g0) * L,
                     hs.data(), as.data(), yb.data(), duc.data(), ddl.data(), lA.data() + c * N, lB.data() + off, lC.data() + off);
        float* ddtc = pddt + b * L * D + c;
        for (int64_t t = 0; t < L; ++t) {
          pdu[row + t] += duc[t];
          ddtc[t * D] = ddl[t] * sigmoid(dtc[t * D]) * inv_scale;
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t k = 0; k < D * N; ++k) pdA[k] += lA[k];
    for (int64_t k = 0; k < D; ++k) pdD[k] += lD[k];
    for (int64_t k = 0; k < (b1 - b0 + 1) * L * N; ++k) {
      pdB[b0 * L * N + k] += lB[k];
      pdC[b0 * L * N + k] += lC[k];
    }
  });
  return {du, ddt, dA, dB, dC, dD, dz};
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

void check_defocus(const torch::Tensor& u, const torch::Tensor& dt, const torch::Tensor& Dskip,
                   const torch::Tensor& z, int64_t G) {
  check(dt, "dt", 3);
  check(Dskip, "D", 1);
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == torch::kFloat32 && z.dim() == 3 && z.stride(2) == 1 &&
                  z.stride(0) == z.size(1) * z.stride(1),
              "z must be a float32 CPU (Bt, L, D) tensor with unit channel stride");
  const int64_t Bt = u.size(0), D = u.size(1), L = u.size(2);
  TORCH_CHECK(dt.size(0) == Bt && dt.size(1) == L && dt.size(2) == D, "dt must be (Bt, L, D)");
  TORCH_CHECK(z.size(0) == Bt && z.size(1) == L && z.size(2) == D, "z must be (Bt, L, D)");
  TORCH_CHECK(Dskip.size(0) == D, "D must be (D,)");
  TORCH_CHECK(G >= 0 && (G == 0 || D % G == 0), "group size must divide D");
}

std::vector<torch::Tensor> defocus_fwd(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bl,
                                       torch::Tensor Cl, torch::Tensor Dskip, torch::Tensor z, int64_t G,
                                       double delta_scale) {
  check_scan(u, A, Bl, Cl);
  check_defocus(u, dt, Dskip, z, G);
  return DISPATCH_N(A.size(1), defocus_fwd_impl, u, dt, A, Bl, Cl, Dskip, z, G, delta_scale);
}

std::vector<torch::Tensor> defocus_bwd(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bl,
                                       torch::Tensor Cl, torch::Tensor Dskip, torch::Tensor z, torch::Tensor yraw,
                                       torch::Tensor dout, int64_t G, double delta_scale) {
  check_scan(u, A, Bl, Cl);
  check_defocus(u, dt, Dskip, z, G);
  check(yraw, "yraw", 3);
  check(dout, "dout", 3);
  return DISPATCH_N(A.size(1), defocus_bwd_impl, u, dt, A, Bl, Cl, Dskip, z, yraw, dout, G, delta_scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &scan_fwd, "selective scan forward");
  m.def("scan_bwd", &scan_bwd, "selective scan backward (recomputes the states)");
  m.def("defocus_fwd", &defocus_fwd, "fused softplus, scan, group RMS norm, D skip, SiLU gate: forward");
  m.def("defocus_bwd", &defocus_bwd, "fused softplus, scan, group RMS norm, D skip, SiLU gate: backward");
}
