"""C++ source of the CPU int8 quantisation kernels (built JIT by sysopt.kernels.cpu): fused rowwise
amax -> scale -> cast (optionally also writing the row in bf16), a scaled int8 cast, and the dequantising
epilogue of an int32 GEMM; AVX-512 with a scalar twin.

The math is formats.py's, in the torch reference's order, each step one IEEE-rounded operation (built with
-ffp-contract=off, so no FMA): results equal sysopt.kernels.quantize_ref / gemm_ref bit for bit. Outputs are
allocated by the caller; each op fills them, rows split over ATen's intra-op threads.
"""

CPP_SOURCE = r"""
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SYSOPT_AVX512 1
#endif

namespace {

constexpr float kEps = 1e-12f;

// formats.py: scale = max(amax, EPS) / qmax, optionally rounded up to a power of two; NaN passes through
inline float scale_from_amax(float amax, float qmax, bool pow2) {
  float scale = (std::isnan(amax) ? amax : (amax < kEps ? kEps : amax)) / qmax;
  if (pow2 && std::isfinite(scale)) {
    uint32_t bits;
    std::memcpy(&bits, &scale, 4);
    bits = (bits + 0x7FFFFFu) & 0x7F800000u;
    std::memcpy(&scale, &bits, 4);
  }
  return scale;
}

inline int8_t to_int8(float v) {  // v already rounded; saturate as the clamp/cast would
  v = std::nearbyint(v);
  if (!std::isfinite(v)) return 0;  // NaN and +-inf: 0, as torch's float -> int8 conversion gives
  if (v < -128.f) return -128;
  if (v > 127.f) return 127;
  return static_cast<int8_t>(v);
}

// max |x| over n values; NaN if any value is NaN
float row_amax(const float* x, int64_t n) {
  int64_t i = 0;
  float amax = 0.f;
  bool nan = false;
#ifdef SYSOPT_AVX512
  __m512 m = _mm512_setzero_ps();
  __mmask16 nans = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  amax = _mm512_reduce_max_ps(m);
  nan = nans != 0;
#endif
  for (; i < n; ++i) {
    float v = std::fabs(x[i]);
    nan |= v != v;
    amax = v > amax ? v : amax;
  }
  return nan ? NAN : amax;
}

#ifdef SYSOPT_AVX512
// 16 floats -> 16 bf16, rounded to nearest even as c10::BFloat16 does; NaN -> 0x7FC0 (still NaN; torch's
// vectorised cast writes 0xFFFF)
inline void store_bf16x16(c10::BFloat16* out, __m512 xv) {
  const __m512i bits = _mm512_castps_si512(xv);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}
#endif

// n floats -> bf16
inline void to_bf16(const float* x, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
#ifdef SYSOPT_AVX512
  for (; i + 16 <= n; i += 16) store_bf16x16(out + i, _mm512_loadu_ps(x + i));
#endif
  for (; i < n; ++i) out[i] = c10::BFloat16(x[i]);
}

// q[i] = int8(round(clamp?(x[i] * inv))); bf16 (if not null) = bf16(x[i]). NaN gives 0 and, unclamped, so
// does +-inf (clamped: +-127), as in the torch reference.
void cast_row(const float* x, int64_t n, float inv, bool clamp, int8_t* q, c10::BFloat16* bf16) {
  int64_t i = 0;
#ifdef SYSOPT_AVX512
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i int_min = _mm512_set1_epi32(INT32_MIN);
  for (; i + 16 <= n; i += 16) {
    __m512 xv = _mm512_loadu_ps(x + i);
    __m512 v = _mm512_mul_ps(xv, vinv);
    // max/min return their second operand when one is NaN: v second, so NaN passes the clamp
    if (clamp) v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // cvtps_epi32 gives INT32_MIN for NaN and +-inf (no finite in-range lane does): those lanes -> 0
    __m512i qi = _mm512_cvtps_epi32(v);
    qi = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(qi, int_min), qi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(qi));
    if (bf16 != nullptr) store_bf16x16(bf16 + i, xv);
  }
#endif
  for (; i < n; ++i) {
    float v = x[i] * inv;
    if (clamp) v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
    q[i] = to_int8(v);
    if (bf16 != nullptr) bf16[i] = c10::BFloat16(x[i]);
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& q, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              what, ": x must be a contiguous 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(q.sizes() == x.sizes() && q.is_contiguous() && q.scalar_type() == at::kChar,
              what, ": q must be a contiguous int8 tensor shaped like x");
}

// rowwise int8: scale[r] from row r's own amax; q = round(x / scale); also bf16(x) when bf16 is not empty
void quantize_rows_int8(const at::Tensor& x, at::Tensor q, at::Tensor scale, at::Tensor bf16, bool pow2) {
  check_rows(x, q, "quantize_rows_int8");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(scale.numel() == rows && scale.is_contiguous() && scale.scalar_type() == at::kFloat,
              "quantize_rows_int8: scale must be a contiguous float32 tensor with one value per row");
  const bool with_bf16 = bf16.numel() > 0;
  TORCH_CHECK(!with_bf16 || (bf16.sizes() == x.sizes() && bf16.is_contiguous() &&
                             bf16.scalar_type() == at::kBFloat16),
              "quantize_rows_int8: bf16 must be empty or a contiguous bfloat16 tensor shaped like x");
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  c10::BFloat16* bp = with_bf16 ? bf16.data_ptr<c10::BFloat16>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* xr = xp + r * cols;
      const float s = scale_from_amax(row_amax(xr, cols), 127.f, pow2);
      sp[r] = s;
      cast_row(xr, cols, 1.f / s, false, qp + r * cols, bp != nullptr ? bp + r * cols : nullptr);
    }
  });
}

// q = round(clamp?(x * inv)) for one scale over the whole (contiguous) tensor
void cast_int8(const at::Tensor& x, at::Tensor q, double inv, bool clamp) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "cast_int8: x must be contiguous float32");
  TORCH_CHECK(q.numel() == x.numel() && q.is_contiguous() && q.scalar_type() == at::kChar,
              "cast_int8: q must be a contiguous int8 tensor with x's size");
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  const float finv = static_cast<float>(inv);
  constexpr int64_t kBlock = 1 << 16;
  at::parallel_for(0, x.numel(), kBlock, [&](int64_t first, int64_t last) {
    cast_row(xp + first, last - first, finv, clamp, qp + first, nullptr);
  });
}

// out = float(acc) * row[r] * col[c] + bias[c], in that order, each step rounded; row / col / bias may be
// empty (skipped). out may be acc's own storage viewed as float32 (each element is read before it is written).
void dequant_int32(const at::Tensor& acc, at::Tensor out, const at::Tensor& row, const at::Tensor& col,
                   const at::Tensor& bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt,
              "dequant_int32: acc must be a contiguous 2-D int32 tensor");
  TORCH_CHECK(out.sizes() == acc.sizes() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "dequant_int32: out must be a contiguous float32 tensor shaped like acc");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  const bool has_row = row.numel() > 0, has_col = col.numel() > 0, has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_row || (row.numel() == rows && row.is_contiguous() && row.scalar_type() == at::kFloat),
              "dequant_int32: row scales must be float32, one per row");
  TORCH_CHECK(!has_col || (col.numel() == cols && col.is_contiguous() && col.scalar_type() == at::kFloat),
              "dequant_int32: column scales must be float32, one per column");
  TORCH_CHECK(!has_bias || (bias.numel() == cols && bias.is_contiguous() && bias.scalar_type() == at::kFloat),
              "dequant_int32: bias must be float32, one per column");
  const int32_t* ap = acc.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float* rp = has_row ? row.data_ptr<float>() : nullptr;
  const float* cp = has_col ? col.data_ptr<float>() : nullptr;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int32_t* a = ap + r * cols;
      float* o = op + r * cols;
      int64_t c = 0;
#ifdef SYSOPT_AVX512
      const __m512 rs = _mm512_set1_ps(has_row ? rp[r] : 1.f);
      for (; c + 16 <= cols; c += 16) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(a + c));
        if (has_row) v = _mm512_mul_ps(v, rs);
        if (has_col) v = _mm512_mul_ps(v, _mm512_loadu_ps(cp + c));
        if (has_bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + c));
        _mm512_storeu_ps(o + c, v);
      }
#endif
      for (; c < cols; ++c) {
        float v = static_cast<float>(a[c]);
        if (has_row) v = v * rp[r];
        if (has_col) v = v * cp[c];
        if (has_bias) v = v + bp[c];
        o[c] = v;
      }
    }
  });
}

#ifdef SYSOPT_AVX512
// r[k] <- column k of the 16 x 16 block whose rows are r[0..15] (unpack, in-lane shuffle, lane shuffles)
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

// out[c][r] = bf16(x[r][c]): a transposing cast over 16-row x 64-column tiles (a tile's reads and writes touch
// few pages). AVX-512: 16 x 16 blocks transposed in registers, each column stored as 16 contiguous bf16.
void transpose_bf16(const at::Tensor& x, at::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "transpose_bf16: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(1) && out.size(1) == x.size(0) && out.is_contiguous() &&
              out.scalar_type() == at::kBFloat16, "transpose_bf16: out must be a contiguous bfloat16 x.T");
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* xp = x.data_ptr<float>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  constexpr int64_t kRows = 16, kCols = 64;
  const int64_t col_tiles = (cols + kCols - 1) / kCols;
  at::parallel_for(0, col_tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t c0 = t * kCols, c1 = std::min(cols, c0 + kCols);
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int64_t nr = std::min(rows, r0 + kRows) - r0;
        int64_t c = c0;
#ifdef SYSOPT_AVX512
        if (nr == kRows) {
          for (; c + 16 <= c1; c += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(xp + (r0 + i) * cols + c);
            transpose16x16(r);
            for (int k = 0; k < 16; ++k) store_bf16x16(op + (c + k) * rows + r0, r[k]);
          }
        }
#endif
        for (; c < c1; ++c)
          for (int64_t r = 0; r < nr; ++r) op[c * rows + r0 + r] = c10::BFloat16(xp[(r0 + r) * cols + c]);
      }
    }
  });
}

bool built_with_avx512() {
#ifdef SYSOPT_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(SYSOPT_OPS_NAMESPACE, m) {
  m.def("quantize_rows_int8(Tensor x, Tensor(a!) q, Tensor(b!) scale, Tensor(c!) bf16, bool pow2) -> ()",
        &quantize_rows_int8);
  m.def("cast_int8(Tensor x, Tensor(a!) q, float inv, bool clamp) -> ()", &cast_int8);
  m.def("dequant_int32(Tensor acc, Tensor(a!) out, Tensor row, Tensor col, Tensor bias) -> ()", &dequant_int32);
  m.def("transpose_bf16(Tensor x, Tensor(a!) out) -> ()", &transpose_bf16);
  m.def("built_with_avx512() -> bool", &built_with_avx512);
}
"""
