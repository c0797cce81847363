/* Weight matrices as the CPU kernels read them: float rows, GGUF blocks, interleaved blocks.
 *
 * Shared by the whole-step decoder (llama_decode.c) and the prefill GEMM (block_gemm.c). A matrix
 * is `rows` output features of `cols` inputs, row n at data + n * row_bytes, in one of:
 *   float32, float16, bfloat16   plain rows
 *   Q8_0   34-byte blocks of 32 weights: float16 scale d, 32 int8 q          (w = d * q)
 *   Q4_0   18-byte blocks: float16 scale d, 16 bytes of nibbles (low: j, high: j + 16; w = (q - 8) * d)
 *   Q4_1   20-byte blocks: float16 scale d, float16 minimum m, 16 bytes of nibbles (w = d * q + m)
 *   Q5_0   22-byte blocks: float16 d, 4 bytes qh, 16 bytes of nibbles as Q4's; bit j of qh (little
 *          endian) is weight j's fifth bit (w = d * (q - 16))
 *   Q5_1   24-byte blocks: float16 d, float16 m, qh, nibbles (w = d * q + m)
 *   Q6_K   210-byte super-blocks of 256 weights: ql [128] (low four bits), qh [64] (top two), 16
 *          int8 scales (one per 16 weights), float16 d (w = (d * scale) * (q - 32)); q6_k_parts
 *          says where each 32-weight sub-block's bits are. Read as eight blocks of 32, each
 *          with two scales.
 *   Q2_K   84-byte super-blocks of 256 weights: 16 bytes of scales (low nibble: a scale, high:
 *          a minimum, one pair per 16 weights), qs [64] (2-bit q, four per byte), float16 d and
 *          dmin (w = (d * scale) * q - dmin * minimum); q2_k_parts says where each 32-weight
 *          sub-block's bits are. Read as eight blocks of 32, each with two scales and minimums.
 *   Q3_K   110-byte super-blocks of 256 weights: hmask [32] (bit b of byte l: weight 32b + l's
 *          third bit), qs [64] (the low two bits, laid out as Q2_K's), 12 bytes of 6-bit scales
 *          (one per 16 weights, packed as q3_k_scales reads them), float16 d (w = (d * (scale -
 *          32)) * (q - 4), q the three bits). Read as eight blocks of 32, each with two scales.
 *   Q4_K   144-byte super-blocks of 256 weights: float16 d and dmin, 12 bytes of 6-bit scales
 *          and minimums (one pair per 32 weights, packed as k_scales_mins reads them), qs [128]
 *          (32-byte chunk i: sub-block 2i in the low nibbles, 2i + 1 in the high ones; w =
 *          (d * scale) * q - dmin * minimum)
 *   Q5_K   176-byte super-blocks: d, dmin, the 12 scale bytes, qh [32] (bit j of byte l: weight l
 *          of sub-block j's fifth bit), then qs [128] as Q4_K's
 *   *_X4   the same blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) with four rows interleaved by
 *          pagoda_repack_x4: for each group of four rows and each block column, the four scales,
 *          then (Q4_1, Q5_1) the four minimums, then the four payloads. A group of four rows
 *          takes 4 * row_bytes bytes. Q4_K and Q5_K too, a super-block column at a time: the
 *          four rows' 16-byte headers (d, dmin, scale bytes), Q5_K's four qh [32], then for
 *          each 32-byte chunk of qs the four rows' chunks (k_parts_as).
 */
#ifndef PAGODA_BLOCKS_H
#define PAGODA_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PG_AVX2 1
#endif

enum { PG_F32 = 0, PG_F16 = 1, PG_BF16 = 2, PG_Q8_0 = 3, PG_Q4_0 = 4, PG_Q4_1 = 5 };
enum { PG_Q8_0_X4 = 6, PG_Q4_0_X4 = 7, PG_Q4_1_X4 = 8 };
/* Block matrices packed for the integer GEMM (int8_gemm.c): 16-row groups, nibbles or bytes. */
enum { PG_I8_NIBBLES = 9, PG_I8_BYTES = 10 };
/* More GGUF block formats, read as stored; Q5_0 and Q5_1 also interleaved (14, 15). */
enum { PG_Q5_0 = 11, PG_Q5_1 = 12, PG_Q6_K = 13, PG_Q5_0_X4 = 14, PG_Q5_1_X4 = 15 };
enum { PG_Q2_K = 16, PG_Q4_K = 17, PG_Q5_K = 18, PG_Q4_K_X4 = 19, PG_Q5_K_X4 = 20, PG_Q3_K = 21 };
#define PG_Q6_K_BYTES 210
#define PG_Q3_K_BYTES 110
#define PG_Q2_K_BYTES 84
#define PG_Q4_K_BYTES 144
#define PG_Q5_K_BYTES 176

typedef struct {
    const uint8_t *data;
    const float *bias; /* [rows] or NULL */
    int64_t rows, cols, row_bytes, format;
} pg_matrix;

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            --exponent;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
#endif
}

static inline float read_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return half_to_float(h);
}

/* One GGUF block of 32 weights as float32, computed as the loader's PyTorch dequantizers do
 * (Q8_0: d * q; Q4_0: (q - 8) * d; Q4_1: d * q + m, with no fused multiply-add under -std=c11),
 * so every path sees the same weights. */
static inline void widen_q8_0(float d, const int8_t *qs, float *out) {
#ifdef PG_AVX2
    const __m256 scale = _mm256_set1_ps(d);
    for (int i = 0; i < 4; ++i) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * i)));
        _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(q)));
    }
#else
    for (int j = 0; j < 32; ++j) out[j] = d * (float)qs[j];
#endif
}

/* Q4_0 (with_min 0) and Q4_1 (with_min 1, minimum m) nibbles. */
static inline void widen_q4(float d, float m, int with_min, const uint8_t *qs, float *out) {
#ifdef PG_AVX2
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i parts[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
    const __m256 scale = _mm256_set1_ps(d), minimum = _mm256_set1_ps(m);
    const __m256i eight = _mm256_set1_epi32(8);
    for (int i = 0; i < 4; ++i) {
        const __m256i q = _mm256_cvtepu8_epi32(parts[i]);
        __m256 value;
        if (with_min)
            value = _mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(q)), minimum);
        else
            value = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), scale);
        _mm256_storeu_ps(out + 8 * i, value);
    }
#else
    for (int j = 0; j < 16; ++j) {
        const float q0 = (float)(qs[j] & 0x0f), q1 = (float)(qs[j] >> 4);
        out[j] = with_min ? d * q0 + m : (q0 - 8.f) * d;
        out[j + 16] = with_min ? d * q1 + m : (q1 - 8.f) * d;
    }
#endif
}

#ifdef PG_AVX2
/* A Q5 block's 32 values (0-31), in weight order, as bytes. */
static inline __m256i q5_values(const uint8_t *qh_qs) {
    uint32_t qh;
    memcpy(&qh, qh_qs, sizeof qh);
    const __m128i qs = _mm_loadu_si128((const __m128i *)(qh_qs + 4));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m256i low = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), mask),
                                         _mm_and_si128(qs, mask));
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    /* qh is a byte mask as it stands: 16 where its bit is set. */
    return _mm256_mask_add_epi8(low, (__mmask32)qh, low, _mm256_set1_epi8(0x10));
#else
    /* Byte j of `spread` is byte j / 8 of qh (each 128-bit lane holds qh four times), and `bit`
     * picks its bit j % 8. */
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)qh),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                         3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
#endif
}

/* A Q6_K sub-block's 32 values q - 32 (-32 to 31), in weight order, as signed bytes. */
static inline __m256i q6_k_values(const uint8_t *ql, int high, const uint8_t *qh, int shift) {
    const __m256i nibble_mask = _mm256_set1_epi8(0x0f);
    __m256i low = _mm256_loadu_si256((const __m256i *)ql);
    if (high) low = _mm256_srli_epi16(low, 4);
    low = _mm256_and_si256(low, nibble_mask);
    __m256i top = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qh), _mm_cvtsi32_si128(shift));
    top = _mm256_slli_epi16(_mm256_and_si256(top, _mm256_set1_epi8(3)), 4);
    return _mm256_sub_epi8(_mm256_or_si256(low, top), _mm256_set1_epi8(32));
}
#endif

/* Q5_0 (with_min 0: w = d * (q - 16)) and Q5_1 (w = d * q + m) from the block's qh and nibbles. */
static inline void widen_q5(float d, float m, int with_min, const uint8_t *qh_qs, float *out) {
#ifdef PG_AVX2
    const __m256i q = q5_values(qh_qs);
    const __m256 scale = _mm256_set1_ps(d), minimum = _mm256_set1_ps(m);
    const __m256i sixteen = _mm256_set1_epi32(16);
    uint8_t bytes[32];
    _mm256_storeu_si256((__m256i *)bytes, q);
    for (int i = 0; i < 4; ++i) {
        const __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8 * i)));
        const __m256 value =
            with_min ? _mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(qi)), minimum)
                     : _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_sub_epi32(qi, sixteen)));
        _mm256_storeu_ps(out + 8 * i, value);
    }
#else
    uint32_t qh;
    memcpy(&qh, qh_qs, sizeof qh);
    const uint8_t *qs = qh_qs + 4;
    for (int j = 0; j < 16; ++j) {
        const int q0 = (qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
        const int q1 = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        out[j] = with_min ? d * (float)q0 + m : d * (float)(q0 - 16);
        out[j + 16] = with_min ? d * (float)q1 + m : d * (float)(q1 - 16);
    }
#endif
}

/* Where sub-block j (0-7: weights 32j .. 32j + 31) of the Q6_K super-block at `super` keeps its
 * bits: in each half of 128 weights (ql += 64, qh += 32, scales += 8 per half), sub-block k (0-3)
 * takes the low (k < 2) or high nibbles of ql bytes 32 (k & 1) .. + 31, bits 2k and 2k + 1 of the
 * half's 32 qh bytes, and scales 2k (its first 16 weights) and 2k + 1. d0 and d1 are d * scale,
 * exact in float32 (11 by 8 significant bits), as gguf computes them. */
static inline void q6_k_parts(const uint8_t *super, int j, const uint8_t **ql, int *high,
                              const uint8_t **qh, int *shift, float *d0, float *d1) {
    const int half = j / 4, k = j % 4;
    *ql = super + 64 * half + 32 * (k & 1);
    *high = k >> 1;
    *qh = super + 128 + 32 * half;
    *shift = 2 * k;
    const int8_t *scales = (const int8_t *)(super + 192) + 8 * half + 2 * k;
    const float d = read_half(super + 208);
    *d0 = d * (float)scales[0];
    *d1 = d * (float)scales[1];
}

static inline void widen_q6_k(const uint8_t *super, int j, float *out) {
    const uint8_t *ql, *qh;
    int high, shift;
    float d0, d1;
    q6_k_parts(super, j, &ql, &high, &qh, &shift, &d0, &d1);
#ifdef PG_AVX2
    const __m256i q = q6_k_values(ql, high, qh, shift);
    int8_t bytes[32];
    _mm256_storeu_si256((__m256i *)bytes, q);
    for (int i = 0; i < 4; ++i) {
        const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8 * i)));
        _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(_mm256_set1_ps(i < 2 ? d0 : d1),
                                                    _mm256_cvtepi32_ps(qi)));
    }
#else
    for (int l = 0; l < 32; ++l) {
        const int q = ((ql[l] >> (4 * high)) & 0x0f) | (((qh[l] >> shift) & 3) << 4);
        out[l] = (l < 16 ? d0 : d1) * (float)(q - 32);
    }
#endif
}

/* Where sub-block j (0-7: weights 32j .. 32j + 31) of the Q2_K super-block at `super` keeps its
 * bits: in each half of 128 weights (qs += 32, scales += 8 per half), sub-block k (0-3) takes bits
 * 2k and 2k + 1 of the half's 32 qs bytes, and the scale / minimum pairs 2k (its first 16 weights,
 * from qs bytes 0-15) and 2k + 1 (bytes 16-31). d0, d1 are d * scale and m0, m1 dmin * minimum,
 * exact in float32 (11 by 4 significant bits), as gguf computes them; sc0, sc1, mi0, mi1 the
 * 4-bit scales and minimums themselves. */
typedef struct {
    const uint8_t *qs;
    int shift, sc0, sc1, mi0, mi1;
    float d, dmin;
} pg_q2_k_part;

static inline pg_q2_k_part q2_k_parts(const uint8_t *super, int j) {
    const int half = j / 4, k = j % 4;
    const uint8_t *scales = super + 8 * half + 2 * k;
    pg_q2_k_part part;
    part.qs = super + 16 + 32 * half;
    part.shift = 2 * k;
    part.sc0 = scales[0] & 0x0f;
    part.mi0 = scales[0] >> 4;
    part.sc1 = scales[1] & 0x0f;
    part.mi1 = scales[1] >> 4;
    part.d = read_half(super + 80);
    part.dmin = read_half(super + 82);
    return part;
}

static inline void widen_q2_k(const uint8_t *super, int j, float *out) {
    const pg_q2_k_part part = q2_k_parts(super, j);
    const float d0 = part.d * (float)part.sc0, d1 = part.d * (float)part.sc1;
    const float m0 = part.dmin * (float)part.mi0, m1 = part.dmin * (float)part.mi1;
    /* (d * scale) * q is exact (q < 4), so one rounding: the subtraction's, as gguf's. */
    for (int l = 0; l < 32; ++l) {
        const int q = (part.qs[l] >> part.shift) & 3;
        out[l] = l < 16 ? d0 * (float)q - m0 : d1 * (float)q - m1;
    }
}

/* The sixteen 6-bit scales of a Q3_K super-block minus 32 (-32 to 31), scale i (weights 16i ..
 * 16i + 15) in byte i, from its 12 packed bytes: the low four bits of scale i are the low (i < 8)
 * or high nibble of byte i % 8, its top two bits are bits 2 (i / 4) and 2 (i / 4) + 1 of byte
 * 8 + i % 4. Four scales per 32-bit word operation. */
static inline void q3_k_scales(const uint8_t *packed, int8_t scales[16]) {
    uint32_t a, b, c, words[4];
    memcpy(&a, packed, 4);
    memcpy(&b, packed + 4, 4);
    memcpy(&c, packed + 8, 4);
    const uint32_t four = 0x0f0f0f0fu, two = 0x03030303u;
    words[0] = (a & four) | ((c & two) << 4);
    words[1] = (b & four) | (((c >> 2) & two) << 4);
    words[2] = ((a >> 4) & four) | (((c >> 4) & two) << 4);
    words[3] = ((b >> 4) & four) | (((c >> 6) & two) << 4);
    uint8_t bytes[16];
    memcpy(bytes, words, sizeof bytes);
    for (int i = 0; i < 16; ++i) scales[i] = (int8_t)(bytes[i] - 32);
}

#ifdef PG_AVX2
/* A Q3_K sub-block's 32 values q - 4 (-4 to 3), in weight order, as signed bytes: two bits at
 * `shift` of its qs bytes, and bit `bit` of the super-block's 32 hmask bytes (set: no offset). */
static inline __m256i q3_k_values(const uint8_t *qs, int shift, const uint8_t *hmask, int bit) {
    const __m256i low = _mm256_and_si256(
        _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qs), _mm_cvtsi32_si128(shift)),
        _mm256_set1_epi8(3));
    const __m256i high = _mm256_and_si256(
        _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)hmask), _mm_cvtsi32_si128(bit)),
        _mm256_set1_epi8(1));
    return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 2)), _mm256_set1_epi8(4));
}
#endif

/* Sub-block j (0-7: weights 32j .. 32j + 31) of the Q3_K super-block at `super`, widened: in
 * each half of 128 weights (qs += 32 per half), sub-block k (0-3) takes bits 2k and 2k + 1 of the
 * half's 32 qs bytes, bit 4 half + k of the 32 hmask bytes, and scales 8 half + 2k (its first 16
 * weights) and 8 half + 2k + 1. (d * scale) * q is exact in float32 (11 by 6 by 3 significant
 * bits), as gguf computes it. */
static inline void widen_q3_k(const uint8_t *super, int j, float *out) {
    const int half = j / 4, k = j % 4;
    int8_t scales[16];
    q3_k_scales(super + 96, scales);
    const float d = read_half(super + 108);
    const float d0 = d * (float)scales[8 * half + 2 * k], d1 = d * (float)scales[8 * half + 2 * k + 1];
    const uint8_t *qs = super + 32 + 32 * half;
#ifdef PG_AVX2
    const __m256i q = q3_k_values(qs, 2 * k, super, 4 * half + k);
    int8_t bytes[32];
    _mm256_storeu_si256((__m256i *)bytes, q);
    for (int i = 0; i < 4; ++i) {
        const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8 * i)));
        _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(_mm256_set1_ps(i < 2 ? d0 : d1),
                                                    _mm256_cvtepi32_ps(qi)));
    }
#else
    for (int l = 0; l < 32; ++l) {
        const int q = (((qs[l] >> (2 * k)) & 3) | (((super[l] >> (4 * half + k)) & 1) << 2)) - 4;
        out[l] = (l < 16 ? d0 : d1) * (float)q;
    }
#endif
}

/* The eight 6-bit scales (*scales) and minimums (*minimums) of a Q4_K or Q5_K super-block, one
 * byte each, sub-block j in byte j (little endian), from its 12 packed bytes: bytes 0-3 hold
 * scales 0-3 in their low six bits and bytes 4-7 minimums 0-3; scales and minimums 4-7 take their
 * low four bits from bytes 8-11 (low and high nibbles) and their top two from the top two bits
 * of bytes 0-3 (scales) and 4-7 (minimums). Four sub-blocks per 32-bit word operation. */
static inline void k_scales_mins(const uint8_t *packed, uint64_t *scales, uint64_t *minimums) {
    uint32_t a, b, c;
    memcpy(&a, packed, 4);
    memcpy(&b, packed + 4, 4);
    memcpy(&c, packed + 8, 4);
    const uint32_t six = 0x3f3f3f3fu, four = 0x0f0f0f0fu, top = 0x30303030u;
    *scales = (uint64_t)(a & six) | (uint64_t)((c & four) | ((a >> 2) & top)) << 32;
    *minimums = (uint64_t)(b & six) | (uint64_t)(((c >> 4) & four) | ((b >> 2) & top)) << 32;
}

/* Where super-block s of row n of a Q4_K (q5 0) or Q5_K (q5 1) matrix keeps its 16-byte header
 * (float16 d and dmin, the 12 scale bytes), Q5_K's 32 qh bytes, and its four 32-byte chunks of
 * qs (chunk c at qs + c * chunk): as stored, or in the row's group of four (x4). */
typedef struct {
    const uint8_t *header, *qh, *qs;
    int64_t chunk;
} pg_k_part;

static inline pg_k_part k_parts_as(const pg_matrix *w, int q5, int x4, int64_t n, int64_t s) {
    const int64_t bytes = q5 ? PG_Q5_K_BYTES : PG_Q4_K_BYTES;
    pg_k_part part;
    if (x4) {
        const uint8_t *group = w->data + (n - n % 4) * w->row_bytes + s * 4 * bytes;
        const int64_t lane = n % 4;
        part.header = group + 16 * lane;
        part.qh = group + 64 + 32 * lane;
        part.qs = group + (q5 ? 192 : 64) + 32 * lane;
        part.chunk = 128;
    } else {
        const uint8_t *super = w->data + n * w->row_bytes + s * bytes;
        part.header = super;
        part.qh = super + 16;
        part.qs = super + (q5 ? 48 : 16);
        part.chunk = 32;
    }
    return part;
}

/* Sub-block j (0-7) of a Q4_K (q5 0) or Q5_K (q5 1) super-block widened to 32 floats, as gguf
 * computes them: (d * scale) * q, exact in float32 (11 by 6 by 5 significant bits), minus
 * dmin * minimum (exact too), so one rounding, the subtraction's (no fused multiply-add under
 * -std=c11). Weight l is the low (j even) or high nibble of byte l of chunk j / 2. */
static inline void widen_k(pg_k_part part, int q5, int j, float *out) {
    uint64_t scales, minimums;
    k_scales_mins(part.header + 4, &scales, &minimums);
    const float d = read_half(part.header) * (float)((scales >> (8 * j)) & 0xff);
    const float m = read_half(part.header + 2) * (float)((minimums >> (8 * j)) & 0xff);
    const uint8_t *qs = part.qs + part.chunk * (j / 2), *qh = part.qh;
    const int shift = 4 * (j & 1);
#ifdef PG_AVX2
    __m256i q = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qs),
                                                  _mm_cvtsi32_si128(shift)),
                                 _mm256_set1_epi8(0x0f));
    if (q5) {
        const __m256i fifth = _mm256_and_si256(
            _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qh), _mm_cvtsi32_si128(j)),
            _mm256_set1_epi8(1));
        q = _mm256_or_si256(q, _mm256_slli_epi16(fifth, 4));
    }
    uint8_t bytes[32];
    _mm256_storeu_si256((__m256i *)bytes, q);
    const __m256 scale = _mm256_set1_ps(d), minimum = _mm256_set1_ps(m);
    for (int i = 0; i < 4; ++i) {
        const __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8 * i)));
        _mm256_storeu_ps(out + 8 * i,
                         _mm256_sub_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(qi)), minimum));
    }
#else
    for (int l = 0; l < 32; ++l) {
        int q = (qs[l] >> shift) & 0x0f;
        if (q5) q |= ((qh[l] >> j) & 1) << 4;
        out[l] = d * (float)q - m;
    }
#endif
}

/* Formats whose blocks of 32 share 256-weight super-blocks (rows a multiple of 256 inputs). */
static inline int is_super_block_format(int64_t format) {
    return format == PG_Q6_K || (format >= PG_Q2_K && format <= PG_Q3_K);
}

/* The bytes of one super-block of a (plain) super-block format. */
static inline int64_t super_block_bytes(int64_t format) {
    switch (format) {
    case PG_Q6_K: return PG_Q6_K_BYTES;
    case PG_Q2_K: return PG_Q2_K_BYTES;
    case PG_Q3_K: return PG_Q3_K_BYTES;
    case PG_Q4_K: return PG_Q4_K_BYTES;
    default: return PG_Q5_K_BYTES;
    }
}

static inline int is_block_format(int64_t format) {
    return (format >= PG_Q8_0 && format <= PG_Q4_1_X4) ||
           (format >= PG_Q5_0 && format <= PG_Q5_1_X4) || (format >= PG_Q2_K && format <= PG_Q3_K);
}

/* The fewest tokens the bfloat16 block GEMM multiplies: below that the decoder's int16 matmul
 * (llama_decode.c) is faster. For block formats that holds up to 9 tokens (the GEMM widens every
 * weight, a cost only many tokens amortize: at 8 tokens the int16 matmul took 0.7-0.8x its time
 * on the default model's matrices, Gemma 3's 262k-row head 17.5 ms against 25.4 on a Zen 4); a
 * 16-bit row has nothing to widen for the GEMM, and it takes steps from 8 tokens. */
static inline int64_t pg_bf16_gemm_min_tokens(const pg_matrix *const *mats, int count) {
    for (int m = 0; m < count; ++m)
        if (!is_block_format(mats[m]->format)) return 8;
    return 10;
}

static inline int is_x4_format(int64_t format) {
    return (format >= PG_Q8_0_X4 && format <= PG_Q4_1_X4) || format == PG_Q5_0_X4 ||
           format == PG_Q5_1_X4 || format == PG_Q4_K_X4 || format == PG_Q5_K_X4;
}

/* The format of an interleaved one's blocks; any other format itself. */
static inline int64_t base_format(int64_t format) {
    if (format == PG_Q5_0_X4 || format == PG_Q5_1_X4) return format - (PG_Q5_0_X4 - PG_Q5_0);
    if (format == PG_Q4_K_X4 || format == PG_Q5_K_X4) return format - (PG_Q4_K_X4 - PG_Q4_K);
    return is_x4_format(format) ? format - (PG_Q8_0_X4 - PG_Q8_0) : format;
}

/* The interleaved format of a block format, -1 for one that has none (Q2_K, Q3_K, Q6_K). */
static inline int64_t x4_format(int64_t format) {
    if (format == PG_Q4_K || format == PG_Q5_K) return format + (PG_Q4_K_X4 - PG_Q4_K);
    if (format == PG_Q5_0 || format == PG_Q5_1) return format + (PG_Q5_0_X4 - PG_Q5_0);
    if (format >= PG_Q8_0 && format <= PG_Q4_1) return format + (PG_Q8_0_X4 - PG_Q8_0);
    return -1;
}

/* Bytes of one 32-weight GGUF block: its float16 header (scale, and Q4_1's or Q5_1's minimum) and
 * its payload (Q5's qh and nibbles). Not for the K-quants, whose blocks share a super-block. */
static inline int64_t block_header(int64_t format) {
    return format == PG_Q4_1 || format == PG_Q5_1 ? 4 : 2;
}
static inline int64_t block_payload(int64_t format) {
    return format == PG_Q8_0 ? 32 : (format == PG_Q5_0 || format == PG_Q5_1 ? 20 : 16);
}

/* Bytes of `count` consecutive blocks of one row (K-quants: the super-blocks they fall in). */
static inline int64_t blocks_bytes(int64_t format, int64_t count) {
    if (is_super_block_format(format)) return (count + 7) / 8 * super_block_bytes(format);
    return (block_header(format) + block_payload(format)) * count;
}

/* Where block b of row n of a matrix in `format` (interleaved if `x4`) starts: the block itself,
 * or its group's block, which holds the four rows' scales, minimums and payloads. */
static inline const uint8_t *block_address_as(const pg_matrix *w, int64_t format, int x4,
                                              int64_t n, int64_t b) {
    if (is_super_block_format(format)) {
        const int64_t bytes = super_block_bytes(format);
        if (x4) return w->data + (n - n % 4) * w->row_bytes + b / 8 * 4 * bytes;
        return w->data + n * w->row_bytes + b / 8 * bytes;
    }
    const int64_t block = block_header(format) + block_payload(format);
    if (x4) return w->data + (n - n % 4) * w->row_bytes + b * 4 * block;
    return w->data + n * w->row_bytes + b * block;
}

/* Where block b of row n keeps its float16 scale, its float16 minimum (Q4_1) and its payload. */
static inline __attribute__((always_inline)) void block_parts_as(
    const pg_matrix *w, int64_t format, int x4, int64_t n, int64_t b, const uint8_t **scale,
    const uint8_t **minimum, const uint8_t **qs) {
    const int64_t header = block_header(format), payload = block_payload(format);
    const uint8_t *start = block_address_as(w, format, x4, n, b);
    if (x4) {
        const int64_t lane = n % 4;
        *scale = start + 2 * lane;
        *minimum = start + 8 + 2 * lane;
        *qs = start + 4 * header + lane * payload;
    } else {
        *scale = start;
        *minimum = start + 2;
        *qs = start + header;
    }
}

/* Block b of row n of a matrix in `format` (any block format; interleaved if `x4`), widened to
 * 32 floats. Inlined with constant format and x4 where speed matters. */
static inline __attribute__((always_inline)) void widen_block_as(const pg_matrix *w,
                                                                 int64_t format, int x4,
                                                                 int64_t n, int64_t b,
                                                                 float *out) {
    if (format == PG_Q6_K) {
        widen_q6_k(block_address_as(w, format, 0, n, b), (int)(b % 8), out);
        return;
    }
    if (format == PG_Q2_K) {
        widen_q2_k(block_address_as(w, format, 0, n, b), (int)(b % 8), out);
        return;
    }
    if (format == PG_Q3_K) {
        widen_q3_k(block_address_as(w, format, 0, n, b), (int)(b % 8), out);
        return;
    }
    if (format == PG_Q4_K || format == PG_Q5_K) {
        const int q5 = format == PG_Q5_K;
        widen_k(k_parts_as(w, q5, x4, n, b / 8), q5, (int)(b % 8), out);
        return;
    }
    const uint8_t *scale, *minimum, *qs;
    block_parts_as(w, format, x4, n, b, &scale, &minimum, &qs);
    if (format == PG_Q8_0)
        widen_q8_0(read_half(scale), (const int8_t *)qs, out);
    else if (format == PG_Q4_0)
        widen_q4(read_half(scale), 0.f, 0, qs, out);
    else if (format == PG_Q4_1)
        widen_q4(read_half(scale), read_half(minimum), 1, qs, out);
    else
        widen_q5(read_half(scale), format == PG_Q5_1 ? read_half(minimum) : 0.f,
                 format == PG_Q5_1, qs, out);
}

/* Block b of row n of a block-format matrix (plain or interleaved), widened to 32 floats. */
static inline void widen_block(const pg_matrix *w, int64_t n, int64_t b, float *out) {
    widen_block_as(w, base_format(w->format), is_x4_format(w->format), n, b, out);
}

/* exp(x) for x in [-87, 88]: x = n*ln2 + r with |r| <= ln2/2 (n an integer), e^r by its Taylor
 * series to degree 7 (truncation under 1e-8 relative), times 2^n through the exponent bits. Within
 * a few float32 ulps of expf; written so that the compiler vectorizes loops calling it (floorf
 * and fminf would not: the rounding adds and removes 1.5 * 2^23 instead). */
static inline float pg_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n << 23;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* `bytes` of 64-byte aligned scratch for the calling thread, one buffer per `slot` (0 to 3), kept
 * for its later calls: OpenMP's threads live as long as the process, and a fresh buffer of this
 * size would come from mmap or a trimmed heap, its pages faulted in anew on every call (slowly on
 * a VM that backs guest pages on first touch). NULL when memory ran out. Never freed. Each
 * source file has its own buffers (the function is static), so a kernel calling into another
 * file's never shares one with it. */
static inline void *pg_scratch(int slot, size_t bytes) {
    static __thread void *buffers[4];
    static __thread size_t sizes[4];
    if (bytes > sizes[slot]) {
        free(buffers[slot]);
        const size_t size = (bytes + bytes / 2 + 63) & ~(size_t)63;
        buffers[slot] = aligned_alloc(64, size);
        sizes[slot] = buffers[slot] != NULL ? size : 0;
    }
    return buffers[slot];
}

#ifdef PG_AVX2
static inline float hsum(__m256 s) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
#endif

#endif /* PAGODA_BLOCKS_H */
