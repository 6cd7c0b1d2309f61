// Decoding kernels for CPUs with AVX-512 BF16 and without AMX, built on first use by `openowl/infer/kernels.py`.
//
// A decoding step multiplies a few rows (one per sequence in the batch) by every weight, and attends one query per
// sequence to its cached keys and values. Both read far more bytes than they compute on, so their speed is the
// speed at which they stream memory. On such a CPU, oneDNN's bf16 GEMM re-packs each weight at every call and
// reads it well below the bandwidth with 8 rows, and PyTorch's CPU attention spends most of a one-token query on
// set-up; these two kernels stream the weights and the cache once (measured: docs/performance.md, Run G).
//
// openowl::small_linear(x, w): (M, K) @ (N, K)^T for a few rows; each output is the same sum whatever M is (a row
//     decoded alone and in a batch gets the same bits).
// openowl::small_linear_int8(x, w, scale): the same with int8 weights and one scale per output (weight-only int8).
// openowl::decode_attention(q, k, v, mask, scale): one query per (sequence, head) against its keys and values.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using bf16 = at::BFloat16;

constexpr int64_t kLanes = 32;              // bf16 values in one 512-bit register
constexpr int64_t kPrefetchAhead = 8192;    // weight elements (16 KB) prefetched ahead of the one being read
constexpr int64_t kMaxRows = 8;             // rows per pass over the weight

inline __m512bh load_bf16(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }

// 32 weights as bf16: bf16 weights as they are; int8 weights converted exactly (every int8 is a bf16).
inline __m512bh load_weights(const bf16* p) { return load_bf16(p); }

inline __m512bh load_weights(const int8_t* p) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

inline __m512 widen(const bf16* p) {  // 16 bf16 -> 16 fp32
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}

// out[m, n] = scale[n] * sum_k x[m, k] * w[n, k] for the M rows of x and the weight rows [n0, n1) (no scale: 1),
// R weight rows at a time: R * M fp32 accumulators, each fed 32 products per instruction, summed once at the end.
template <int M, int R, typename W>
void rows_times_weight(const bf16* x, const W* w, const bf16* scale, bf16* out, int64_t K, int64_t N, int64_t n0,
                       int64_t n1) {
  for (int64_t n = n0; n < n1; n += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kLanes) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) {
        const W* row = w + (n + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchAhead), _MM_HINT_T1);
        wv[r] = load_weights(row);
      }
      for (int m = 0; m < M; ++m) {
        __m512bh xv = load_bf16(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = scale ? static_cast<float>(scale[n + r]) : 1.f;
      for (int m = 0; m < M; ++m) out[m * N + n + r] = bf16(_mm512_reduce_add_ps(acc[r][m]) * s);
    }
  }
}

// bf16 weights and more than 4 rows: two passes over each block of 4 weight rows, the first 4 rows while the block
// streams in from memory, the others while it is still in the cache: one pass of 8 rows over 3 weight rows at a
// time barely overlaps its arithmetic with the loads, and the second pass reads from the cache rather than memory.
// int8 weights stay in one pass: the second would convert them again, which costs more than it saves (measured:
// docs/performance.md, Run H).
template <int M, typename W>
void small_linear_pass(const bf16* x, const W* w, const bf16* scale, bf16* out, int64_t K, int64_t N) {
  constexpr bool two_passes = M > 4 && std::is_same_v<W, bf16>;
  constexpr int R = M <= 4 || two_passes ? 4 : 3;  // as many weight rows as the registers allow beside the sums
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    if constexpr (two_passes) {
      for (int64_t b = b0; b < b1; ++b) {
        rows_times_weight<4, R>(x, w, scale, out, K, N, b * R, b * R + R);
        rows_times_weight<M - 4, R>(x + 4 * K, w, scale, out + 4 * N, K, N, b * R, b * R + R);
      }
    } else {
      rows_times_weight<M, R>(x, w, scale, out, K, N, b0 * R, b1 * R);
    }
  });
  for (int64_t n = blocks * R; n < N; ++n) rows_times_weight<M, 1>(x, w, scale, out, K, N, n, n + 1);
}

template <typename W>
void small_linear_passes(const at::Tensor& x, const W* w, const bf16* scale, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const bf16* xp = x.data_ptr<bf16>() + m0 * K;
    bf16* op = out.data_ptr<bf16>() + m0 * N;
    switch (std::min(kMaxRows, M - m0)) {
      case 1: small_linear_pass<1>(xp, w, scale, op, K, N); break;
      case 2: small_linear_pass<2>(xp, w, scale, op, K, N); break;
      case 3: small_linear_pass<3>(xp, w, scale, op, K, N); break;
      case 4: small_linear_pass<4>(xp, w, scale, op, K, N); break;
      case 5: small_linear_pass<5>(xp, w, scale, op, K, N); break;
      case 6: small_linear_pass<6>(xp, w, scale, op, K, N); break;
      case 7: small_linear_pass<7>(xp, w, scale, op, K, N); break;
      default: small_linear_pass<8>(xp, w, scale, op, K, N); break;
    }
  }
}

void check_cpu() {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "openowl's CPU kernels need AVX-512 BF16, which this CPU lacks");
}

void check_small_linear(const at::Tensor& x, const at::Tensor& w) {
  check_cpu();
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "small_linear: expected (M, K) and (N, K), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "small_linear: bf16 inputs only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_linear: contiguous tensors only");
  TORCH_CHECK(x.size(1) % kLanes == 0, "small_linear: the inner size must be a multiple of 32, got ", x.size(1));
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w) {
  check_small_linear(x, w);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "small_linear: bf16 weights only");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  small_linear_passes(x, w.data_ptr<bf16>(), nullptr, out);
  return out;
}

// Weight-only int8: x @ w^T * scale, one bf16 scale per output feature.
at::Tensor small_linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_small_linear(x, w);
  TORCH_CHECK(w.scalar_type() == at::kChar, "small_linear_int8: int8 weights only");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0) && scale.is_contiguous(),
              "small_linear_int8: one contiguous bf16 scale per output feature");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  small_linear_passes(x, w.data_ptr<int8_t>(), scale.data_ptr<bf16>(), out);
  return out;
}

// q: (B, H, 1, D); k, v: (B, Hkv, L, D) with H a multiple of Hkv, any strides but a contiguous last dimension;
// mask: None or bool (B or 1, 1, 1, L), true where a key is attended. -> (B, 1, H, D), the layout the attention
// module reshapes from. Scores and the softmax in fp32; the output accumulates in fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  check_cpu();
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: one query per row");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16, "decode_attention: bf16 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == L && k.size(3) == D &&
                  v.size(3) == D && H % Hkv == 0, "decode_attention: mismatched shapes");
  TORCH_CHECK(D % kLanes == 0 && D <= 256, "decode_attention: head size must be a multiple of 32, at most 256");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: contiguous heads only");
  const bool* mp = nullptr;
  int64_t mask_row = 0, mask_col = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == L, "decode_attention: mask must be bool (B, 1, 1, L)");
    mp = m.data_ptr<bool>();
    mask_row = m.size(0) == 1 ? 0 : m.stride(0);
    mask_col = m.stride(3);
  }
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  const int64_t group = H / Hkv, chunks = D / kLanes;
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, hk = h / group;
      const bf16* qh = qp + b * q.stride(0) + h * q.stride(1);
      const bf16* kh = kp + b * k.stride(0) + hk * k.stride(1);
      const bf16* vh = vp + b * v.stride(0) + hk * v.stride(1);
      __m512bh qv[256 / kLanes];
      for (int64_t c = 0; c < chunks; ++c) qv[c] = load_bf16(qh + c * kLanes);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t l = 0; l < L; ++l) {
        if (mp && !mp[b * mask_row + l * mask_col]) {
          p[l] = -std::numeric_limits<float>::infinity();
          continue;
        }
        for (int64_t c = 0; c < D * 2; c += 64)  // the value row, read by the second pass: in the cache by then
          _mm_prefetch(reinterpret_cast<const char*>(vh + l * v.stride(2)) + c, _MM_HINT_T0);
        __m512 s = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) s = _mm512_dpbf16_ps(s, qv[c], load_bf16(kh + l * k.stride(2) + c * kLanes));
        p[l] = _mm512_reduce_add_ps(s) * static_cast<float>(scale);
        top = std::max(top, p[l]);
      }
      __m512 acc[256 / 16];
      for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
      float total = 0.f;
      if (top != -std::numeric_limits<float>::infinity()) {  // a row with every key masked gives zeros
        for (int64_t l = 0; l < L; ++l) {
          const float e = std::exp(p[l] - top);
          if (e == 0.f) continue;
          total += e;
          const __m512 ev = _mm512_set1_ps(e);
          const bf16* vr = vh + l * v.stride(2);
          for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_fmadd_ps(ev, widen(vr + c * 16), acc[c]);
        }
      }
      const __m512 inv = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);
      bf16* oh = op + (b * H + h) * D;
      for (int64_t c = 0; c < D / 16; ++c) {
        alignas(64) float buf[16];
        _mm512_store_ps(buf, _mm512_mul_ps(acc[c], inv));
        for (int j = 0; j < 16; ++j) oh[c * 16 + j] = bf16(buf[j]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(openowl, m) {
  m.def("small_linear(Tensor x, Tensor w) -> Tensor");
  m.def("small_linear_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(openowl, CPU, m) {
  m.impl("small_linear", small_linear);
  m.impl("small_linear_int8", small_linear_int8);
  m.impl("decode_attention", decode_attention);
}
