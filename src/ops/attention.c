/* Causal grouped-query attention with an optional sliding window. */
#include "ops/attention.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#include <cblas.h>

#include "ops/fast_exp.h"
#include "ops/matmul.h"

/* The first key position visible from query position i. */
static int first_visible(int i, int window)
{
    return (window > 0 && i - window + 1 > 0) ? i - window + 1 : 0;
}

/* Softmax of row[lo..hi] in place; entries outside are zeroed. */
static void softmax_range(float *row, int lo, int hi, int n)
{
    float max = -INFINITY;
#pragma omp simd reduction(max : max)
    for (int j = lo; j <= hi; j++)
        max = row[j] > max ? row[j] : max;
    int j = lo;
    cp_v8sf sum8 = {0};
    for (; j + 8 <= hi + 1; j += 8) {
        cp_v8sf x;
        memcpy(&x, row + j, sizeof x);
        x = cp_fast_expf8(x - max);
        memcpy(row + j, &x, sizeof x);
        sum8 += x;
    }
    float sum = 0.0f;
    for (int i = 0; i < 8; i++)
        sum += sum8[i];
    for (; j <= hi; j++) {
        row[j] = cp_fast_expf(row[j] - max);
        sum += row[j];
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (int j = lo; j <= hi; j++)
        row[j] *= inv;
    for (int j = 0; j < lo; j++)
        row[j] = 0.0f;
    for (int j = hi + 1; j < n; j++)
        row[j] = 0.0f;
}

/* One query row against keys [lo, hi]: scores into p, weighted values into o. */
static void attend_row(float *o, float *p, const float *qrow, const float *k, const float *v,
                       int lo, int hi, int n_cols, size_t kv_stride, int D, float scale)
{
    for (int j = lo; j <= hi; j++) {
        const float *krow = k + (size_t)j * kv_stride;
        float dot = 0.0f;
        for (int d = 0; d < D; d++)
            dot += qrow[d] * krow[d];
        p[j] = dot * scale;
    }
    softmax_range(p, lo, hi, n_cols);

    memset(o, 0, (size_t)D * sizeof *o);
    for (int j = lo; j <= hi; j++) {
        const float *vrow = v + (size_t)j * kv_stride;
        float w = p[j];
        for (int d = 0; d < D; d++)
            o[d] += w * vrow[d];
    }
}

/* Query rows per block: the block's scores stay in cache between the two
 * products, and keys after the block's last row are never scored. */
#define QUERY_BLOCK 64

/* Per (sequence, head) and block of query rows [t0, t1): scores against the
 * keys [lo, t1) the block can see, written by sgemm straight into the saved
 * probabilities, a masked softmax per row, then out = P V. Both products stay
 * in BLAS, far faster than scalar loops at small head sizes. */
void cp_attention_forward(float *out, float *att, const float *q, const float *k,
                          const float *v, int B, int T, int H, int KVH, int D, int window)
{
    int group = H / KVH;
    float scale = 1.0f / sqrtf((float)D);
    int q_stride = H * D, kv_stride = KVH * D;
    cp_blas_single_threaded();

#pragma omp parallel for schedule(dynamic, 1)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *qh = q + (size_t)b * T * q_stride + (size_t)h * D;
        const float *kh = k + (size_t)b * T * kv_stride + (size_t)(h / group) * D;
        const float *vh = v + (size_t)b * T * kv_stride + (size_t)(h / group) * D;
        float *oh = out + (size_t)b * T * q_stride + (size_t)h * D;
        float *p = att + (size_t)bh * T * T;

        for (int t0 = 0; t0 < T; t0 += QUERY_BLOCK) {
            int t1 = t0 + QUERY_BLOCK < T ? t0 + QUERY_BLOCK : T;
            int lo = first_visible(t0, window), rows = t1 - t0, cols = t1 - lo;
            float *block = p + (size_t)t0 * T + lo;

            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, D, scale,
                        qh + (size_t)t0 * q_stride, q_stride, kh + (size_t)lo * kv_stride,
                        kv_stride, 0.0f, block, T);
            for (int t = t0; t < t1; t++)
                softmax_range(p + (size_t)t * T, first_visible(t, window), t, T);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, cols, 1.0f, block, T,
                        vh + (size_t)lo * kv_stride, kv_stride, 0.0f,
                        oh + (size_t)t0 * q_stride, q_stride);
        }
    }
}

void cp_attention_forward_ref(float *out, float *att, const float *q, const float *k,
                              const float *v, int B, int T, int H, int KVH, int D, int window)
{
    int group = H / KVH;
    float scale = 1.0f / sqrtf((float)D);
    size_t q_stride = (size_t)H * D, kv_stride = (size_t)KVH * D;
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const float *kb = k + (size_t)b * T * kv_stride + (size_t)(h / group) * D;
            const float *vb = v + (size_t)b * T * kv_stride + (size_t)(h / group) * D;
            for (int t = 0; t < T; t++) {
                const float *qrow = q + ((size_t)b * T + t) * q_stride + (size_t)h * D;
                float *orow = out + ((size_t)b * T + t) * q_stride + (size_t)h * D;
                float *p = att + (((size_t)b * H + h) * T + t) * T;
                attend_row(orow, p, qrow, kb, vb, first_visible(t, window), t, T, kv_stride, D,
                           scale);
            }
        }
    }
}

void cp_attention_decode(float *out, float *scores, const float *q, const float *k_cache,
                         const float *v_cache, int len, int H, int KVH, int D, int window)
{
    int group = H / KVH;
    float scale = 1.0f / sqrtf((float)D);
    size_t kv_stride = (size_t)KVH * D;
    int t = len - 1;

    for (int h = 0; h < H; h++) {
        const float *kh = k_cache + (size_t)(h / group) * D;
        const float *vh = v_cache + (size_t)(h / group) * D;
        attend_row(out + (size_t)h * D, scores + (size_t)h * len, q + (size_t)h * D, kh, vh,
                   first_visible(t, window), t, len, kv_stride, D, scale);
    }
}
