/* Weight matrices as the CPU kernels read them: float rows, GGUF blocks, interleaved blocks.
 *
 * Shared by the whole-step decoder (llama_decode.c) and the prefill GEMM (block_gemm.c). A matrix
 * is `rows` output features of `cols` inputs, row n at data + n * row_bytes, in one of:
 *   float32, float16, bfloat16   plain rows
 *   Q8_0   34-byte blocks of 32 weights: float16 scale d, 32 int8 q          (w = d * q)
 *   Q4_0   18-byte blocks: float16 scale d, 16 bytes of nibbles (low: j, high: j + 16; w = (q - 8) * d)
 *   Q4_1   20-byte blocks: float16 scale d, float16 minimum m, 16 bytes of nibbles (w = d * q + m)
 *   *_X4   the same blocks with four rows interleaved by pagoda_repack_x4: for each group of four
 *          rows and each block column, the four scales, then (Q4_1) the four minimums, then the
 *          four payloads. A group of four rows takes 4 * row_bytes bytes.
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

static inline int is_block_format(int64_t format) {
    return format >= PG_Q8_0 && format <= PG_Q4_1_X4;
}

static inline int is_x4_format(int64_t format) { return format >= PG_Q8_0_X4; }

/* Q8_0, Q4_0 or Q4_1, interleaved or not. */
static inline int64_t base_format(int64_t format) {
    return is_x4_format(format) ? format - (PG_Q8_0_X4 - PG_Q8_0) : format;
}

/* Bytes of one GGUF block: its float16 header (scale, and Q4_1's minimum) and its payload. */
static inline int64_t block_header(int64_t format) { return format == PG_Q4_1 ? 4 : 2; }
static inline int64_t block_payload(int64_t format) { return format == PG_Q8_0 ? 32 : 16; }

/* Where block b of row n of a matrix in `format` (interleaved if `x4`) starts: the block itself,
 * or its group's block, which holds the four rows' scales, minimums and payloads. */
static inline const uint8_t *block_address_as(const pg_matrix *w, int64_t format, int x4,
                                              int64_t n, int64_t b) {
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

/* Block b of row n of a matrix in `format` (Q8_0, Q4_0 or Q4_1; interleaved if `x4`), widened to
 * 32 floats. Inlined with constant format and x4 where speed matters. */
static inline __attribute__((always_inline)) void widen_block_as(const pg_matrix *w,
                                                                 int64_t format, int x4,
                                                                 int64_t n, int64_t b,
                                                                 float *out) {
    const uint8_t *scale, *minimum, *qs;
    block_parts_as(w, format, x4, n, b, &scale, &minimum, &qs);
    if (format == PG_Q8_0)
        widen_q8_0(read_half(scale), (const int8_t *)qs, out);
    else if (format == PG_Q4_0)
        widen_q4(read_half(scale), 0.f, 0, qs, out);
    else
        widen_q4(read_half(scale), read_half(minimum), 1, qs, out);
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
