// Few-row linears on x86 CPUs with AVX-512: y[M, N] = x[M, K] @ W[N, K]^T for M <= 8 (decode, draft, verify).
// At these M a linear only has to read its weight once, so the kernel is written around the read: four weight rows
// at a time (one contiguous chunk of memory), every activation row applied to each weight vector while it is in a
// register, fp32 accumulation, and a software prefetch PREFETCH_BYTES ahead, because the hardware prefetcher alone
// does not follow four short row streams (measured: 17 GB/s a core without it, 30 with it, on a 43 GB/s core).
// Weights: bf16 or fp32 (dense), int8 with a scale per row (rows as in quantize.py's file), int4 with a scale and zero
// per group of columns, dequantized as (q - 8) * scale + zero, its rows interleaved 16 at a time (below). Each linear
// op takes up to three weights of one K (wq/wk/wv, w1/w3) and returns their outputs side by side: one call, so one fork
// and join of the threads, reads them all; the swiglu and attention ops run a layer's MLP, and its attention with wo,
// each in one parallel region, and the layer op a whole layer. Every op reads its weights through one of three
// format structs (DenseFormat, Int8Format, Int4Format), chosen by the weights' dtype (with_format).
// tests/test_cpu_kernels.py checks each against the path it replaces.
// The tensor class, empty() and the op registry only: the first build takes 9.8 s on 2 cores, against 12.9 s with
// ATen/ATen.h (every ATen function) and 29 s with torch/extension.h (pybind, autograd, the whole C++ frontend), and
// the ops need neither (they are registered with TORCH_LIBRARY, not as a module).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int R = 4;                 // weight rows per block
constexpr int MAX_M = 8;
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif

inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// Where the software prefetches put the weights: the first-level cache (false) or the second (true). Which streams
// faster from memory depends on the CPU (measured on a Xeon with AMX: 21 GB/s into L1, 28 into L2, for a bf16 weight
// from DRAM on 2 cores), so cpu_linear's probe chooses it per machine (set_prefetch_l2).
bool prefetch_l2 = false;

inline void prefetch(const char* p) {
  if (prefetch_l2) _mm_prefetch(p, _MM_HINT_T1);
  else _mm_prefetch(p, _MM_HINT_T0);
}

inline void prefetch_lines(const char* p, int lines) {
  for (int i = 0; i < lines; ++i) prefetch(p + 64 * i);
}

// Dense rows: out[r * MC + m] = sum_k w[r, k] * x[m, k]
template <typename W, int MC>
inline void block_dot(const W* w, int64_t K, const float* x, float* out) {
  constexpr int step_bytes = R * 16 * sizeof(W);
  const char* ahead = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  __m512 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    prefetch_lines(ahead + (k / 16) * step_bytes, step_bytes / 64 > 0 ? step_bytes / 64 : 1);
    __m512 xv[MC];
    for (int m = 0; m < MC; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      __m512 wv = load16(w + r * K + k);
      for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[r * MC + m] = _mm512_reduce_add_ps(acc[r][m]);
}

// The sums of four accumulators, as one vector [a, b, c, d].
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// int8 rows against x rounded to int16, one scale per row (dx = max|x| / 32767; the rounding is within bf16's own
// for all but elements under 1/128 of the row's largest, and those weigh little in the sum): 32 products a vpdpwssd
// after one sign extension of the weights, where converting each weight to float took three instructions per 16
// (the float kernel was bound by them at ~30 GB/s a core, under the memory's rate; BENCHMARKS.md). An int32 lane
// takes 2 of every 32 columns, so over INT16_CHUNK columns it sums 256 products of at most 128 * 32767: under 2^31.
struct Int16Rows {
  const int16_t* x;  // [M, K]
  const float* dx;   // [M]
};
constexpr int64_t INT16_CHUNK = 4096;

inline __m512i dot_s16(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

template <int MC>
inline void block_int8(const int8_t* w, int64_t K, const Int16Rows& xr, int64_t m0, float* out) {
  const char* ahead = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  __m512 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += INT16_CHUNK) {
    __m512i sums[R][MC];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) sums[r][m] = _mm512_setzero_si512();
    for (int64_t k = k0; k < std::min(K, k0 + INT16_CHUNK); k += 32) {
      prefetch_lines(ahead + k * R, R / 2);
      __m512i xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = _mm512_loadu_si512(xr.x + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
        for (int m = 0; m < MC; ++m) sums[r][m] = dot_s16(sums[r][m], wv, xv[m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_add_ps(acc[r][m], _mm512_cvtepi32_ps(sums[r][m]));
  }
  for (int m = 0; m < MC; ++m) {
    alignas(16) float total[4];
    _mm_store_ps(total, _mm_mul_ps(sum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]), _mm_set1_ps(xr.dx[m0 + m])));
    for (int r = 0; r < R; ++r) out[r * MC + m] = total[r];
  }
}

// int4 (llama.cpp's Q4 x Q8 scheme). Per call, each activation row is quantized to int8 in blocks of 32 columns
// (xq = round(x / dx), dx = max|x| / 127), so that a block's products q * xq are integer dot products (VNNI vpdpbusd,
// the nibbles its unsigned operand). Then
//     sum_k w_k x_k ~ sum_blocks dx_b * (s_g * sum_b q_k xq_k + (z_g - 8 s_g) * sum_b xq_k)
// for the block's group g. The weights come interleaved 16 rows at a time (cpu_kernels.interleave_int4): 64 bytes hold
// 4 bytes (8 columns) of each of 16 rows, so one vpdpbusd against 4 activation bytes broadcast to every lane adds 4
// products to each of the 16 rows, and the rows' sums end in the 16 lanes of one vector: no horizontal sum, one scale
// vector per group for 16 rows, and a block of rows is one contiguous stream. Reading each row's bytes in turn
// instead (the file's layout) took ~1.7x the instructions per byte and left one core at 20-27 GB/s in cache
// (BENCHMARKS.md). The scales and zeros are interleaved alike: per 16 rows and group, 16 scales then 16 zeros.
// The rounding of x is the one approximation (tests/test_cpu_kernels.py checks it against exact x and torch's kernel;
// BENCHMARKS.md has its perplexity cost).
constexpr int BLOCK = 32;         // activation columns per int8 scale
constexpr int INT4_ROWS = 16;     // weight rows interleaved, one per int32 lane

inline __m512i dot_u8_s8(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// A 64-byte step's high nibbles as the dot product's unsigned operand. With VNNI, v & 0xF0: 16 times each nibble,
// which the block's sum divides out exactly (16 products of at most 16 x 15 x 127 a lane): one shift less per 64
// bytes, ~10% faster in cache on a Xeon with AMX, which counts where int4 decode is bound by these instructions
// rather than by the memory read (the AMD EPYC; BENCHMARKS.md). Without VNNI, maddubs would saturate on the 16x
// values, so they are shifted down.
#ifdef __AVX512VNNI__
constexpr int HIGH_SHIFT = 4;
inline __m512i high_nibbles(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(0xF0))); }
#else
constexpr int HIGH_SHIFT = 0;
inline __m512i high_nibbles(__m512i v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
#endif

// The quantized activations of one call. Per row m and 8 columns c: hi[c] the int8 x of columns 8c, 8c+2, 8c+4, 8c+6
// (which meet the high nibbles of a row's 4 bytes), lo[c] those of 8c+1, ..., 8c+7; per block b of 32 columns
// dx[b] and dxsum[b] = dx_b * sum_b xq.
struct Int8Rows {
  int64_t blocks;  // per row
  int32_t *lo, *hi;
  float *dx, *dxsum;
};

template <typename S, int MC>
inline void block_int4(const uint8_t* w, int64_t blocks_per_group, const S* sz, const Int8Rows& xr, int64_t m0,
                       float* out) {
  const int64_t blocks = xr.blocks;
  const char* ahead = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  // the scales as far ahead, in groups, as the nibbles: a second stream the hardware prefetcher left behind
  const char* scales_ahead = reinterpret_cast<const char*>(sz) +
                             (PREFETCH_BYTES / (4 * 64 * blocks_per_group) + 1) * 2 * INT4_ROWS * sizeof(S);
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < blocks / blocks_per_group; ++g) {
    prefetch_lines(scales_ahead + g * 2 * INT4_ROWS * sizeof(S), 2 * INT4_ROWS * sizeof(S) / 64);
    const __m512 s = load16(sz + g * 2 * INT4_ROWS), z = load16(sz + g * 2 * INT4_ROWS + INT4_ROWS);
    const __m512 zero_term = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);  // z - 8 s
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m512i lo_sum[MC], hi_sum[MC];
      for (int m = 0; m < MC; ++m) lo_sum[m] = hi_sum[m] = _mm512_setzero_si512();
      for (int64_t c = 4 * b; c < 4 * b + 4; ++c) {
        prefetch(ahead + c * 64);
        const __m512i v = _mm512_loadu_si512(w + c * 64);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = high_nibbles(v);
        for (int m = 0; m < MC; ++m) {
          const int64_t at = (m0 + m) * blocks * 4 + c;
          lo_sum[m] = dot_u8_s8(lo_sum[m], lo, _mm512_set1_epi32(xr.lo[at]));
          hi_sum[m] = dot_u8_s8(hi_sum[m], hi, _mm512_set1_epi32(xr.hi[at]));
        }
      }
      for (int m = 0; m < MC; ++m) {
        const int64_t at = (m0 + m) * blocks + b;
        const __m512i d = _mm512_add_epi32(lo_sum[m], _mm512_srai_epi32(hi_sum[m], HIGH_SHIFT));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(xr.dx[at])), acc[m]);
        acc[m] = _mm512_fmadd_ps(zero_term, _mm512_set1_ps(xr.dxsum[at]), acc[m]);
      }
    }
  }
  for (int m = 0; m < MC; ++m) {
    alignas(64) float rows[INT4_ROWS];
    _mm512_store_ps(rows, acc[m]);
    for (int r = 0; r < INT4_ROWS; ++r) out[r * MC + m] = rows[r];
  }
}

// Runs block(b, m0, mc, out) over `blocks` blocks of RB weight rows and chunks of up to 4 activation rows, in parallel
// over blocks; block returns the column of y [M, ldy] its first row goes to and leaves in out its RB x mc results.
// Blocks b0 to b1 - 1 of that, on the calling thread
template <int RB, typename Y, typename Block>
void blocks_into(int64_t b0, int64_t b1, int64_t M, int64_t ldy, Y* y, const Block& block) {
  alignas(64) float out[RB * 4];
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mc = static_cast<int>(std::min<int64_t>(4, M - m0));
      const int64_t col = block(b, m0, mc, out);
      for (int r = 0; r < RB; ++r)
        for (int m = 0; m < mc; ++m) y[(m0 + m) * ldy + col + r] = static_cast<Y>(out[r * mc + m]);
    }
}

template <int RB, typename Y, typename Block>
void for_blocks(int64_t M, int64_t ldy, int64_t blocks, Y* y, const Block& block) {
  at::parallel_for(0, blocks, 64 / RB,
                   [&](int64_t b0, int64_t b1) { blocks_into<RB>(b0, b1, M, ldy, y, block); });
}

// Several weights of the same input width as one run of blocks (one parallel region for all: a small weight takes
// less time to read than a fork and join of the threads). Block b lies in weight part(b), at row first_row(b).
struct Parts {
  std::vector<int64_t> ends;  // cumulative row counts
  int part(int64_t row) const {
    int j = 0;
    while (row >= ends[j]) ++j;
    return j;
  }
  int64_t first_row(int j) const { return j ? ends[j - 1] : 0; }
};

Parts parts_of(const std::vector<int64_t>& rows) {
  Parts p;
  int64_t total = 0;
  for (int64_t n : rows) p.ends.push_back(total += n);
  return p;
}

// y [M, sum rows] filled block by block: block(j, local, m0, mc, out) leaves in out the RB x mc results of weight j's
// rows from local, for activation rows m0 to m0 + mc - 1
template <int RB = R, typename Block>
void run_parts(int64_t M, const std::vector<int64_t>& rows, at::Tensor& y, const Block& block) {
  const Parts parts = parts_of(rows);
  const int64_t N = parts.ends.back();
  auto at_row = [&](int64_t b, int64_t m0, int mc, float* out) {
    const int64_t row = b * RB;
    const int j = parts.part(row);
    block(j, row - parts.first_row(j), m0, mc, out);
    return row;
  };
  if (y.scalar_type() == at::kFloat) for_blocks<RB>(M, N, N / RB, y.data_ptr<float>(), at_row);
  else for_blocks<RB>(M, N, N / RB, y.data_ptr<at::BFloat16>(), at_row);
}

template <typename W>
inline void dispatch_dot(int mc, const W* w, int64_t K, const float* x, float* out) {
  switch (mc) {
    case 1: block_dot<W, 1>(w, K, x, out); break;
    case 2: block_dot<W, 2>(w, K, x, out); break;
    case 3: block_dot<W, 3>(w, K, x, out); break;
    default: block_dot<W, 4>(w, K, x, out); break;
  }
}

// n elements of a reused buffer, at a 64-byte boundary: a vector load that straddles two cache lines costs two reads
template <typename T>
T* aligned(std::vector<T>& buffer, int64_t n) {
  buffer.resize(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
}

// x as fp32 rows [M, K] (a reused per-thread buffer: the call itself allocates only y)
const float* float_rows(const at::Tensor& x, int64_t M, int64_t K) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  static thread_local std::vector<float> buffer;
  float* out = aligned(buffer, M * K);
  const at::BFloat16* src = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) out[i] = static_cast<float>(src[i]);
  return out;
}

// The memory of an Int16Rows, reused from call to call
struct Int16Buffers {
  std::vector<int16_t> xq;
  std::vector<float> dx;
};

// x [M, K] rounded to int16 rows in buffers
Int16Rows int16_rows(const float* x, int64_t M, int64_t K, Int16Buffers& buffers) {
  int16_t* xq = aligned(buffers.xq, M * K);
  std::vector<float>& dx = buffers.dx;
  dx.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + m * K + k)));
    dx[m] = _mm512_reduce_max_ps(top) / 32767.f;
    const __m512 inv = _mm512_set1_ps(dx[m] > 0.f ? 1.f / dx[m] : 0.f);
    for (int64_t k = 0; k < K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + k),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + m * K + k), inv))));
  }
  return Int16Rows{xq, dx.data()};
}

// One int8 weight's 4 rows from `local` (w: the whole weight, K columns; its row scales) against the activation rows
// m0 to m0 + mc - 1: out[r * mc + m]
template <typename S>
void int8_block(const int8_t* w, const S* row_scales, int64_t K, int64_t local, const Int16Rows& xr, int64_t m0,
                int mc, float* out) {
  const int8_t* wb = w + local * K;
  switch (mc) {
    case 1: block_int8<1>(wb, K, xr, m0, out); break;
    case 2: block_int8<2>(wb, K, xr, m0, out); break;
    case 3: block_int8<3>(wb, K, xr, m0, out); break;
    default: block_int8<4>(wb, K, xr, m0, out); break;
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < mc; ++m) out[r * mc + m] *= static_cast<float>(row_scales[local + r]);
}

// The memory of an Int8Rows, reused from call to call
struct Int8Buffers {
  std::vector<int32_t> lo, hi;
  std::vector<float> dx, dxsum;
  Int8Rows rows(int64_t M, int64_t K) {
    const int64_t blocks = K / BLOCK;
    return Int8Rows{blocks, aligned(lo, M * blocks * 4), aligned(hi, M * blocks * 4), aligned(dx, M * blocks),
                    aligned(dxsum, M * blocks)};
  }
};

// Quantizes the blocks b0 to b1 - 1 of row m of x [M, K] into xr.
void quantize_blocks(const float* x, int64_t K, int64_t m, int64_t b0, int64_t b1, const Int8Rows& xr) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + m * K + b * BLOCK;
    const __m512 first = _mm512_loadu_ps(xb), second = _mm512_loadu_ps(xb + 16);
    const float d = std::max(_mm512_reduce_max_ps(_mm512_abs_ps(first)),
                             _mm512_reduce_max_ps(_mm512_abs_ps(second))) / 127.f;
    // round(x / d) to nearest even, as torch.round (a zero block stays zero)
    const __m512 dv = _mm512_set1_ps(d > 0.f ? d : 1.f);
    const __m512i even = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_permutex2var_ps(first, evens, second), dv));
    const __m512i odd = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_permutex2var_ps(first, odds, second), dv));
    const int64_t at = m * xr.blocks + b;
    // the high nibble holds the even column
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xr.hi + at * 4), _mm512_cvtepi32_epi8(even));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xr.lo + at * 4), _mm512_cvtepi32_epi8(odd));
    xr.dx[at] = d;
    xr.dxsum[at] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(even, odd)));
  }
}

// One int4 weight's 16 rows from `local` (w and sz: the whole weight, K columns in `groups` groups) against the
// activation rows m0 to m0 + mc - 1: out[r * mc + m]
template <typename S>
void int4_block(const uint8_t* w, const S* sz, int64_t K, int64_t groups, int64_t local, const Int8Rows& xr,
                int64_t m0, int mc, float* out) {
  const uint8_t* wb = w + local * K / 2;
  const S* szb = sz + local * groups * 2;
  const int64_t blocks_per_group = K / groups / BLOCK;
  switch (mc) {
    case 1: block_int4<S, 1>(wb, blocks_per_group, szb, xr, m0, out); break;
    case 2: block_int4<S, 2>(wb, blocks_per_group, szb, xr, m0, out); break;
    case 3: block_int4<S, 3>(wb, blocks_per_group, szb, xr, m0, out); break;
    default: block_int4<S, 4>(wb, blocks_per_group, szb, xr, m0, out); break;
  }
}

// e^x to about one fp32 ulp, for the SwiGLU's sigmoid: 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by
// its Taylor polynomial to r^6 (next term under 1.2e-7 of it); vscalefps applies 2^n, overflowing to inf and
// underflowing to 0 as exp does.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts, the first exact in n * it
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// v as Y holds it: rounded to the nearest bf16 (ties to even, as c10::BFloat16) for bf16, unchanged for fp32
template <typename Y>
inline __m512 as(__m512 v) {
  if constexpr (std::is_same_v<Y, float>) return v;
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(0xFFFF0000)));
}

// [begin, end) of thread t's share of n items among T
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int T) { return {n * t / T, n * (t + 1) / T}; }

// silu(gate) * up for n values, each input and the result rounded as Y holds it (as the three calls' outputs were)
template <typename Y>
inline void silu_times(float* gate, const float* up, int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 g = as<Y>(_mm512_maskz_loadu_ps(k, gate + i)), u = as<Y>(_mm512_maskz_loadu_ps(k, up + i));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    _mm512_mask_storeu_ps(gate + i, k, as<Y>(_mm512_mul_ps(silu, u)));
  }
}

// Which of the (up to) 16 slots from `allowed` the mask allows
inline __mmask16 slots_allowed(const bool* allowed, __mmask16 tail) {
  return _mm_mask_cmpneq_epi8_mask(tail, _mm_maskz_loadu_epi8(tail, allowed), _mm_setzero_si128());
}

// Attention of T query rows q [H, T, D] (roped) against a cache k, v [KV, S, D] (each head's slots contiguous,
// kv_stride apart), the slots the mask [T, S] allows: hidden[row, h * D + d] = sum_s p_s v[h / G, s, d], p the
// softmax of q[h, row] . k[h / G, s] / sqrt(D) (G query heads share a KV head), in fp32 and rounded to Q as
// few_token_attention's output. Each thread takes whole (head, row) units; the scores of 4 slots are summed
// together (one horizontal sum per 4), and the cache, which a token's weights have pushed out of the near caches,
// is prefetched 16 slots ahead. D = 16 C.
template <int C, typename Q>
void attend_units(const Q* q, const Q* k, const Q* v, int64_t kv_stride, const bool* mask, int64_t H, int64_t KV,
                  int64_t T, int64_t S, int t, int threads, float* hidden) {
  constexpr int64_t D = 16 * C;
  const int64_t G = H / KV;
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(static_cast<float>(D)));
  static thread_local std::vector<float> score_buffer;
  float* scores = aligned(score_buffer, S + 16);
  const auto [first, last] = share(H * T, t, threads);
  for (int64_t unit = first; unit < last; ++unit) {
    const int64_t h = unit / T, row = unit % T, kv = h / G;
    const Q* kh = k + kv * kv_stride;
    const Q* vh = v + kv * kv_stride;
    const bool* allowed = mask + row * S;
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = load16(q + (h * T + row) * D + 16 * c);
    int64_t s = 0;
    for (; s + 4 <= S; s += 4) {
      __m512 acc[4];
      prefetch_lines(reinterpret_cast<const char*>(kh + (s + 16) * D), 4 * D * sizeof(Q) / 64);
      for (int j = 0; j < 4; ++j) {
        acc[j] = _mm512_mul_ps(qv[0], load16(kh + (s + j) * D));
        for (int c = 1; c < C; ++c) acc[j] = _mm512_fmadd_ps(qv[c], load16(kh + (s + j) * D + 16 * c), acc[j]);
      }
      _mm_storeu_ps(scores + s, sum4(acc[0], acc[1], acc[2], acc[3]));
    }
    for (; s < S; ++s) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], load16(kh + s * D + 16 * c), acc);
      scores[s] = _mm512_reduce_add_ps(acc);
    }
    // the slots the mask allows, scaled; the others -inf, then 0 after the exp
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (s = 0; s < S; s += 16) {
      const __mmask16 tail = S - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S - s)) - 1);
      const __mmask16 ok = slots_allowed(allowed + s, tail);
      const __m512 sc = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), ok, _mm512_maskz_loadu_ps(tail, scores + s),
                                           scale);
      _mm512_mask_storeu_ps(scores + s, tail, sc);
      top = _mm512_mask_max_ps(top, tail, top, sc);
    }
    const __m512 top_all = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (s = 0; s < S; s += 16) {
      const __mmask16 tail = S - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S - s)) - 1);
      const __mmask16 ok = slots_allowed(allowed + s, tail);
      const __m512 e = _mm512_maskz_mov_ps(ok, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + s), top_all)));
      _mm512_mask_storeu_ps(scores + s, tail, e);
      total = _mm512_add_ps(total, e);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(total);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    prefetch_lines(reinterpret_cast<const char*>(vh), std::min<int64_t>(16, S) * D * sizeof(Q) / 64);
    for (s = 0; s < S; ++s) {
      prefetch_lines(reinterpret_cast<const char*>(vh + (s + 16) * D), D * sizeof(Q) / 64);
      const __m512 p = _mm512_set1_ps(scores[s]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vh + s * D + 16 * c), acc[c]);
    }
    float* out = hidden + row * H * D + h * D;
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, as<Q>(_mm512_mul_ps(acc[c], _mm512_set1_ps(inv))));
  }
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {  // v rounded to bf16 already (as<at::BFloat16>)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

// x [M, D] normed as model.RMSNorm: in fp32, rounded to Y, times the weight, rounded to Y; and as fp32 (what the
// dense kernels read) in xf. D = 16 n.
template <typename Y>
void rms_norm_rows(const Y* x, const Y* w, int64_t M, int64_t D, float eps, float* xf) {
  for (int64_t m = 0; m < M; ++m) {
    const Y* row = x + m * D;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) squares = _mm512_fmadd_ps(load16(row + d), load16(row + d), squares);
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(D) + eps));
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(xf + m * D + d,
                       as<Y>(_mm512_mul_ps(load16(w + d), as<Y>(_mm512_mul_ps(load16(row + d), inv)))));
  }
}

// y = x + y for n values of Y, rounded as Y holds it (a thread's share of columns need not be whole vectors: 4-row
// blocks split among 3 threads, say)
template <typename Y>
void add_into(const Y* x, Y* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(y + i, as<Y>(_mm512_add_ps(load16(x + i), load16(y + i))));
  for (; i < n; ++i) y[i] = static_cast<Y>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

// One head's row x [D] roped as model.apply_rope with its position's cos and sin [D] (the rope cache's sin carries
// the minus of the first half) into to [D]. D = 32 n.
template <typename Y>
void rope_one(const Y* x, const float* cos, const float* sin, int64_t D, Y* to) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 16) {
    const __m512 first = load16(x + d), second = load16(x + half + d);
    store16(to + d, as<Y>(_mm512_add_ps(_mm512_mul_ps(first, _mm512_loadu_ps(cos + d)),
                                         _mm512_mul_ps(second, _mm512_loadu_ps(sin + d)))));
    store16(to + half + d, as<Y>(_mm512_add_ps(_mm512_mul_ps(second, _mm512_loadu_ps(cos + half + d)),
                                               _mm512_mul_ps(first, _mm512_loadu_ps(sin + half + d)))));
  }
}

// f(float{}) for an fp32 dtype, f(at::BFloat16{}) for bf16 (the callers check it is one of them)
template <typename F>
auto with_type(at::ScalarType dtype, const F& f) {
  return dtype == at::kFloat ? f(float{}) : f(at::BFloat16{});
}

// x of K columns as the ops take it: CPU, fp32 or bf16, at most MAX_M rows
void check_x(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what, ": x must be fp32 or bf16");
  TORCH_CHECK(x.dim() >= 1 && K > 0 && x.size(-1) == K && x.numel() / K <= MAX_M, what, ": x must be [..., ", K,
              "] of at most ", MAX_M, " rows");
}

// w a contiguous [N, stored] of dtype that rows of K columns multiply (stored: K, or K / 2 for int4's nibbles), N a
// multiple of the format's block rows
void check_weight(const at::Tensor& w, at::ScalarType dtype, int64_t K, int64_t stored, int block_rows,
                  const char* what) {
  TORCH_CHECK(K > 0 && K % 32 == 0, what, ": K must be a positive multiple of 32, not ", K);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == stored && w.is_contiguous() && w.scalar_type() == dtype, what,
              ": weights must be contiguous [N, K] (int4: [N, K/2] bytes) of one dtype and K");
  TORCH_CHECK(w.size(0) % block_rows == 0, what, ": N must be a multiple of ", block_rows);
}

// How the ops read a weight format. RB: the weight rows a block takes. Weight: one weight's pointers, from weight(w,
// s, K, what), which checks the tensors first (w for rows of K columns, s its scales: none for dense weights).
// prepare(rows, M, K): fp32 rows [M, K] made what the format's kernel reads, in this instance's buffers; inside a
// parallel region each thread prepares its own (a few microseconds, where sharing the work out cost a barrier).
// block(w, local, m0, mc, out): RB rows of w from row `local` against the prepared rows m0 to m0 + mc - 1, in
// out[r * mc + m]. Dense: W fp32 or bf16, the rows read as they are.
template <typename W>
struct DenseFormat {
  static constexpr int RB = R;
  struct Weight {
    const W* w;
  };
  static Weight weight(const at::Tensor& w, const at::Tensor*, int64_t K, const char* what) {
    check_weight(w, c10::CppTypeToScalarType<W>::value, K, K, R, what);
    return {w.data_ptr<W>()};
  }
  const float* x = nullptr;
  int64_t K = 0;
  void prepare(const float* rows, int64_t, int64_t columns) { x = rows, K = columns; }
  void block(const Weight& w, int64_t local, int64_t m0, int mc, float* out) const {
    dispatch_dot(mc, w.w + local * K, K, x + m0 * K, out);
  }
};

// int8 with a scale per row (of S): the rows rounded to int16
template <typename S>
struct Int8Format {
  static constexpr int RB = R;
  struct Weight {
    const int8_t* w;
    const S* scales;
  };
  static Weight weight(const at::Tensor& w, const at::Tensor* s, int64_t K, const char* what) {
    check_weight(w, at::kChar, K, K, R, what);
    TORCH_CHECK(s != nullptr, what, ": quantized weights need their scales");
    TORCH_CHECK(s->is_contiguous() && s->numel() == w.size(0) && s->scalar_type() == c10::CppTypeToScalarType<S>::value,
                what, ": int8 weights need N contiguous fp32 or bf16 scales, one dtype for all");
    return {w.data_ptr<int8_t>(), s->data_ptr<S>()};
  }
  Int16Buffers buffers;
  Int16Rows xr{};
  int64_t K = 0;
  void prepare(const float* rows, int64_t M, int64_t columns) { K = columns, xr = int16_rows(rows, M, K, buffers); }
  void block(const Weight& w, int64_t local, int64_t m0, int mc, float* out) const {
    int8_block(w.w, w.scales, K, local, xr, m0, mc, out);
  }
};

// int4 nibbles as interleave_int4 lays them out, with their scales_zeros (of S) in `groups` groups a row: the rows
// rounded to int8 per 32 columns
template <typename S>
struct Int4Format {
  static constexpr int RB = INT4_ROWS;
  struct Weight {
    const uint8_t* w;
    const S* sz;
    int64_t groups;
  };
  static Weight weight(const at::Tensor& w, const at::Tensor* sz, int64_t K, const char* what) {
    check_weight(w, at::kByte, K, K / 2, INT4_ROWS, what);
    TORCH_CHECK(sz != nullptr, what, ": quantized weights need their scales");
    const int64_t groups = sz->dim() == 3 ? sz->size(1) : 0;
    TORCH_CHECK(sz->is_contiguous() && sz->dim() == 3 && sz->size(0) == w.size(0) && sz->size(2) == 2 && groups > 0 &&
                    K % groups == 0 && (K / groups) % BLOCK == 0 &&
                    sz->scalar_type() == c10::CppTypeToScalarType<S>::value,
                what, ": scales_zeros must be fp32 or bf16 [N, K/groupsize, 2], the groupsize a multiple of 32, one "
                "dtype for all");
    return {w.data_ptr<uint8_t>(), sz->data_ptr<S>(), groups};
  }
  Int8Buffers buffers;
  Int8Rows xr{};
  int64_t K = 0;
  void prepare(const float* rows, int64_t M, int64_t columns) {
    K = columns, xr = buffers.rows(M, K);
    for (int64_t m = 0; m < M; ++m) quantize_blocks(rows, K, m, 0, xr.blocks, xr);
  }
  void block(const Weight& w, int64_t local, int64_t m0, int mc, float* out) const {
    int4_block(w.w, w.sz, K, w.groups, local, xr, m0, mc, out);
  }
};

// f(Format{}) for the format of weights like w: fp32 or bf16 (dense); int8 with row scales s; uint8, int4 nibbles,
// with scales_zeros s. s: nullptr for none.
template <typename F>
auto with_format(const at::Tensor& w, const at::Tensor* s, const char* what, const F& f) {
  const auto dtype = w.scalar_type();
  if (dtype == at::kFloat) return f(DenseFormat<float>{});
  if (dtype == at::kBFloat16) return f(DenseFormat<at::BFloat16>{});
  TORCH_CHECK(dtype == at::kChar || dtype == at::kByte, what, ": weights must be fp32, bf16, int8 or uint8 (int4 "
              "nibbles)");
  TORCH_CHECK(s != nullptr, what, ": quantized weights need their scales");
  TORCH_CHECK(s->scalar_type() == at::kFloat || s->scalar_type() == at::kBFloat16, what,
              ": scales must be fp32 or bf16");
  const bool fp32 = s->scalar_type() == at::kFloat;
  if (dtype == at::kChar) return fp32 ? f(Int8Format<float>{}) : f(Int8Format<at::BFloat16>{});
  return fp32 ? f(Int4Format<float>{}) : f(Int4Format<at::BFloat16>{});
}

at::Tensor output(const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return at::empty(shape, x.options());
}

// What the threads of one parallel region do in turn. Each of these is thread t of `threads`' share.

// y [M, N] = (the prepared rows) @ w^T, w of N rows: whole blocks of RB rows, so columns [first, last) of y, which it
// returns (for a residual the caller adds to them)
template <typename Format, typename Y>
std::pair<int64_t, int64_t> share_of_rows(const Format& format, const typename Format::Weight& w, int64_t N, int64_t M,
                                          int t, int threads, Y* y) {
  constexpr int RB = Format::RB;
  const auto [b0, b1] = share(N / RB, t, threads);
  blocks_into<RB>(b0, b1, M, N, y, [&](int64_t b, int64_t m0, int mc, float* out) {
    format.block(w, b * RB, m0, mc, out);
    return b * RB;
  });
  return {b0 * RB, b1 * RB};
}

// hidden [M, F] = silu((the prepared rows) @ w1^T) * ((the prepared rows) @ w3^T), w1 and w3 of F rows
template <typename Y, typename Format>
void share_of_gate_up(const Format& format, const typename Format::Weight& w1, const typename Format::Weight& w3,
                      int64_t F, int64_t M, int t, int threads, float* hidden) {
  constexpr int RB = Format::RB;
  alignas(64) float gate[RB * 4], up[RB * 4];
  const auto [b0, b1] = share(F / RB, t, threads);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mc = static_cast<int>(std::min<int64_t>(4, M - m0));
      format.block(w1, b * RB, m0, mc, gate);
      format.block(w3, b * RB, m0, mc, up);
      silu_times<Y>(gate, up, RB * mc);
      for (int r = 0; r < RB; ++r)
        for (int m = 0; m < mc; ++m) hidden[(m0 + m) * F + b * RB + r] = gate[r * mc + m];
    }
}

// attend_units for head_dim D (64 or 128)
template <typename Q>
void share_of_attention(const Q* q, const Q* k, const Q* v, int64_t kv_stride, const bool* mask, int64_t H,
                        int64_t KV, int64_t T, int64_t S, int64_t D, int t, int threads, float* hidden) {
  if (D == 64) attend_units<4>(q, k, v, kv_stride, mask, H, KV, T, S, t, threads, hidden);
  else attend_units<8>(q, k, v, kv_stride, mask, H, KV, T, S, t, threads, hidden);
}

// y [..., sum N_j] = x @ [W_0; W_1; ...]^T for weights of one format and K, their scales s_j (none for dense), in
// one parallel region (run_parts); the rows are prepared once, on the calling thread.
at::Tensor linear(const at::Tensor& x_any, const std::vector<at::Tensor>& ws, const std::vector<const at::Tensor*>& s,
                  const char* what) {
  const at::Tensor x = x_any.contiguous();
  const int64_t K = x.dim() ? x.size(-1) : 0;
  check_x(x, K, what);
  return with_format(ws[0], s[0], what, [&](auto f) {
    using Format = decltype(f);
    std::vector<typename Format::Weight> weights;
    std::vector<int64_t> rows;
    for (size_t j = 0; j < ws.size(); ++j) {
      weights.push_back(Format::weight(ws[j], s[j], K, what));
      rows.push_back(ws[j].size(0));
    }
    at::Tensor y = output(x, std::accumulate(rows.begin(), rows.end(), int64_t{0}));
    const int64_t M = x.numel() / K;
    static thread_local Format calling_threads;
    Format& format = calling_threads;  // what every thread reads (a thread_local named in the lambda is each one's own)
    format.prepare(float_rows(x, M, K), M, K);
    run_parts<Format::RB>(M, rows, y, [&](int j, int64_t local, int64_t m0, int mc, float* out) {
      format.block(weights[j], local, m0, mc, out);
    });
    return y;
  });
}

// y [..., D] = w2 @ (silu(w1 @ x) * (w3 @ x)) for x [..., D], w1 and w3 [H, D], w2 [D, H] of one format (scales s1,
// s3, s2; none for dense), in one parallel region: each thread prepares x, takes its share of w1/w3's rows and the
// activation, and after a barrier prepares the hidden rows and takes its share of w2's rows. As three calls, each
// forked and joined the threads, and at a decode step's sizes a fork and join costs about as much as reading a small
// weight.
at::Tensor swiglu(const at::Tensor& x_any, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                  const at::Tensor* s1, const at::Tensor* s3, const at::Tensor* s2, const char* what) {
  const at::Tensor x = x_any.contiguous();
  const int64_t D = x.dim() ? x.size(-1) : 0;
  check_x(x, D, what);
  TORCH_CHECK(w1.dim() == 2 && w3.sizes() == w1.sizes() && w2.dim() == 2 && w2.size(0) == D, what,
              ": w1, w3 must be [H, D] and w2 [D, H]");
  const int64_t H = w1.size(0), M = x.numel() / D;
  return with_format(w1, s1, what, [&](auto f) {
    using Format = decltype(f);
    const auto gate = Format::weight(w1, s1, D, what), up = Format::weight(w3, s3, D, what);
    const auto down = Format::weight(w2, s2, H, what);
    at::Tensor y = output(x, D);
    with_type(x.scalar_type(), [&](auto y_type) {
      using Y = decltype(y_type);
      const float* xf = float_rows(x, M, D);
      static thread_local std::vector<float> hidden_buffer;
      float* hidden = aligned(hidden_buffer, M * H);
#pragma omp parallel num_threads(at::get_num_threads())
      {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        static thread_local Format format;
        format.prepare(xf, M, D);
        share_of_gate_up<Y>(format, gate, up, H, M, t, threads, hidden);
#pragma omp barrier
        format.prepare(hidden, M, H);
        share_of_rows(format, down, D, M, t, threads, y.data_ptr<Y>());
      }
      return 0;
    });
    return y;
  });
}

// y [1, T, dim] = wo(attention of q [1, H, T <= MAX_M, D of 64 or 128] against the cache slots k, v [1, KV, S, D],
// a narrowed view of the cache taken as it is, the slots the mask [..., T, S] allows), wo [dim, H * D] of any format
// (so: its scales, none for dense), in one parallel region: each thread's attention units, a barrier, then each
// prepares the attended rows and takes its share of wo's rows.
at::Tensor attention(const at::Tensor& q_any, const at::Tensor& k_any, const at::Tensor& v_any, const at::Tensor& mask,
                     const at::Tensor& wo, const at::Tensor* so, const char* what) {
  const at::Tensor q = q_any.contiguous();
  // each head's slots contiguous, the heads apart
  auto slots = [](const at::Tensor& c) { return c.stride(3) == 1 && c.stride(2) == c.size(3) ? c : c.contiguous(); };
  at::Tensor k = slots(k_any), v = slots(v_any);
  if (k.strides() != v.strides()) k = k.contiguous(), v = v.contiguous();  // the kernel reads both with one stride
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == 1 && k.size(0) == 1 && k.sizes() == v.sizes() &&
                  k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 &&
                  (q.size(3) == 64 || q.size(3) == 128) && q.size(2) <= MAX_M,
              what, ": q [1, H, T <= ", MAX_M, ", D of 64 or 128] against k, v [1, KV, S, D], H a multiple of KV");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              what, ": q, k, v fp32 or bf16, of one dtype");
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2), NQ = H * D;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == T * S && mask.size(-1) == S, what,
              ": mask must be bool [..., T, S]");
  const at::Tensor allowed = mask.reshape({T, S}).contiguous();
  TORCH_CHECK(wo.dim() == 2, what, ": wo must be [dim, H * D]");
  return with_format(wo, so, what, [&](auto f) {
    using Format = decltype(f);
    const auto w = Format::weight(wo, so, NQ, what);
    const int64_t dim = wo.size(0);
    at::Tensor y = at::empty({1, T, dim}, q.options());
    with_type(q.scalar_type(), [&](auto q_type) {
      using Q = decltype(q_type);
      static thread_local std::vector<float> attended_buffer;
      float* attended = aligned(attended_buffer, T * NQ);
#pragma omp parallel num_threads(at::get_num_threads())
      {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        share_of_attention(q.data_ptr<Q>(), k.data_ptr<Q>(), v.data_ptr<Q>(), k.stride(1), allowed.data_ptr<bool>(), H,
                           KV, T, S, D, t, threads, attended);
#pragma omp barrier
        static thread_local Format format;
        format.prepare(attended, T, NQ);
        share_of_rows(format, w, dim, T, t, threads, y.data_ptr<Q>());
      }
      return 0;
    });
    return y;
  });
}

// The pointers and sizes of one plain layer (layer): activations Y, weights of Format, the caches [B, KV, slots, D]
// of Y (batch 0 written and read, head_stride and slot_stride apart), the mask [T, S]
template <typename Format, typename Y>
struct Layer {
  using Weight = typename Format::Weight;
  const Y *x, *attn_norm, *ffn_norm;
  const float *cos, *sin;  // [T, D]
  const int64_t* pos;      // [T]
  Y *k_cache, *v_cache;
  int64_t head_stride, slot_stride;
  const bool* mask;
  int64_t S;
  Weight wq, wk, wv, wo, w1, w3, w2;
  int64_t T, dim, H, KV, D, F;
  float eps;
};

// out [T, dim] = h + w2(silu(w1(ffn_norm(h))) * w3(ffn_norm(h))), h = x + wo(attention(rope(wq a), the cache with
// this step's rope(wk a) and wv a written at pos)), a = attention_norm(x): model.TransformerBlock.block, each
// intermediate rounded to Y where the model's ops round it, in one parallel region: each thread norms x itself and
// takes its share of wq/wk/wv's rows; after a barrier it ropes the query rows of its attention units (attend_units'
// share) and writes its share of the KV heads into the caches; after another, its attention units; then its share of
// wo's rows and their residual, the ffn norm of h (again its own), its share of w1/w3's rows and the activation, and
// its share of w2's rows and their residual: five barriers, where as three ops a layer forked and joined the
// threads three times with inductor's kernels between them on one thread (BENCHMARKS.md).
template <typename Format, typename Y>
void run_layer(const Layer<Format, Y>& l, Y* out) {
  constexpr int RB = Format::RB;
  const int64_t T = l.T, dim = l.dim, D = l.D, F = l.F, NQ = l.H * D, NK = l.KV * D, N = NQ + 2 * NK;
  static thread_local std::vector<Y> projected_buffer, q_buffer, h_buffer;
  static thread_local std::vector<float> attended_buffer, hidden_buffer;
  Y* projected = aligned(projected_buffer, T * N);
  Y* q = aligned(q_buffer, NQ * T);
  Y* h = aligned(h_buffer, T * dim);
  float* attended = aligned(attended_buffer, T * NQ);
  float* hidden = aligned(hidden_buffer, T * F);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    static thread_local std::vector<float> normed_buffer;
    static thread_local Format format;
    float* normed = aligned(normed_buffer, T * dim);
    rms_norm_rows(l.x, l.attn_norm, T, dim, l.eps, normed);
    format.prepare(normed, T, dim);
    const auto [b0, b1] = share(N / RB, t, threads);
    blocks_into<RB>(b0, b1, T, N, projected, [&](int64_t b, int64_t m0, int mc, float* o) {
      const int64_t row = b * RB;  // N_q and N_k are multiples of RB: a block lies in one weight
      if (row < NQ) format.block(l.wq, row, m0, mc, o);
      else if (row < NQ + NK) format.block(l.wk, row - NQ, m0, mc, o);
      else format.block(l.wv, row - NQ - NK, m0, mc, o);
      return row;
    });
#pragma omp barrier
    const auto [u0, u1] = share(l.H * T, t, threads);
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t head = unit / T, row = unit % T;
      rope_one(projected + row * N + head * D, l.cos + row * D, l.sin + row * D, D, q + (head * T + row) * D);
    }
    const auto [k0, k1] = share(l.KV, t, threads);
    for (int64_t head = k0; head < k1; ++head)
      for (int64_t row = 0; row < T; ++row) {
        const int64_t slot = head * l.head_stride + l.pos[row] * l.slot_stride;
        rope_one(projected + row * N + NQ + head * D, l.cos + row * D, l.sin + row * D, D, l.k_cache + slot);
        std::copy_n(projected + row * N + NQ + NK + head * D, D, l.v_cache + slot);
      }
#pragma omp barrier
    share_of_attention(q, l.k_cache, l.v_cache, l.head_stride, l.mask, l.H, l.KV, T, l.S, D, t, threads, attended);
#pragma omp barrier
    format.prepare(attended, T, NQ);
    const auto [c0, c1] = share_of_rows(format, l.wo, dim, T, t, threads, h);  // this thread's columns of h and out
    for (int64_t m = 0; m < T; ++m) add_into(l.x + m * dim + c0, h + m * dim + c0, c1 - c0);
#pragma omp barrier
    rms_norm_rows(h, l.ffn_norm, T, dim, l.eps, normed);
    format.prepare(normed, T, dim);
    share_of_gate_up<Y>(format, l.w1, l.w3, F, T, t, threads, hidden);
#pragma omp barrier
    format.prepare(hidden, T, F);
    share_of_rows(format, l.w2, dim, T, t, threads, out);  // the same columns as wo's: c0 to c1
    for (int64_t m = 0; m < T; ++m) add_into(h + m * dim + c0, out + m * dim + c0, c1 - c0);
  }
}

}  // namespace

// A plain layer for x [1, T <= MAX_M, dim] in one call (run_layer), writing this step's keys and values into
// k_cache and v_cache [B, KV, slots, D] (batch 0) at input_pos; attention reads the mask's S slots. cos and sin: the
// rope's rows [T, D] at input_pos (model.rope_rows). The weights' format is their dtype: fp32 or bf16; int8 with
// row scales sq, ...; uint8, int4 as linear_int4 takes it, with scales_zeros sq, ....
at::Tensor layer(const at::Tensor& x_any, const at::Tensor& attn_norm, const at::Tensor& ffn_norm,
                 const at::Tensor& cos_any, const at::Tensor& sin_any, const at::Tensor& input_pos,
                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& mask, double eps, const at::Tensor& wq,
                 const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& w1,
                 const at::Tensor& w3, const at::Tensor& w2, const std::optional<at::Tensor>& sq,
                 const std::optional<at::Tensor>& sk, const std::optional<at::Tensor>& sv,
                 const std::optional<at::Tensor>& so, const std::optional<at::Tensor>& s1,
                 const std::optional<at::Tensor>& s3, const std::optional<at::Tensor>& s2) {
  const char* what = "flexfast::layer";
  const at::Tensor x = x_any.contiguous();
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, what, ": x must be [1, T, dim]");
  check_x(x, x.size(2), what);  // fp32 or bf16, T <= MAX_M
  for (const at::Tensor* n : {&attn_norm, &ffn_norm})
    TORCH_CHECK(n->is_contiguous() && n->numel() == x.size(2) && n->scalar_type() == dtype, what,
                ": norm weights must be [dim] of x's dtype");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides() &&
                  k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              what, ": caches must be [B, KV, slots, D] of x's dtype, each head's slots contiguous, one layout");
  const int64_t T = x.size(1), dim = x.size(2), KV = k_cache.size(1), D = k_cache.size(3);
  const int64_t NQ = wq.dim() == 2 ? wq.size(0) : 0, F = w1.dim() == 2 ? w1.size(0) : 0;
  TORCH_CHECK((D == 64 || D == 128) && KV > 0 && NQ % D == 0 && (NQ / D) % KV == 0 && wk.dim() == 2 &&
                  wk.size(0) == KV * D && wv.dim() == 2 && wv.size(0) == KV * D && wo.dim() == 2 && wo.size(0) == dim &&
                  w3.sizes() == w1.sizes() && w2.dim() == 2 && w2.size(0) == dim,
              what, ": wq [H D, dim], wk and wv [KV D, dim] for the cache's KV heads (D 64 or 128), wo [dim, H D], "
              "w1 and w3 [F, dim], w2 [dim, F]");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == T * mask.size(-1) &&
                  mask.size(-1) <= k_cache.size(2),
              what, ": mask must be bool [..., T, S], S at most the cache's slots");
  const at::Tensor cos = cos_any.contiguous(), sin = sin_any.contiguous(), pos = input_pos.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == T * D &&
                  sin.numel() == T * D,
              what, ": cos and sin must be fp32 [T, D]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == T, what, ": input_pos must be T int64 positions");
  for (int64_t m = 0; m < T; ++m)
    TORCH_CHECK(pos.data_ptr<int64_t>()[m] >= 0 && pos.data_ptr<int64_t>()[m] < k_cache.size(2), what,
                ": position ", pos.data_ptr<int64_t>()[m], " is outside the cache's ", k_cache.size(2), " slots");
  const at::Tensor mask_rows = mask.reshape({T, mask.size(-1)}).contiguous();
  auto scales = [](const std::optional<at::Tensor>& s) { return s ? &*s : nullptr; };
  at::Tensor out = at::empty(x.sizes(), x.options());
  with_format(wq, scales(sq), what, [&](auto f) {
    using Format = decltype(f);
    auto weight = [&](const at::Tensor& w, const std::optional<at::Tensor>& s, int64_t K) {
      return Format::weight(w, scales(s), K, what);
    };
    const auto q = weight(wq, sq, dim), k = weight(wk, sk, dim), v = weight(wv, sv, dim), o = weight(wo, so, NQ);
    const auto gate = weight(w1, s1, dim), up = weight(w3, s3, dim), down = weight(w2, s2, F);
    return with_type(dtype, [&](auto y) {
      using Y = decltype(y);
      const Layer<Format, Y> l{x.data_ptr<Y>(), attn_norm.data_ptr<Y>(), ffn_norm.data_ptr<Y>(),
                               cos.data_ptr<float>(), sin.data_ptr<float>(), pos.data_ptr<int64_t>(),
                               k_cache.data_ptr<Y>(), v_cache.data_ptr<Y>(), k_cache.stride(1), k_cache.stride(2),
                               mask_rows.data_ptr<bool>(), mask.size(-1), q, k, v, o, gate, up, down, T, dim,
                               NQ / D, KV, D, F, static_cast<float>(eps)};
      run_layer(l, out.data_ptr<Y>());
      return 0;
    });
  });
  return out;
}

void set_prefetch_l2(bool l2) { prefetch_l2 = l2; }

// The ops' entries take up to three weights of one K (wq/wk/wv) as arguments of their own, not a Tensor[] (chosen
// for inductor's C++ wrapper, which the compiled steps no longer use; steps.compile_one_token). Each entry takes one
// family of formats: its name says which.
std::vector<at::Tensor> given(const at::Tensor& first, const std::optional<at::Tensor>& second,
                              const std::optional<at::Tensor>& third) {
  TORCH_CHECK(second.has_value() || !third.has_value(), "flexfast: a third weight or scale without a second");
  std::vector<at::Tensor> tensors{first};
  for (const auto* t : {&second, &third})
    if (t->has_value()) tensors.push_back(**t);
  return tensors;
}

std::vector<const at::Tensor*> addresses(const std::vector<at::Tensor>& tensors) {
  std::vector<const at::Tensor*> out;
  for (const auto& t : tensors) out.push_back(&t);
  return out;
}

void expect(const at::Tensor& w, at::ScalarType a, at::ScalarType b, const char* family, const char* what) {
  TORCH_CHECK(w.scalar_type() == a || w.scalar_type() == b, what, ": weights must be ", family);
}

at::Tensor linear_entry(const at::Tensor& x, const at::Tensor& w0, const std::optional<at::Tensor>& w1,
                        const std::optional<at::Tensor>& w2) {
  const char* what = "flexfast::linear";
  expect(w0, at::kFloat, at::kBFloat16, "fp32 or bf16", what);
  const std::vector<at::Tensor> ws = given(w0, w1, w2);
  return linear(x, ws, std::vector<const at::Tensor*>(ws.size(), nullptr), what);
}

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& s0,
                            const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& s1,
                            const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& s2,
                            at::ScalarType quantized, const char* what) {
  expect(w0, quantized, quantized, quantized == at::kChar ? "int8" : "uint8 (int4 nibbles)", what);
  const std::vector<at::Tensor> ws = given(w0, w1, w2), s = given(s0, s1, s2);
  TORCH_CHECK(s.size() == ws.size(), what, ": one scales tensor per weight");
  return linear(x, ws, addresses(s), what);
}

at::Tensor linear_int8_entry(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& s0,
                             const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& s1,
                             const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& s2) {
  return quantized_linear(x, w0, s0, w1, s1, w2, s2, at::kChar, "flexfast::linear_int8");
}

at::Tensor linear_int4_entry(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& sz0,
                             const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& sz1,
                             const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& sz2) {
  return quantized_linear(x, w0, sz0, w1, sz1, w2, sz2, at::kByte, "flexfast::linear_int4");
}

at::Tensor swiglu_entry(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2) {
  const char* what = "flexfast::swiglu";
  expect(w1, at::kFloat, at::kBFloat16, "fp32 or bf16", what);
  return swiglu(x, w1, w3, w2, nullptr, nullptr, nullptr, what);
}

at::Tensor swiglu_int8_entry(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1, const at::Tensor& w3,
                             const at::Tensor& s3, const at::Tensor& w2, const at::Tensor& s2) {
  const char* what = "flexfast::swiglu_int8";
  expect(w1, at::kChar, at::kChar, "int8", what);
  return swiglu(x, w1, w3, w2, &s1, &s3, &s2, what);
}

at::Tensor swiglu_int4_entry(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& sz1, const at::Tensor& w3,
                             const at::Tensor& sz3, const at::Tensor& w2, const at::Tensor& sz2) {
  const char* what = "flexfast::swiglu_int4";
  expect(w1, at::kByte, at::kByte, "uint8 (int4 nibbles)", what);
  return swiglu(x, w1, w3, w2, &sz1, &sz3, &sz2, what);
}

at::Tensor attention_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           const at::Tensor& wo) {
  const char* what = "flexfast::attention";
  expect(wo, at::kFloat, at::kBFloat16, "fp32 or bf16", what);
  return attention(q, k, v, mask, wo, nullptr, what);
}

at::Tensor attention_int8_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                const at::Tensor& wo, const at::Tensor& scales) {
  const char* what = "flexfast::attention_int8";
  expect(wo, at::kChar, at::kChar, "int8", what);
  return attention(q, k, v, mask, wo, &scales, what);
}

at::Tensor attention_int4_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                const at::Tensor& wo, const at::Tensor& sz) {
  const char* what = "flexfast::attention_int4";
  expect(wo, at::kByte, at::kByte, "uint8 (int4 nibbles)", what);
  return attention(q, k, v, mask, wo, &sz, what);
}

TORCH_LIBRARY(flexfast, m) {
  m.def("set_prefetch_l2(bool l2) -> ()", &set_prefetch_l2);
  m.def("linear(Tensor x, Tensor w0, Tensor? w1=None, Tensor? w2=None) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w0, Tensor s0, Tensor? w1=None, Tensor? s1=None, Tensor? w2=None, "
        "Tensor? s2=None) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w0, Tensor sz0, Tensor? w1=None, Tensor? sz1=None, Tensor? w2=None, "
        "Tensor? sz2=None) -> Tensor");
  m.def("swiglu(Tensor x, Tensor w1, Tensor w3, Tensor w2) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor wo) -> Tensor");
  m.def("attention_int8(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor wo, Tensor scales) -> Tensor");
  m.def("attention_int4(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor wo, Tensor sz) -> Tensor");
  m.def("swiglu_int8(Tensor x, Tensor w1, Tensor s1, Tensor w3, Tensor s3, Tensor w2, Tensor s2) -> Tensor");
  m.def("swiglu_int4(Tensor x, Tensor w1, Tensor sz1, Tensor w3, Tensor sz3, Tensor w2, Tensor sz2) -> Tensor");
  m.def("layer(Tensor x, Tensor attn_norm, Tensor ffn_norm, Tensor cos, Tensor sin, Tensor input_pos, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor mask, float eps, Tensor wq, Tensor wk, Tensor wv, Tensor wo, "
        "Tensor w1, Tensor w3, Tensor w2, Tensor? sq=None, Tensor? sk=None, Tensor? sv=None, Tensor? so=None, "
        "Tensor? s1=None, Tensor? s3=None, Tensor? s2=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(flexfast, CPU, m) {
  m.impl("linear", &linear_entry);
  m.impl("linear_int8", &linear_int8_entry);
  m.impl("linear_int4", &linear_int4_entry);
  m.impl("swiglu", &swiglu_entry);
  m.impl("attention", &attention_entry);
  m.impl("attention_int8", &attention_int8_entry);
  m.impl("attention_int4", &attention_int4_entry);
  m.impl("swiglu_int8", &swiglu_int8_entry);
  m.impl("swiglu_int4", &swiglu_int4_entry);
  m.impl("layer", &layer);
}
