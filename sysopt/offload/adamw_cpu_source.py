"""C++ source of the host AdamW kernel (built JIT by sysopt.offload.cpu_kernel): bf16 moments with stochastic
rounding; fp32, stochastically rounded bf16 or Kahan-compensated bf16 master weights; fp32 or bf16 gradients;
AVX-512 (or AVX2 where the CPU has no AVX-512) with a scalar twin.

Every operation is a single IEEE-rounded add, multiply, divide or square root (built with -ffp-contract=off,
so no FMA), in the same order as the torch reference in sysopt.offload.update: results are bitwise equal.
Stochastic-rounding noise is a counter-based hash of (seed, element index), independent of the threading."""

CPP_SOURCE = r"""
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SYSOPT_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define SYSOPT_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 1 << 15;  // elements per parallel work item (a multiple of the 16 SIMD lanes)
// The vector paths advance a noise counter within a work item, which needs the index's high word fixed there.
static_assert((int64_t{1} << 32) % kBlock == 0, "work items must never cross a multiple of 2^32 elements");

struct Hyper {  // one tensor's scalars, rounded to fp32 exactly as torch rounds a Python float operand
  float decay, wdlr, b1, omb1, b2, omb2, step_size, inv_bc2_sqrt, eps;
  uint32_t seed_lo, seed_hi;
};

struct Work {
  int64_t tensor, begin, end;
};

// ------------------------------------------------------------------ scalar twin (tails, non-AVX-512 CPUs)

constexpr uint32_t kWeyl = 0x9E3779B9u, kWeylHigh = 0x85EBCA77u;

// The first half of murmur3's finaliser: one multiply. Each element's noise is exactly uniform whatever the
// mixer (a bijection of seed_lo + i * golden, and seed_lo is uniform); the mixer only breaks up patterns
// between neighbouring elements. A second round cost ~10% of the kernel's throughput.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  return x;
}

// SplitMix-style counter hash: mix(seed_lo + i * golden) ^ seed_hi (the index's high word mixed in too).
inline uint32_t noise32(int64_t i, const Hyper& h) {
  uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
  return mix32(h.seed_lo + lo * kWeyl + hi * kWeylHigh) ^ h.seed_hi;
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return float_of(static_cast<uint32_t>(x.x) << 16); }

inline bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// fp32 bits plus up to 0xFFFF, keep the high half: infinities stay (their low half is 0); NaN -> 0x7FC0.
inline uint16_t high_half(uint32_t u, uint32_t add) {
  return is_nan_bits(u) ? 0x7FC0 : static_cast<uint16_t>((u + add) >> 16);
}

inline uint16_t round_stochastic(float f, uint32_t noise16) { return high_half(bits_of(f), noise16); }

inline uint16_t round_nearest_even(float f) {
  uint32_t u = bits_of(f);
  return high_half(u, 0x7FFFu + ((u >> 16) & 1u));
}

// A stochastically rounded bf16 master takes its noise from the moments' hash: the xor of its two halves. With
// the halves independent and uniform, the xor is uniform (the rounding is unbiased) and independent of either
// half alone (of m's rounding, and of v's); only the three together are dependent. One vector op.
inline uint32_t master_noise16(uint32_t noise) { return (noise & 0xFFFFu) ^ (noise >> 16); }

inline void store(float* dst, float x, uint32_t) { *dst = x; }
inline void store(c10::BFloat16* dst, float x, uint32_t noise16) { dst->x = round_stochastic(x, noise16); }

// One element: moments, then the master weight (fp32, or bf16 with a Kahan compensation buffer `c`).
template <typename P, typename G, typename S, bool kKahan>
inline void element(P* p, P* c, const G* g, S* m, S* v, int64_t i, const Hyper& h) {
  float gi = to_f32(g[i]);
  float mi = h.b1 * to_f32(m[i]) + h.omb1 * gi;
  float vi = h.b2 * to_f32(v[i]) + h.omb2 * (gi * gi);
  float denom = __builtin_sqrtf(vi) * h.inv_bc2_sqrt + h.eps;
  float step = h.step_size * (mi / denom);
  constexpr bool kRound = std::is_same_v<S, c10::BFloat16>;
  uint32_t noise = kRound ? noise32(i, h) : 0u;
  store(m + i, mi, noise & 0xFFFFu);
  store(v + i, vi, noise >> 16);
  if constexpr (kKahan) {
    float pi = to_f32(p[i]);
    float u = to_f32(c[i]) - (h.wdlr * pi + step);
    float t = pi + u;
    uint16_t t16 = round_nearest_even(t);
    float lost = u - (float_of(static_cast<uint32_t>(t16) << 16) - pi);
    p[i].x = t16;
    c[i].x = round_nearest_even(lost);
  } else if constexpr (std::is_same_v<P, c10::BFloat16>) {  // bf16 master, stochastically rounded
    store(p + i, to_f32(p[i]) * h.decay - step, master_noise16(noise));
  } else {
    p[i] = p[i] * h.decay - step;
  }
}

#ifdef SYSOPT_AVX512
// ------------------------------------------------------------------ AVX-512: the same operations, 16 lanes

struct Lanes {  // constant vectors, built once per work item
  __m512i weyl = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                    _mm512_set1_epi32(static_cast<int>(kWeyl)));
  __m512i weyl16 = _mm512_set1_epi32(static_cast<int>(16u * kWeyl));  // the counter's advance per vector
  // vpermw indices: word k of a bf16 vector to the high half of lane k, and back.
  __m512i widen = _mm512_setr_epi32(0x00000000, 0x00010000, 0x00020000, 0x00030000, 0x00040000, 0x00050000,
                                    0x00060000, 0x00070000, 0x00080000, 0x00090000, 0x000A0000, 0x000B0000,
                                    0x000C0000, 0x000D0000, 0x000E0000, 0x000F0000);
  __m512i narrow = _mm512_setr_epi32(0x00030001, 0x00070005, 0x000B0009, 0x000F000D, 0x00130011, 0x00170015,
                                     0x001B0019, 0x001F001D, 0, 0, 0, 0, 0, 0, 0, 0);
};

inline __m512 load16(const float* x, const Lanes&) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x, const Lanes& l) {
  __m512i raw = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, l.widen, raw));
}

// noise32 of lanes i .. i + 15, for i = begin, begin + 16, ...: the hash's input advances by 16 * golden per
// vector instead of being rebuilt from i (a work item never crosses a multiple of 2^32 elements: see kBlock).
struct Noise16 {
  __m512i x, seed_hi;
  Noise16(int64_t begin, const Hyper& h, const Lanes& l) {
    uint32_t lo = static_cast<uint32_t>(begin), hi = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32);
    x = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(h.seed_lo + lo * kWeyl + hi * kWeylHigh)), l.weyl);
    seed_hi = _mm512_set1_epi32(static_cast<int>(h.seed_hi));
  }
  __m512i next(const Lanes& l) {
    __m512i y = x;
    x = _mm512_add_epi32(x, l.weyl16);
    y = _mm512_xor_si512(y, _mm512_srli_epi32(y, 16));
    y = _mm512_mullo_epi32(y, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
    y = _mm512_xor_si512(y, _mm512_srli_epi32(y, 13));
    return _mm512_xor_si512(y, seed_hi);
  }
};

// As high_half: (u + add) with NaN lanes replaced by 0x7FC0'0000; the caller keeps the high halves.
inline __m512i add_keep_nan(__m512i u, __m512i add) {
  __m512 x = _mm512_castsi512_ps(u);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, _mm512_add_epi32(u, add), _mm512_set1_epi32(0x7FC00000));
}

inline __m512i round_nearest_even16(__m512 x) {  // rounded fp32 bits (low halves are garbage)
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x10000)), 16);
  return add_keep_nan(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}

inline void store_high_halves(c10::BFloat16* dst, __m512i r, const Lanes& l) {
  __m512i packed = _mm512_permutexvar_epi16(l.narrow, r);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_castsi512_si256(packed));
}

// x rounded stochastically into dst; the NaN blend runs only when some lane needs it (a value is NaN only
// after a NaN or infinite gradient).
inline void store_stochastic16(c10::BFloat16* dst, __m512 x, __m512i noise16, const Lanes& l) {
  __m512i u = _mm512_castps_si512(x);
  if (__builtin_expect(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) == 0, 1)) {
    store_high_halves(dst, _mm512_add_epi32(u, noise16), l);
  } else {
    store_high_halves(dst, add_keep_nan(u, noise16), l);
  }
}

// Both moments: the low half of each lane's noise for m, the high half for v.
inline void store_moments16(c10::BFloat16* m, c10::BFloat16* v, __m512 mi, __m512 vi, __m512i noise,
                            const Lanes& l) {
  __m512i madd = _mm512_and_si512(noise, _mm512_set1_epi32(0xFFFF)), vadd = _mm512_srli_epi32(noise, 16);
  __m512i mu = _mm512_castps_si512(mi), vu = _mm512_castps_si512(vi);
  if (__builtin_expect(_mm512_cmp_ps_mask(mi, vi, _CMP_UNORD_Q) == 0, 1)) {  // neither is NaN in any lane
    store_high_halves(m, _mm512_add_epi32(mu, madd), l);
    store_high_halves(v, _mm512_add_epi32(vu, vadd), l);
  } else {
    store_high_halves(m, add_keep_nan(mu, madd), l);
    store_high_halves(v, add_keep_nan(vu, vadd), l);
  }
}
inline void store_moments16(float* m, float* v, __m512 mi, __m512 vi, __m512i, const Lanes&) {
  _mm512_storeu_ps(m, mi);
  _mm512_storeu_ps(v, vi);
}

constexpr int64_t kPrefetch = 1024;  // elements ahead (past the end of a tensor a prefetch is harmless)

template <typename T>
inline void prefetch(const T* x) {
  _mm_prefetch(reinterpret_cast<const char*>(x), _MM_HINT_T0);
}

template <typename P, typename G, typename S, bool kKahan>
inline void element16(P* p, P* c, const G* g, S* m, S* v, int64_t i, const Hyper& h, const Lanes& l,
                      __m512i noise) {
  __m512 gi = load16(g + i, l);
  __m512 mi = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(h.b1), load16(m + i, l)),
                            _mm512_mul_ps(_mm512_set1_ps(h.omb1), gi));
  __m512 vi = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(h.b2), load16(v + i, l)),
                            _mm512_mul_ps(_mm512_set1_ps(h.omb2), _mm512_mul_ps(gi, gi)));
  __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), _mm512_set1_ps(h.inv_bc2_sqrt)),
                               _mm512_set1_ps(h.eps));
  __m512 step = _mm512_mul_ps(_mm512_set1_ps(h.step_size), _mm512_div_ps(mi, denom));
  store_moments16(m + i, v + i, mi, vi, noise, l);
  if constexpr (kKahan) {
    __m512 pi = load16(p + i, l);
    __m512 u = _mm512_sub_ps(load16(c + i, l), _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(h.wdlr), pi), step));
    __m512i t = round_nearest_even16(_mm512_add_ps(pi, u));
    __m512 rounded = _mm512_castsi512_ps(_mm512_and_si512(t, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    __m512 lost = _mm512_sub_ps(u, _mm512_sub_ps(rounded, pi));
    store_high_halves(p + i, t, l);
    store_high_halves(c + i, round_nearest_even16(lost), l);
  } else if constexpr (std::is_same_v<P, c10::BFloat16>) {  // bf16 master, stochastically rounded
    __m512i pnoise = _mm512_xor_si512(_mm512_and_si512(noise, _mm512_set1_epi32(0xFFFF)), _mm512_srli_epi32(noise, 16));
    __m512 pi = _mm512_sub_ps(_mm512_mul_ps(load16(p + i, l), _mm512_set1_ps(h.decay)), step);
    store_stochastic16(p + i, pi, pnoise, l);
  } else {
    __m512 pi = load16(p + i, l);
    _mm512_storeu_ps(reinterpret_cast<float*>(p + i),
                     _mm512_sub_ps(_mm512_mul_ps(pi, _mm512_set1_ps(h.decay)), step));
  }
}
#endif

#ifdef SYSOPT_AVX2
// ------------------------------------------------------------------ AVX2 (CPUs without AVX-512): 8 lanes

struct Lanes8 {
  __m256i weyl = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                    _mm256_set1_epi32(static_cast<int>(kWeyl)));
  __m256i weyl8 = _mm256_set1_epi32(static_cast<int>(8u * kWeyl));  // the counter's advance per vector
};

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const c10::BFloat16* x) {  // interleaved with zero words, not widened and shifted
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x)), zero = _mm_setzero_si128();
  return _mm256_castsi256_ps(_mm256_setr_m128i(_mm_unpacklo_epi16(zero, raw), _mm_unpackhi_epi16(zero, raw)));
}

// noise32 of lanes i .. i + 7, for i = begin, begin + 8, ...: the hash's input advances by 8 * golden per
// vector instead of being rebuilt from i. A work item never crosses a multiple of 2^32 elements (kBlock
// divides 2^32 and items start at multiples of it), so the index's high word is fixed within one.
struct Noise8 {
  __m256i x, seed_hi;
  Noise8(int64_t begin, const Hyper& h, const Lanes8& l) {
    uint32_t lo = static_cast<uint32_t>(begin), hi = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32);
    x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(h.seed_lo + lo * kWeyl + hi * kWeylHigh)), l.weyl);
    seed_hi = _mm256_set1_epi32(static_cast<int>(h.seed_hi));
  }
  __m256i next(const Lanes8& l) {
    __m256i y = x;
    x = _mm256_add_epi32(x, l.weyl8);
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 16));
    y = _mm256_mullo_epi32(y, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 13));
    return _mm256_xor_si256(y, seed_hi);
  }
};

inline __m256i add_keep_nan8(__m256i u, __m256i add) {  // as high_half, before the shift
  __m256 x = _mm256_castsi256_ps(u);
  __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  __m256 sum = _mm256_castsi256_ps(_mm256_add_epi32(u, add));
  return _mm256_castps_si256(_mm256_blendv_ps(sum, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
}

inline __m256i round_nearest_even8(__m256 x) {  // rounded fp32 bits (low halves are garbage)
  __m256i u = _mm256_castps_si256(x);
  __m256i lsb = _mm256_srli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x10000)), 16);
  return add_keep_nan8(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
}

// The high halves of r's lanes, packed: byte shuffles, not shifts and packs (Zen 1 runs vector shifts on one
// pipe, which the hash and the adds already crowd).
inline void store_high_halves8(c10::BFloat16* dst, __m256i r) {
  const __m128i pick = _mm_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i pick_hi = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14, 15);
  __m128i lo = _mm_shuffle_epi8(_mm256_castsi256_si128(r), pick);
  __m128i hi = _mm_shuffle_epi8(_mm256_extracti128_si256(r, 1), pick_hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_or_si128(lo, hi));
}
// Both moments rounded stochastically: the low half of each lane's noise for m, the high half for v. The NaN
// blend (a moment is NaN only after a NaN or infinite gradient) runs only when some lane needs it.
inline void store_moments8(c10::BFloat16* m, c10::BFloat16* v, __m256 mi, __m256 vi, __m256i noise) {
  __m256i madd = _mm256_and_si256(noise, _mm256_set1_epi32(0xFFFF)), vadd = _mm256_srli_epi32(noise, 16);
  __m256i mu = _mm256_castps_si256(mi), vu = _mm256_castps_si256(vi);
  __m256 nan = _mm256_cmp_ps(mi, vi, _CMP_UNORD_Q);  // lanes where either is NaN
  if (__builtin_expect(_mm256_testz_ps(nan, nan), 1)) {
    store_high_halves8(m, _mm256_add_epi32(mu, madd));
    store_high_halves8(v, _mm256_add_epi32(vu, vadd));
  } else {
    store_high_halves8(m, add_keep_nan8(mu, madd));
    store_high_halves8(v, add_keep_nan8(vu, vadd));
  }
}
inline void store_stochastic8(c10::BFloat16* dst, __m256 x, __m256i noise16) {
  __m256i u = _mm256_castps_si256(x);
  __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  if (__builtin_expect(_mm256_testz_ps(nan, nan), 1)) {
    store_high_halves8(dst, _mm256_add_epi32(u, noise16));
  } else {
    store_high_halves8(dst, add_keep_nan8(u, noise16));
  }
}
inline void store_moments8(float* m, float* v, __m256 mi, __m256 vi, __m256i) {
  _mm256_storeu_ps(m, mi);
  _mm256_storeu_ps(v, vi);
}

template <typename P, typename G, typename S, bool kKahan>
inline void element8(P* p, P* c, const G* g, S* m, S* v, int64_t i, const Hyper& h, __m256i noise) {
  __m256 gi = load8(g + i);
  __m256 mi = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(h.b1), load8(m + i)), _mm256_mul_ps(_mm256_set1_ps(h.omb1), gi));
  __m256 vi = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(h.b2), load8(v + i)),
                            _mm256_mul_ps(_mm256_set1_ps(h.omb2), _mm256_mul_ps(gi, gi)));
  __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), _mm256_set1_ps(h.inv_bc2_sqrt)), _mm256_set1_ps(h.eps));
  __m256 step = _mm256_mul_ps(_mm256_set1_ps(h.step_size), _mm256_div_ps(mi, denom));
  store_moments8(m + i, v + i, mi, vi, noise);
  if constexpr (kKahan) {
    __m256 pi = load8(p + i);
    __m256 u = _mm256_sub_ps(load8(c + i), _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(h.wdlr), pi), step));
    __m256i t = round_nearest_even8(_mm256_add_ps(pi, u));
    __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(t, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    __m256 lost = _mm256_sub_ps(u, _mm256_sub_ps(rounded, pi));
    store_high_halves8(p + i, t);
    store_high_halves8(c + i, round_nearest_even8(lost));
  } else if constexpr (std::is_same_v<P, c10::BFloat16>) {  // bf16 master, stochastically rounded
    __m256i pnoise = _mm256_xor_si256(_mm256_and_si256(noise, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(noise, 16));
    store_stochastic8(p + i, _mm256_sub_ps(_mm256_mul_ps(load8(p + i), _mm256_set1_ps(h.decay)), step), pnoise);
  } else {
    __m256 pi = load8(p + i);
    _mm256_storeu_ps(reinterpret_cast<float*>(p + i), _mm256_sub_ps(_mm256_mul_ps(pi, _mm256_set1_ps(h.decay)), step));
  }
}
#endif

template <typename P, typename G, typename S, bool kKahan>
void run_range(P* p, P* c, const G* g, S* m, S* v, int64_t begin, int64_t end, const Hyper& hyper) {
  // A local copy: the stores through p, m and v cannot alias it, so the scalars' broadcasts leave the loop
  // (read through the reference, every vector re-broadcast all nine from memory).
  const Hyper h = hyper;
  int64_t i = begin;
#ifdef SYSOPT_AVX512
  const Lanes lanes;
  Noise16 noise(begin, h, lanes);
  _Pragma("GCC unroll 2")  // two vectors in flight: their divides and square roots overlap
  for (; i + 16 <= end; i += 16) {
    // A single thread's bf16-state streams are latency-bound without software prefetch (~5-10%); the fp32
    // state's seven 4-byte streams are ~18% faster without it (Zen 4, 100M elements, 1 thread).
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      prefetch(p + i + kPrefetch);
      prefetch(g + i + kPrefetch);
      prefetch(m + i + kPrefetch);
      prefetch(v + i + kPrefetch);
      if constexpr (kKahan) prefetch(c + i + kPrefetch);
    }
    __m512i lane_noise = std::is_same_v<S, c10::BFloat16> ? noise.next(lanes) : _mm512_setzero_si512();
    element16<P, G, S, kKahan>(p, c, g, m, v, i, h, lanes, lane_noise);
  }
#elif defined(SYSOPT_AVX2)
  const Lanes8 lanes;
  Noise8 noise(begin, h, lanes);
  _Pragma("GCC unroll 2")
  for (; i + 8 <= end; i += 8) {
    __m256i lane_noise = std::is_same_v<S, c10::BFloat16> ? noise.next(lanes) : _mm256_setzero_si256();
    element8<P, G, S, kKahan>(p, c, g, m, v, i, h, lane_noise);
  }
#endif
  for (; i < end; ++i) element<P, G, S, kKahan>(p, c, g, m, v, i, h);
}

template <typename P, typename G, typename S, bool kKahan>
void run_work(at::TensorList params, at::TensorList comps, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, const std::vector<Hyper>& hyper,
              const std::vector<Work>& work) {
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const Work& item = work[w];
      const int64_t t = item.tensor;
      P* c = kKahan ? static_cast<P*>(comps[t].data_ptr()) : nullptr;
      run_range<P, G, S, kKahan>(static_cast<P*>(params[t].data_ptr()), c,
                                 static_cast<const G*>(grads[t].data_ptr()),
                                 static_cast<S*>(exp_avgs[t].data_ptr()),
                                 static_cast<S*>(exp_avg_sqs[t].data_ptr()), item.begin, item.end, hyper[t]);
    }
  });
}

void check_same(at::TensorList ts, c10::ScalarType dtype, at::TensorList ref, const char* what) {
  TORCH_CHECK(ts.size() == ref.size(), what, ": ", ts.size(), " tensors for ", ref.size(), " parameters");
  for (size_t j = 0; j < ts.size(); ++j) {
    TORCH_CHECK(ts[j].device().is_cpu() && ts[j].is_contiguous(), what, "[", j, "] must be a contiguous CPU tensor");
    TORCH_CHECK(ts[j].scalar_type() == dtype, what, "[", j, "] has dtype ", ts[j].scalar_type(), ", expected ",
                dtype, " like the others");
    TORCH_CHECK(ts[j].numel() == ref[j].numel(), what, "[", j, "] has ", ts[j].numel(), " elements, the parameter ",
                ref[j].numel());
  }
}

// AdamW on lists of CPU tensors, in place. `scalars` holds per tensor, in order: decay (1 - lr*wd), lr*wd,
// beta1, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1, 1 / sqrt(bias_correction2), eps (9 doubles),
// `seeds` two 32-bit words per tensor. Empty `comps`: fp32 master params, or bf16 ones rounded stochastically;
// else bf16 params + Kahan compensation.
void adamw_step(at::TensorList params, at::TensorList comps, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, c10::ArrayRef<double> scalars, c10::ArrayRef<int64_t> seeds) {
  const size_t n = params.size();
  if (n == 0) return;
  const bool kahan = !comps.empty();
  const auto pdtype = kahan ? at::kBFloat16 : params[0].scalar_type();
  TORCH_CHECK(pdtype == at::kFloat || pdtype == at::kBFloat16, "params must be float32 or bfloat16, got ", pdtype);
  check_same(params, pdtype, params, kahan ? "params (with compensation)" : "params");
  if (kahan) check_same(comps, at::kBFloat16, params, "compensations");
  const auto gdtype = grads.empty() ? at::kFloat : grads[0].scalar_type();
  check_same(grads, gdtype, params, "grads");
  TORCH_CHECK(gdtype == at::kFloat || gdtype == at::kBFloat16, "grads must be float32 or bfloat16, got ", gdtype);
  const auto sdtype = exp_avgs[0].scalar_type();
  check_same(exp_avgs, sdtype, params, "exp_avgs");
  check_same(exp_avg_sqs, sdtype, params, "exp_avg_sqs");
  TORCH_CHECK(sdtype == at::kFloat || sdtype == at::kBFloat16, "moments must be float32 or bfloat16, got ", sdtype);
  TORCH_CHECK(!(pdtype == at::kBFloat16 && sdtype == at::kFloat), "bf16 params need bfloat16 moments");
  TORCH_CHECK(scalars.size() == 9 * n, "scalars: expected 9 per tensor (", 9 * n, "), got ", scalars.size());
  TORCH_CHECK(seeds.size() == 2 * n, "seeds: expected 2 per tensor (", 2 * n, "), got ", seeds.size());
  std::vector<Hyper> hyper(n);
  std::vector<Work> work;
  for (size_t t = 0; t < n; ++t) {
    const double* s = scalars.data() + 9 * t;
    hyper[t] = Hyper{static_cast<float>(s[0]), static_cast<float>(s[1]), static_cast<float>(s[2]),
                     static_cast<float>(s[3]), static_cast<float>(s[4]), static_cast<float>(s[5]),
                     static_cast<float>(s[6]), static_cast<float>(s[7]), static_cast<float>(s[8]),
                     static_cast<uint32_t>(seeds[2 * t]), static_cast<uint32_t>(seeds[2 * t + 1])};
    const int64_t numel = params[t].numel();
    for (int64_t b = 0; b < numel; b += kBlock) work.push_back(Work{static_cast<int64_t>(t), b, std::min(numel, b + kBlock)});
  }
  using BF = c10::BFloat16;
  const bool g32 = gdtype == at::kFloat, s32 = sdtype == at::kFloat;
  if (kahan) {
    if (g32) run_work<BF, float, BF, true>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
    else run_work<BF, BF, BF, true>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
  } else if (pdtype == at::kBFloat16) {  // bf16 master, stochastically rounded
    if (g32) run_work<BF, float, BF, false>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
    else run_work<BF, BF, BF, false>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
  } else if (s32) {
    if (g32) run_work<float, float, float, false>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
    else run_work<float, BF, float, false>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
  } else {
    if (g32) run_work<float, float, BF, false>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
    else run_work<float, BF, BF, false>(params, comps, grads, exp_avgs, exp_avg_sqs, hyper, work);
  }
}

bool built_with_avx2() {
#ifdef SYSOPT_AVX2
  return true;
#else
  return false;
#endif
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
  m.def("adamw_step(Tensor(a!)[] params, Tensor(b!)[] comps, Tensor[] grads, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, float[] scalars, int[] seeds) -> ()", &adamw_step);
  m.def("built_with_avx512() -> bool", &built_with_avx512);
  m.def("built_with_avx2() -> bool", &built_with_avx2);  // the 8-lane path (no AVX-512 on this CPU)
}
"""
