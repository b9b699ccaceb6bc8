/* Causal grouped-query attention with an optional sliding window, forward
 * and backward. */
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

/* Turns dP = dO Vᵀ in ds into dS = P ⊙ (dP - Σ_j dP_j P_j) in place, undoing
 * the masked softmax for query rows [t0, t1) of one head, each row over its
 * visible keys. The rest of the block's columns [lo, t1) is zeroed, because
 * the sgemm calls that follow read the whole block. p and ds are (T, T). */
static void softmax_backward_rows(float *ds, const float *p, int t0, int t1, int lo, int T,
                                  int window)
{
    for (int t = t0; t < t1; t++) {
        float *drow = ds + (size_t)t * T;
        const float *prow = p + (size_t)t * T;
        int first = first_visible(t, window);

        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = first; j <= t; j++)
            dot += drow[j] * prow[j];
#pragma omp simd
        for (int j = first; j <= t; j++)
            drow[j] = prow[j] * (drow[j] - dot);
        for (int j = lo; j < first; j++)
            drow[j] = 0.0f;
        for (int j = t + 1; j < t1; j++)
            drow[j] = 0.0f;
    }
}

/* Adds the gradients of one query head of one sequence, by the forward's
 * blocks of query rows: four products, each restricted to the keys [lo, t1)
 * that the block can see. The caller owns the dk and dv rows of its kv head. */
static void attention_backward_head(float *dqh, float *dkh, float *dvh, float *s,
                                    const float *doh, const float *p, const float *qh,
                                    const float *kh, const float *vh, int T, int q_stride,
                                    int kv_stride, int D, int window)
{
    float scale = 1.0f / sqrtf((float)D);
    for (int t0 = 0; t0 < T; t0 += QUERY_BLOCK) {
        int t1 = t0 + QUERY_BLOCK < T ? t0 + QUERY_BLOCK : T;
        int lo = first_visible(t0, window), rows = t1 - t0, cols = t1 - lo;
        const float *p_block = p + (size_t)t0 * T + lo;
        float *s_block = s + (size_t)t0 * T + lo;
        const float *do_rows = doh + (size_t)t0 * q_stride;

        /* Undoes out = P V: dV += Pᵀ dO and dP = dO Vᵀ. */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, D, rows, 1.0f, p_block, T,
                    do_rows, q_stride, 1.0f, dvh + (size_t)lo * kv_stride, kv_stride);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, D, 1.0f, do_rows,
                    q_stride, vh + (size_t)lo * kv_stride, kv_stride, 0.0f, s_block, T);

        softmax_backward_rows(s, p, t0, t1, lo, T, window);

        /* Undoes scores = scale · Q Kᵀ: dQ += scale · dS K, dK += scale · dSᵀ Q. */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, cols, scale, s_block, T,
                    kh + (size_t)lo * kv_stride, kv_stride, 1.0f, dqh + (size_t)t0 * q_stride,
                    q_stride);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, D, rows, scale, s_block, T,
                    qh + (size_t)t0 * q_stride, q_stride, 1.0f, dkh + (size_t)lo * kv_stride,
                    kv_stride);
    }
}

/* dout, dq and q are (B, T, H, D), dk, dv, k and v (B, T, KVH, D), att and
 * scratch (B, H, T, T). Threads take whole (sequence, kv head) pairs, so the
 * query heads that share a kv head add into its dk and dv rows one after
 * another, never concurrently.
 * NOTE: that leaves B * KVH units of work, so threads beyond that sit idle
 * (a single sequence with 4 kv heads uses 4 threads). */
void cp_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                           const float *att, const float *q, const float *k, const float *v,
                           int B, int T, int H, int KVH, int D, int window)
{
    int group = H / KVH;
    int q_stride = H * D, kv_stride = KVH * D;
    cp_blas_single_threaded();

#pragma omp parallel for schedule(dynamic, 1)
    for (int bkv = 0; bkv < B * KVH; bkv++) {
        int b = bkv / KVH, kvh = bkv % KVH;
        size_t kv_off = (size_t)b * T * kv_stride + (size_t)kvh * D;

        for (int h = kvh * group; h < (kvh + 1) * group; h++) {
            size_t q_off = (size_t)b * T * q_stride + (size_t)h * D;
            size_t bh = (size_t)b * H + h;
            attention_backward_head(dq + q_off, dk + kv_off, dv + kv_off,
                                    scratch + bh * T * T, dout + q_off, att + bh * T * T,
                                    q + q_off, k + kv_off, v + kv_off, T, q_stride, kv_stride,
                                    D, window);
        }
    }
}
