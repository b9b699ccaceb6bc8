/* Fast kernels against their plain reference kernels. */
#include <stdlib.h>

#include "ops/attention.h"
#include "ops/matmul.h"
#include "test.h"

static void fill_random(float *x, size_t n, unsigned seed)
{
    srand(seed);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
}

static float max_abs_diff(const float *a, const float *b, size_t n)
{
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (d > m)
            m = d;
    }
    return m;
}

TEST(matmul_matches_reference)
{
    int shapes[][3] = {{1, 64, 172}, {7, 33, 5}, {130, 64, 512}, {64, 172, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        float *x = malloc(sizeof(float) * N * IC), *w = malloc(sizeof(float) * OC * IC);
        float *bias = malloc(sizeof(float) * OC);
        float *fast = malloc(sizeof(float) * N * OC), *ref = malloc(sizeof(float) * N * OC);
        fill_random(x, (size_t)N * IC, 1);
        fill_random(w, (size_t)OC * IC, 2);
        fill_random(bias, (size_t)OC, 3);
        cp_matmul_forward(fast, x, w, s % 2 ? bias : NULL, N, IC, OC);
        cp_matmul_forward_ref(ref, x, w, s % 2 ? bias : NULL, N, IC, OC);
        CHECK_MSG(max_abs_diff(fast, ref, (size_t)N * OC) < 1e-4f, "shape %d x %d x %d", N, IC,
                  OC);
        free(x), free(w), free(bias), free(fast), free(ref);
    }
}

TEST(attention_matches_reference)
{
    /* (B, T, H, KVH, D, window) */
    int cases[][6] = {{2, 9, 4, 2, 8, 0}, {1, 16, 8, 4, 8, 3}, {3, 5, 2, 1, 6, 1}, {1, 1, 2, 2, 4, 0}, {2, 150, 4, 2, 8, 0}, {1, 130, 2, 1, 8, 70}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int B = cases[c][0], T = cases[c][1], H = cases[c][2], KVH = cases[c][3], D = cases[c][4];
        int W = cases[c][5];
        size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * KVH * D, na = (size_t)B * H * T * T;
        float *q = malloc(nq * 4), *k = malloc(nkv * 4), *v = malloc(nkv * 4);
        float *out = malloc(nq * 4), *out_ref = malloc(nq * 4);
        float *att = malloc(na * 4), *att_ref = malloc(na * 4);
        fill_random(q, nq, 4);
        fill_random(k, nkv, 5);
        fill_random(v, nkv, 6);
        cp_attention_forward(out, att, q, k, v, B, T, H, KVH, D, W);
        cp_attention_forward_ref(out_ref, att_ref, q, k, v, B, T, H, KVH, D, W);
        CHECK_MSG(max_abs_diff(out, out_ref, nq) < 1e-5f, "case %zu: outputs differ", c);
        CHECK_MSG(max_abs_diff(att, att_ref, na) < 1e-5f, "case %zu: probabilities differ", c);
        free(q), free(k), free(v), free(out), free(out_ref), free(att), free(att_ref);
    }
}
