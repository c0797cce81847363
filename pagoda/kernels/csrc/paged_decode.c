/* Paged decode attention on CPU, float32.
 *
 * One query token per request attends over that request's context, read in place from the paged
 * KV cache through its block table: no gather, no padding, each K/V row read once per kv head.
 *
 * Layouts (all contiguous):
 *   q        [B, H, D]
 *   cache    [2, num_blocks, block_size, Hkv, D]   (K then V; the engine's per-layer cache)
 *   tables   [B, max_blocks] int64 block ids
 *   ctx_lens [B] int64 tokens in each request's context, the new one included
 *   out      [B, H, D]
 * Query head i uses kv head i / (H / Hkv), as in grouped-query attention.
 * window > 0 keeps only the last `window` positions; softcap > 0 applies softcap * tanh(s / softcap).
 *
 * Work is split over (request, kv head) pairs with OpenMP; the process's OpenMP runtime is the
 * one PyTorch loaded, so torch.set_num_threads governs it too.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void pagoda_paged_decode_attention_f32(float *out, const float *q, const float *cache,
                                       int64_t num_blocks, const int64_t *tables,
                                       int64_t max_blocks, const int64_t *ctx_lens, int64_t B,
                                       int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                                       float scale, int64_t window, float softcap) {
    const int64_t G = H / Hkv;
    const int64_t row = Hkv * D;
    const float *values = cache + num_blocks * block_size * row;

#pragma omp parallel
    {
        float *scores = NULL;
        int64_t capacity = 0;
        float *acc = (float *)malloc((size_t)(G * D) * sizeof(float));

#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * Hkv; ++item) {
            const int64_t b = item / Hkv, h = item % Hkv;
            const int64_t length = ctx_lens[b];
            const int64_t start = (window > 0 && length > window) ? length - window : 0;
            const int64_t n = length - start;
            if (G * n > capacity) {
                free(scores);
                capacity = G * n;
                scores = (float *)malloc((size_t)capacity * sizeof(float));
            }
            const float *qh = q + (b * H + h * G) * D;
            const int64_t *table = tables + b * max_blocks;

            /* Walk the context block by block: no division per position. */
            for (int64_t first = start - start % block_size; first < length; first += block_size) {
                const float *page = cache + table[first / block_size] * block_size * row + h * D;
                const int64_t lo = first > start ? first : start;
                const int64_t hi = first + block_size < length ? first + block_size : length;
                for (int64_t pos = lo; pos < hi; ++pos) {
                    const float *k = page + (pos - first) * row;
                    const int64_t t = pos - start;
                    for (int64_t g = 0; g < G; ++g) {
                        const float *qg = qh + g * D;
                        float s = 0.f;
#pragma omp simd reduction(+ : s)
                        for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
                        s *= scale;
                        if (softcap > 0.f) s = softcap * tanhf(s / softcap);
                        scores[g * n + t] = s;
                    }
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                float *sg = scores + g * n;
                float peak = -INFINITY;
                for (int64_t t = 0; t < n; ++t) peak = sg[t] > peak ? sg[t] : peak;
                float total = 0.f;
                for (int64_t t = 0; t < n; ++t) {
                    sg[t] = expf(sg[t] - peak);
                    total += sg[t];
                }
                const float inv = 1.f / total;
                for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
            }
            memset(acc, 0, (size_t)(G * D) * sizeof(float));
            for (int64_t first = start - start % block_size; first < length; first += block_size) {
                const float *page = values + table[first / block_size] * block_size * row + h * D;
                const int64_t lo = first > start ? first : start;
                const int64_t hi = first + block_size < length ? first + block_size : length;
                for (int64_t pos = lo; pos < hi; ++pos) {
                    const float *v = page + (pos - first) * row;
                    const int64_t t = pos - start;
                    for (int64_t g = 0; g < G; ++g) {
                        const float p = scores[g * n + t];
                        float *a = acc + g * D;
#pragma omp simd
                        for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
                    }
                }
            }
            memcpy(out + (b * H + h * G) * D, acc, (size_t)(G * D) * sizeof(float));
        }
        free(scores);
        free(acc);
    }
}
