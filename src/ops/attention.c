/* Causal grouped-query attention with an optional sliding window and an
 * optional key/value prefix, forward and backward. */
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

/* Where the keys (or values) of one (sequence, kv head) live: absolute
 * positions below P are prefix rows, shared by every sequence, and positions
 * from P on are the sequence's own rows. Both have the row stride of a
 * (rows, KVH, D) array. */
typedef struct kv_rows {
    const float *prefix, *own;
    int P, stride;
} kv_rows;

static const float *kv_row(const kv_rows *s, int c)
{
    return c < s->P ? s->prefix + (size_t)c * s->stride : s->own + (size_t)(c - s->P) * s->stride;
}

/* Splits the columns [c0, c1) into at most two runs that each lie in one
 * array: part 0 is the prefix run, part 1 the sequence's own run. Returns 0
 * when the part is empty. */
static int column_run(int part, int c0, int c1, int P, int *a, int *e)
{
    if (part == 0) {
        *a = c0;
        *e = c1 < P ? c1 : P;
    } else {
        *a = c0 > P ? c0 : P;
        *e = c1;
    }
    return *a < *e;
}

/* Per (sequence, head) and block of query rows [t0, t1) at absolute
 * positions P + t: scores against the keys [lo, P + t1) the block can see,
 * written by sgemm straight into the saved probabilities, a masked softmax per
 * row, then out = P V. The prefix and the sequence's own keys are separate
 * arrays, so each product runs once per array. Both products stay in BLAS,
 * far faster than scalar loops at small head sizes. */
void cp_attention_forward_prefix(float *out, float *att, const float *q, const float *k,
                                 const float *v, const float *pk, const float *pv, int B, int T,
                                 int P, int H, int KVH, int D, int window)
{
    int group = H / KVH, n_cols = P + T;
    float scale = 1.0f / sqrtf((float)D);
    int q_stride = H * D, kv_stride = KVH * D;
    cp_blas_single_threaded();

#pragma omp parallel for schedule(dynamic, 1)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        size_t head = (size_t)(h / group) * D;
        const float *qh = q + (size_t)b * T * q_stride + (size_t)h * D;
        kv_rows keys = {pk ? pk + head : NULL, k + (size_t)b * T * kv_stride + head, P, kv_stride};
        kv_rows values = {pv ? pv + head : NULL, v + (size_t)b * T * kv_stride + head, P,
                          kv_stride};
        float *oh = out + (size_t)b * T * q_stride + (size_t)h * D;
        float *p = att + (size_t)bh * T * n_cols;

        for (int t0 = 0; t0 < T; t0 += QUERY_BLOCK) {
            int t1 = t0 + QUERY_BLOCK < T ? t0 + QUERY_BLOCK : T;
            int lo = first_visible(P + t0, window), hi = P + t1, rows = t1 - t0;
            float *block = p + (size_t)t0 * n_cols;
            int a, e, first = 1;

            for (int part = 0; part < 2; part++)
                if (column_run(part, lo, hi, P, &a, &e))
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, e - a, D, scale,
                                qh + (size_t)t0 * q_stride, q_stride, kv_row(&keys, a),
                                kv_stride, 0.0f, block + a, n_cols);
            for (int t = t0; t < t1; t++)
                softmax_range(p + (size_t)t * n_cols, first_visible(P + t, window), P + t,
                              n_cols);
            for (int part = 0; part < 2; part++) {
                if (!column_run(part, lo, hi, P, &a, &e))
                    continue;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, e - a, 1.0f,
                            block + a, n_cols, kv_row(&values, a), kv_stride,
                            first ? 0.0f : 1.0f, oh + (size_t)t0 * q_stride, q_stride);
                first = 0;
            }
        }
    }
}

void cp_attention_forward(float *out, float *att, const float *q, const float *k,
                          const float *v, int B, int T, int H, int KVH, int D, int window)
{
    cp_attention_forward_prefix(out, att, q, k, v, NULL, NULL, B, T, 0, H, KVH, D, window);
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
 * visible keys. The rest of the block's columns [lo, P + t1) is zeroed,
 * because the sgemm calls that follow read the whole block. p and ds are
 * (T, P + T). */
static void softmax_backward_rows(float *ds, const float *p, int t0, int t1, int lo, int T,
                                  int P, int window)
{
    int n_cols = P + T;
    for (int t = t0; t < t1; t++) {
        float *drow = ds + (size_t)t * n_cols;
        const float *prow = p + (size_t)t * n_cols;
        int first = first_visible(P + t, window), last = P + t;

        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = first; j <= last; j++)
            dot += drow[j] * prow[j];
#pragma omp simd
        for (int j = first; j <= last; j++)
            drow[j] = prow[j] * (drow[j] - dot);
        for (int j = lo; j < first; j++)
            drow[j] = 0.0f;
        for (int j = last + 1; j < P + t1; j++)
            drow[j] = 0.0f;
    }
}

/* One head's arrays for the backward pass: the forward's inputs and the
 * gradients that receive its results. Keys and values come from a prefix
 * and the sequence's own rows (kv_rows); so do their gradients. */
typedef struct head_grads {
    float *dq;
    const float *dout, *q;
    kv_rows k, v, dk, dv;
} head_grads;

/* Adds the gradients of one query head of one sequence, by the forward's
 * blocks of query rows: four products, each restricted to the keys
 * [lo, P + t1) that the block can see and run once per array they lie in.
 * The caller owns the dk and dv rows of its kv head. */
static void attention_backward_head(const head_grads *g, float *s, const float *p, int T, int P,
                                    int q_stride, int kv_stride, int D, int window)
{
    float scale = 1.0f / sqrtf((float)D);
    int n_cols = P + T;
    for (int t0 = 0; t0 < T; t0 += QUERY_BLOCK) {
        int t1 = t0 + QUERY_BLOCK < T ? t0 + QUERY_BLOCK : T;
        int lo = first_visible(P + t0, window), hi = P + t1, rows = t1 - t0, a, e;
        const float *p_block = p + (size_t)t0 * n_cols;
        float *s_block = s + (size_t)t0 * n_cols;
        const float *do_rows = g->dout + (size_t)t0 * q_stride;

        /* Undoes out = P V: dV += Pᵀ dO and dP = dO Vᵀ. */
        for (int part = 0; part < 2; part++) {
            if (!column_run(part, lo, hi, P, &a, &e))
                continue;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, e - a, D, rows, 1.0f,
                        p_block + a, n_cols, do_rows, q_stride, 1.0f,
                        (float *)kv_row(&g->dv, a), kv_stride);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, e - a, D, 1.0f, do_rows,
                        q_stride, kv_row(&g->v, a), kv_stride, 0.0f, s_block + a, n_cols);
        }

        softmax_backward_rows(s, p, t0, t1, lo, T, P, window);

        /* Undoes scores = scale · Q Kᵀ: dQ += scale · dS K, dK += scale · dSᵀ Q. */
        for (int part = 0; part < 2; part++) {
            if (!column_run(part, lo, hi, P, &a, &e))
                continue;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, e - a, scale,
                        s_block + a, n_cols, kv_row(&g->k, a), kv_stride, 1.0f,
                        g->dq + (size_t)t0 * q_stride, q_stride);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, e - a, D, rows, scale,
                        s_block + a, n_cols, g->q + (size_t)t0 * q_stride, q_stride, 1.0f,
                        (float *)kv_row(&g->dk, a), kv_stride);
        }
    }
}

/* dout, dq and q are (B, T, H, D), dk, dv, k and v (B, T, KVH, D), pk and pv
 * (P, KVH, D), dpk and dpv (B, P, KVH, D), att and scratch (B, H, T, P + T).
 * Threads take whole (sequence, kv head) pairs, so the query heads that share
 * a kv head add into its dk and dv rows one after another, never
 * concurrently. For the same reason each sequence has its own slice of the
 * prefix gradients.
 * NOTE: that leaves B * KVH units of work, so threads beyond that sit idle
 * (a single sequence with 4 kv heads uses 4 threads). */
void cp_attention_backward_prefix(float *dq, float *dk, float *dv, float *dpk, float *dpv,
                                  float *scratch, const float *dout, const float *att,
                                  const float *q, const float *k, const float *v,
                                  const float *pk, const float *pv, int B, int T, int P, int H,
                                  int KVH, int D, int window)
{
    int group = H / KVH, n_cols = P + T;
    int q_stride = H * D, kv_stride = KVH * D;
    cp_blas_single_threaded();

#pragma omp parallel for schedule(dynamic, 1)
    for (int bkv = 0; bkv < B * KVH; bkv++) {
        int b = bkv / KVH, kvh = bkv % KVH;
        size_t kv_off = (size_t)b * T * kv_stride + (size_t)kvh * D;
        size_t prefix_off = (size_t)kvh * D, dprefix_off = (size_t)b * P * kv_stride + prefix_off;

        for (int h = kvh * group; h < (kvh + 1) * group; h++) {
            size_t q_off = (size_t)b * T * q_stride + (size_t)h * D;
            size_t bh = (size_t)b * H + h;
            head_grads g = {
                .dq = dq + q_off,
                .dout = dout + q_off,
                .q = q + q_off,
                .k = {pk ? pk + prefix_off : NULL, k + kv_off, P, kv_stride},
                .v = {pv ? pv + prefix_off : NULL, v + kv_off, P, kv_stride},
                .dk = {dpk ? dpk + dprefix_off : NULL, dk + kv_off, P, kv_stride},
                .dv = {dpv ? dpv + dprefix_off : NULL, dv + kv_off, P, kv_stride},
            };
            attention_backward_head(&g, scratch + bh * T * n_cols, att + bh * T * n_cols, T, P,
                                    q_stride, kv_stride, D, window);
        }
    }
}

void cp_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                           const float *att, const float *q, const float *k, const float *v,
                           int B, int T, int H, int KVH, int D, int window)
{
    cp_attention_backward_prefix(dq, dk, dv, NULL, NULL, scratch, dout, att, q, k, v, NULL, NULL,
                                 B, T, 0, H, KVH, D, window);
}
