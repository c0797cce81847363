/* The paged decode-attention kernel for one KV cache element type, included by paged_decode.c
 * once per type with:
 *   PG_KV           the cache's element type (float, or uint16_t holding bfloat16 bits)
 *   PG_NAME(name)   name suffixed with the type (_f32, _bf16)
 *   PG_LOAD8(p)     eight elements at p as a __m256 of float32 (AVX2 builds)
 *   PG_KV_TO_F32(x) one element as float32
 * Arithmetic is float32 throughout; only the cache's loads differ.
 */

/* Rows of a paged cache are scattered (a request's blocks anywhere, its kv head a stride apart
 * within a block): the hardware prefetcher loses them at every 4 KiB page, and each row then costs
 * a DRAM round trip. Fetch the row PG_AHEAD positions on instead. */
#define PG_AHEAD 8

static inline void PG_NAME(prefetch_row)(const PG_KV *base, const int64_t *table, int64_t pos,
                                int64_t length, int64_t block_size, int64_t row, int64_t D) {
    if (pos >= length) return;
    const char *p = (const char *)(base + (table[pos / block_size] * block_size +
                                           pos % block_size) * row);
    for (int64_t offset = 0; offset < D * (int64_t)sizeof(PG_KV); offset += 64)
        __builtin_prefetch(p + offset);
}

/* One block of a walk over a context, block by block (one division per block, not per position):
 * the positions [*lo, *hi) of the block starting at position `first` that fall in [start, length),
 * and where that block's rows begin in `base` (row r of it at base + r * row). */
static inline const PG_KV *PG_NAME(block_rows)(const PG_KV *base, const int64_t *table, int64_t first,
                                      int64_t start, int64_t length, int64_t block_size,
                                      int64_t row, int64_t *lo, int64_t *hi) {
    *lo = first > start ? first : start;
    *hi = first + block_size < length ? first + block_size : length;
    return base + table[first / block_size] * block_size * row;
}

#ifdef PG_ATTEND_AVX2
/* One query head qh [D] over positions [start, length) of kv head rows `keys`/`values` (row r of
 * block b at base + (b * block_size + r) * row): out [D]. D a multiple of 64, no soft-capping.
 * Scores of eight positions at a time (eight independent FMA chains, one transposed sum), the
 * softmax's exponentials eight at a time, and the weighted sum of V with 64 dims in registers. */
static void PG_NAME(attend_head_avx2)(float *out, const float *qh, const PG_KV *keys,
                                       const PG_KV *values,
                             const int64_t *table, int64_t start, int64_t length, int64_t D,
                             int64_t block_size, int64_t row, float scale, float *scores) {
    const int64_t n = length - start;
    __m256 peak8 = _mm256_set1_ps(-INFINITY);
    const __m256 scale8 = _mm256_set1_ps(scale);
    for (int64_t first = start - start % block_size; first < length; first += block_size) {
        int64_t lo, hi;
        const PG_KV *page =
            PG_NAME(block_rows)(keys, table, first, start, length, block_size, row, &lo, &hi);
        int64_t pos = lo;
        for (; pos + 8 <= hi; pos += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            const PG_KV *k = page + (pos - first) * row;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qh + d);
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_fmadd_ps(PG_LOAD8(k + j * row + d), qv, acc[j]);
            }
            PG_NAME(prefetch_row)(keys, table, pos + PG_AHEAD, length, block_size, row, D);
            const __m256 s = _mm256_mul_ps(sum_lanes8(acc), scale8);
            _mm256_storeu_ps(scores + (pos - start), s);
            peak8 = _mm256_max_ps(peak8, s);
        }
        for (; pos < hi; ++pos) {
            const PG_KV *k = page + (pos - first) * row;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8)
                acc = _mm256_fmadd_ps(PG_LOAD8(k + d), _mm256_loadu_ps(qh + d), acc);
            __m256 one[8] = {acc, acc, acc, acc, acc, acc, acc, acc};
            const float score = _mm256_cvtss_f32(sum_lanes8(one)) * scale;
            scores[pos - start] = score;
            peak8 = _mm256_max_ps(peak8, _mm256_set1_ps(score));
        }
    }
    const __m256 inv = softmax_in_place(scores, n, peak8);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t first = start - start % block_size; first < length; first += block_size) {
            int64_t lo, hi;
            const PG_KV *page =
                PG_NAME(block_rows)(values + d0, table, first, start, length, block_size, row, &lo, &hi);
            for (int64_t pos = lo; pos < hi; ++pos) {
                const PG_KV *v = page + (pos - first) * row;
                if (d0 == 0)
                    PG_NAME(prefetch_row)(values, table, pos + PG_AHEAD, length, block_size, row, D);
                const __m256 p = _mm256_set1_ps(scores[pos - start]);
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_fmadd_ps(p, PG_LOAD8(v + 8 * j), acc[j]);
            }
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
    }
}
#endif

#ifdef PG_ATTEND_AVX2
/* Positions [start, length) of K or V, every kv head of each position (a whole cache row, read
 * in order, the rows ahead prefetched), widened to float32 into dst [Hkv][n][D]: head h's rows
 * at dst + h * n * D, in context order. */
static void PG_NAME(gather_rows)(float *dst, const PG_KV *rows, const int64_t *table,
                                 int64_t start, int64_t length, int64_t Hkv, int64_t D,
                                 int64_t block_size) {
    const int64_t n = length - start, row = Hkv * D;
    for (int64_t first = start - start % block_size; first < length; first += block_size) {
        int64_t lo, hi;
        const PG_KV *page =
            PG_NAME(block_rows)(rows, table, first, start, length, block_size, row, &lo, &hi);
        for (int64_t pos = lo; pos < hi; ++pos) {
            const PG_KV *src = page + (pos - first) * row;
            PG_NAME(prefetch_row)(rows, table, pos + PG_AHEAD, length, block_size, row, row);
            for (int64_t h = 0; h < Hkv; ++h) {
                float *out = dst + (h * n + pos - start) * D;
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(out + d, PG_LOAD8(src + h * D + d));
            }
        }
    }
}

/* The G query heads qg [G][D] of one kv head over its n gathered rows kf/vf [n][D] (float32,
 * contiguous, in L2): out [G][D]. D a multiple of 64, no soft-capping. */
static void PG_NAME(attend_gathered_avx2)(float *out, const float *qg, int64_t G, const float *kf,
                                          const float *vf, int64_t n, int64_t D, float scale,
                                          float *scores) {
    const __m256 scale8 = _mm256_set1_ps(scale);
    for (int64_t g = 0; g < G; ++g) {
        const float *qh = qg + g * D;
        __m256 peak8 = _mm256_set1_ps(-INFINITY);
        int64_t pos = 0;
        for (; pos + 8 <= n; pos += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            const float *k = kf + pos * D;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qh + d);
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k + j * D + d), qv, acc[j]);
            }
            const __m256 s = _mm256_mul_ps(sum_lanes8(acc), scale8);
            _mm256_storeu_ps(scores + pos, s);
            peak8 = _mm256_max_ps(peak8, s);
        }
        for (; pos < n; ++pos) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(kf + pos * D + d), _mm256_loadu_ps(qh + d),
                                      acc);
            __m256 one[8] = {acc, acc, acc, acc, acc, acc, acc, acc};
            const float score = _mm256_cvtss_f32(sum_lanes8(one)) * scale;
            scores[pos] = score;
            peak8 = _mm256_max_ps(peak8, _mm256_set1_ps(score));
        }
        const __m256 inv = softmax_in_place(scores, n, peak8);
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t p = 0; p < n; ++p) {
                const float *v = vf + p * D + d0;
                const __m256 w = _mm256_set1_ps(scores[p]);
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * j), acc[j]);
            }
            for (int j = 0; j < 8; ++j)
                _mm256_storeu_ps(out + g * D + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
        }
    }
}
#endif

void PG_NAME(pagoda_paged_decode_attention)(float *out, const float *q, const PG_KV *cache,
                                            int64_t num_blocks, const int64_t *tables,
                                            int64_t max_blocks, const int64_t *ctx_lens,
                                            int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                            int64_t block_size, float scale, int64_t window,
                                            float softcap) {
    const int64_t G = H / Hkv;
    const int64_t row = Hkv * D;
    const PG_KV *values = cache + num_blocks * block_size * row;

#ifdef PG_ATTEND_AVX2
    /* One request per item, when there are enough requests to keep every thread busy and each
     * one's K and V fit a few MiB of scratch: its cache rows are read once, whole and in order,
     * widened into scratch per kv head, and each kv head's query heads work on those rows
     * together (the per-head split reads every kv head's rows once per query head, scattered). */
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = ctx_lens[b] > longest ? ctx_lens[b] : longest;
    if (window > 0 && longest > window) longest = window;
    if (D % 64 == 0 && softcap <= 0.f && B >= 4 * omp_get_max_threads() &&
        longest * row <= (1 << 19)) {
#pragma omp parallel
        {
            const size_t floats = (size_t)((1 + 2 * row) * longest);
            float *scores = (float *)pg_scratch(0, floats * sizeof(float));
            float *kf = scores + longest, *vf = kf + longest * row;
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < B; ++b) {
                const int64_t length = ctx_lens[b];
                const int64_t start = (window > 0 && length > window) ? length - window : 0;
                const int64_t n = length - start;
                const int64_t *table = tables + b * max_blocks;
                PG_NAME(gather_rows)(kf, cache, table, start, length, Hkv, D, block_size);
                PG_NAME(gather_rows)(vf, values, table, start, length, Hkv, D, block_size);
                for (int64_t h = 0; h < Hkv; ++h)
                    PG_NAME(attend_gathered_avx2)(out + (b * H + h * G) * D,
                                                  q + (b * H + h * G) * D, G, kf + h * n * D,
                                                  vf + h * n * D, n, D, scale, scores);
            }
        }
        return;
    }
#endif
#pragma omp parallel
    {
        float *scores = NULL;
        int64_t capacity = 0;

        /* One item per (request, query head): a decode step of one request still has H items to
         * share out (its Hkv kv heads alone left one of two threads idle a third of the time);
         * the G query heads of a kv head read its rows from cache after the first. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * H; ++item) {
            const int64_t b = item / H, qhead = item % H, h = qhead / G;
            const int64_t length = ctx_lens[b];
            const int64_t start = (window > 0 && length > window) ? length - window : 0;
            const int64_t n = length - start;
            if (n > capacity) {
                free(scores);
                capacity = n;
                scores = (float *)malloc((size_t)capacity * sizeof(float));
            }
            const float *qh = q + (b * H + qhead) * D;
            const int64_t *table = tables + b * max_blocks;
            const PG_KV *key_rows = cache + h * D, *value_rows = values + h * D;
#ifdef PG_ATTEND_AVX2
            if (D % 64 == 0 && softcap <= 0.f) {
                PG_NAME(attend_head_avx2)(out + (b * H + qhead) * D, qh, key_rows, value_rows, table, start,
                                 length, D, block_size, row, scale, scores);
                continue;
            }
#endif
            float peak = -INFINITY;

            for (int64_t first = start - start % block_size; first < length; first += block_size) {
                int64_t lo, hi;
                const PG_KV *page =
                    PG_NAME(block_rows)(key_rows, table, first, start, length, block_size, row, &lo, &hi);
                for (int64_t pos = lo; pos < hi; ++pos) {
                    const PG_KV *k = page + (pos - first) * row;
                    PG_NAME(prefetch_row)(key_rows, table, pos + PG_AHEAD, length, block_size, row, D);
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < D; ++d) s += qh[d] * PG_KV_TO_F32(k[d]);
                    s *= scale;
                    if (softcap > 0.f) s = softcap * tanhf(s / softcap);
                    scores[pos - start] = s;
                    peak = s > peak ? s : peak;
                }
            }
            float total = 0.f;
            for (int64_t t = 0; t < n; ++t) {
                scores[t] = expf(scores[t] - peak);
                total += scores[t];
            }
            const float inv = 1.f / total;
            float *acc = out + (b * H + qhead) * D;
            memset(acc, 0, (size_t)D * sizeof(float));
            for (int64_t first = start - start % block_size; first < length; first += block_size) {
                int64_t lo, hi;
                const PG_KV *page =
                    PG_NAME(block_rows)(value_rows, table, first, start, length, block_size, row, &lo, &hi);
                for (int64_t pos = lo; pos < hi; ++pos) {
                    const PG_KV *v = page + (pos - first) * row;
                    PG_NAME(prefetch_row)(value_rows, table, pos + PG_AHEAD, length, block_size, row, D);
                    const float p = scores[pos - start] * inv;
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d) acc[d] += p * PG_KV_TO_F32(v[d]);
                }
            }
        }
        free(scores);
    }
}
