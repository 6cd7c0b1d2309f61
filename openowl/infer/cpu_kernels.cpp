// Decoding kernels for CPUs with AVX-512 BF16 (and VNNI), built on first use by `openowl/infer/kernels.py`.
//
// A decoding step multiplies a few rows (one per sequence in the batch) by every weight, and attends one query per
// sequence to its cached keys and values. Both read far more bytes than they compute on, so their speed is the
// speed at which they stream memory. oneDNN's bf16 products read the weights well below the bandwidth with a few
// rows (on an AMX CPU too, with 1-4 rows), and PyTorch's CPU attention spends most of a one-token query on set-up
// on a CPU without AMX; these kernels stream the weights and the cache once (measured: docs/performance.md, Run G,
// Run H and Run J).
//
// openowl::small_linear(x, w): (M, K) @ (N, K)^T for a few rows; each output is the same sum whatever M is (a row
//     decoded alone and in a batch gets the same bits).
// openowl::small_linear_int8(x, w, scale): the same with int8 weights and one scale per output (weight-only int8):
//     the int8 weights multiplied as they are by the rows in fixed point (AVX-512 VNNI), or converted to bf16.
// openowl::decode_attention(q, k, v, mask, scale): one query per (sequence, head) against its keys and values.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

// Weight-only int8 on AVX-512 VNNI: the rows become fixed point and the int8 weights are multiplied as they are.
//
// Converting each int8 weight to bf16 costs several instructions per 32 weights, more than reading them from memory
// takes (measured: docs/performance.md, Run J). Instead each row x is written once per call as integers
// X = round(x * 2^s) below 2^23 in size, s chosen per row from its largest |x|, offset to U = X + 2^23 and split into
// kDigits unsigned bytes; vpdpbusd multiplies 64 of those bytes by 64 int8 weights per instruction and sums them in
// int32. sum_k w_k X_k = sum_j 256^j sum_k w_k U_jk - 2^23 sum_k w_k is then exact in int64, and scaled once in
// double. Every x within 2^16 of its row's largest is exact in 24 bits (a bf16 has 8 significant bits); smaller ones
// are rounded to 2^-24 of the largest, less than float32's own rounding of the sum. The result is the exact product
// of those rows, rounded once to bf16: per row alone, whatever else is in the batch.
constexpr int kDigits = 3;
constexpr int64_t kFixedLanes = 64;  // bytes per 512-bit register
constexpr int32_t kOffset = 1 << 23;

struct FixedRows {
  std::vector<uint8_t> digits;  // (M, kDigits, K)
  std::vector<double> unit;     // 2^-s per row
};

// false where a row holds inf or NaN (the conversion path then carries them through, as PyTorch's product does) or is
// too small for a float scale (|x| < 2^-104).
bool to_fixed(const bf16* x, int64_t M, int64_t K, FixedRows& rows) {
  rows.digits.resize(M * kDigits * K);
  rows.unit.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    const bf16* xm = x + m * K;
    __m512i top_bits = _mm512_setzero_si512();  // |x| as bits: ordered as the magnitudes are, inf and NaN on top
    for (int64_t k = 0; k < K; k += kLanes)
      top_bits = _mm512_max_epu16(top_bits, _mm512_and_si512(_mm512_loadu_si512(xm + k), _mm512_set1_epi16(0x7fff)));
    alignas(64) uint16_t lanes[kLanes];
    _mm512_store_si512(lanes, top_bits);
    const uint16_t top = *std::max_element(lanes, lanes + kLanes);
    if (top >= 0x7f80) return false;
    int e = 0;
    std::frexp(static_cast<float>(c10::BFloat16(top, c10::BFloat16::from_bits())), &e);  // |x| < 2^e
    const int s = 23 - e;  // so |x| * 2^s < 2^23
    if (s > 127) return false;
    rows.unit[m] = std::ldexp(1.0, -s);
    const __m512 factor = _mm512_set1_ps(std::ldexp(1.f, s));
    const __m512i offset = _mm512_set1_epi32(kOffset);
    uint8_t* d = rows.digits.data() + m * kDigits * K;
    for (int64_t k = 0; k < K; k += 16) {  // rounded to nearest (even), as the CPU rounds by default
      const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(widen(xm + k), factor)), offset);
      for (int j = 0; j < kDigits; ++j)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j * K + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8 * j)));
    }
  }
  return true;
}

// One output from a row's digit sums (sum_k w_k U_jk for each digit j) and sum_k w_k: the exact integer sum, scaled
// once in double, rounded once to bf16.
inline bf16 fixed_result(const int64_t (&sums)[kDigits], int64_t weight_sum, double unit, const bf16 scale) {
  int64_t total = -static_cast<int64_t>(kOffset) * weight_sum;
  for (int j = 0; j < kDigits; ++j) total += sums[j] << (8 * j);
  return bf16(static_cast<float>(static_cast<double>(total) * unit * static_cast<double>(static_cast<float>(scale))));
}

// out[m, n] for the M rows' digits and the weight rows [n0, n1), R weight rows at a time.
template <int M, int R>
void fixed_rows_times_int8(const FixedRows& rows, int64_t m0, const int8_t* w, const bf16* scale, bf16* out,
                           int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t* d = rows.digits.data() + m0 * kDigits * K;
  for (int64_t n = n0; n < n1; n += R) {
    __m512i acc[R][M][kDigits], sum[R];
    for (int r = 0; r < R; ++r) {
      sum[r] = _mm512_setzero_si512();
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < kDigits; ++j) acc[r][m][j] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < K; k += kFixedLanes) {
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        const int8_t* row = w + (n + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchAhead), _MM_HINT_T1);
        wv[r] = _mm512_loadu_si512(row);
        sum[r] = _mm512_dpbusd_epi32(sum[r], ones, wv[r]);
      }
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < kDigits; ++j) {
          const __m512i xv = _mm512_loadu_si512(d + (m * kDigits + j) * K + k);
          for (int r = 0; r < R; ++r) acc[r][m][j] = _mm512_dpbusd_epi32(acc[r][m][j], xv, wv[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t weight_sum = _mm512_reduce_add_epi32(sum[r]);
      for (int m = 0; m < M; ++m) {
        int64_t sums[kDigits];
        for (int j = 0; j < kDigits; ++j) sums[j] = _mm512_reduce_add_epi32(acc[r][m][j]);
        out[m * N + n + r] = fixed_result(sums, weight_sum, rows.unit[m0 + m], scale[n + r]);
      }
    }
  }
}

// Up to 4 rows in one pass over the weight; 5-8 rows take a second pass over each block of weight rows while it is
// still in the cache (as `small_linear_pass` does for bf16).
template <int M>
void fixed_pass(const FixedRows& rows, int64_t m0, const int8_t* w, const bf16* scale, bf16* out, int64_t K, int64_t N) {
  constexpr int first = M > 4 ? 4 : M, second = M - first;
  constexpr int R = first == 1 ? 4 : first == 2 ? 3 : 2;  // as many weight rows as the registers allow beside the sums
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      fixed_rows_times_int8<first, R>(rows, m0, w, scale, out + m0 * N, K, N, b * R, b * R + R);
      if constexpr (second > 0)
        fixed_rows_times_int8<second, R>(rows, m0 + first, w, scale, out + (m0 + first) * N, K, N, b * R, b * R + R);
    }
  });
  for (int64_t n = blocks * R; n < N; ++n) {
    fixed_rows_times_int8<first, 1>(rows, m0, w, scale, out + m0 * N, K, N, n, n + 1);
    if constexpr (second > 0) fixed_rows_times_int8<second, 1>(rows, m0 + first, w, scale, out + (m0 + first) * N, K, N, n, n + 1);
  }
}

bool has_vnni() { return __builtin_cpu_supports("avx512vnni"); }

// The same fixed-point product on AMX-INT8 tiles, for 5-8 rows (`OPENOWL_INT8_AMX_ROWS` moves the bound; tests
// compare the two paths): 16 weight rows x 64 inputs, as stored, are the tiles' signed operand; the rows' digits
// (and a column of ones, for sum_k w_k) are the unsigned one, 16 columns of 4 consecutive inputs per tile, laid out
// once per call. One tile product does the work of 16 x 16 vpdpbusd, so 8 rows read the weights as fast as one
// does here, where the AVX-512 path slows down with every row (measured: docs/performance.md, Run J). The integer
// sums are those of the AVX-512 path, and so are the results, bit for bit.
constexpr int kInt8AmxRows = 5;  // 1-4 rows stream as fast or faster on AVX-512 (docs/performance.md, Run J)
// Compilers that know AMX (the tiles' code is left out of older ones, which then run the AVX-512 path).
#if defined(__clang__)
#define OPENOWL_AMX_CODE (__clang_major__ >= 12)
#else
#define OPENOWL_AMX_CODE (__GNUC__ >= 11)
#endif
#if OPENOWL_AMX_CODE
#define OPENOWL_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))

bool has_amx_int8() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA (Linux)
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

OPENOWL_AMX void configure_tiles() {  // 8 tiles of 16 rows x 64 bytes, for this thread
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// The digits of the M rows as B tiles: per 64 inputs and tile, 16 rows (groups of 4 inputs) x 16 columns
// (row m's digit j in column 3m + j, ones in the last column used, zeros after). -> (tiles, K / 64, 16, 16) uint32
std::vector<uint32_t> digit_tiles(const FixedRows& rows, int M, int64_t K, int tiles) {
  std::vector<uint32_t> b(static_cast<size_t>(tiles) * K / 4 * 16, 0);
  const int64_t groups = K / 4;
  for (int col = 0; col <= 3 * M; ++col) {
    uint32_t* dst = b.data() + (col / 16) * groups * 16 + col % 16;
    if (col == 3 * M) {
      for (int64_t g = 0; g < groups; ++g) dst[g * 16] = 0x01010101u;
      continue;
    }
    const uint32_t* src = reinterpret_cast<const uint32_t*>(rows.digits.data() + ((col / 3) * kDigits + col % 3) * K);
    for (int64_t g = 0; g < groups; ++g) dst[g * 16] = src[g];
  }
  return b;
}

void finish_fixed(const int32_t* c, const FixedRows& rows, int M, const bf16* scale, int64_t n, int64_t N,
                  bf16* out) {  // c: one weight row's 16 or 32 columns of sums
  for (int m = 0; m < M; ++m) {
    int64_t sums[kDigits];
    for (int j = 0; j < kDigits; ++j) sums[j] = c[3 * m + j];
    out[m * N + n] = fixed_result(sums, c[3 * M], rows.unit[m], scale[n]);
  }
}

// Weight rows [n0, n1) (a multiple of 16 apart) against T digit tiles: T = 1, 4 weight tiles at a time; T = 2, two.
template <int T>
OPENOWL_AMX void amx_fixed_rows(const FixedRows& rows, int M, const uint32_t* b, const int8_t* w,
                                const bf16* scale, bf16* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  configure_tiles();
  constexpr int per = T == 1 ? 4 : 2;  // weight tiles per step: per x T sums in tiles 0-3
  const int64_t groups = K / 4;
  alignas(64) int32_t c[4][16][16];
  for (int64_t n = n0; n < n1; n += 16 * per) {
    const int count = static_cast<int>(std::min<int64_t>(per, (n1 - n) / 16));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < K; k += 64) {
      const int8_t* a = w + n * K + k;
      _tile_loadd(6, b + (k / 4) * 16, 64);
      if constexpr (T == 2) _tile_loadd(7, b + groups * 16 + (k / 4) * 16, 64);
      for (int r = 0; r < 16 * count; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * K + 256), _MM_HINT_T0);
      if constexpr (T == 1) {
        _tile_loadd(4, a, K);
        _tile_dpbsud(0, 4, 6);
        if (count > 1) { _tile_loadd(5, a + 16 * K, K); _tile_dpbsud(1, 5, 6); }
        if (count > 2) { _tile_loadd(4, a + 32 * K, K); _tile_dpbsud(2, 4, 6); }
        if (count > 3) { _tile_loadd(5, a + 48 * K, K); _tile_dpbsud(3, 5, 6); }
      } else {
        _tile_loadd(4, a, K);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
        if (count > 1) { _tile_loadd(5, a + 16 * K, K); _tile_dpbsud(2, 5, 6); _tile_dpbsud(3, 5, 7); }
      }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    for (int i = 0; i < count; ++i)
      for (int r = 0; r < 16; ++r) {
        alignas(64) int32_t cols[32];
        if constexpr (T == 1) {
          std::memcpy(cols, c[i][r], 64);
        } else {
          std::memcpy(cols, c[2 * i][r], 64);
          std::memcpy(cols + 16, c[2 * i + 1][r], 64);
        }
        finish_fixed(cols, rows, M, scale, n + i * 16 + r, N, out);
      }
  }
  _tile_release();
}

#else
bool has_amx_int8() { return false; }
#endif

// Weight-only int8: x @ w^T * scale, one bf16 scale per output feature. The fixed-point path where the CPU has
// AVX-512 VNNI and the inner size is a multiple of 64 (on AMX tiles for 5-8 rows, the outputs a multiple of 16
// and the inner size at most 65536, so that int32 sums stay exact); otherwise (or for rows with inf / NaN) each
// weight is converted to bf16.
at::Tensor small_linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_small_linear(x, w);
  TORCH_CHECK(w.scalar_type() == at::kChar, "small_linear_int8: int8 weights only");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0) && scale.is_contiguous(),
              "small_linear_int8: one contiguous bf16 scale per output feature");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  FixedRows rows;
  if (!(has_vnni() && K % kFixedLanes == 0 && K < (1 << 20) && to_fixed(x.data_ptr<bf16>(), M, K, rows))) {
    small_linear_passes(x, w.data_ptr<int8_t>(), scale.data_ptr<bf16>(), out);  // (int32 sums stay exact below 2^20)
    return out;
  }
  const int8_t* wp = w.data_ptr<int8_t>();
  const bf16* sp = scale.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
#if OPENOWL_AMX_CODE
  const char* amx_env = std::getenv("OPENOWL_INT8_AMX_ROWS");  // from how many rows the tiles run (9: never)
  const int amx_from = amx_env ? std::atoi(amx_env) : kInt8AmxRows;
  if (M >= amx_from && M <= kMaxRows && N % 16 == 0 && K <= 65536 && has_amx_int8()) {
    const int m = static_cast<int>(M), T = 3 * m + 1 <= 16 ? 1 : 2, block = T == 1 ? 64 : 32;
    const std::vector<uint32_t> b = digit_tiles(rows, m, K, T);
    at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * block, n1 = std::min(N, b1 * block);
      if (T == 1) amx_fixed_rows<1>(rows, m, b.data(), wp, sp, op, K, N, n0, n1);
      else amx_fixed_rows<2>(rows, m, b.data(), wp, sp, op, K, N, n0, n1);
    });
    return out;
  }
#endif
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    switch (std::min(kMaxRows, M - m0)) {
      case 1: fixed_pass<1>(rows, m0, wp, sp, op, K, N); break;
      case 2: fixed_pass<2>(rows, m0, wp, sp, op, K, N); break;
      case 3: fixed_pass<3>(rows, m0, wp, sp, op, K, N); break;
      case 4: fixed_pass<4>(rows, m0, wp, sp, op, K, N); break;
      case 5: fixed_pass<5>(rows, m0, wp, sp, op, K, N); break;
      case 6: fixed_pass<6>(rows, m0, wp, sp, op, K, N); break;
      case 7: fixed_pass<7>(rows, m0, wp, sp, op, K, N); break;
      default: fixed_pass<8>(rows, m0, wp, sp, op, K, N); break;
    }
  }
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
