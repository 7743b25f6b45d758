// Causal grouped-query attention for short rows on CPUs whose oneDNN has bf16 brgemm (AMX, AVX512-BF16),
// forward and backward, each (row, key/value head) pair done in the core's cache. See models/cpu_attention.py
// for why it exists and how it is built and checked.
//
// Layouts: query [B, H, L, D], key and value [B, KV, L, D] (any strides, head dimension contiguous);
// out [B, L, H, D] (what the attention module transposes to anyway); probs [B, H, Lr, Lp] bf16, the causal
// softmax kept for the backward pass, zero past each row's last key, Lr = L rounded up to 2 (oneDNN's VNNI
// layout packs rows in pairs), Lp = L rounded up to 32.
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<BFloat16>;
namespace cpublas = at::native::cpublas;
constexpr int64_t VL = Vec::size();
constexpr int64_t NB = 64;  // oneDNN's B transform takes at most 64 columns at a time
constexpr int64_t BM = 32;  // query rows per block: keys past a block's last row are skipped

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// B operand [K, N] (row stride ld_in) into column blocks of NB in oneDNN's VNNI layout; K must be even.
void pack_b(const BFloat16* in, BFloat16* out, int64_t K, int64_t N, int64_t ld_in) {
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nb = std::min(NB, N - n0);
    cpublas::pack(K, nb, ld_in, nb, at::kBFloat16, at::kBFloat16, in + n0, out + n0 * K);
  }
}

// C[M, c0:c1] (row stride ldc; + C when add) = A[M, K] (row stride lda) @ B[k0:k0 + K, c0:c1], with B packed by
// pack_b as Kp x Np: a prefix or a band of its rows (k0 and K even: VNNI row pairs) and of its columns (c0 a
// multiple of NB). Bands are how the causal structure is skipped: keys after a query block, queries before a
// key block, contribute nothing.
void gemm(const BFloat16* A, int64_t M, int64_t lda, const BFloat16* Bp, int64_t Kp, int64_t Np, int64_t k0, int64_t K,
          int64_t c0, int64_t c1, float* C, int64_t ldc, bool add) {
  for (int64_t n0 = c0; n0 < c1; n0 += NB) {
    const int64_t packed = std::min(NB, Np - n0), nb = std::min(packed, c1 - n0);
    cpublas::brgemm(M, nb, K, lda, packed, ldc, add, A, Bp + n0 * Kp + k0 * packed, C + n0, /*is_vnni=*/true);
  }
}

// dst[j, i] = src[i, j] for a [rows, cols] block, in 32 x 32 tiles.
void transpose(const BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src, BFloat16* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; i += 32)
    for (int64_t j = 0; j < cols; j += 32)
      at::vec::transpose_mxn<BFloat16>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                       std::min<int64_t>(32, rows - i), std::min<int64_t>(32, cols - j));
}

void copy_rows(const BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src, BFloat16* dst) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * cols, src + i * ld_src, cols * sizeof(BFloat16));
}

void to_bf16(const float* src, BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL)
    at::vec::convert_from_float<BFloat16>(Vec::loadu(src + i), Vec::loadu(src + i + VL)).store(dst + i);
  for (; i < n; ++i) dst[i] = BFloat16(src[i]);
}

float sum_of(Vec v) { return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v); }

// Row i of scores (fp32, Lp wide) -> its causal softmax over keys 0..i, written as bf16 with zeros after.
void softmax_row(float* row, int64_t i, int64_t Lp, float scale, BFloat16* out) {
  const int64_t n = i + 1;
  const float mx = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, n) * scale;
  const Vec vs(scale), vm(mx);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    Vec e = (Vec::loadu(row + j) * vs - vm).exp_u20();
    e.store(row + j);
    acc = acc + e;
  }
  if (j < n) {
    Vec e = (Vec::loadu(row + j, n - j) * vs - vm).exp_u20();
    e.store(row + j, n - j);
    acc = acc + Vec::set(Vec(0.f), e, n - j);
  }
  const Vec inv(1.0f / sum_of(acc));
  for (j = 0; j < Lp; j += 2 * VL) {
    if (j >= n) {
      BVec(BFloat16(0)).store(out + j);
      continue;
    }
    Vec a = Vec::loadu(row + j) * inv, c = Vec::loadu(row + j + VL) * inv;
    a = Vec::set(Vec(0.f), a, std::min<int64_t>(VL, n - j));
    c = Vec::set(Vec(0.f), c, std::max<int64_t>(0, std::min<int64_t>(VL, n - j - VL)));
    at::vec::convert_from_float<BFloat16>(a, c).store(out + j);
  }
}

struct Dims {
  int64_t B, H, KV, G, L, D, Lr, Lp;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k) {
  Dims d;
  d.B = q.size(0), d.H = q.size(1), d.L = q.size(2), d.D = q.size(3), d.KV = k.size(1);
  d.G = d.H / d.KV, d.Lr = round_up(d.L, 2), d.Lp = round_up(d.L, 32);
  return d;
}

at::Tensor head_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

}  // namespace

bool supported() { return cpublas::could_pack(at::kBFloat16); }

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, double scaling) {
  q = head_contiguous(q), k = head_contiguous(k), v = head_contiguous(v);
  const Dims d = dims_of(q, k);
  const int64_t B = d.B, H = d.H, KV = d.KV, G = d.G, L = d.L, D = d.D, Lr = d.Lr, Lp = d.Lp;
  auto out = at::empty({B, L, H, D}, q.options());
  auto probs = at::empty({B, H, Lr, Lp}, q.options());
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *kp = k.data_ptr<BFloat16>(), *vp = v.data_ptr<BFloat16>();
  BFloat16 *op = out.data_ptr<BFloat16>(), *pp = probs.data_ptr<BFloat16>();
  const float scale = scaling;
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<BFloat16> kt(D * Lp, BFloat16(0)), kt_packed(D * Lp), vpad(Lp * D, BFloat16(0)), v_packed(Lp * D);
    std::vector<float> s(L * Lp), o(L * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, kh = t % KV;
      transpose(kp + b * k.stride(0) + kh * k.stride(1), L, D, k.stride(2), kt.data(), Lp);  // K^T [D, Lp]
      pack_b(kt.data(), kt_packed.data(), D, Lp, Lp);
      copy_rows(vp + b * v.stride(0) + kh * v.stride(1), L, D, v.stride(2), vpad.data());  // V [Lp, D]
      pack_b(vpad.data(), v_packed.data(), Lp, D, D);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        BFloat16* ph = pp + (b * H + h) * Lr * Lp;
        if (Lr > L) std::fill(ph + L * Lp, ph + Lr * Lp, BFloat16(0));
        const BFloat16* qh = qp + b * q.stride(0) + h * q.stride(1);
        for (int64_t r0 = 0; r0 < L; r0 += BM) {
          const int64_t r1 = std::min(r0 + BM, L);
          // S [r0:r1, keys 0..r1) = Q K^T, then the causal softmax; P [r0:r1] @ V over those keys only
          gemm(qh + r0 * q.stride(2), r1 - r0, q.stride(2), kt_packed.data(), D, Lp, 0, D, 0, round_up(r1, 32), s.data() + r0 * Lp, Lp, false);
          for (int64_t i = r0; i < r1; ++i) softmax_row(s.data() + i * Lp, i, Lp, scale, ph + i * Lp);
          gemm(ph + r0 * Lp, r1 - r0, Lp, v_packed.data(), Lp, D, 0, round_up(r1, 2), 0, D, o.data() + r0 * D, D, false);
        }
        for (int64_t i = 0; i < L; ++i) to_bf16(o.data() + i * D, op + ((b * L + i) * H + h) * D, D);
      }
    }
    cpublas::brgemm_release(true);
  });
  return {out, probs};
}

// grad [B, L, H, D] -> dq [B, H, L, D], dk and dv [B, KV, L, D], all contiguous.
std::vector<at::Tensor> backward(at::Tensor grad, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor probs, double scaling) {
  grad = grad.contiguous(), q = head_contiguous(q), k = head_contiguous(k), v = head_contiguous(v);
  const Dims d = dims_of(q, k);
  const int64_t B = d.B, H = d.H, KV = d.KV, G = d.G, L = d.L, D = d.D, Lr = d.Lr, Lp = d.Lp;
  TORCH_CHECK(probs.is_contiguous() && probs.size(2) == Lr && probs.size(3) == Lp, "probabilities of another shape");
  auto dq = at::empty({B, H, L, D}, q.options()), dk = at::empty({B, KV, L, D}, k.options()), dv = at::empty({B, KV, L, D}, v.options());
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *kp = k.data_ptr<BFloat16>(), *vp = v.data_ptr<BFloat16>();
  const BFloat16 *gp = grad.data_ptr<BFloat16>(), *pp = probs.data_ptr<BFloat16>();
  BFloat16 *dqp = dq.data_ptr<BFloat16>(), *dkp = dk.data_ptr<BFloat16>(), *dvp = dv.data_ptr<BFloat16>();
  const float scale = scaling;
  const int64_t ld_grad = H * D;
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    // Columns and rows past L stay zero: they pad the products' shared dimensions.
    std::vector<BFloat16> vt(D * Lp, BFloat16(0)), vt_packed(D * Lp), kpad(Lp * D, BFloat16(0)), k_packed(Lp * D),
        grad_t(D * Lr, BFloat16(0)), qt(D * Lr, BFloat16(0)), p_packed(Lr * Lp), ds(Lr * Lp, BFloat16(0)),
        ds_packed(Lr * Lp), staged(D * Lp);
    std::vector<float> dp(L * Lp), dqf(L * D), dkt(D * Lp), dvt(D * Lp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, kh = t % KV;
      transpose(vp + b * v.stride(0) + kh * v.stride(1), L, D, v.stride(2), vt.data(), Lp);  // V^T [D, Lp]
      pack_b(vt.data(), vt_packed.data(), D, Lp, Lp);
      copy_rows(kp + b * k.stride(0) + kh * k.stride(1), L, D, k.stride(2), kpad.data());  // K [Lp, D]
      pack_b(kpad.data(), k_packed.data(), Lp, D, D);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        const BFloat16* ph = pp + (b * H + h) * Lr * Lp;
        const BFloat16* gh = gp + b * L * ld_grad + h * D;  // this head's output gradient [L, D]
        const BFloat16* qh = qp + b * q.stride(0) + h * q.stride(1);
        // dV^T [D, Lp] += dO^T [D, Lr] @ P [Lr, Lp]: summed over the heads that share this value head.
        transpose(gh, L, D, ld_grad, grad_t.data(), Lr);
        pack_b(ph, p_packed.data(), Lr, Lp, Lp);
        for (int64_t c0 = 0; c0 < Lp; c0 += NB)  // queries before key c0 see none of keys c0..
          gemm(grad_t.data() + c0, D, Lr, p_packed.data(), Lr, Lp, c0, Lr - c0, c0, std::min(c0 + NB, Lp), dvt.data(), Lp, g > 0);
        // dP [L, Lp] = dO @ V^T, then dS = P * (dP - rowsum(P * dP)) * scale
        const Vec vs(scale);
        for (int64_t r0 = 0; r0 < L; r0 += BM) {
          const int64_t r1 = std::min(r0 + BM, L);
          gemm(gh + r0 * ld_grad, r1 - r0, ld_grad, vt_packed.data(), D, Lp, 0, D, 0, round_up(r1, 32), dp.data() + r0 * Lp, Lp, false);
          for (int64_t i = r0; i < r1; ++i) {
            float* r = dp.data() + i * Lp;
            const BFloat16* prow = ph + i * Lp;
            BFloat16* drow = ds.data() + i * Lp;
            const int64_t seen = std::min(Lp, round_up(i + 1, 2 * VL));  // P is zero past key i
            Vec acc(0.f);
            for (int64_t j = 0; j < seen; j += 2 * VL) {
              auto p = at::vec::convert_to_float<BFloat16>(BVec::loadu(prow + j));
              acc = acc + std::get<0>(p) * Vec::loadu(r + j) + std::get<1>(p) * Vec::loadu(r + j + VL);
            }
            const Vec dot(sum_of(acc));
            int64_t j = 0;
            for (; j < seen; j += 2 * VL) {
              auto p = at::vec::convert_to_float<BFloat16>(BVec::loadu(prow + j));
              Vec a = std::get<0>(p) * (Vec::loadu(r + j) - dot) * vs;
              Vec c = std::get<1>(p) * (Vec::loadu(r + j + VL) - dot) * vs;
              at::vec::convert_from_float<BFloat16>(a, c).store(drow + j);
            }
            for (; j < Lp; j += 2 * VL) BVec(BFloat16(0)).store(drow + j);
          }
          // dQ [r0:r1] = dS [r0:r1, keys 0..r1) @ K
          gemm(ds.data() + r0 * Lp, r1 - r0, Lp, k_packed.data(), Lp, D, 0, round_up(r1, 2), 0, D, dqf.data() + r0 * D, D, false);
        }
        to_bf16(dqf.data(), dqp + (b * H + h) * L * D, L * D);
        // dK^T [D, Lp] += Q^T [D, Lr] @ dS [Lr, Lp]
        transpose(qh, L, D, q.stride(2), qt.data(), Lr);
        pack_b(ds.data(), ds_packed.data(), Lr, Lp, Lp);
        for (int64_t c0 = 0; c0 < Lp; c0 += NB)
          gemm(qt.data() + c0, D, Lr, ds_packed.data(), Lr, Lp, c0, Lr - c0, c0, std::min(c0 + NB, Lp), dkt.data(), Lp, g > 0);
      }
      // [D, L] fp32 sums -> [L, D] bf16
      for (int64_t i = 0; i < D; ++i) to_bf16(dkt.data() + i * Lp, staged.data() + i * Lp, Lp);
      transpose(staged.data(), D, L, Lp, dkp + t * L * D, D);
      for (int64_t i = 0; i < D; ++i) to_bf16(dvt.data() + i * Lp, staged.data() + i * Lp, Lp);
      transpose(staged.data(), D, L, Lp, dvp + t * L * D, D);
    }
    cpublas::brgemm_release(true);
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported);
  m.def("forward", &forward);
  m.def("backward", &backward);
}
