/* Prefill GEMM over GGUF block weights: out = x . W^T + bias in float32, the weights widened on
 * the fly, so no float copy of the model is ever made.
 *
 * Prefill multiplies hundreds of tokens by every matrix: it is bound by arithmetic, not by reading
 * the weights. The input is transposed once per call into chunks of 24 tokens ([k][24]: an input's
 * 24 token values side by side). Each 96-row tile of W is widened, 256 inputs at a time, to the
 * loader's exact float32 values (blocks.h) in plain row order; a micro-kernel then broadcasts one
 * weight at a time against token vectors: 4 rows x 3 vectors for a full chunk, 6 x 2 or 12 x 1
 * for a last chunk of 16 or 8 tokens, twelve AVX2 accumulators each. Widening costs about one
 * operation per weight against T multiply-adds, so for T in the hundreds the FMA units run near
 * their peak, as in a float32 GEMM on pre-packed weights, without the packing at load (fbgemm's
 * was half of the default model's load) or its float16 copy of every matrix. Below 8
 * tokens the decoder's int16 matmul is faster and takes over.
 *
 * Several matrices that share the input (q/k/v, gate/up) are one call: their tiles are split
 * over the threads together, and matrix m writes columns [offset_m, offset_m + rows_m) of out.
 *
 * pagoda_block_gemm_bf16 is the same product for CPUs with AVX512-BF16 (built where the compiler
 * targets it): each widened panel is rounded to bfloat16 once, the tokens too, and
 * vdpbf16ps multiplies 16 tokens by a pair of inputs per instruction with float32 sums, twice
 * the float32 FMA rate, from the same Q4/Q8 bytes (a bfloat16 copy of the weights would be three
 * times them, and small batches are bound by reading them). The values are those of the
 * bfloat16 copy the batched steps otherwise multiply by (weights and tokens rounded to nearest
 * even), only summed in another order.
 */
#include "blocks.h"

void pagoda_matmul_joined(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                          float *out);

#ifdef PG_AVX2
#define PG_NR 96     /* weight rows per tile (a multiple of 4, 6 and 12, and of the four rows of
                      * an interleaved group): widened once per panel, used by every token */
#define PG_KC 256    /* inputs per panel (a multiple of the 32-weight block) */
#define PG_CHUNK 24  /* tokens per chunk: three vectors */
#define PG_FEW_TOKENS 8 /* below this many tokens, the decoder's matmul is faster */

/* The PG_NR-row tiles of `count` (1 to 8) matrices sharing their inputs: matrix m's tiles are
 * [tiles[m], tiles[m + 1]) and its outputs the columns [columns[m], columns[m + 1]). Returns -1
 * unless every matrix is in a block format, float16 or bfloat16, with the same multiple of 32
 * inputs. */
static int plan_tiles(const pg_matrix *const *mats, int count, int64_t tiles[9],
                      int64_t columns[9]) {
    if (count < 1 || count > 8) return -1;
    const int64_t cols = mats[0]->cols;
    for (int m = 0; m < count; ++m) {
        const int64_t format = mats[m]->format;
        if (!(is_block_format(format) || format == PG_F16 || format == PG_BF16) ||
            mats[m]->cols != cols || cols % 32 != 0 ||
            (is_super_block_format(format) && cols % 256 != 0))
            return -1;
        tiles[m + 1] = tiles[m] + (mats[m]->rows + PG_NR - 1) / PG_NR;
        columns[m + 1] = columns[m] + mats[m]->rows;
    }
    return 0;
}

/* In-register transpose of an 8 x 8 float tile. */
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* Tokens t0 .. t0 + 23 of x [T, cols] (zero past T) as xt [cols][24]: each input's 24 token
 * values side by side, for vector loads along the tokens. */
static void transpose_chunk(const float *x, int64_t T, int64_t cols, int64_t t0, float *xt) {
    for (int64_t k = 0; k < cols; k += 8) {
        for (int v = 0; v < PG_CHUNK / 8; ++v) {
            __m256 r[8];
            for (int j = 0; j < 8; ++j) {
                const int64_t t = t0 + 8 * v + j;
                r[j] = t < T ? _mm256_loadu_ps(x + t * cols + k) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int j = 0; j < 8; ++j) _mm256_store_ps(xt + (k + j) * PG_CHUNK + 8 * v, r[j]);
        }
    }
}

/* c [R][24] (+)= w [R rows, stride PG_KC][kc] . xt [kc][24] for the first V token vectors, with
 * R * V = 12 accumulators (plus V registers for the tokens and one for the broadcast weight).
 * One function per shape: GCC keeps an accumulator array in registers only when its size is
 * exactly what the unrolled loops touch. */
#define PG_MICRO_KERNEL(R, V)                                                                     \
    static void micro_kernel_##R##x##V(int64_t kc, const float *w, const float *xt, float *c,     \
                                       int accumulate) {                                          \
        __m256 acc[R][V];                                                                         \
        _Pragma("GCC unroll 12") for (int r = 0; r < R; ++r)                                      \
            _Pragma("GCC unroll 3") for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();  \
        _Pragma("GCC unroll 2") for (int64_t k = 0; k < kc; ++k) {                               \
            __m256 tokens[V];                                                                     \
            _Pragma("GCC unroll 3") for (int v = 0; v < V; ++v)                                   \
                tokens[v] = _mm256_load_ps(xt + k * PG_CHUNK + 8 * v);                            \
            _Pragma("GCC unroll 12") for (int r = 0; r < R; ++r) {                                \
                const __m256 weight = _mm256_broadcast_ss(w + r * PG_KC + k);                     \
                _Pragma("GCC unroll 3") for (int v = 0; v < V; ++v)                               \
                    acc[r][v] = _mm256_fmadd_ps(weight, tokens[v], acc[r][v]);                    \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 12") for (int r = 0; r < R; ++r)                                      \
            _Pragma("GCC unroll 3") for (int v = 0; v < V; ++v) {                                 \
                float *dst = c + r * PG_CHUNK + 8 * v;                                            \
                if (accumulate) acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_load_ps(dst));        \
                _mm256_store_ps(dst, acc[r][v]);                                                  \
            }                                                                                     \
    }
PG_MICRO_KERNEL(4, 3)
PG_MICRO_KERNEL(6, 2)
PG_MICRO_KERNEL(12, 1)
#undef PG_MICRO_KERNEL

/* Rows n0 .. n0 + rows - 1 of w (the rest of the tile zero), inputs k0 .. k0 + kc - 1, widened into
 * w_tile [PG_NR][PG_KC]. The bytes of the rows two groups of four ahead are prefetched: each row
 * starts a new run of blocks the hardware prefetcher has not seen. */
static inline __attribute__((always_inline)) void widen_tile_as(const pg_matrix *w,
                                                                int64_t format, int x4,
                                                                int64_t n0, int64_t rows,
                                                                int64_t k0, int64_t kc,
                                                                float *w_tile) {
    const int64_t b0 = k0 / 32, b1 = (k0 + kc) / 32;
    const int64_t span = blocks_bytes(format, b1 - b0) * (x4 ? 4 : 1);
    for (int64_t i = rows; i < PG_NR; ++i) memset(w_tile + i * PG_KC, 0, (size_t)kc * sizeof(float));
    for (int64_t i = 0; i < rows; i += x4 ? 4 : 1) {
        if (i + 8 < rows) {
            const char *ahead = (const char *)block_address_as(w, format, x4, n0 + i + 8, b0);
            for (int64_t byte = 0; byte < span; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
        }
        if (!x4 || is_super_block_format(format)) {
            /* One row, or a group's four rows one at a time (K-quant super-blocks). */
            for (int64_t r = i; r < i + (x4 ? 4 : 1); ++r)
                for (int64_t b = b0; b < b1; ++b)
                    widen_block_as(w, format, x4, n0 + r, b, w_tile + r * PG_KC + (b - b0) * 32);
            continue;
        }
        /* A group of four interleaved rows (tiles start on a group, and such matrices have rows
         * divisible by 4): its four scales (and minimums) are converted with one instruction. */
        const int64_t header = block_header(format), payload = block_payload(format);
        for (int64_t b = b0; b < b1; ++b) {
            const uint8_t *group = block_address_as(w, format, 1, n0 + i, b);
            float d[4], m[4] = {0.f, 0.f, 0.f, 0.f};
            _mm_storeu_ps(d, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)group)));
            if (format == PG_Q4_1 || format == PG_Q5_1)
                _mm_storeu_ps(m, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(group + 8))));
            for (int lane = 0; lane < 4; ++lane) {
                const uint8_t *qs = group + 4 * header + lane * payload;
                float *out = w_tile + (i + lane) * PG_KC + (b - b0) * 32;
                if (format == PG_Q8_0)
                    widen_q8_0(d[lane], (const int8_t *)qs, out);
                else if (format == PG_Q5_0 || format == PG_Q5_1)
                    widen_q5(d[lane], m[lane], format == PG_Q5_1, qs, out);
                else
                    widen_q4(d[lane], m[lane], format == PG_Q4_1, qs, out);
            }
        }
    }
}

/* Rows n0 .. n0 + rows - 1 of a float16 or bfloat16 matrix (the rest of the tile zero), inputs
 * k0 .. k0 + kc - 1, as float32 (exact) into w_tile [PG_NR][PG_KC]. */
static void widen_tile_half(const pg_matrix *w, int64_t n0, int64_t rows, int64_t k0, int64_t kc,
                            float *w_tile) {
    for (int64_t i = rows; i < PG_NR; ++i) memset(w_tile + i * PG_KC, 0, (size_t)kc * sizeof(float));
    for (int64_t i = 0; i < rows; ++i) {
        if (i + 8 < rows) {
            const char *ahead = (const char *)(w->data + (n0 + i + 8) * w->row_bytes + 2 * k0);
            for (int64_t byte = 0; byte < 2 * kc; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
        }
        const uint16_t *src = (const uint16_t *)(w->data + (n0 + i) * w->row_bytes) + k0;
        float *out = w_tile + i * PG_KC;
        for (int64_t k = 0; k < kc; k += 8) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(src + k));
            const __m256 value =
                w->format == PG_F16
                    ? _mm256_cvtph_ps(h)
                    : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            _mm256_storeu_ps(out + k, value);
        }
    }
}

static void widen_tile(const pg_matrix *w, int64_t n0, int64_t rows, int64_t k0, int64_t kc,
                       float *w_tile) {
    switch (w->format) {
    case PG_F16:
    case PG_BF16: widen_tile_half(w, n0, rows, k0, kc, w_tile); break;
    case PG_Q8_0: widen_tile_as(w, PG_Q8_0, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q4_0: widen_tile_as(w, PG_Q4_0, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q4_1: widen_tile_as(w, PG_Q4_1, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q8_0_X4: widen_tile_as(w, PG_Q8_0, 1, n0, rows, k0, kc, w_tile); break;
    case PG_Q4_0_X4: widen_tile_as(w, PG_Q4_0, 1, n0, rows, k0, kc, w_tile); break;
    case PG_Q4_1_X4: widen_tile_as(w, PG_Q4_1, 1, n0, rows, k0, kc, w_tile); break;
    case PG_Q5_0: widen_tile_as(w, PG_Q5_0, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q5_1: widen_tile_as(w, PG_Q5_1, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q5_0_X4: widen_tile_as(w, PG_Q5_0, 1, n0, rows, k0, kc, w_tile); break;
    case PG_Q5_1_X4: widen_tile_as(w, PG_Q5_1, 1, n0, rows, k0, kc, w_tile); break;
    case PG_Q2_K: widen_tile_as(w, PG_Q2_K, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q3_K: widen_tile_as(w, PG_Q3_K, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q4_K: widen_tile_as(w, PG_Q4_K, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q5_K: widen_tile_as(w, PG_Q5_K, 0, n0, rows, k0, kc, w_tile); break;
    case PG_Q4_K_X4: widen_tile_as(w, PG_Q4_K, 1, n0, rows, k0, kc, w_tile); break;
    case PG_Q5_K_X4: widen_tile_as(w, PG_Q5_K, 1, n0, rows, k0, kc, w_tile); break;
    default: widen_tile_as(w, PG_Q6_K, 0, n0, rows, k0, kc, w_tile); break;
    }
}

/* One panel of a tile (`rows` rows widened in w, padded with zero rows to PG_NR) times every
 * chunk: c [chunk][PG_NR][24] accumulates the tile's results. A full chunk takes four rows at a
 * time (three token vectors each); a last chunk of 16 or 8 tokens, six or twelve rows. */
static void panel_times_chunks(int64_t T, int64_t kc, const float *w, const float *xt,
                               int64_t xt_chunk, float *c, int accumulate) {
    for (int64_t t0 = 0, chunk = 0; t0 < T; t0 += PG_CHUNK, ++chunk) {
        const int64_t left = T - t0;
        const float *xc = xt + chunk * xt_chunk;
        float *cc = c + chunk * PG_NR * PG_CHUNK;
        if (left > 16)
            for (int64_t r = 0; r < PG_NR; r += 4)
                micro_kernel_4x3(kc, w + r * PG_KC, xc, cc + r * PG_CHUNK, accumulate);
        else if (left > 8)
            for (int64_t r = 0; r < PG_NR; r += 6)
                micro_kernel_6x2(kc, w + r * PG_KC, xc, cc + r * PG_CHUNK, accumulate);
        else
            for (int64_t r = 0; r < PG_NR; r += 12)
                micro_kernel_12x1(kc, w + r * PG_KC, xc, cc + r * PG_CHUNK, accumulate);
    }
}

/* The tile's results c [chunk][PG_NR][24] plus bias into out [T, ldo] at column `column`. */
static void store_tile(const float *c, int64_t T, int64_t rows, const float *bias, float *out,
                       int64_t ldo) {
    for (int64_t t0 = 0, chunk = 0; t0 < T; t0 += PG_CHUNK, ++chunk) {
        const float *cc = c + chunk * PG_NR * PG_CHUNK;
        int64_t r = 0;
        for (; r + 8 <= rows; r += 8) { /* eight rows x eight tokens at a time, transposed */
            const __m256 b = bias != NULL ? _mm256_loadu_ps(bias + r) : _mm256_setzero_ps();
            for (int v = 0; v < PG_CHUNK / 8 && t0 + 8 * v < T; ++v) {
                __m256 tile[8];
                for (int i = 0; i < 8; ++i) tile[i] = _mm256_load_ps(cc + (r + i) * PG_CHUNK + 8 * v);
                transpose8(tile);
                for (int j = 0; j < 8 && t0 + 8 * v + j < T; ++j)
                    _mm256_storeu_ps(out + (t0 + 8 * v + j) * ldo + r, _mm256_add_ps(tile[j], b));
            }
        }
        for (; r < rows; ++r)
            for (int64_t j = 0; j < PG_CHUNK && t0 + j < T; ++j)
                out[(t0 + j) * ldo + r] = cc[r * PG_CHUNK + j] + (bias != NULL ? bias[r] : 0.f);
    }
}
#endif

#if defined(PG_AVX2) && defined(__AVX512F__) && defined(__AVX512BF16__)
#define PG_GEMM_BF16 1
#define PG_BF16_LANES 16

/* a and b (pairs of adjacent inputs) rounded to bfloat16 and packed, a in the low half. */
static inline uint32_t bf16_pair(float a, float b) {
    uint32_t bits[2];
    memcpy(&bits[0], &a, 4);
    memcpy(&bits[1], &b, 4);
    for (int i = 0; i < 2; ++i) {
        const uint32_t x = bits[i];
        bits[i] = (x & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    }
    return bits[0] | (bits[1] << 16);
}

/* Tokens t0 .. t0 + 15 of x [T, cols] (zero past T) as pairs xp [cols / 2][16]: for each pair of
 * inputs, the 16 tokens' bfloat16 pairs side by side, one vector. */
static void pack_tokens_bf16(const float *x, int64_t T, int64_t cols, int64_t t0, uint32_t *xp) {
    for (int64_t t = 0; t < PG_BF16_LANES; ++t) {
        const float *row = x + (t0 + t) * cols;
        for (int64_t p = 0; p < cols / 2; ++p)
            xp[p * PG_BF16_LANES + t] = t0 + t < T ? bf16_pair(row[2 * p], row[2 * p + 1]) : 0u;
    }
}

/* One block's 32 weights as bfloat16 (to nearest even from the float32 values widen_q8_0 and
 * widen_q4 compute, the same operations in the same order) at out, 64 bytes. A Q4 block's sixteen
 * possible values are computed and rounded once, and its nibbles look them up (vpermw). */
static inline void widen_q8_0_bf16(float d, const int8_t *qs, void *out) {
    const __m512 scale = _mm512_set1_ps(d);
    const __m512 lo = _mm512_mul_ps(
        scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs))));
    const __m512 hi = _mm512_mul_ps(
        scale,
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)))));
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

static inline void widen_q4_bf16(float d, float m, int with_min, const uint8_t *qs, void *out) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 scale = _mm512_set1_ps(d);
    const __m512 values =
        with_min ? _mm512_add_ps(_mm512_mul_ps(scale, q), _mm512_set1_ps(m))
                 : _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(8.f)), scale);
    const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
    const __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0f));
    const __m256i high = _mm256_srli_epi16(bytes, 4);
    const __m512i index = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(index, table));
}

/* Rows n0 .. n0 + rows - 1 of w (the rest zero), inputs k0 .. k0 + kc - 1, as bfloat16 pairs
 * wp [PG_NR][PG_KC / 2]: widen_tile_as with each block rounded as it is widened. */
static inline __attribute__((always_inline)) void widen_tile_bf16_as(const pg_matrix *w,
                                                                     int64_t format, int x4,
                                                                     int64_t n0, int64_t rows,
                                                                     int64_t k0, int64_t kc,
                                                                     uint32_t *wp) {
    const int64_t b0 = k0 / 32, b1 = (k0 + kc) / 32;
    const int64_t span = blocks_bytes(format, b1 - b0) * (x4 ? 4 : 1);
    for (int64_t i = rows; i < PG_NR; ++i)
        memset(wp + i * (PG_KC / 2), 0, (size_t)(kc / 2) * sizeof(uint32_t));
    for (int64_t i = 0; i < rows; ++i) {
        if (i % 4 == 0 && i + 8 < rows) {
            const char *ahead = (const char *)block_address_as(w, format, x4, n0 + i + 8, b0);
            for (int64_t byte = 0; byte < span; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
        }
        const int64_t n = n0 + i;
        for (int64_t b = b0; b < b1; ++b) {
            void *out = wp + i * (PG_KC / 2) + (b - b0) * 16;
            if (format == PG_Q5_0 || format == PG_Q5_1 || is_super_block_format(format)) {
                /* Widened to float32 first (bits of them are scattered), then rounded. */
                float values[32];
                widen_block_as(w, format, x4, n, b, values);
                _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(values + 16),
                                                                     _mm512_loadu_ps(values)));
                continue;
            }
            const uint8_t *scale, *minimum, *qs;
            block_parts_as(w, format, x4, n, b, &scale, &minimum, &qs);
            if (format == PG_Q8_0)
                widen_q8_0_bf16(read_half(scale), (const int8_t *)qs, out);
            else if (format == PG_Q4_0)
                widen_q4_bf16(read_half(scale), 0.f, 0, qs, out);
            else
                widen_q4_bf16(read_half(scale), read_half(minimum), 1, qs, out);
        }
    }
}

/* Rows of a float16 or bfloat16 matrix as bfloat16 pairs wp [PG_NR][PG_KC / 2]: bfloat16 as
 * stored, float16 rounded to nearest even (what torch's .to(bfloat16) gives). */
static void widen_tile_half_bf16(const pg_matrix *w, int64_t n0, int64_t rows, int64_t k0,
                                 int64_t kc, uint32_t *wp) {
    for (int64_t i = rows; i < PG_NR; ++i)
        memset(wp + i * (PG_KC / 2), 0, (size_t)(kc / 2) * sizeof(uint32_t));
    for (int64_t i = 0; i < rows; ++i) {
        if (i + 8 < rows) {
            const char *ahead = (const char *)(w->data + (n0 + i + 8) * w->row_bytes + 2 * k0);
            for (int64_t byte = 0; byte < 2 * kc; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
        }
        const uint16_t *src = (const uint16_t *)(w->data + (n0 + i) * w->row_bytes) + k0;
        uint32_t *out = wp + i * (PG_KC / 2);
        if (w->format == PG_BF16) {
            memcpy(out, src, (size_t)kc * sizeof(uint16_t));
            continue;
        }
        for (int64_t k = 0; k < kc; k += 32) {
            const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + k)));
            const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + k + 16)));
            _mm512_storeu_si512(out + k / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

static void widen_tile_bf16(const pg_matrix *w, int64_t n0, int64_t rows, int64_t k0, int64_t kc,
                            uint32_t *wp) {
    switch (w->format) {
    case PG_F16:
    case PG_BF16: widen_tile_half_bf16(w, n0, rows, k0, kc, wp); break;
    case PG_Q8_0: widen_tile_bf16_as(w, PG_Q8_0, 0, n0, rows, k0, kc, wp); break;
    case PG_Q4_0: widen_tile_bf16_as(w, PG_Q4_0, 0, n0, rows, k0, kc, wp); break;
    case PG_Q4_1: widen_tile_bf16_as(w, PG_Q4_1, 0, n0, rows, k0, kc, wp); break;
    case PG_Q8_0_X4: widen_tile_bf16_as(w, PG_Q8_0, 1, n0, rows, k0, kc, wp); break;
    case PG_Q4_0_X4: widen_tile_bf16_as(w, PG_Q4_0, 1, n0, rows, k0, kc, wp); break;
    case PG_Q4_1_X4: widen_tile_bf16_as(w, PG_Q4_1, 1, n0, rows, k0, kc, wp); break;
    case PG_Q5_0: widen_tile_bf16_as(w, PG_Q5_0, 0, n0, rows, k0, kc, wp); break;
    case PG_Q5_1: widen_tile_bf16_as(w, PG_Q5_1, 0, n0, rows, k0, kc, wp); break;
    case PG_Q5_0_X4: widen_tile_bf16_as(w, PG_Q5_0, 1, n0, rows, k0, kc, wp); break;
    case PG_Q5_1_X4: widen_tile_bf16_as(w, PG_Q5_1, 1, n0, rows, k0, kc, wp); break;
    case PG_Q2_K: widen_tile_bf16_as(w, PG_Q2_K, 0, n0, rows, k0, kc, wp); break;
    case PG_Q3_K: widen_tile_bf16_as(w, PG_Q3_K, 0, n0, rows, k0, kc, wp); break;
    case PG_Q4_K: widen_tile_bf16_as(w, PG_Q4_K, 0, n0, rows, k0, kc, wp); break;
    case PG_Q5_K: widen_tile_bf16_as(w, PG_Q5_K, 0, n0, rows, k0, kc, wp); break;
    case PG_Q4_K_X4: widen_tile_bf16_as(w, PG_Q4_K, 1, n0, rows, k0, kc, wp); break;
    case PG_Q5_K_X4: widen_tile_bf16_as(w, PG_Q5_K, 1, n0, rows, k0, kc, wp); break;
    default: widen_tile_bf16_as(w, PG_Q6_K, 0, n0, rows, k0, kc, wp); break;
    }
}

/* c (+)= wp [R rows, stride PG_KC / 2][kc / 2] . xp [kc / 2][16] for V chunks of 16 tokens
 * (chunk v's pairs at xp + v * xp_chunk, its results at c + v * c_chunk, row r at r * 16), with
 * R * V = 24 accumulators: 24 x 1 for a last chunk, 12 x 2 (half the weight broadcasts per
 * product) while two chunks remain. */
#define PG_MICRO_KERNEL_BF16(R, V)                                                                 \
    static void micro_kernel_bf16_##R##x##V(int64_t kc, const uint32_t *wp, const uint32_t *xp,   \
                                            int64_t xp_chunk, float *c, int64_t c_chunk,          \
                                            int accumulate) {                                     \
        __m512 acc[R][V];                                                                         \
        _Pragma("GCC unroll 24") for (int r = 0; r < R; ++r)                                      \
            _Pragma("GCC unroll 2") for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();  \
        for (int64_t p = 0; p < kc / 2; ++p) {                                                    \
            __m512bh tokens[V];                                                                   \
            _Pragma("GCC unroll 2") for (int v = 0; v < V; ++v) tokens[v] = (__m512bh)            \
                _mm512_loadu_si512((const void *)(xp + v * xp_chunk + p * PG_BF16_LANES));        \
            _Pragma("GCC unroll 24") for (int r = 0; r < R; ++r) {                                \
                const __m512bh weight =                                                           \
                    (__m512bh)_mm512_set1_epi32((int)wp[r * (PG_KC / 2) + p]);                    \
                _Pragma("GCC unroll 2") for (int v = 0; v < V; ++v)                               \
                    acc[r][v] = _mm512_dpbf16_ps(acc[r][v], weight, tokens[v]);                   \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 24") for (int r = 0; r < R; ++r)                                      \
            _Pragma("GCC unroll 2") for (int v = 0; v < V; ++v) {                                 \
                float *dst = c + v * c_chunk + r * PG_BF16_LANES;                                 \
                if (accumulate) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_loadu_ps(dst));       \
                _mm512_storeu_ps(dst, acc[r][v]);                                                 \
            }                                                                                     \
    }
PG_MICRO_KERNEL_BF16(24, 1)
PG_MICRO_KERNEL_BF16(12, 2)
#undef PG_MICRO_KERNEL_BF16
#endif

/* Whether this build has the bfloat16 block GEMM (AVX512-BF16). */
int pagoda_block_gemm_bf16_available(void) {
#ifdef PG_GEMM_BF16
    return 1;
#else
    return 0;
#endif
}

/* pagoda_block_gemm in bfloat16 products with float32 sums (see the top of the file); the same
 * arguments and return values, -1 also where this build has no AVX512-BF16. */
int pagoda_block_gemm_bf16(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                           float *out) {
#ifndef PG_GEMM_BF16
    (void)mats, (void)count, (void)x, (void)T, (void)out;
    return -1;
#else
    int64_t tiles[9] = {0}, columns[9] = {0};
    if (plan_tiles(mats, count, tiles, columns) != 0) return -1;
    const int64_t cols = mats[0]->cols;
    if (T < pg_bf16_gemm_min_tokens(mats, count)) {
        pagoda_matmul_joined(mats, count, x, T, out);
        return 0;
    }
    const int64_t ldo = columns[count], chunks = (T + PG_BF16_LANES - 1) / PG_BF16_LANES;
    const int64_t xp_chunk = (cols / 2) * PG_BF16_LANES;
    uint32_t *xp = (uint32_t *)pg_scratch(0, (size_t)(chunks * xp_chunk) * sizeof(uint32_t));
    if (xp == NULL) return -2;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < chunks; ++chunk)
            pack_tokens_bf16(x, T, cols, chunk * PG_BF16_LANES, xp + chunk * xp_chunk);
        uint32_t *wp = (uint32_t *)pg_scratch(1, PG_NR * (PG_KC / 2) * sizeof(uint32_t));
        const size_t c_bytes = (size_t)(chunks * PG_NR * PG_BF16_LANES) * sizeof(float);
        float *c = (float *)pg_scratch(2, c_bytes);
        const int ok = wp != NULL && c != NULL;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < tiles[count]; ++unit) {
            if (!ok) continue;
            int m = 0;
            while (unit >= tiles[m + 1]) ++m;
            const pg_matrix *matrix = mats[m];
            const int64_t n0 = (unit - tiles[m]) * PG_NR;
            const int64_t rows = matrix->rows - n0 < PG_NR ? matrix->rows - n0 : PG_NR;
            for (int64_t k0 = 0; k0 < cols; k0 += PG_KC) {
                const int64_t kc = cols - k0 < PG_KC ? cols - k0 : PG_KC;
                widen_tile_bf16(matrix, n0, rows, k0, kc, wp);
                const int64_t c_chunk = PG_NR * PG_BF16_LANES;
                int64_t chunk = 0;
                for (; chunk + 2 <= chunks; chunk += 2)
                    for (int64_t r = 0; r < PG_NR; r += 12)
                        micro_kernel_bf16_12x2(kc, wp + r * (PG_KC / 2),
                                               xp + chunk * xp_chunk + (k0 / 2) * PG_BF16_LANES,
                                               xp_chunk, c + chunk * c_chunk + r * PG_BF16_LANES,
                                               c_chunk, k0 > 0);
                for (; chunk < chunks; ++chunk)
                    for (int64_t r = 0; r < PG_NR; r += 24)
                        micro_kernel_bf16_24x1(kc, wp + r * (PG_KC / 2),
                                               xp + chunk * xp_chunk + (k0 / 2) * PG_BF16_LANES,
                                               xp_chunk, c + chunk * c_chunk + r * PG_BF16_LANES,
                                               c_chunk, k0 > 0);
            }
            const float *bias = matrix->bias != NULL ? matrix->bias + n0 : NULL;
            float *dst = out + columns[m] + n0;
            for (int64_t chunk = 0; chunk < chunks; ++chunk)
                for (int64_t t = 0; t < PG_BF16_LANES && chunk * PG_BF16_LANES + t < T; ++t) {
                    float *row = dst + (chunk * PG_BF16_LANES + t) * ldo;
                    const float *cc = c + chunk * PG_NR * PG_BF16_LANES + t;
                    for (int64_t r = 0; r < rows; ++r)
                        row[r] = cc[r * PG_BF16_LANES] + (bias != NULL ? bias[r] : 0.f);
                }
        }
    }
    return failed ? -2 : 0;
#endif
}

/* Whether this build has the block GEMM (it needs AVX2 and FMA). */
int pagoda_block_gemm_available(void) {
#ifdef PG_AVX2
    return 1;
#else
    return 0;
#endif
}

/* out [T, sum of rows] = x [T, cols] . [W_0; W_1; ...]^T + biases, for `count` (<= 8) block-format
 * matrices of `cols` inputs (a multiple of 32). Returns 0, -1 where this build cannot (no AVX2,
 * another format, mismatched inputs), -2 if scratch memory ran out. */
int pagoda_block_gemm(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                      float *out) {
#ifndef PG_AVX2
    (void)mats, (void)count, (void)x, (void)T, (void)out;
    return -1;
#else
    int64_t tiles[9] = {0}, columns[9] = {0};
    if (plan_tiles(mats, count, tiles, columns) != 0) return -1;
    const int64_t cols = mats[0]->cols;
    if (T < PG_FEW_TOKENS) {
        pagoda_matmul_joined(mats, count, x, T, out);
        return 0;
    }
    const int64_t ldo = columns[count], chunks = (T + PG_CHUNK - 1) / PG_CHUNK;
    const int64_t xt_chunk = cols * PG_CHUNK;
    float *xt = (float *)pg_scratch(0, (size_t)(chunks * xt_chunk) * sizeof(float));
    if (xt == NULL) return -2;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < chunks; ++chunk)
            transpose_chunk(x, T, cols, chunk * PG_CHUNK, xt + chunk * xt_chunk);
        float *w = (float *)pg_scratch(1, PG_NR * PG_KC * sizeof(float));
        float *c = (float *)pg_scratch(2, (size_t)(chunks * PG_NR * PG_CHUNK) * sizeof(float));
        const int ok = w != NULL && c != NULL;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < tiles[count]; ++unit) {
            if (!ok) continue;
            int m = 0;
            while (unit >= tiles[m + 1]) ++m;
            const pg_matrix *matrix = mats[m];
            const int64_t n0 = (unit - tiles[m]) * PG_NR;
            const int64_t rows = matrix->rows - n0 < PG_NR ? matrix->rows - n0 : PG_NR;
            for (int64_t k0 = 0; k0 < cols; k0 += PG_KC) {
                const int64_t kc = cols - k0 < PG_KC ? cols - k0 : PG_KC;
                widen_tile(matrix, n0, rows, k0, kc, w);
                panel_times_chunks(T, kc, w, xt + k0 * PG_CHUNK, xt_chunk, c, k0 > 0);
            }
            store_tile(c, T, rows, matrix->bias != NULL ? matrix->bias + n0 : NULL,
                       out + columns[m] + n0, ldo);
        }
    }
    return failed ? -2 : 0;
#endif
}
