/* One decode step of a Llama-shaped model on CPU, every layer in one call.
 *
 * A decode step computes one token per request: every matmul has as many rows as there are
 * requests (often one), so the step is bound by reading the weights and, when run op by op from
 * Python, by dispatching some 30 small operators per layer. This file runs the whole step:
 * embedding, then per layer RMSNorm, q/k/v, rotary, the KV cache write, paged attention, the
 * output projection, RMSNorm and the gated MLP, then the final norm and the LM head.
 *
 * The options of the families built on Llama's layer (pagoda.models.llama) are per layer or per
 * model: per-head q/k norms (Qwen3, Gemma 3), Gemma 2/3's norms after attention and after the MLP,
 * rotary tables per layer (Gemma 3's local and global bases), sliding windows, attention and
 * final logit soft-capping, an embedding scale, and a GELU-gated MLP (Gemma). Gemma's norms
 * multiply by 1 + w: the caller passes that sum as the weight.
 *
 * Weights stay in their checkpoint encoding (float32, float16, bfloat16, or GGUF's Q8_0, Q4_0 and
 * Q4_1 blocks along each row, or those blocks interleaved four rows at a time). Float formats are
 * widened to float32 one row at a time into a buffer that stays in L1; block formats are multiplied
 * as integers against int16-rounded activations (see quantize_blocks). Rows are split over OpenMP
 * threads (PyTorch's runtime).
 *
 * Layouts (all contiguous, row-major):
 *   matrix    rows x row_bytes: output feature n is row n, input features along the row
 *   kv_cache  [2, cache_blocks, block_size, Hkv, D], as pagoda.attention.torch_backend: float32,
 *             or bfloat16 when kv_bf16 (new rows rounded to nearest even, as torch rounds)
 *   cos, sin  [max_position, rotary_dim / 2] per layer, Neox-style rotary over the first
 *             rotary_dim dims
 *   tables    [T, max_blocks] block ids; ctx_lens [T] context length including the new token
 *   logits    [T, vocab]
 */
#include "blocks.h"

#include <omp.h>

typedef struct {
    pg_matrix q, k, v, o, gate, up, down;
    const float *attn_norm, *ffn_norm;
    /* Gemma 2/3: normalize the attention output and the MLP output before each residual add;
     * NULL for none. */
    const float *post_attn_norm, *post_ffn_norm;
    const float *q_norm, *k_norm; /* [D] per-head norms before the rotation; NULL for none */
    const float *cos, *sin;
    void *kv_cache;
    int64_t window; /* 0: the whole context */
    float scale;
    float softcap; /* attention logits: softcap * tanh(s / softcap); 0 for none */
} pg_layer;

/* The gated MLP's activation of the gate half. */
enum { PG_SILU = 0, PG_GELU_TANH = 1, PG_GELU = 2 };

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, rotary_dim, intermediate;
    int64_t vocab, cache_blocks, block_size;
    int64_t kv_bf16; /* the KV cache holds bfloat16, not float32 */
    /* Steps of PG_BATCHED_TOKENS or more: 0 keep the decoder's matmul; 1 multiply with the block
     * GEMM (float32 products); 2 with its bfloat16 variant, as the PyTorch path's layers would. */
    int64_t batched;
    int64_t activation; /* PG_SILU, PG_GELU_TANH or PG_GELU */
    float eps;
    float embed_scale;   /* the embeddings times this (Gemma: sqrt(hidden)); 0 for none */
    float final_softcap; /* logits: final_softcap * tanh(logit / final_softcap); 0 for none */
    const float *final_norm;
    pg_matrix embed, lm_head;
    const pg_layer *layers;
} pg_model;

void pagoda_paged_decode_attention_f32(float *out, const float *q, const float *cache,
                                       int64_t num_blocks, const int64_t *tables,
                                       int64_t max_blocks, const int64_t *ctx_lens, int64_t B,
                                       int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                                       float scale, int64_t window, float softcap);
void pagoda_paged_decode_attention_bf16(float *out, const float *q, const uint16_t *cache,
                                        int64_t num_blocks, const int64_t *tables,
                                        int64_t max_blocks, const int64_t *ctx_lens, int64_t B,
                                        int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                                        float scale, int64_t window, float softcap);

int pagoda_block_gemm(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                      float *out);
int pagoda_block_gemm_bf16(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                           float *out);

/* From this many tokens a step's elementwise work is vectorized and split over the threads, and
 * (model->batched) its matmuls are the block GEMM's. */
#define PG_BATCHED_TOKENS 8

/* x rounded to bfloat16, to nearest even, any NaN as 0x7fc0: what torch's .to(bfloat16) does, so
 * a row the decoder writes equals the one the PyTorch path writes. */
static void store_bf16(uint16_t *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u)
            out[i] = 0x7fc0u;
        else
            out[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
}

/* Row n of w as float32: a pointer into w itself for float32, else widened into buf. */
static const float *matrix_row(const pg_matrix *w, int64_t n, float *buf) {
    const uint8_t *row = w->data + n * w->row_bytes;
    const int64_t cols = w->cols;
    switch (w->format) {
    case PG_F32:
        return (const float *)row;
    case PG_F16: {
        const uint16_t *h = (const uint16_t *)row;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + 8 <= cols; i += 8)
            _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
        for (; i < cols; ++i) buf[i] = half_to_float(h[i]);
        return buf;
    }
    case PG_BF16: {
        const uint16_t *h = (const uint16_t *)row;
        for (int64_t i = 0; i < cols; ++i) {
            const uint32_t bits = (uint32_t)h[i] << 16;
            memcpy(buf + i, &bits, sizeof bits);
        }
        return buf;
    }
    default: /* block formats (blocks.h) */
        for (int64_t b = 0; b < cols / 32; ++b) widen_block(w, n, b, buf + b * 32);
        return buf;
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float sum = 0.f;
#ifdef PG_AVX2
    /* Four accumulators hide the FMA latency. */
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    sum = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

/* Rewrites a Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 matrix (rows divisible by 4) into `out` (as many bytes)
 * with four rows interleaved: for each group of four rows and each block column, the four rows'
 * scales (float16), then for Q4_1 and Q5_1 their four minimums, then their four payloads; a
 * Q4_K/Q5_K one by super-block columns (blocks.h). A dot
 * product then reads the four headers with one load and converts them with one instruction, and
 * the weights of a group stream from one place. Returns the interleaved format, or -1 if `w` cannot be. */
int64_t pagoda_repack_x4(const pg_matrix *w, uint8_t *out) {
#ifndef PG_AVX2
    (void)out;
    return -1; /* only the AVX2 kernels read interleaved blocks */
#endif
    if (w->rows % 4 != 0 || w->cols % 32 != 0 || x4_format(w->format) < 0) return -1;
    if (w->format == PG_Q4_K || w->format == PG_Q5_K) {
        if (w->cols % 256 != 0) return -1;
        const int q5 = w->format == PG_Q5_K;
        const int64_t bytes = q5 ? PG_Q5_K_BYTES : PG_Q4_K_BYTES, supers = w->cols / 256;
        const pg_matrix grouped = {out, NULL, w->rows, w->cols, w->row_bytes, x4_format(w->format)};
        for (int64_t n = 0; n < w->rows; ++n) {
            for (int64_t s = 0; s < supers; ++s) {
                const pg_k_part from = k_parts_as(w, q5, 0, n, s);
                const pg_k_part to = k_parts_as(&grouped, q5, 1, n, s);
                memcpy((uint8_t *)to.header, from.header, 16);
                if (q5) memcpy((uint8_t *)to.qh, from.qh, 32);
                for (int c = 0; c < 4; ++c)
                    memcpy((uint8_t *)to.qs + c * to.chunk, from.qs + c * from.chunk, 32);
            }
        }
        return grouped.format;
    }
    const int64_t header = block_header(w->format), payload = block_payload(w->format);
    const int64_t block = header + payload, nblocks = w->cols / 32;
    for (int64_t g = 0; g < w->rows / 4; ++g) {
        for (int64_t b = 0; b < nblocks; ++b) {
            uint8_t *dst = out + (g * nblocks + b) * 4 * block;
            for (int64_t i = 0; i < 4; ++i) {
                const uint8_t *src = w->data + (4 * g + i) * w->row_bytes + b * block;
                memcpy(dst + 2 * i, src, 2);
                if (header == 4) memcpy(dst + 8 + 2 * i, src + 2, 2);
                memcpy(dst + 4 * header + i * payload, src + header, (size_t)payload);
            }
        }
    }
    return x4_format(w->format);
}

#ifdef PG_AVX2
/* Activations for block-quantized weights: each 32-value block of x as int16 times a float scale
 * (x ~= xq * scale, relative error <= 2^-16 of the block's largest value), plus the block's exact
 * float sum. Widening the weights' 4- and 8-bit integers to float costs more than the memory they
 * save; multiplying integers with integers (vpmaddwd) is three times faster. */
#define PG_TOKEN_TILE 8

typedef struct {
    int16_t *values;
    float *scales, *sums;
} pg_blocks;

static void quantize_blocks(const float *x, int64_t count, pg_blocks *out) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < count; ++b) {
        const float *xb = x + 32 * b;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float largest = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        const __m256 inv = _mm256_set1_ps(largest > 0.f ? 32767.f / largest : 0.f);
        /* Round to nearest even (the default rounding mode); |x * inv| <= 32767 up to one ulp,
         * and packs saturates the rest. packs interleaves 128-bit lanes: the permute restores
         * the order. */
        const __m256i q01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)));
        const __m256i q23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)));
        _mm256_storeu_si256((__m256i *)(out->values + 32 * b),
                            _mm256_permute4x64_epi64(q01, 0xd8));
        _mm256_storeu_si256((__m256i *)(out->values + 32 * b + 16),
                            _mm256_permute4x64_epi64(q23, 0xd8));
        out->scales[b] = largest / 32767.f;
        out->sums[b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
}

/* dot_blocks_tile for the super-block formats, a super-block of 256 weights at a time: its
 * float16 scales are read once, and each 16-weight group's integer scale is multiplied into the
 * weights (int16), so a token's two halves of a 32-weight block make one integer sum, one
 * conversion and one multiply-add (Q6_K: |q * scale| <= 32 * 128, each int32 lane of vpmaddwd
 * under 2^28; Q2_K: q * scale <= 45; Q3_K: |q * scale| <= 4 * 32). */
static inline __attribute__((always_inline)) void dot_super_blocks_tile(
    const pg_matrix *w, const uint8_t *row, const pg_blocks *x, int64_t t0, const int tile,
    int64_t x_blocks, float bias, float *out, int64_t out_stride) {
    const int64_t supers = w->cols / 256;
    const int q2_k = w->format == PG_Q2_K, q3_k = w->format == PG_Q3_K;
    __m256 acc[PG_TOKEN_TILE];
    for (int t = 0; t < tile; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t s = 0; s < supers; ++s) {
        const uint8_t *super = row + s * super_block_bytes(w->format);
        const float d = read_half(super + (q2_k ? 80 : (q3_k ? 108 : 208)));
        const float dmin = q2_k ? read_half(super + 82) : 0.f;
        int8_t q3_scales[16];
        if (q3_k) q3_k_scales(super + 96, q3_scales);
        for (int j = 0; j < 8; ++j) {
            const int half = j / 4, k = j % 4;
            const int64_t b = 8 * s + j;
            __m256i w0, w1, m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
            if (q2_k) {
                /* sum((d sc q - dmin mi) x) = d sum(sc q x) - dmin sum(mi x). */
                const uint8_t *scales = super + 8 * half + 2 * k;
                const __m256i q = _mm256_and_si256(
                    _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(super + 16 + 32 * half)),
                                     _mm_cvtsi32_si128(2 * k)),
                    _mm256_set1_epi8(3));
                w0 = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)),
                                        _mm256_set1_epi16((short)(scales[0] & 0x0f)));
                w1 = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)),
                                        _mm256_set1_epi16((short)(scales[1] & 0x0f)));
                m0 = _mm256_set1_epi16((short)(scales[0] >> 4));
                m1 = _mm256_set1_epi16((short)(scales[1] >> 4));
            } else if (q3_k) {
                /* Where sub-block j keeps its bits: see widen_q3_k. */
                const __m256i q = q3_k_values(super + 32 + 32 * half, 2 * k, super, 4 * half + k);
                w0 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)),
                                        _mm256_set1_epi16(q3_scales[8 * half + 2 * k]));
                w1 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)),
                                        _mm256_set1_epi16(q3_scales[8 * half + 2 * k + 1]));
            } else {
                /* Where sub-block j keeps its bits: see q6_k_parts. */
                const int8_t *scales = (const int8_t *)(super + 192) + 8 * half + 2 * k;
                const __m256i q = q6_k_values(super + 64 * half + 32 * (k & 1), k >> 1,
                                              super + 128 + 32 * half, 2 * k);
                w0 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)),
                                        _mm256_set1_epi16(scales[0]));
                w1 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)),
                                        _mm256_set1_epi16(scales[1]));
            }
            for (int t = 0; t < tile; ++t) {
                const int64_t xb = (t0 + t) * x_blocks + b;
                const int16_t *xq = x->values + 32 * xb;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 16));
                const __m256i p =
                    _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x->scales[xb]),
                                         acc[t]);
                if (q2_k) {
                    const __m256i pm =
                        _mm256_add_epi32(_mm256_madd_epi16(m0, x0), _mm256_madd_epi16(m1, x1));
                    acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(pm),
                                              _mm256_set1_ps(dmin * x->scales[xb]), acc[t]);
                }
            }
        }
    }
    for (int t = 0; t < tile; ++t) out[(t0 + t) * out_stride] = hsum(acc[t]) + bias;
}

/* out[t * out_stride] = row . x[t0 + t] + bias for `tile` tokens of x (quantized by
 * quantize_blocks, `x_blocks` blocks per token), for one GGUF block row: each block's weights are
 * widened once for all of them. Called with a constant tile, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_blocks_tile(
    const pg_matrix *w, const uint8_t *row, const pg_blocks *x, int64_t t0, const int tile,
    int64_t x_blocks, float bias, float *out, int64_t out_stride) {
    if (is_super_block_format(w->format)) {
        dot_super_blocks_tile(w, row, x, t0, tile, x_blocks, bias, out, out_stride);
        return;
    }
    const int64_t nblocks = w->cols / 32;
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m256 acc[PG_TOKEN_TILE];
    float offset[PG_TOKEN_TILE];
    for (int t = 0; t < tile; ++t) {
        acc[t] = _mm256_setzero_ps();
        offset[t] = 0.f;
    }
    for (int64_t b = 0; b < nblocks; ++b) {
        __m256i w0, w1;
        float d, m = 0.f;
        if (w->format == PG_Q5_0 || w->format == PG_Q5_1) {
            const int with_min = w->format == PG_Q5_1;
            const uint8_t *block = row + b * (with_min ? 24 : 22);
            d = read_half(block);
            /* Q5_0 stores q + 16: d * sum((q - 16) x) = d * sum(q x) - 16 d * sum(x). */
            m = with_min ? read_half(block + 2) : -16.f * d;
            const __m256i q = q5_values(block + (with_min ? 4 : 2));
            w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
            w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
        } else if (w->format == PG_Q8_0) {
            const uint8_t *block = row + b * 34;
            d = read_half(block);
            const __m256i q = _mm256_loadu_si256((const __m256i *)(block + 2));
            w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
            w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
        } else {
            const int with_min = w->format == PG_Q4_1;
            const uint8_t *block = row + b * (with_min ? 20 : 18);
            d = read_half(block);
            /* Q4_0 stores q + 8: d * sum((q - 8) x) = d * sum(q x) - 8 d * sum(x). */
            m = with_min ? read_half(block + 2) : -8.f * d;
            const __m128i q = _mm_loadu_si128((const __m128i *)(block + (with_min ? 4 : 2)));
            w0 = _mm256_cvtepu8_epi16(_mm_and_si128(q, mask));
            w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
        }
        for (int t = 0; t < tile; ++t) {
            const int64_t xb = (t0 + t) * x_blocks + b;
            const int16_t *xq = x->values + 32 * xb;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 16));
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            const __m256 scale = _mm256_set1_ps(d * x->scales[xb]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
            offset[t] += m * x->sums[xb];
        }
    }
    for (int t = 0; t < tile; ++t) out[(t0 + t) * out_stride] = hsum(acc[t]) + offset[t] + bias;
}

static void dot_blocks(const pg_matrix *w, const uint8_t *row, const pg_blocks *x, int64_t T,
                       int64_t x_blocks, float bias, float *out, int64_t out_stride) {
    for (int64_t t0 = 0; t0 < T; t0 += PG_TOKEN_TILE) {
        switch (T - t0 < PG_TOKEN_TILE ? T - t0 : PG_TOKEN_TILE) {
#define PG_TILE_CASE(n)                                                                           \
    case n:                                                                                       \
        dot_blocks_tile(w, row, x, t0, n, x_blocks, bias, out, out_stride);                       \
        break;
            PG_TILE_CASE(1)
            PG_TILE_CASE(2)
            PG_TILE_CASE(3)
            PG_TILE_CASE(4)
            PG_TILE_CASE(5)
            PG_TILE_CASE(6)
            PG_TILE_CASE(7)
            PG_TILE_CASE(8)
#undef PG_TILE_CASE
        }
    }
}

/* Tokens per pass over an interleaved group: each block's weights are widened once for all of
 * them. 4 rows x tile accumulators must stay in registers: 16 ymm registers (AVX2) hold a tile of
 * 2, 32 (AVX-512VL, which lets AVX2 code use ymm16-31) a tile of 4. */
#ifdef __AVX512VL__
#define PG_X4_TILE 4
#else
#define PG_X4_TILE 2
#endif

/* Four rows (one interleaved group) times tokens t0 .. t0 + tile - 1 of x: result[t][i] = row i .
 * x[t0 + t]. `format` is the group's base format (Q8_0, Q4_*, Q5_*) and `tile` a constant where
 * this is inlined. Each token's sums run in the same order whatever the tile, so a token's result
 * does not depend on the tokens beside it. */
static inline __attribute__((always_inline)) void dot_x4_tile(int64_t format, const uint8_t *group,
                                                              int64_t nblocks, const pg_blocks *x,
                                                              int64_t t0, const int tile,
                                                              __m128 *result) {
    const int64_t header = 4 * block_header(format), payload = block_payload(format);
    const int64_t stride = header + 4 * payload;
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m256 acc[4][PG_X4_TILE];
    __m128 offset[PG_X4_TILE];
    for (int t = 0; t < tile; ++t) {
        offset[t] = _mm_setzero_ps();
        for (int i = 0; i < 4; ++i) acc[i][t] = _mm256_setzero_ps();
    }
    const uint8_t *p = group;
    for (int64_t b = 0; b < nblocks; ++b, p += stride) {
        /* The hardware prefetcher restarts on each group; eight blocks ahead keeps DRAM busy. */
        _mm_prefetch((const char *)(p + 8 * stride), _MM_HINT_T0);
        const __m128 d = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
        __m256 scale[PG_X4_TILE];
        for (int t = 0; t < tile; ++t) {
            const int64_t xb = (t0 + t) * nblocks + b;
            const __m128 sum = _mm_set1_ps(x->sums[xb]);
            if (format == PG_Q4_1 || format == PG_Q5_1)
                offset[t] = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p + 8))),
                                         sum, offset[t]);
            else if (format == PG_Q4_0) /* stored q + 8 */
                offset[t] = _mm_fmadd_ps(_mm_mul_ps(d, _mm_set1_ps(-8.f)), sum, offset[t]);
            else if (format == PG_Q5_0) /* stored q + 16 */
                offset[t] = _mm_fmadd_ps(_mm_mul_ps(d, _mm_set1_ps(-16.f)), sum, offset[t]);
            const __m128 scale4 = _mm_mul_ps(d, _mm_set1_ps(x->scales[xb]));
            scale[t] = _mm256_set_m128(scale4, scale4);
        }
        for (int i = 0; i < 4; ++i) {
            __m256i w0, w1;
            if (format == PG_Q8_0) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(p + header + 32 * i));
                w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
            } else if (format == PG_Q5_0 || format == PG_Q5_1) {
                const __m256i q = q5_values(p + header + 20 * i);
                w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
                w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
            } else {
                const __m128i q = _mm_loadu_si128((const __m128i *)(p + header + 16 * i));
                w0 = _mm256_cvtepu8_epi16(_mm_and_si128(q, mask));
                w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
            }
            for (int t = 0; t < tile; ++t) {
                const int16_t *xq = x->values + 32 * ((t0 + t) * nblocks + b);
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 16));
                const __m256i products =
                    _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                const __m256 lane = _mm256_permutevar_ps(scale[t], _mm256_set1_epi32(i));
                acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), lane, acc[i][t]);
            }
        }
    }
    for (int t = 0; t < tile; ++t) {
        const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][t], acc[1][t]),
                                            _mm256_hadd_ps(acc[2][t], acc[3][t]));
        result[t] = _mm_add_ps(
            _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)), offset[t]);
    }
}

static inline __attribute__((always_inline)) void dot_x4_tiles(int64_t format, const uint8_t *group,
                                                               int64_t nblocks, const pg_blocks *x,
                                                               int64_t t0, int64_t tile,
                                                               __m128 *result) {
    switch (tile) {
#define PG_X4_CASE(n)                                                                             \
    case n:                                                                                       \
        dot_x4_tile(format, group, nblocks, x, t0, n, result);                                    \
        break;
        PG_X4_CASE(1)
        PG_X4_CASE(2)
#if PG_X4_TILE == 4
        PG_X4_CASE(3)
        PG_X4_CASE(4)
#endif
#undef PG_X4_CASE
    }
}

/* Group g of an interleaved matrix times every token of x: out[t * out_stride + 4g + i]. */
static void dot_group_x4(const pg_matrix *w, int64_t g, const pg_blocks *x, int64_t T,
                         float *out, int64_t out_stride) {
    const int64_t nblocks = w->cols / 32;
    const uint8_t *group = w->data + 4 * g * w->row_bytes;
    for (int64_t t0 = 0; t0 < T; t0 += PG_X4_TILE) {
        const int64_t tile = T - t0 < PG_X4_TILE ? T - t0 : PG_X4_TILE;
        __m128 r[PG_X4_TILE];
        switch (w->format) {
        case PG_Q8_0_X4:
            dot_x4_tiles(PG_Q8_0, group, nblocks, x, t0, tile, r);
            break;
        case PG_Q4_0_X4:
            dot_x4_tiles(PG_Q4_0, group, nblocks, x, t0, tile, r);
            break;
        case PG_Q5_0_X4:
            dot_x4_tiles(PG_Q5_0, group, nblocks, x, t0, tile, r);
            break;
        case PG_Q5_1_X4:
            dot_x4_tiles(PG_Q5_1, group, nblocks, x, t0, tile, r);
            break;
        default:
            dot_x4_tiles(PG_Q4_1, group, nblocks, x, t0, tile, r);
            break;
        }
        for (int64_t t = 0; t < tile; ++t) {
            if (w->bias != NULL) r[t] = _mm_add_ps(r[t], _mm_loadu_ps(w->bias + 4 * g));
            _mm_storeu_ps(out + (t0 + t) * out_stride + 4 * g, r[t]);
        }
    }
}

/* Rows 4g .. 4g + 3 (`rows`; past the matrix's end, its last row again) of a Q4_K (q5 0) or
 * Q5_K (q5 1) matrix times tokens t0 .. t0 + tile - 1 of x: result[t] lane i = rows[i] .
 * x[t0 + t]. Four rows at a time as the interleaved formats are read, though the super-blocks stay
 * as stored: each token's activations are loaded once for the four rows, and the four sums
 * reduced together. Per super-block, a row's eight 32-weight scales d * scale and minimums dmin *
 * minimum are one vector each (k_scales_mins), multiplied by a token's eight block scales and
 * sums in one instruction each; the minimums' term -sum(dmin * minimum * sum(x)) goes into the
 * row's accumulator as eight lanes. A token's sums run in the same order whatever the tile. */
static inline __attribute__((always_inline)) void dot_k_tile(const pg_matrix *w,
                                                             const int64_t rows[4], const int q5,
                                                             const int x4, const pg_blocks *x,
                                                             int64_t t0, const int tile,
                                                             __m128 *result) {
    const int64_t supers = w->cols / 256, x_blocks = w->cols / 32;
    const __m256i nibble = _mm256_set1_epi16(0x0f), fifth = _mm256_set1_epi16(0x10);
    __m256 acc[4][PG_X4_TILE];
    for (int t = 0; t < tile; ++t)
        for (int i = 0; i < 4; ++i) acc[i][t] = _mm256_setzero_ps();
    pg_k_part first[4];
    for (int i = 0; i < 4; ++i) first[i] = k_parts_as(w, q5, x4, rows[i], 0);
    const int64_t stride = (x4 ? 4 : 1) * (q5 ? PG_Q5_K_BYTES : PG_Q4_K_BYTES);
    for (int64_t s = 0; s < supers; ++s) {
        pg_k_part part[4];
        for (int i = 0; i < 4; ++i) {
            part[i].header = first[i].header + s * stride;
            part[i].qh = first[i].qh + s * stride;
            part[i].qs = first[i].qs + s * stride;
            part[i].chunk = x4 ? 128 : 32;
        }
        if (x4) {
            /* The group's super-blocks stream from one place: the prefetcher restarts on each
             * group; the next super-block column ahead keeps DRAM busy. */
            const int64_t span = 4 * (q5 ? PG_Q5_K_BYTES : PG_Q4_K_BYTES);
            _mm_prefetch((const char *)part[0].header + 2 * span, _MM_HINT_T0);
            _mm_prefetch((const char *)part[0].header + 2 * span + span / 2, _MM_HINT_T0);
        }
        /* The four headers as 32-bit words [d | dmin, a, b, c] (a, b, c those of
         * k_scales_mins), transposed to one vector per word, lane i row i; then the scales'
         * and minimums' bytes, four sub-blocks a vector: lane i of lo holds row i's sub-blocks
         * 0-3, of hi its 4-7. */
        __m128 h0 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)part[0].header));
        __m128 h1 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)part[1].header));
        __m128 h2 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)part[2].header));
        __m128 h3 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)part[3].header));
        _MM_TRANSPOSE4_PS(h0, h1, h2, h3);
        const __m128i dd = _mm_castps_si128(h0), a = _mm_castps_si128(h1);
        const __m128i b = _mm_castps_si128(h2), c = _mm_castps_si128(h3);
        const __m128i six = _mm_set1_epi8(0x3f), four = _mm_set1_epi8(0x0f);
        const __m128i top = _mm_set1_epi8(0x30);
        const __m128i sc_lo = _mm_and_si128(a, six);
        const __m128i sc_hi =
            _mm_or_si128(_mm_and_si128(c, four), _mm_and_si128(_mm_srli_epi32(a, 2), top));
        const __m128i mn_lo = _mm_and_si128(b, six);
        const __m128i mn_hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi32(c, 4), four),
                                           _mm_and_si128(_mm_srli_epi32(b, 2), top));
        const __m128 d4 = _mm_cvtph_ps(
            _mm_shuffle_epi8(dd, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1,
                                               -1, -1)));
        const __m256 dmin4 = _mm256_castps128_ps256(_mm_cvtph_ps(
            _mm_shuffle_epi8(dd, _mm_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1,
                                               -1, -1, -1))));
        /* The minimums' term, row by row: row i's eight minimums (bytes 8 (i % 2) of
         * m01 / m23) times dmin, against each token's eight block sums. */
        const __m128i m01 = _mm_unpacklo_epi32(mn_lo, mn_hi), m23 = _mm_unpackhi_epi32(mn_lo, mn_hi);
        for (int i = 0; i < 4; ++i) {
            const __m128i pair = i < 2 ? m01 : m23;
            const __m128i bytes = (i & 1) ? _mm_srli_si128(pair, 8) : pair;
            const __m256 dmn =
                _mm256_mul_ps(_mm256_permutevar8x32_ps(dmin4, _mm256_set1_epi32(i)),
                              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
            for (int t = 0; t < tile; ++t)
                acc[i][t] = _mm256_fnmadd_ps(
                    dmn, _mm256_loadu_ps(x->sums + (t0 + t) * x_blocks + 8 * s), acc[i][t]);
        }
        /* The scales by sub-block: byte 4j + i of by_block_lo is row i's scale of sub-block j
         * (0-3), of by_block_hi of sub-block 4 + j. */
        const __m128i order = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        const __m128i by_block_lo = _mm_shuffle_epi8(sc_lo, order);
        const __m128i by_block_hi = _mm_shuffle_epi8(sc_hi, order);
        const __m256 d44 = _mm256_set_m128(d4, d4);
        __m256 pair_scales = _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
            if (j % 2 == 0) {
                /* Sub-blocks j and j + 1: d * scale for the four rows, in the low and high half. */
                __m128i bytes = j < 4 ? by_block_lo : by_block_hi;
                if (j % 4 == 2) bytes = _mm_srli_si128(bytes, 8);
                pair_scales = _mm256_mul_ps(d44, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
            }
            const __m128 d4j = (j & 1) ? _mm256_extractf128_ps(pair_scales, 1)
                                       : _mm256_castps256_ps128(pair_scales);
            const __m256 dj = _mm256_set_m128(d4j, d4j);
            __m256i x0[PG_X4_TILE], x1[PG_X4_TILE];
            __m256 scale[PG_X4_TILE];
            for (int t = 0; t < tile; ++t) {
                const int64_t xb = (t0 + t) * x_blocks + 8 * s + j;
                const int16_t *xq = x->values + 32 * xb;
                x0[t] = _mm256_loadu_si256((const __m256i *)xq);
                x1[t] = _mm256_loadu_si256((const __m256i *)(xq + 16));
                scale[t] = _mm256_mul_ps(dj, _mm256_broadcast_ss(x->scales + xb));
            }
            for (int i = 0; i < 4; ++i) {
                /* Sub-block j: the low (j even) or high nibbles of the 32 bytes of chunk j / 2,
                 * widened to int16 as they are loaded (one shuffle per 16 weights), then masked
                 * or shifted; Q5_K's fifth bits are bit j of its 32 qh bytes. */
                const uint8_t *chunk = part[i].qs + part[i].chunk * (j / 2);
                __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)chunk));
                __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(chunk + 16)));
                if (j & 1) {
                    w0 = _mm256_srli_epi16(w0, 4);
                    w1 = _mm256_srli_epi16(w1, 4);
                } else {
                    w0 = _mm256_and_si256(w0, nibble);
                    w1 = _mm256_and_si256(w1, nibble);
                }
                if (q5) {
                    const __m128i shift = _mm_cvtsi32_si128(j);
                    const __m256i h0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)part[i].qh));
                    const __m256i h1 =
                        _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(part[i].qh + 16)));
                    w0 = _mm256_or_si256(w0, _mm256_and_si256(_mm256_srl_epi16(_mm256_slli_epi16(h0, 4), shift), fifth));
                    w1 = _mm256_or_si256(w1, _mm256_and_si256(_mm256_srl_epi16(_mm256_slli_epi16(h1, 4), shift), fifth));
                }
                for (int t = 0; t < tile; ++t) {
                    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0[t]),
                                                       _mm256_madd_epi16(w1, x1[t]));
                    const __m256 lane = _mm256_permutevar_ps(scale[t], _mm256_set1_epi32(i));
                    acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane, acc[i][t]);
                }
            }
        }
    }
    for (int t = 0; t < tile; ++t) {
        const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][t], acc[1][t]),
                                            _mm256_hadd_ps(acc[2][t], acc[3][t]));
        result[t] = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
    }
}

/* Rows 4g .. 4g + 3 of a Q4_K or Q5_K matrix, as stored (those of them it has) or interleaved,
 * times every token of x: out[t * out_stride + 4g + i]. */
static void dot_k_group(const pg_matrix *w, int64_t g, const pg_blocks *x, int64_t T, float *out,
                        int64_t out_stride) {
    int64_t rows[4];
    for (int i = 0; i < 4; ++i) rows[i] = 4 * g + i < w->rows ? 4 * g + i : w->rows - 1;
    const int64_t count = w->rows - 4 * g < 4 ? w->rows - 4 * g : 4;
    const int64_t base = base_format(w->format);
    const int kind = 2 * (base == PG_Q5_K) + is_x4_format(w->format);
    for (int64_t t0 = 0; t0 < T; t0 += PG_X4_TILE) {
        const int64_t tile = T - t0 < PG_X4_TILE ? T - t0 : PG_X4_TILE;
        __m128 r[PG_X4_TILE];
        switch (8 * kind + tile) {
#define PG_K_CASE(n, q5, x4)                                                                      \
    case 8 * (2 * q5 + x4) + n:                                                                   \
        dot_k_tile(w, rows, q5, x4, x, t0, n, r);                                                 \
        break;
#define PG_K_CASES(n) PG_K_CASE(n, 0, 0) PG_K_CASE(n, 0, 1) PG_K_CASE(n, 1, 0) PG_K_CASE(n, 1, 1)
            PG_K_CASES(1)
            PG_K_CASES(2)
#if PG_X4_TILE == 4
            PG_K_CASES(3)
            PG_K_CASES(4)
#endif
#undef PG_K_CASES
#undef PG_K_CASE
        }
        for (int64_t t = 0; t < tile; ++t) {
            float values[4];
            _mm_storeu_ps(values, r[t]);
            for (int64_t i = 0; i < count; ++i)
                out[(t0 + t) * out_stride + 4 * g + i] =
                    values[i] + (w->bias != NULL ? w->bias[4 * g + i] : 0.f);
        }
    }
}
#endif

/* Formats whose unit of work in matmul_group is four rows read as stored (dot_k_group). */
static inline int is_k_group_format(int64_t format) {
#ifdef PG_AVX2
    return base_format(format) == PG_Q4_K || base_format(format) == PG_Q5_K;
#else
    (void)format;
    return 0;
#endif
}

/* out[m][t * stride + n] = x[t] . W_m[n] + b_m[n] for every matrix m of a group sharing the input
 * x [T, cols], stride `out_stride`, or each matrix's rows where it is 0:
 * the group's rows are split over threads together, so q/k/v (or gate/up) cost one fork. The unit
 * of work is a row, or a group of four rows for interleaved matrices. */
static void matmul_group(const pg_matrix *const *mats, float *const *outs, int count,
                         const float *x, int64_t T, int64_t out_stride) {
    int64_t offsets[8];
    int64_t total = 0;
    for (int m = 0; m < count; ++m) {
        offsets[m] = total;
        total += is_k_group_format(mats[m]->format) ? (mats[m]->rows + 3) / 4
                 : is_x4_format(mats[m]->format)    ? mats[m]->rows / 4
                                                    : mats[m]->rows;
    }
    const int64_t cols = mats[0]->cols;
#ifdef PG_AVX2
    pg_blocks blocks = {NULL, NULL, NULL};
    int any_blocks = 0;
    for (int m = 0; m < count; ++m) any_blocks |= is_block_format(mats[m]->format);
    if (any_blocks && cols % 32 == 0) {
        const int64_t nblocks = T * cols / 32;
        blocks.values = (int16_t *)malloc((size_t)(T * cols) * sizeof(int16_t));
        blocks.scales = (float *)malloc((size_t)(2 * nblocks) * sizeof(float));
        blocks.sums = blocks.scales + nblocks;
        quantize_blocks(x, nblocks, &blocks);
    }
#endif
    /* Dynamic chunks: in a server the HTTP thread and the client preempt one of the two threads
     * now and then, and the other should take its rows rather than wait for them. Each thread
     * gets about eight chunks, at least 16 units: a thread's reads stay sequential over a chunk,
     * and the hardware prefetcher loses its stream at every jump to the next one (a 262k-row
     * LM head read in chunks of 16 units came at 22 GB/s, in eighths of its share at 33). */
    const int64_t chunk = total / (8 * (int64_t)omp_get_max_threads()) > 16
                              ? total / (8 * (int64_t)omp_get_max_threads())
                              : 16;
#pragma omp parallel
    {
        float *buf = (float *)malloc((size_t)cols * sizeof(float));
#pragma omp for schedule(dynamic, chunk)
        for (int64_t unit = 0; unit < total; ++unit) {
            int m = 0;
            while (m + 1 < count && unit >= offsets[m + 1]) ++m;
            const pg_matrix *w = mats[m];
            const int64_t n = unit - offsets[m];
#ifdef PG_AVX2
            if (is_k_group_format(w->format)) {
                dot_k_group(w, n, &blocks, T, outs[m], out_stride ? out_stride : w->rows);
                continue;
            }
            if (is_x4_format(w->format)) {
                dot_group_x4(w, n, &blocks, T, outs[m], out_stride ? out_stride : w->rows);
                continue;
            }
#endif
            const float bias = w->bias ? w->bias[n] : 0.f;
#ifdef PG_AVX2
            if (blocks.values != NULL && is_block_format(w->format)) {
                dot_blocks(w, w->data + n * w->row_bytes, &blocks, T, cols / 32, bias,
                           outs[m] + n, out_stride ? out_stride : w->rows);
                continue;
            }
#endif
            const float *row = matrix_row(w, n, buf);
            const int64_t stride = out_stride ? out_stride : w->rows;
            for (int64_t t = 0; t < T; ++t) outs[m][t * stride + n] = dot(row, x + t * cols, cols) + bias;
        }
        free(buf);
    }
#ifdef PG_AVX2
    free(blocks.values);
    free(blocks.scales);
#endif
}

static void matmul(const pg_matrix *w, float *out, const float *x, int64_t T) {
    matmul_group(&w, &out, 1, x, T, 0);
}

/* matmul_group with each matrix's rows in outs[m] [T, rows_m], through the block GEMM for a step
 * of PG_BATCHED_TOKENS or more when the model says so (its joined output split afterwards); the
 * bfloat16 GEMM from its own threshold (pg_bf16_gemm_min_tokens). */
static void step_matmul(const pg_model *model, const pg_matrix *const *mats, float *const *outs,
                        int count, const float *x, int64_t T) {
    const int64_t fewest =
        model->batched == 2 ? pg_bf16_gemm_min_tokens(mats, count) : PG_BATCHED_TOKENS;
    if (model->batched && T >= fewest) {
        int64_t total = 0;
        for (int m = 0; m < count; ++m) total += mats[m]->rows;
        /* One matrix: its joined output is its own. */
        float *joined =
            count == 1 ? outs[0] : (float *)pg_scratch(1, (size_t)(T * total) * sizeof(float));
        const int status =
            joined == NULL ? -2
            : model->batched == 2 ? pagoda_block_gemm_bf16(mats, count, x, T, joined)
                                  : pagoda_block_gemm(mats, count, x, T, joined);
        if (status == 0 && count == 1) return;
        if (status == 0) {
#pragma omp parallel for schedule(static) if (T * total >= (1 << 15))
            for (int64_t t = 0; t < T; ++t) {
                int64_t column = 0;
                for (int m = 0; m < count; ++m) {
                    memcpy(outs[m] + t * mats[m]->rows, joined + t * total + column,
                           (size_t)mats[m]->rows * sizeof(float));
                    column += mats[m]->rows;
                }
            }
            return;
        }
    }
    matmul_group(mats, outs, count, x, T, 0);
}

static void rms_norm(float *out, const float *x, const float *weight, int64_t T, int64_t n,
                     float eps) {
#pragma omp parallel for schedule(static) if (T >= PG_BATCHED_TOKENS)
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * n;
        float *ot = out + t * n;
        float squares = 0.f;
        for (int64_t i = 0; i < n; ++i) squares += xt[i] * xt[i];
        const float inv = 1.f / sqrtf(squares / (float)n + eps);
        for (int64_t i = 0; i < n; ++i) ot[i] = xt[i] * inv * weight[i];
    }
}

/* gate = act(gate) * up over T rows of I: libm's expf/tanhf/erff for a few tokens (the
 * decoder's numerics since it was written), the vectorized pg_exp split over the threads for a
 * batch (tanh(u) = 1 - 2 / (1 + e^(2u)); the exact GELU keeps erff). */
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

static inline float gelu_tanh_fast(float x) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (2.f - 2.f / (1.f + pg_exp(2.f * u)));
}

static inline float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }

static void activate_and_mul_rows(float *gate, const float *up, int64_t T, int64_t I,
                                  int64_t activation) {
    if (T < PG_BATCHED_TOKENS) {
        for (int64_t i = 0; i < T * I; ++i) {
            const float g = gate[i];
            const float a = activation == PG_SILU        ? g / (1.f + expf(-g))
                            : activation == PG_GELU_TANH ? gelu_tanh(g)
                                                         : gelu(g);
            gate[i] = a * up[i];
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        float *g = gate + t * I;
        const float *u = up + t * I;
        if (activation == PG_SILU) {
#pragma omp simd
            for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.f + pg_exp(-g[i])) * u[i];
        } else if (activation == PG_GELU_TANH) {
#pragma omp simd
            for (int64_t i = 0; i < I; ++i) g[i] = gelu_tanh_fast(g[i]) * u[i];
        } else {
            for (int64_t i = 0; i < I; ++i) g[i] = gelu(g[i]) * u[i];
        }
    }
}

/* x = cap * tanh(x / cap) over n values. */
static void soft_cap(float *x, int64_t n, float cap) {
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
    for (int64_t i = 0; i < n; ++i) x[i] = cap * tanhf(x[i] / cap);
}

/* Neox-style rotary on the first rotary_dim dims of each of `heads` heads of one token. */
static void rotate(float *x, int64_t heads, int64_t head_dim, int64_t rotary_dim, const float *cos,
                   const float *sin) {
    const int64_t half = rotary_dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float *head = x + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
            const float x1 = head[i], x2 = head[i + half];
            head[i] = x1 * cos[i] - x2 * sin[i];
            head[i + half] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/* One decode step for T requests; token t is at positions[t] and is written to cache slot
 * slots[t]. Writes logits [T, vocab]. Returns 0, or -1 if scratch memory ran out. */
int pagoda_llama_decode_step(const pg_model *model, int64_t T, const int64_t *token_ids,
                             const int64_t *positions, const int64_t *slots,
                             const int64_t *tables, int64_t max_blocks, const int64_t *ctx_lens,
                             float *logits) {
    const int64_t E = model->hidden, H = model->num_heads, Hkv = model->num_kv_heads;
    const int64_t D = model->head_dim, I = model->intermediate, half = model->rotary_dim / 2;
    const int64_t kv_row = Hkv * D;
    const size_t floats = (size_t)T * (size_t)(3 * E + 2 * H * D + 2 * kv_row + 2 * I);
    float *scratch = (float *)pg_scratch(0, floats * sizeof(float));
    if (scratch == NULL) return -1;
    float *x = scratch;                 /* [T, E] residual stream */
    float *normed = x + T * E;          /* [T, E] */
    float *projected = normed + T * E;  /* [T, E] attention or MLP output */
    float *q = projected + T * E;       /* [T, H, D] */
    float *attended = q + T * H * D;    /* [T, H, D] */
    float *k = attended + T * H * D;    /* [T, Hkv, D] */
    float *v = k + T * kv_row;          /* [T, Hkv, D] */
    float *gate = v + T * kv_row;       /* [T, I] */
    float *up = gate + T * I;           /* [T, I] */

    for (int64_t t = 0; t < T; ++t) {
        const float *row = matrix_row(&model->embed, token_ids[t], x + t * E);
        if (row != x + t * E) memcpy(x + t * E, row, (size_t)E * sizeof(float));
        if (model->embed_scale != 0.f)
            for (int64_t i = 0; i < E; ++i) x[t * E + i] *= model->embed_scale;
    }

    for (int64_t l = 0; l < model->num_layers; ++l) {
        const pg_layer *layer = &model->layers[l];
        rms_norm(normed, x, layer->attn_norm, T, E, model->eps);
        const pg_matrix *qkv[3] = {&layer->q, &layer->k, &layer->v};
        float *qkv_out[3] = {q, k, v};
        step_matmul(model, qkv, qkv_out, 3, normed, T);
        if (layer->q_norm != NULL) { /* each head of each token is a row of D */
            rms_norm(q, q, layer->q_norm, T * H, D, model->eps);
            rms_norm(k, k, layer->k_norm, T * Hkv, D, model->eps);
        }

        const int64_t cache_rows = model->cache_blocks * model->block_size;
        for (int64_t t = 0; t < T; ++t) {
            const float *cos = layer->cos + positions[t] * half;
            const float *sin = layer->sin + positions[t] * half;
            rotate(q + t * H * D, H, D, model->rotary_dim, cos, sin);
            rotate(k + t * kv_row, Hkv, D, model->rotary_dim, cos, sin);
            if (model->kv_bf16) {
                uint16_t *key_cache = (uint16_t *)layer->kv_cache;
                store_bf16(key_cache + slots[t] * kv_row, k + t * kv_row, kv_row);
                store_bf16(key_cache + (cache_rows + slots[t]) * kv_row, v + t * kv_row, kv_row);
            } else {
                float *key_cache = (float *)layer->kv_cache;
                memcpy(key_cache + slots[t] * kv_row, k + t * kv_row, kv_row * sizeof(float));
                memcpy(key_cache + (cache_rows + slots[t]) * kv_row, v + t * kv_row,
                       kv_row * sizeof(float));
            }
        }
        if (model->kv_bf16)
            pagoda_paged_decode_attention_bf16(attended, q, (const uint16_t *)layer->kv_cache,
                                               model->cache_blocks, tables, max_blocks, ctx_lens,
                                               T, H, Hkv, D, model->block_size, layer->scale,
                                               layer->window, layer->softcap);
        else
            pagoda_paged_decode_attention_f32(attended, q, (const float *)layer->kv_cache,
                                              model->cache_blocks, tables, max_blocks, ctx_lens,
                                              T, H, Hkv, D, model->block_size, layer->scale,
                                              layer->window, layer->softcap);
        const pg_matrix *o[1] = {&layer->o};
        step_matmul(model, o, &projected, 1, attended, T);
        if (layer->post_attn_norm != NULL)
            rms_norm(projected, projected, layer->post_attn_norm, T, E, model->eps);
#pragma omp simd
        for (int64_t i = 0; i < T * E; ++i) x[i] += projected[i];

        rms_norm(normed, x, layer->ffn_norm, T, E, model->eps);
        const pg_matrix *gate_up[2] = {&layer->gate, &layer->up};
        float *gate_up_out[2] = {gate, up};
        step_matmul(model, gate_up, gate_up_out, 2, normed, T);
        activate_and_mul_rows(gate, up, T, I, model->activation);
        const pg_matrix *down[1] = {&layer->down};
        step_matmul(model, down, &projected, 1, gate, T);
        if (layer->post_ffn_norm != NULL)
            rms_norm(projected, projected, layer->post_ffn_norm, T, E, model->eps);
#pragma omp simd
        for (int64_t i = 0; i < T * E; ++i) x[i] += projected[i];
    }
    rms_norm(normed, x, model->final_norm, T, E, model->eps);
    const pg_matrix *head[1] = {&model->lm_head};
    step_matmul(model, head, &logits, 1, normed, T);
    if (model->final_softcap != 0.f) soft_cap(logits, T * model->vocab, model->final_softcap);
    return 0;
}

/* out [T, rows] = x [T, cols] . W^T + bias: one matmul of the decoder, for tests and benchmarks. */
void pagoda_matmul(const pg_matrix *w, float *out, const float *x, int64_t T) {
    matmul(w, out, x, T);
}

/* out [T, sum of rows] = x . [W_0; W_1; ...]^T + biases with the decoder's matmul (int16-rounded
 * activations for block formats): the block GEMM's path for a few tokens, where widening every
 * weight to float would cost more than the multiplications it feeds. */
void pagoda_matmul_joined(const pg_matrix *const *mats, int count, const float *x, int64_t T,
                          float *out) {
    float *outs[8];
    int64_t columns = 0, total = 0;
    for (int m = 0; m < count; ++m) total += mats[m]->rows;
    for (int m = 0; m < count; ++m) {
        outs[m] = out + columns;
        columns += mats[m]->rows;
    }
    matmul_group(mats, outs, count, x, T, total);
}

/* Every row of w (a float or GGUF block format) as float32 into out [rows, cols]: the values
 * the PyTorch dequantizers of pagoda.loader.gguf compute, for loading GGUF files. */
void pagoda_dequantize(const pg_matrix *w, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < w->rows; ++n) {
        float *dst = out + n * w->cols;
        const float *row = matrix_row(w, n, dst);
        if (row != dst) memcpy(dst, row, (size_t)w->cols * sizeof(float));
    }
}
