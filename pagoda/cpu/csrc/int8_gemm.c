/* Batched GEMM over GGUF block weights in integer arithmetic (AVX512-VNNI): out = x . W^T + bias.
 *
 * The bfloat16 block GEMM (block_gemm.c) widens every weight to bfloat16 on every call and
 * multiplies 32 pairs per vdpbf16ps. Here the weights stay 4- or 8-bit integers and the tokens are
 * quantized to int8 per 32-input block (scale amax / 127, as llama.cpp's Q8 activations), so
 * vpdpbusd multiplies 64 byte pairs per instruction with int32 sums, and each block's sum is
 * scaled once: sum_k w_k x_k = d * dx * sum_k q_k qx_k + m * sum_k x_k for a weight block
 * w = d * q + m (q unsigned: Q4_1 as stored; Q4_0 with m = -8 d; Q8_0 shifted by 128 with
 * m = -128 d; a Q4_K sub-block with d * scale and m = -(dmin * minimum)) and the exact float sum
 * of the block's inputs for the offset term.
 *
 * The weights are packed once (pagoda_int8_pack) in groups of 16 rows: for each 32-input block,
 * the 16 scales d and offsets m as float32, then the 16 rows' integers arranged so that one
 * 64-byte vector holds four consecutive inputs of each of the 16 rows (vpdpbusd's layout):
 * eight such vectors per block, stored as bytes (Q8_0) or two to a vector as nibbles (Q4_0/Q4_1/
 * Q4_K, 256 bytes a block). A micro-kernel multiplies one group by up to eight
 * tokens, a float32 accumulator of 16 rows per token, each token's four int8 inputs broadcast.
 *
 * Several packed matrices sharing the input (q/k/v, gate/up) are one call, their row groups split
 * over the threads together; matrix m writes columns [offset_m, offset_m + rows_m) of out.
 */
#include <omp.h>

#include "blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PG_VNNI 1
#endif

#define PG_GROUP 16 /* rows per packed group: one float32 vector of outputs */

int pagoda_int8_gemm_available(void) {
#ifdef PG_VNNI
    return 1;
#else
    return 0;
#endif
}

static int64_t packed_block_bytes(int64_t packed_format) {
    return 2 * PG_GROUP * 4 + (packed_format == PG_I8_NIBBLES ? 256 : 512);
}

/* The packed format of a GGUF block format (nibbles for Q4_0/Q4_1/Q4_K, bytes for Q8_0), -1 for
 * another format (Q5_*, Q6_K, ...) or inputs not a multiple of 32. */
int64_t pagoda_int8_packed_format(const pg_matrix *w) {
    const int64_t base = base_format(w->format);
    if (!(base == PG_Q8_0 || base == PG_Q4_0 || base == PG_Q4_1 || base == PG_Q4_K) ||
        w->cols % 32 != 0)
        return -1;
    return base == PG_Q8_0 ? PG_I8_BYTES : PG_I8_NIBBLES;
}

int64_t pagoda_int8_packed_bytes(const pg_matrix *w) {
    const int64_t format = pagoda_int8_packed_format(w);
    if (format < 0) return -1;
    const int64_t groups = (w->rows + PG_GROUP - 1) / PG_GROUP;
    return groups * (w->cols / 32) * packed_block_bytes(format);
}

/* Rows past w->rows (the last group's padding) get d = m = 0 and q = 0. Returns the packed
 * format, or -1 for a matrix it cannot pack. */
int64_t pagoda_int8_pack(const pg_matrix *w, uint8_t *dst) {
    const int64_t format = pagoda_int8_packed_format(w);
    if (format < 0) return -1;
    const int64_t base = base_format(w->format), x4 = is_x4_format(w->format);
    const int64_t nb = w->cols / 32, block_bytes = packed_block_bytes(format);
    const int64_t groups = (w->rows + PG_GROUP - 1) / PG_GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
        for (int64_t b = 0; b < nb; ++b) {
            uint8_t *out = dst + (g * nb + b) * block_bytes;
            float d[PG_GROUP], m[PG_GROUP];
            uint8_t q[PG_GROUP][32];
            for (int r = 0; r < PG_GROUP; ++r) {
                const int64_t n = g * PG_GROUP + r;
                d[r] = m[r] = 0.f;
                memset(q[r], 0, 32);
                if (n >= w->rows) continue;
                if (base == PG_Q4_K) {
                    /* Sub-block b % 8: scale d * sc, minimum -(dmin * m), weight l the nibble
                     * of byte l of its chunk. */
                    const pg_k_part part = k_parts_as(w, 0, (int)x4, n, b / 8);
                    const int j = (int)(b % 8);
                    uint64_t scales, minimums;
                    k_scales_mins(part.header + 4, &scales, &minimums);
                    d[r] = read_half(part.header) * (float)((scales >> (8 * j)) & 0xff);
                    m[r] = -(read_half(part.header + 2) * (float)((minimums >> (8 * j)) & 0xff));
                    const uint8_t *chunk = part.qs + part.chunk * (j / 2);
                    for (int k = 0; k < 32; ++k) q[r][k] = (chunk[k] >> (4 * (j & 1))) & 0x0f;
                    continue;
                }
                const uint8_t *scale, *minimum, *qs;
                block_parts_as(w, base, (int)x4, n, b, &scale, &minimum, &qs);
                d[r] = read_half(scale);
                if (base == PG_Q8_0) {
                    m[r] = -128.f * d[r];
                    for (int k = 0; k < 32; ++k) q[r][k] = (uint8_t)((int)((const int8_t *)qs)[k] + 128);
                } else {
                    m[r] = base == PG_Q4_1 ? read_half(minimum) : -8.f * d[r];
                    for (int k = 0; k < 16; ++k) {
                        q[r][k] = qs[k] & 0x0f;
                        q[r][k + 16] = qs[k] >> 4;
                    }
                }
            }
            memcpy(out, d, sizeof d);
            memcpy(out + sizeof d, m, sizeof m);
            uint8_t *payload = out + sizeof d + sizeof m;
            /* Vector j holds inputs 4j .. 4j + 3 of each row r at bytes 4r .. 4r + 3. */
            for (int j = 0; j < 8; ++j)
                for (int r = 0; r < PG_GROUP; ++r)
                    for (int e = 0; e < 4; ++e) {
                        const uint8_t value = q[r][4 * j + e];
                        if (format == PG_I8_BYTES)
                            payload[j * 64 + r * 4 + e] = value;
                        else if (j % 2 == 0)
                            payload[(j / 2) * 64 + r * 4 + e] = value;
                        else
                            payload[(j / 2) * 64 + r * 4 + e] |= (uint8_t)(value << 4);
                    }
        }
    }
    return format;
}

#ifdef PG_VNNI

/* Tokens x [T, K] as int8 per 32-input block: qx [T][K], the scales dx [T][nb] and the exact
 * float sums sx [T][nb] of each block's inputs. */
static void quantize_tokens(const float *x, int64_t T, int64_t K, int8_t *qx, float *dx,
                            float *sx) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) if (T * K >= (1 << 16))
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t b = 0; b < nb; ++b) {
            const float *src = x + t * K + b * 32;
            const __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
            const __m512 amax =
                _mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi));
            const float peak = _mm512_reduce_max_ps(amax);
            const float scale = peak / 127.f;
            const __m512 inverse = _mm512_set1_ps(peak > 0.f ? 127.f / peak : 0.f);
            const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
            const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
            _mm_storeu_si128((__m128i *)(qx + t * K + b * 32), _mm512_cvtsepi32_epi8(qlo));
            _mm_storeu_si128((__m128i *)(qx + t * K + b * 32 + 16), _mm512_cvtsepi32_epi8(qhi));
            dx[t * nb + b] = scale;
            sx[t * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
    }
}

/* One group of 16 rows times TT tokens: acc[t] (16 rows) = sum over blocks. */
#define PG_INT8_TILE(TT)                                                                         \
    static void tile_##TT(const uint8_t *group, int64_t nb, int64_t block_bytes, int nibbles,   \
                          const int8_t *qx, const float *dx, const float *sx, int64_t K,        \
                          __m512 *result) {                                                      \
        __m512 acc[TT];                                                                          \
        _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();       \
        const __m512i low4 = _mm512_set1_epi8(0x0f);                                             \
        for (int64_t b = 0; b < nb; ++b) {                                                       \
            const uint8_t *block = group + b * block_bytes;                                      \
            const __m512 d = _mm512_loadu_ps(block), m = _mm512_loadu_ps(block + 64);            \
            const uint8_t *payload = block + 128;                                                \
            __m512i w[8];                                                                        \
            if (nibbles) {                                                                       \
                _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) {                            \
                    const __m512i v = _mm512_loadu_si512(payload + 64 * c);                      \
                    w[2 * c] = _mm512_and_si512(v, low4);                                        \
                    w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);              \
                }                                                                                \
            } else {                                                                             \
                _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j) w[j] =                       \
                    _mm512_loadu_si512(payload + 64 * j);                                        \
            }                                                                                    \
            _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t) {                               \
                const int32_t *xq = (const int32_t *)(qx + t * K + b * 32);                      \
                __m512i s = _mm512_setzero_si512();                                              \
                _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j) s =                          \
                    _mm512_dpbusd_epi32(s, w[j], _mm512_set1_epi32(xq[j]));                      \
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[t * nb + b]));           \
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[t]);                  \
                acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[t * nb + b]), acc[t]);             \
            }                                                                                    \
        }                                                                                        \
        _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t) result[t] = acc[t];                 \
    }
PG_INT8_TILE(8)
PG_INT8_TILE(4)
PG_INT8_TILE(2)
PG_INT8_TILE(1)
#undef PG_INT8_TILE
#endif

/* x [T, K] float32 times `count` (1 to 8) packed matrices sharing K; out [T, sum of rows].
 * Returns 0, -1 for matrices it cannot multiply (or a build without VNNI), -2 out of memory. */
int pagoda_int8_gemm(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                     float *out) {
#ifndef PG_VNNI
    (void)mats, (void)count, (void)x, (void)T, (void)out;
    return -1;
#else
    if (count < 1 || count > 8) return -1;
    const int64_t K = mats[0]->cols, nb = K / 32;
    int64_t groups[9] = {0}, columns[9] = {0};
    for (int i = 0; i < count; ++i) {
        const pg_matrix *w = mats[i];
        if ((w->format != PG_I8_NIBBLES && w->format != PG_I8_BYTES) || w->cols != K ||
            K % 32 != 0)
            return -1;
        groups[i + 1] = groups[i] + (w->rows + PG_GROUP - 1) / PG_GROUP;
        columns[i + 1] = columns[i] + w->rows;
    }
    const int64_t width = columns[count];
    uint8_t *buffer = (uint8_t *)pg_scratch(3, (size_t)(T * K + 2 * T * nb * 4));
    if (buffer == NULL) return -2;
    float *dx = (float *)buffer, *sx = dx + T * nb;
    int8_t *qx = (int8_t *)(sx + T * nb);
    quantize_tokens(x, T, K, qx, dx, sx);
#pragma omp parallel for schedule(static) if (groups[count] * T >= 64)
    for (int64_t task = 0; task < groups[count]; ++task) {
        int i = 0;
        while (task >= groups[i + 1]) ++i;
        const pg_matrix *w = mats[i];
        const int64_t g = task - groups[i];
        const int nibbles = w->format == PG_I8_NIBBLES;
        const int64_t block_bytes = packed_block_bytes(w->format);
        const uint8_t *group = w->data + g * nb * block_bytes;
        const int64_t row0 = g * PG_GROUP;
        const int64_t rows = w->rows - row0 < PG_GROUP ? w->rows - row0 : PG_GROUP;
        const __mmask16 keep = (__mmask16)((1u << rows) - 1u);
        const __m512 bias = w->bias != NULL ? _mm512_maskz_loadu_ps(keep, w->bias + row0)
                                            : _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < T;) {
            __m512 result[8];
            int tokens;
            const int8_t *q = qx + t0 * K;
            const float *d = dx + t0 * nb, *s = sx + t0 * nb;
            if (T - t0 >= 8) {
                tile_8(group, nb, block_bytes, nibbles, q, d, s, K, result);
                tokens = 8;
            } else if (T - t0 >= 4) {
                tile_4(group, nb, block_bytes, nibbles, q, d, s, K, result);
                tokens = 4;
            } else if (T - t0 >= 2) {
                tile_2(group, nb, block_bytes, nibbles, q, d, s, K, result);
                tokens = 2;
            } else {
                tile_1(group, nb, block_bytes, nibbles, q, d, s, K, result);
                tokens = 1;
            }
            for (int t = 0; t < tokens; ++t)
                _mm512_mask_storeu_ps(out + (t0 + t) * width + columns[i] + row0, keep,
                                      _mm512_add_ps(result[t], bias));
            t0 += tokens;
        }
    }
    return 0;
#endif
}
