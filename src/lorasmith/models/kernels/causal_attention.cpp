// Causal grouped-query attention for short rows on CPUs whose oneDNN has bf16 brgemm (AMX, or AVX512-BF16),
// forward and backward, each (row, key/value head) pair done in the core's cache. See models/cpu_attention.py
// for why it exists and how it is built and checked.
//
// Layouts: query [B, H, L, D], key and value [B, KV, L, D] (any strides, head dimension contiguous); out and
// the query gradient [B, L, H, D] (what the attention module transposes to anyway); lse [B, KV, Lr * G] fp32,
// each row's log-sum-exp, all the backward pass keeps to recompute the probabilities. Within a key/value head
// the G query heads that share it are rows (position, head): one product covers them all, and a block of
// positions needs the keys up to its last position only. Lr = L rounded up to 2 (oneDNN's VNNI layout packs
// rows in pairs), Lp = L rounded up to 32.
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
constexpr int64_t BP = 32;  // positions per block of rows: keys past a block's last position are skipped

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

// exp(x) for x <= 0 (scores minus their row's maximum): Cephes' polynomial on x - n ln 2, scaled by 2^n with
// scalef; ~1 ulp, far below the bf16 rounding the probabilities get. Written out because ATen's exp_u20 and
// the passes around it were half of the forward kernel's time.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bf16_to_float(const BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// Row i of scores (fp32, Lp wide) -> its causal softmax over keys 0..i, written as bf16 with zeros after;
// returns the row's log-sum-exp (of the scaled scores).
float softmax_row(float* row, int64_t i, int64_t Lp, float scale, BFloat16* out) {
  const int64_t n = i + 1;
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) m = _mm512_mask_max_ps(m, first(n - j), m, _mm512_loadu_ps(row + j));
  const float mx = _mm512_reduce_max_ps(m) * scale;
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(first(n - j), exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), vs, vm)));
    _mm512_storeu_ps(row + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (round_up(n, 16) < round_up(n, 32)) _mm512_storeu_ps(row + round_up(n, 16), _mm512_setzero_ps());
  const float sum = _mm512_reduce_add_ps(acc);
  const Vec inv(1.0f / sum);
  int64_t j = 0;
  for (; j < n; j += 2 * VL)  // zero past key i: masked or zeroed above
    at::vec::convert_from_float<BFloat16>(Vec::loadu(row + j) * inv, Vec::loadu(row + j + VL) * inv).store(out + j);
  for (; j < Lp; j += 2 * VL) BVec(BFloat16(0)).store(out + j);
  return mx + std::log(sum);
}

// The backward pass's probabilities, from the scores again and the forward's log-sum-exp: exp(s * scale - lse)
// over keys 0..i, bf16, zeros after (the same values the forward's normalisation gave, to fp32 rounding).
void probs_row(const float* row, int64_t i, int64_t Lp, float scale, float lse, BFloat16* out) {
  const int64_t n = i + 1;
  const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse);
  int64_t j = 0;
  for (; j < n; j += 2 * VL) {
    const __m512 a = _mm512_maskz_mov_ps(first(n - j), exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), vs, vl)));
    const __m512 c = n - j > VL ? _mm512_maskz_mov_ps(first(n - j - VL), exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j + VL), vs, vl)))
                                : _mm512_setzero_ps();
    at::vec::convert_from_float<BFloat16>(Vec(a), Vec(c)).store(out + j);
  }
  for (; j < Lp; j += 2 * VL) BVec(BFloat16(0)).store(out + j);
}

struct Dims {
  int64_t B, H, KV, G, L, D, Lr, Lp, R;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k) {
  Dims d;
  d.B = q.size(0), d.H = q.size(1), d.L = q.size(2), d.D = q.size(3), d.KV = k.size(1);
  d.G = d.H / d.KV, d.Lr = round_up(d.L, 2), d.Lp = round_up(d.L, 32), d.R = d.Lr * d.G;
  return d;
}

at::Tensor head_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// Key/value head h of row b, [L, D], as a packed B operand: as it is ([Lp, D]) or transposed ([D, Lp]). The rows or
// columns past L of ``staging`` are zero and stay so: they pad the products' shared dimension.
void pack_head(const at::Tensor& t, int64_t b, int64_t h, const Dims& d, bool transposed, BFloat16* staging, BFloat16* out) {
  const BFloat16* src = t.data_ptr<BFloat16>() + b * t.stride(0) + h * t.stride(1);
  if (transposed) {
    transpose(src, d.L, d.D, t.stride(2), staging, d.Lp);
    pack_b(staging, out, d.D, d.Lp, d.Lp);
  } else {
    copy_rows(src, d.L, d.D, t.stride(2), staging);
    pack_b(staging, out, d.Lp, d.D, d.D);
  }
}

// The G query heads of key/value head kh of row b as rows (position, head) [L * G, D].
void gather_query(const at::Tensor& q, int64_t b, int64_t kh, const Dims& d, BFloat16* dst) {
  const BFloat16* base = q.data_ptr<BFloat16>() + b * q.stride(0) + kh * d.G * q.stride(1);
  if (q.stride(1) == d.D) {  // q_proj's own layout, [B, L, H, D]: the group's heads are one run per position
    copy_rows(base, d.L, d.G * d.D, q.stride(2), dst);
    return;
  }
  for (int64_t i = 0; i < d.L; ++i)
    for (int64_t g = 0; g < d.G; ++g)
      std::memcpy(dst + (i * d.G + g) * d.D, base + g * q.stride(1) + i * q.stride(2), d.D * sizeof(BFloat16));
}

}  // namespace

bool supported() { return cpublas::could_pack(at::kBFloat16); }

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, double scaling) {
  q = head_contiguous(q), k = head_contiguous(k), v = head_contiguous(v);
  const Dims d = dims_of(q, k);
  const int64_t B = d.B, H = d.H, KV = d.KV, G = d.G, L = d.L, D = d.D, Lp = d.Lp, R = d.R;
  auto out = at::empty({B, L, H, D}, q.options());
  auto lse = at::zeros({B, KV, R}, q.options().dtype(at::kFloat));  // the padding position's rows stay 0
  BFloat16* op = out.data_ptr<BFloat16>();
  float* lp = lse.data_ptr<float>();
  const float scale = scaling;
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<BFloat16> qg(L * G * D), kt(D * Lp, BFloat16(0)), kt_packed(D * Lp), vpad(Lp * D, BFloat16(0)), v_packed(Lp * D);
    std::vector<BFloat16> pb(BP * G * Lp);
    std::vector<float> s(BP * G * Lp), o(BP * G * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, kh = t % KV;
      gather_query(q, b, kh, d, qg.data());
      pack_head(k, b, kh, d, true, kt.data(), kt_packed.data());  // K^T [D, Lp]
      pack_head(v, b, kh, d, false, vpad.data(), v_packed.data());  // V [Lp, D]
      for (int64_t p0 = 0; p0 < L; p0 += BP) {
        const int64_t p1 = std::min(p0 + BP, L), r0 = p0 * G, rows = (p1 - p0) * G;
        // S = Q K^T over keys 0..p1, the causal softmax per row, then P V over the same keys
        gemm(qg.data() + r0 * D, rows, D, kt_packed.data(), D, Lp, 0, D, 0, round_up(p1, 32), s.data(), Lp, false);
        for (int64_t r = 0; r < rows; ++r) lp[t * R + r0 + r] = softmax_row(s.data() + r * Lp, p0 + r / G, Lp, scale, pb.data() + r * Lp);
        gemm(pb.data(), rows, Lp, v_packed.data(), Lp, D, 0, round_up(p1, 2), 0, D, o.data(), D, false);
        for (int64_t i = p0; i < p1; ++i) to_bf16(o.data() + (i - p0) * G * D, op + ((b * L + i) * H + kh * G) * D, G * D);
      }
    }
    cpublas::brgemm_release(true);
  });
  return {out, lse};
}

// grad [B, L, H, D] -> query gradient [B, L, H, D], key and value gradients [B, KV, L, D], all contiguous.
std::vector<at::Tensor> backward(at::Tensor grad, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor lse, double scaling) {
  grad = grad.contiguous(), q = head_contiguous(q), k = head_contiguous(k), v = head_contiguous(v);
  const Dims d = dims_of(q, k);
  const int64_t B = d.B, H = d.H, KV = d.KV, G = d.G, L = d.L, D = d.D, Lp = d.Lp, R = d.R;
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.size(2) == R, "log-sum-exps of another shape");
  auto dq = at::empty({B, L, H, D}, q.options()), dk = at::empty({B, KV, L, D}, k.options()), dv = at::empty({B, KV, L, D}, v.options());
  const BFloat16* gp = grad.data_ptr<BFloat16>();
  const float* lp = lse.data_ptr<float>();
  BFloat16 *dqp = dq.data_ptr<BFloat16>(), *dkp = dk.data_ptr<BFloat16>(), *dvp = dv.data_ptr<BFloat16>();
  const float scale = scaling;
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    // Rows past L * G and columns past L stay zero: they pad the products' shared dimensions.
    std::vector<BFloat16> kt(D * Lp, BFloat16(0)), kt_packed(D * Lp), pb((BP * G + 1) * Lp);
    std::vector<BFloat16> vt(D * Lp, BFloat16(0)), vt_packed(D * Lp), kpad(Lp * D, BFloat16(0)), k_packed(Lp * D),
        gg(R * D, BFloat16(0)), qg(R * D, BFloat16(0)), ds((BP * G + 1) * Lp), gt(D * BP * G), qt(D * BP * G),
        p_packed(BP * G * Lp), ds_packed(BP * G * Lp), staged(D * Lp);
    std::vector<float> dp(BP * G * Lp), dqf(BP * G * D), dkt(D * Lp), dvt(D * Lp);
    const Vec vs(scale);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, kh = t % KV;
      pack_head(k, b, kh, d, true, kt.data(), kt_packed.data());  // K^T [D, Lp]
      pack_head(v, b, kh, d, true, vt.data(), vt_packed.data());  // V^T [D, Lp]
      pack_head(k, b, kh, d, false, kpad.data(), k_packed.data());  // K [Lp, D]
      for (int64_t i = 0; i < L; ++i)  // this group's output gradient as rows (position, head)
        std::memcpy(gg.data() + i * G * D, gp + ((b * L + i) * H + kh * G) * D, G * D * sizeof(BFloat16));
      gather_query(q, b, kh, d, qg.data());
      std::fill(dkt.begin(), dkt.end(), 0.f);
      std::fill(dvt.begin(), dvt.end(), 0.f);
      for (int64_t p0 = 0; p0 < L; p0 += BP) {
        const int64_t p1 = std::min(p0 + BP, L), r0 = p0 * G, rows = (p1 - p0) * G, keys = round_up(p1, 32);
        // P again: S = Q K^T over keys 0..p1, exp(S * scale - lse); rows rounded up to a pair are zero
        gemm(qg.data() + r0 * D, rows, D, kt_packed.data(), D, Lp, 0, D, 0, keys, dp.data(), Lp, false);
        for (int64_t r = 0; r < rows; ++r) probs_row(dp.data() + r * Lp, p0 + r / G, Lp, scale, lp[t * R + r0 + r], pb.data() + r * Lp);
        const int64_t pairs = round_up(rows, 2);
        if (pairs > rows) std::fill(pb.data() + rows * Lp, pb.data() + pairs * Lp, BFloat16(0));
        // dP = dO V^T over the same keys, then dS = P * (dP - rowsum(P * dP)) * scale
        gemm(gg.data() + r0 * D, rows, D, vt_packed.data(), D, Lp, 0, D, 0, keys, dp.data(), Lp, false);
        for (int64_t r = 0; r < rows; ++r) {
          const float* dpr = dp.data() + r * Lp;
          const BFloat16* prow = pb.data() + r * Lp;
          BFloat16* drow = ds.data() + r * Lp;
          const int64_t seen = std::min(Lp, round_up(p0 + r / G + 1, 2 * VL));  // P is zero past the row's key
          __m512 acc = _mm512_setzero_ps();
          for (int64_t j = 0; j < seen; j += VL) acc = _mm512_fmadd_ps(bf16_to_float(prow + j), _mm512_loadu_ps(dpr + j), acc);
          const Vec dot(_mm512_reduce_add_ps(acc));
          int64_t j = 0;
          for (; j < seen; j += 2 * VL) {
            Vec a = Vec(bf16_to_float(prow + j)) * (Vec::loadu(dpr + j) - dot) * vs;
            Vec c = Vec(bf16_to_float(prow + j + VL)) * (Vec::loadu(dpr + j + VL) - dot) * vs;
            at::vec::convert_from_float<BFloat16>(a, c).store(drow + j);
          }
          for (; j < Lp; j += 2 * VL) BVec(BFloat16(0)).store(drow + j);
        }
        // dQ = dS K over the same keys
        gemm(ds.data(), rows, Lp, k_packed.data(), Lp, D, 0, round_up(p1, 2), 0, D, dqf.data(), D, false);
        for (int64_t i = p0; i < p1; ++i) to_bf16(dqf.data() + (i - p0) * G * D, dqp + ((b * L + i) * H + kh * G) * D, G * D);
        // dV^T [D, keys] += dO^T [D, rows] @ P [rows, keys] and dK^T += Q^T @ dS: the block's rows, all the group's
        // heads in one product (rows rounded up to a pair: the padding position's rows are zero).
        transpose(gg.data() + r0 * D, pairs, D, D, gt.data(), pairs);
        pack_b(pb.data(), p_packed.data(), pairs, keys, Lp);
        gemm(gt.data(), D, pairs, p_packed.data(), pairs, keys, 0, pairs, 0, keys, dvt.data(), Lp, true);
        transpose(qg.data() + r0 * D, pairs, D, D, qt.data(), pairs);
        if (pairs > rows) std::fill(ds.data() + rows * Lp, ds.data() + pairs * Lp, BFloat16(0));
        pack_b(ds.data(), ds_packed.data(), pairs, keys, Lp);
        gemm(qt.data(), D, pairs, ds_packed.data(), pairs, keys, 0, pairs, 0, keys, dkt.data(), Lp, true);
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
