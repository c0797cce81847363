/* Paged decode attention on CPU: float32 arithmetic over a float32 or bfloat16 KV cache.
 *
 * One query token per request attends over that request's context, read in place from the paged
 * KV cache through its block table: no gather, no padding, each K/V row read once per kv head.
 *
 * Layouts (all contiguous):
 *   q        [B, H, D] float32
 *   cache    [2, num_blocks, block_size, Hkv, D]   (K then V; the engine's per-layer cache), float32
 *            (pagoda_paged_decode_attention_f32) or bfloat16 (_bf16: half the bytes per step, each
 *            element widened to float32 as it is loaded)
 *   tables   [B, max_blocks] int64 block ids
 *   ctx_lens [B] int64 tokens in each request's context, the new one included
 *   out      [B, H, D]
 * Query head i uses kv head i / (H / Hkv), as in grouped-query attention.
 * window > 0 keeps only the last `window` positions; softcap > 0 applies softcap * tanh(s / softcap).
 *
 * Work is split over requests with OpenMP when there are enough of them (each request's cache
 * rows read once, whole and in order, widened into scratch for all its query heads), else over
 * (request, query head) pairs; the process's OpenMP runtime is the
 * one PyTorch loaded, so torch.set_num_threads governs it too.
 */
#include <omp.h>

#include "blocks.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PG_ATTEND_AVX2 1
#endif

#ifdef PG_ATTEND_AVX2
/* e^x for x <= 0 in eight lanes: x = n ln2 + r, e^r by a degree-7 polynomial (Cephes' expf
 * coefficients, within 2 ulp of expf), 2^n through the exponent bits. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_floor_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

/* Eight sums in one vector: lane j = the sum of the lanes of a[j]. */

static inline __m256 sum_lanes8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores[0 .. n) (whose largest is the largest lane of peak8) replaced by exp(score - peak), the
 * tail through the same polynomial padded with -inf (e = 0); returns 1 / their sum in every lane. */
static inline __m256 softmax_in_place(float *scores, int64_t n, __m256 peak8) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(peak8), _mm256_extractf128_ps(peak8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float peak = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    __m256 total8 = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e =
            exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(peak)));
        _mm256_storeu_ps(scores + t, e);
        total8 = _mm256_add_ps(total8, e);
    }
    if (t < n) {
        float tail[8];
        for (int j = 0; j < 8; ++j) tail[j] = t + j < n ? scores[t + j] - peak : -INFINITY;
        const __m256 e = exp_nonpositive(_mm256_loadu_ps(tail));
        _mm256_storeu_ps(tail, e);
        for (int j = 0; t + j < n; ++j) scores[t + j] = tail[j];
        total8 = _mm256_add_ps(total8, e);
    }
    __m256 totals[8] = {total8, total8, total8, total8, total8, total8, total8, total8};
    return _mm256_set1_ps(1.f / _mm256_cvtss_f32(sum_lanes8(totals)));
}

#endif

/* bfloat16 is the top half of a float32: widening is a 16-bit shift. */
static inline float pg_bf16_to_f32(uint16_t x) {
    union {
        uint32_t bits;
        float value;
    } u = {(uint32_t)x << 16};
    return u.value;
}

#ifdef PG_ATTEND_AVX2
static inline __m256 pg_load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

#define PG_CAT2(a, b) a##b
#define PG_CAT(a, b) PG_CAT2(a, b)

#define PG_KV float
#define PG_NAME(name) PG_CAT(name, _f32)
#define PG_LOAD8(p) _mm256_loadu_ps(p)
#define PG_KV_TO_F32(x) (x)
#include "paged_decode_body.h"
#undef PG_KV
#undef PG_NAME
#undef PG_LOAD8
#undef PG_KV_TO_F32

#define PG_KV uint16_t
#define PG_NAME(name) PG_CAT(name, _bf16)
#define PG_LOAD8(p) pg_load8_bf16(p)
#define PG_KV_TO_F32(x) pg_bf16_to_f32(x)
#include "paged_decode_body.h"
