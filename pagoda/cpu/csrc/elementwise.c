// Elementwise steps of a decoder layer, one pass each over float32 rows (bound by
// pagoda/cpu/elementwise.py):
//
//   pagoda_rotary_neox       RoPE in place, the halves of each head's first `rotary_dim` dims
//                            rotated against each other (Llama, Qwen, Mistral). The arithmetic is
//                            PyTorch's, rounding for rounding (`x1*cos - x2*sin`, no fused
//                            multiply-add), so the result is bit-identical to the tensor-op path.
//   pagoda_silu_and_mul      silu(gate) * up over a fused [gate | up] projection.
//   pagoda_add_rms_norm      sum = x + residual; out = weight * sum / rms(sum).
//
// The last two compute exp (blocks.h's pg_exp) and the mean square their own way: within a few
// float32 ulps of PyTorch's, not equal to them, so the layers use them only on paths that are not
// bit-exact anyway (see elementwise.py). Rows are split over the OpenMP threads when there are enough of
// them; a decode step's few rows stay on the calling thread (a fork/join costs more than they do).

#include "blocks.h"

// Rows of work below which one thread does it all.
#define PARALLEL_ELEMENTS (1 << 15)

// out[t, i] = silu(in[t, i]) * in[t, size + i] for t < rows, i < size.
void pagoda_silu_and_mul(float *out, const float *in, int64_t rows, int64_t size,
                         int64_t in_stride, int64_t out_stride) {
#pragma omp parallel for schedule(static) if (rows * size >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *gate = in + t * in_stride;
        const float *up = gate + size;
        float *row = out + t * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < size; i++) {
            const float g = gate[i];
            row[i] = g / (1.0f + pg_exp(-g)) * up[i];
        }
    }
}

// x: rows of `num_heads` heads of `head_dim` values, `stride` floats apart; each head's first
// `rotary_dim` dims are rotated by the angles of the row's position (cos/sin tables of
// rotary_dim / 2 entries per position).
void pagoda_rotary_neox(float *x, int64_t rows, int64_t stride, int64_t num_heads,
                        int64_t head_dim, int64_t rotary_dim, const float *cos_table,
                        const float *sin_table, const int64_t *positions) {
#pragma STDC FP_CONTRACT OFF
    const int64_t half = rotary_dim / 2;
#pragma omp parallel for schedule(static) if (rows * num_heads * rotary_dim >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos_table + positions[t] * half;
        const float *s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < num_heads; h++) {
            float *lo = x + t * stride + h * head_dim;
            float *hi = lo + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = lo[i], b = hi[i];
                const float a_cos = a * c[i], b_sin = b * s[i];
                const float b_cos = b * c[i], a_sin = a * s[i];
                lo[i] = a_cos - b_sin;
                hi[i] = b_cos + a_sin;
            }
        }
    }
}

// sum[t] = x[t] + residual[t]; out[t] = weight * sum[t] / sqrt(mean(sum[t]^2) + eps).
// `residual` may be null: then out[t] is the norm of x[t] alone and `sum` is not written.
void pagoda_add_rms_norm(float *out, float *sum_out, const float *x, const float *residual,
                         const float *weight, int64_t rows, int64_t size, float eps) {
#pragma omp parallel for schedule(static) if (rows * size >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *in = x + t * size;
        float *row = out + t * size;
        float squares = 0.0f;
        if (residual != NULL) {
            const float *add = residual + t * size;
            float *sum = sum_out + t * size;
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < size; i++) {
                const float v = in[i] + add[i];
                sum[i] = v;
                squares += v * v;
            }
            in = sum;
        } else {
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < size; i++) squares += in[i] * in[i];
        }
        const float scale = 1.0f / sqrtf(squares / (float)size + eps);
#pragma omp simd
        for (int64_t i = 0; i < size; i++) row[i] = weight[i] * (in[i] * scale);
    }
}
