// LoRA's rank-r gradient products on AMX tiles: q^T p, and with it q @ bt, in one pass over q.
//
// Why a kernel of our own: in a LoRA layer's backward pass the big operand q ([tokens, width]: the output gradient
// dY, or the layer's input x) meets a rank-r one twice, B's gradient dY^T h and the rank-r input gradient dY @ B
// (the same dY), and A's gradient dh^T x. oneDNN runs the contractions over the tokens (q^T p) with q transposed at
// about a third of the rate it reads memory (AMX Xeon, [896, 1536] x 16: 0.43 ms where reading dY takes 0.13), and
// reads dY once more for dY @ B. Here each block of 32 rows of q is read once: its two 16-row halves are the A
// tiles of q @ bt, and its rows, interleaved in pairs (AMX's bf16 layout), the B tiles of p^T q. Products
// accumulate in fp32 and are rounded to bf16 once, as oneDNN's are.
//
// Tiles (AMX has 8): 0, 1 accumulate q @ bt for rows 0-15 and 16-31 of a block (rj fp32 columns); 2, 3 accumulate
// p^T q for columns c..c+15 and c+16..c+31 (rj rows of 16 fp32), loaded from and stored to the thread's fp32 sums;
// 4 holds 16 rows x 32 columns of q; 5 32 rows of bt as pairs; 6 p^T for the block's 32 rows; 7 16 row pairs of q.
// p's columns are taken 16 at a time (a tile's rows), q read again for each further 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace {

using at::BFloat16;
constexpr int64_t BM = 32;  // rows of q per block
constexpr int64_t BN = 32;  // columns of q per step

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out AMX's tile state to a process that asks (oneDNN asks too, on first use of AMX).
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

void configure(int64_t rj) {
  TileConfig cfg;
  for (int t : {0, 1}) cfg.rows[t] = 16, cfg.colsb[t] = rj * 4;
  for (int t : {2, 3}) cfg.rows[t] = rj, cfg.colsb[t] = 64;
  cfg.rows[4] = 16, cfg.colsb[4] = 64;
  cfg.rows[5] = 16, cfg.colsb[5] = rj * 4;
  cfg.rows[6] = rj, cfg.colsb[6] = 64;
  cfg.rows[7] = 16, cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
}

// One block of BM rows of q (row stride ldq): pt its rows of p^T (row stride ldpt), btp bt's pairs for this pass's
// rj columns, dh the block's [BM, 16] fp32 q @ bt (with_dh), acc the thread's [N / 16][rj][16] fp32 sums of p^T q.
void block(const BFloat16* q, int64_t ldq, int64_t N, const BFloat16* pt, int64_t ldpt, const BFloat16* btp, int64_t rj,
           float* dh, float* acc, bool with_dh) {
  alignas(64) BFloat16 pairs[2][16 * 32];
  // (a[0], b[0], a[1], b[1], ...) from a 32-bit lane pair: row 2k and row 2k+1 of 16 columns, interleaved
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _tile_loadd(6, pt, ldpt * 2);
  if (with_dh) {
    _tile_zero(0);
    _tile_zero(1);
  }
  for (int64_t c = 0; c < N; c += BN) {
    if (with_dh) {
      _tile_loadd(5, btp + c * rj, rj * 4);
      _tile_loadd(4, q + c, ldq * 2);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(4, q + 16 * ldq + c, ldq * 2);
      _tile_dpbf16ps(1, 4, 5);
    }
    for (int64_t k = 0; k < 16; ++k) {  // rows 2k, 2k+1; columns c..c+15 into pairs[0], c+16..c+31 into pairs[1]
      const __m512i a = _mm512_loadu_si512(q + 2 * k * ldq + c), b = _mm512_loadu_si512(q + (2 * k + 1) * ldq + c);
      _mm512_store_si512(pairs[0] + k * 32,
                         _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(a, _mm512_castsi512_si256(b), 1)));
      _mm512_store_si512(pairs[1] + k * 32,
                         _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(b, _mm512_extracti64x4_epi64(a, 1), 0)));
    }
    float* sums = acc + (c / 16) * rj * 16;
    _tile_loadd(2, sums, 64);
    _tile_loadd(7, pairs[0], 64);
    _tile_dpbf16ps(2, 6, 7);
    _tile_stored(2, sums, 64);
    _tile_loadd(3, sums + rj * 16, 64);
    _tile_loadd(7, pairs[1], 64);
    _tile_dpbf16ps(3, 6, 7);
    _tile_stored(3, sums + rj * 16, 64);
  }
  if (with_dh) {
    _tile_stored(0, dh, 64);
    _tile_stored(1, dh + 16 * 16, 64);
  }
}

}  // namespace

bool supported() { return amx_permitted(); }

// q [M, N] (N a multiple of 32), p [M, r] -> q^T p [N, r]; with bt [N, r], also q @ bt [M, r]. All bf16.
std::vector<at::Tensor> lora_grads(const at::Tensor& q_in, const at::Tensor& p_in, const c10::optional<at::Tensor>& bt_in) {
  TORCH_CHECK(amx_permitted(), "lorasmith's LoRA gradient kernel needs AMX tiles");
  const auto q = q_in.stride(1) == 1 ? q_in : q_in.contiguous();
  const auto p = p_in.contiguous();
  const int64_t M = q.size(0), N = q.size(1), r = p.size(1), ldq = q.stride(0);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && p.scalar_type() == at::kBFloat16 && p.size(0) == M && N % BN == 0,
              "lora_grads: bf16 q [M, N] with N a multiple of 32 and p [M, r]");
  const bool with_dh = bt_in.has_value();
  const auto bt = with_dh ? bt_in->contiguous() : at::Tensor();
  TORCH_CHECK(!with_dh || (bt.scalar_type() == at::kBFloat16 && bt.size(0) == N && bt.size(1) == r), "lora_grads: bt [N, r]");
  const int64_t Mp = (M + BM - 1) / BM * BM, blocks = Mp / BM;
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  auto out = at::empty({N, r}, q.options());
  auto dh = with_dh ? at::empty({M, r}, q.options()) : at::Tensor();
  std::vector<float> acc(nthreads * N * 16);
  std::vector<BFloat16> pt(16 * Mp), btp(with_dh ? N * 16 : 0), tail(M % BM ? BM * N : 0);
  const BFloat16 *qd = q.data_ptr<BFloat16>(), *pd = p.data_ptr<BFloat16>();
  const BFloat16* bd = with_dh ? bt.data_ptr<BFloat16>() : nullptr;
  BFloat16* dhd = with_dh ? dh.data_ptr<BFloat16>() : nullptr;
  BFloat16* o = out.data_ptr<BFloat16>();
  if (M % BM) {  // the last block's rows, zero-padded to BM
    const int64_t m0 = M / BM * BM;
    for (int64_t i = m0; i < M; ++i) std::memcpy(tail.data() + (i - m0) * N, qd + i * ldq, N * sizeof(BFloat16));
  }
  for (int64_t j0 = 0; j0 < r; j0 += 16) {
    const int64_t rj = std::min<int64_t>(16, r - j0);
    if (with_dh)  // bt's columns j0..j0+rj as row pairs: btp[n / 2][j][n % 2]
      at::parallel_for(0, N / 2, 64, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t j = 0; j < rj; ++j) {
            btp[(k * rj + j) * 2] = bd[2 * k * r + j0 + j];
            btp[(k * rj + j) * 2 + 1] = bd[(2 * k + 1) * r + j0 + j];
          }
      });
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      configure(rj);
      alignas(64) float dhf[BM * 16];
      for (int64_t t = t0; t < t1; ++t) {
        float* sums = acc.data() + t * N * 16;
        std::fill(sums, sums + N * rj, 0.f);
        const int64_t b0 = blocks * t / nthreads, b1 = blocks * (t + 1) / nthreads;
        for (int64_t i = b0 * BM; i < b1 * BM; ++i)  // p^T for this thread's rows, zero past M
          for (int64_t j = 0; j < rj; ++j) pt[j * Mp + i] = i < M ? pd[i * r + j0 + j] : BFloat16(0);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * BM;
          const bool last = m0 + BM > M;
          block(last ? tail.data() : qd + m0 * ldq, last ? N : ldq, N, pt.data() + m0, Mp, btp.data(), rj, dhf, sums, with_dh);
          if (with_dh)
            for (int64_t i = 0; i < std::min(BM, M - m0); ++i)
              for (int64_t j = 0; j < rj; ++j) dhd[(m0 + i) * r + j0 + j] = BFloat16(dhf[i * 16 + j]);
        }
      }
      // Tiles released, and ATen's record of the brgemm whose tile layout is loaded cleared: its next brgemm (the
      // attention kernel's) configures the tiles again rather than running on this kernel's layout.
      at::native::cpublas::brgemm_release(true);
    });
    at::parallel_for(0, N / 16, 8, [&](int64_t c0, int64_t c1) {  // the threads' sums -> out[n, j0 + j]
      alignas(64) float v[16];
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t j = 0; j < rj; ++j) {
          __m512 s = _mm512_loadu_ps(acc.data() + (c * rj + j) * 16);
          for (int64_t t = 1; t < nthreads; ++t) s = _mm512_add_ps(s, _mm512_loadu_ps(acc.data() + t * N * 16 + (c * rj + j) * 16));
          _mm512_store_ps(v, s);
          for (int k = 0; k < 16; ++k) o[(c * 16 + k) * r + j0 + j] = BFloat16(v[k]);
        }
    });
  }
  return {out, dh};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_grads", &lora_grads, "q^T p, and q @ bt where given, for bf16 LoRA gradients on AMX");
  m.def("supported", &supported, "whether this process may use AMX tiles");
}
