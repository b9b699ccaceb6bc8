/*
 * Backward kernels of src/ops against central finite differences of their
 * forwards. Each check takes a scalar objective L = Σ r ⊙ f(x) with random r,
 * so the analytic gradient is the backward called with dout = r, and the
 * numeric one is (L(x + eps) - L(x - eps)) / 2eps per input element, L summed
 * in double over float32 outputs. Also checked: accumulation (+=), NULL
 * weight gradients, masked cross-entropy rows, and the fast matmul backward
 * against its reference kernel.
 */
#include <omp.h>
#include <stdlib.h>

#include "core/rng.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/embedding.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "test.h"

/* Finite-difference step. Only the outputs that depend on the perturbed
 * element change between the two evaluations, but their float32 rounding
 * still adds noise of order 1e-7 / EPS to the numeric gradient. On these
 * tests that noise dominates up to EPS = 1e-2, where the relative errors are
 * 2e-4 at most, about 10 times smaller than with 1e-3. From 3e-2 on, the
 * truncation error of swiglu and attention starts to grow. */
#define EPS 1e-2f

/* Max |analytic - numeric| over the max |numeric| of one input tensor. The
 * largest error measured on these shapes is 2e-4 (rmsnorm dinp at C = 512).
 * Bugs planted on purpose (a flipped sign, a dropped factor, a transposed
 * operand, a skipped head) gave errors from 1e-2 (rmsnorm's r³ as r²) to 4. */
#define GRAD_TOL 1e-3

/* Fast against reference matmul backward: float32 sums of up to 1024
 * products against double ones, measured up to 1.2e-6 relative. */
#define REF_TOL 1e-5

static float *random_array(size_t n, uint64_t seed, float lo, float hi)
{
    float *x = malloc(n * sizeof *x);
    cp_rng rng;
    cp_rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = lo + (hi - lo) * cp_rng_uniform(&rng);
    return x;
}

static float *zeros(size_t n) { return calloc(n, sizeof(float)); }

static float *copy_array(const float *x, size_t n)
{
    float *y = malloc(n * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    return y;
}

/* Max |a - b| over max |b| (or over 1 if b is all zeros). */
static double relative_diff(const float *a, const float *b, size_t n)
{
    double max_diff = 0.0, max_b = 0.0;
    for (size_t i = 0; i < n; i++) {
        max_diff = fmax(max_diff, fabs((double)a[i] - b[i]));
        max_b = fmax(max_b, fabs((double)b[i]));
    }
    return max_diff / (max_b > 0.0 ? max_b : 1.0);
}

/* L = Σ r ⊙ out, where forward(ctx) recomputes out (n_out) from the inputs. */
typedef struct objective {
    void (*forward)(void *ctx);
    void *ctx;
    const float *out;
    const float *r;
    size_t n_out;
} objective;

static double objective_value(const objective *obj)
{
    obj->forward(obj->ctx);
    double sum = 0.0;
    for (size_t i = 0; i < obj->n_out; i++)
        sum += (double)obj->r[i] * obj->out[i];
    return sum;
}

/* Compares analytic (n) with central differences of L in every step-th
 * element of x, which is perturbed in place and restored. Returns the max
 * error over the max numeric gradient. The forwards run on one thread here:
 * their results do not depend on the thread count, and thousands of short
 * parallel regions crawl on a loaded machine. */
static double gradient_error(const objective *obj, float *x, const float *analytic, size_t n,
                             size_t step)
{
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    double max_err = 0.0, max_grad = 0.0;
    for (size_t i = 0; i < n; i += step) {
        float saved = x[i], up = saved + EPS, down = saved - EPS;
        x[i] = up;
        double l_up = objective_value(obj);
        x[i] = down;
        double l_down = objective_value(obj);
        x[i] = saved;

        /* The step actually taken, after rounding to float. */
        double numeric = (l_up - l_down) / ((double)up - (double)down);
        max_err = fmax(max_err, fabs(analytic[i] - numeric));
        max_grad = fmax(max_grad, fabs(numeric));
    }
    omp_set_num_threads(threads);
    return max_grad > 0.0 ? max_err / max_grad : max_err;
}

/* Checks one input tensor's gradient error; fmt and its arguments name the case. */
#define CHECK_GRAD(err, name, fmt, ...)                                                \
    do {                                                                               \
        double e_ = (err);                                                             \
        CHECK_MSG(e_ <= GRAD_TOL, "d%s " fmt ": relative error %.3g > %.3g", #name,    \
                  __VA_ARGS__, e_, GRAD_TOL);                                          \
    } while (0)

/* ---- matmul ---- */

typedef struct matmul_ctx {
    float *out, *inp, *weight, *bias;
    int N, IC, OC;
} matmul_ctx;

static void matmul_objective_forward(void *p)
{
    matmul_ctx *c = p;
    cp_matmul_forward_ref(c->out, c->inp, c->weight, c->bias, c->N, c->IC, c->OC);
}

/* (N, IC, OC, with bias): the first two run single-threaded. The third splits
 * dinp by rows and dweight by columns (IC > OC), the fourth dinp by columns
 * (N < 64) and dweight by rows. */
static const int matmul_shapes[][4] = {{5, 7, 4, 1}, {5, 7, 4, 0}, {70, 24, 20, 1}, {8, 64, 80, 0}};

TEST(grad_matmul_finite_differences)
{
    for (size_t s = 0; s < sizeof matmul_shapes / sizeof *matmul_shapes; s++) {
        int N = matmul_shapes[s][0], IC = matmul_shapes[s][1], OC = matmul_shapes[s][2];
        int has_bias = matmul_shapes[s][3];
        matmul_ctx c = {zeros((size_t)N * OC), random_array((size_t)N * IC, 1, -1, 1),
                        random_array((size_t)OC * IC, 2, -1, 1),
                        has_bias ? random_array((size_t)OC, 3, -1, 1) : NULL, N, IC, OC};
        float *r = random_array((size_t)N * OC, 4, -1, 1);
        float *dinp = zeros((size_t)N * IC), *dweight = zeros((size_t)OC * IC);
        float *dbias = zeros((size_t)OC);
        cp_matmul_backward(dinp, dweight, has_bias ? dbias : NULL, r, c.inp, c.weight, N, IC, OC);

        objective obj = {matmul_objective_forward, &c, c.out, r, (size_t)N * OC};
        CHECK_GRAD(gradient_error(&obj, c.inp, dinp, (size_t)N * IC, 1), inp, "(shape %d)",
                   (int)s);
        CHECK_GRAD(gradient_error(&obj, c.weight, dweight, (size_t)OC * IC, 1), weight,
                   "(shape %d)", (int)s);
        if (has_bias)
            CHECK_GRAD(gradient_error(&obj, c.bias, dbias, (size_t)OC, 1), bias, "(shape %d)",
                       (int)s);
        free(c.out), free(c.inp), free(c.weight), free(c.bias);
        free(r), free(dinp), free(dweight), free(dbias);
    }
}

TEST(grad_matmul_matches_reference)
{
    int shapes[][3] = {{1, 64, 172}, {7, 33, 5}, {130, 64, 512}, {64, 172, 64}, {1024, 64, 172}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        size_t ni = (size_t)N * IC, nw = (size_t)OC * IC;
        float *x = random_array(ni, 5, -1, 1), *w = random_array(nw, 6, -1, 1);
        float *dout = random_array((size_t)N * OC, 7, -1, 1);

        /* Nonzero starting gradients, so that both kernels must accumulate. */
        float *dinp = random_array(ni, 8, -1, 1), *dweight = random_array(nw, 9, -1, 1);
        float *dbias = random_array((size_t)OC, 10, -1, 1);
        float *dinp_ref = copy_array(dinp, ni), *dweight_ref = copy_array(dweight, nw);
        float *dbias_ref = copy_array(dbias, (size_t)OC);
        cp_matmul_backward(dinp, dweight, dbias, dout, x, w, N, IC, OC);
        cp_matmul_backward_ref(dinp_ref, dweight_ref, dbias_ref, dout, x, w, N, IC, OC);

        CHECK_MSG(relative_diff(dinp, dinp_ref, ni) < REF_TOL, "shape %d x %d x %d: dinp", N,
                  IC, OC);
        CHECK_MSG(relative_diff(dweight, dweight_ref, nw) < REF_TOL,
                  "shape %d x %d x %d: dweight", N, IC, OC);
        CHECK_MSG(relative_diff(dbias, dbias_ref, (size_t)OC) < REF_TOL,
                  "shape %d x %d x %d: dbias", N, IC, OC);
        free(x), free(w), free(dout), free(dinp), free(dweight), free(dbias);
        free(dinp_ref), free(dweight_ref), free(dbias_ref);
    }
}

/* A frozen weight (dweight NULL) and no bias must leave dinp as the full
 * call computes it; dinp NULL must leave dweight and dbias likewise. */
TEST(grad_matmul_null_gradients)
{
    int N = 70, IC = 24, OC = 20;
    size_t ni = (size_t)N * IC, nw = (size_t)OC * IC;
    float *x = random_array(ni, 11, -1, 1), *w = random_array(nw, 12, -1, 1);
    float *dout = random_array((size_t)N * OC, 13, -1, 1);
    float *dinp = zeros(ni), *dweight = zeros(nw), *dbias = zeros((size_t)OC);
    float *dinp_only = zeros(ni), *dweight_only = zeros(nw), *dbias_only = zeros((size_t)OC);

    cp_matmul_backward(dinp, dweight, dbias, dout, x, w, N, IC, OC);
    cp_matmul_backward(dinp_only, NULL, NULL, dout, x, w, N, IC, OC);
    cp_matmul_backward(NULL, dweight_only, dbias_only, dout, x, w, N, IC, OC);
    CHECK(relative_diff(dinp_only, dinp, ni) == 0.0);
    CHECK(relative_diff(dweight_only, dweight, nw) == 0.0);
    CHECK(relative_diff(dbias_only, dbias, (size_t)OC) == 0.0);

    memset(dinp_only, 0, ni * sizeof *dinp_only);
    cp_matmul_backward_ref(dinp_only, NULL, NULL, dout, x, w, N, IC, OC);
    CHECK(relative_diff(dinp_only, dinp, ni) < REF_TOL);
    free(x), free(w), free(dout), free(dinp), free(dweight), free(dbias);
    free(dinp_only), free(dweight_only), free(dbias_only);
}

/* ---- rmsnorm ---- */

typedef struct rmsnorm_ctx {
    float *out, *rstd, *inp, *weight;
    int N, C;
} rmsnorm_ctx;

#define RMSNORM_EPS 1e-5f

static void rmsnorm_objective_forward(void *p)
{
    rmsnorm_ctx *c = p;
    cp_rmsnorm_forward(c->out, c->rstd, c->inp, c->weight, c->N, c->C, RMSNORM_EPS);
}

TEST(grad_rmsnorm_finite_differences)
{
    /* (N, C, step): the second shape runs threaded and is sampled. */
    int shapes[][3] = {{5, 12, 1}, {40, 512, 13}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int N = shapes[s][0], C = shapes[s][1], step = shapes[s][2];
        size_t n = (size_t)N * C;
        rmsnorm_ctx c = {zeros(n), zeros((size_t)N), random_array(n, 14, -2, 2),
                         random_array((size_t)C, 15, 0.5f, 1.5f), N, C};
        float *r = random_array(n, 16, -1, 1);
        float *dinp = zeros(n), *dweight = zeros((size_t)C);
        rmsnorm_objective_forward(&c);
        float *rstd = copy_array(c.rstd, (size_t)N);
        cp_rmsnorm_backward(dinp, dweight, r, c.inp, c.weight, rstd, N, C);

        objective obj = {rmsnorm_objective_forward, &c, c.out, r, n};
        CHECK_GRAD(gradient_error(&obj, c.inp, dinp, n, (size_t)step), inp, "(N %d, C %d)", N, C);
        CHECK_GRAD(gradient_error(&obj, c.weight, dweight, (size_t)C, 1), weight, "(N %d, C %d)",
                   N, C);
        free(c.out), free(c.rstd), free(c.inp), free(c.weight);
        free(r), free(dinp), free(dweight), free(rstd);
    }
}

TEST(grad_rmsnorm_frozen_weight)
{
    int N = 40, C = 512;
    size_t n = (size_t)N * C;
    float *x = random_array(n, 17, -2, 2), *w = random_array((size_t)C, 18, 0.5f, 1.5f);
    float *dout = random_array(n, 19, -1, 1), *out = zeros(n), *rstd = zeros((size_t)N);
    float *dinp = zeros(n), *dweight = zeros((size_t)C), *dinp_frozen = zeros(n);
    cp_rmsnorm_forward(out, rstd, x, w, N, C, RMSNORM_EPS);
    cp_rmsnorm_backward(dinp, dweight, dout, x, w, rstd, N, C);
    cp_rmsnorm_backward(dinp_frozen, NULL, dout, x, w, rstd, N, C);
    CHECK(relative_diff(dinp_frozen, dinp, n) == 0.0);
    free(x), free(w), free(dout), free(out), free(rstd), free(dinp), free(dweight);
    free(dinp_frozen);
}

/* ---- rope ---- */

typedef struct rope_ctx {
    float *out, *inp, *inv_freq;
    int *pos;
    int N, n_heads, head_dim;
} rope_ctx;

static void rope_objective_forward(void *p)
{
    rope_ctx *c = p;
    memcpy(c->out, c->inp, (size_t)c->N * c->n_heads * c->head_dim * sizeof *c->out);
    cp_rope_forward(c->out, c->pos, c->N, c->n_heads, c->head_dim, c->inv_freq);
}

/* The backward rotates dx in place rather than accumulating, as its header
 * states, so there is no accumulation check for it. */
TEST(grad_rope_finite_differences)
{
    int N = 20, n_heads = 3, head_dim = 8;
    size_t n = (size_t)N * n_heads * head_dim;
    rope_ctx c = {zeros(n), random_array(n, 20, -1, 1), malloc(head_dim / 2 * sizeof(float)),
                  malloc(N * sizeof(int)), N, n_heads, head_dim};
    for (int i = 0; i < head_dim / 2; i++)
        c.inv_freq[i] = powf(10000.0f, -2.0f * i / head_dim);
    for (int i = 0; i < N; i++)
        c.pos[i] = (i * 7) % 41; /* unordered positions up to 40 */
    float *r = random_array(n, 21, -1, 1), *dx = copy_array(r, n);
    cp_rope_backward(dx, c.pos, N, n_heads, head_dim, c.inv_freq);

    objective obj = {rope_objective_forward, &c, c.out, r, n};
    CHECK_GRAD(gradient_error(&obj, c.inp, dx, n, 1), x, "(N %d)", N);
    free(c.out), free(c.inp), free(c.inv_freq), free(c.pos), free(r), free(dx);
}

/* ---- swiglu ---- */

typedef struct swiglu_ctx {
    float *out, *gate, *up;
    size_t n;
} swiglu_ctx;

static void swiglu_objective_forward(void *p)
{
    swiglu_ctx *c = p;
    cp_swiglu_forward(c->out, c->gate, c->up, c->n);
}

TEST(grad_swiglu_finite_differences)
{
    size_t sizes[] = {37, 5000}; /* the second runs threaded */
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        size_t n = sizes[s];
        swiglu_ctx c = {zeros(n), random_array(n, 22, -6, 6), random_array(n, 23, -2, 2), n};
        float *r = random_array(n, 24, -1, 1), *dgate = zeros(n), *dup = zeros(n);
        cp_swiglu_backward(dgate, dup, r, c.gate, c.up, n);

        objective obj = {swiglu_objective_forward, &c, c.out, r, n};
        CHECK_GRAD(gradient_error(&obj, c.gate, dgate, n, 1), gate, "(n %zu)", n);
        CHECK_GRAD(gradient_error(&obj, c.up, dup, n, 1), up, "(n %zu)", n);
        free(c.out), free(c.gate), free(c.up), free(r), free(dgate), free(dup);
    }
}

/* ---- embedding ---- */

typedef struct embedding_ctx {
    float *out, *table;
    int32_t *ids;
    int N, C;
} embedding_ctx;

static void embedding_objective_forward(void *p)
{
    embedding_ctx *c = p;
    cp_embedding_forward(c->out, c->ids, c->table, c->N, c->C);
}

TEST(grad_embedding_finite_differences)
{
    /* (V, N, C, step): repeated and unused ids; the second shape runs threaded. */
    int shapes[][4] = {{6, 9, 5, 1}, {40, 300, 256, 7}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int V = shapes[s][0], N = shapes[s][1], C = shapes[s][2], step = shapes[s][3];
        embedding_ctx c = {zeros((size_t)N * C), random_array((size_t)V * C, 25, -1, 1),
                           malloc(N * sizeof(int32_t)), N, C};
        for (int i = 0; i < N; i++)
            c.ids[i] = (i * 5) % (V - 1); /* id V - 1 never occurs */
        float *r = random_array((size_t)N * C, 26, -1, 1), *dtable = zeros((size_t)V * C);
        cp_embedding_backward(dtable, r, c.ids, N, C);

        objective obj = {embedding_objective_forward, &c, c.out, r, (size_t)N * C};
        CHECK_GRAD(gradient_error(&obj, c.table, dtable, (size_t)V * C, (size_t)step), table,
                   "(V %d, N %d, C %d)", V, N, C);
        free(c.out), free(c.table), free(c.ids), free(r), free(dtable);
    }
}

/* ---- cross-entropy ---- */

typedef struct cross_entropy_ctx {
    float *losses, *logits;
    int32_t *targets;
    int N, V;
} cross_entropy_ctx;

static void cross_entropy_objective_forward(void *p)
{
    cross_entropy_ctx *c = p;
    cp_cross_entropy_forward(c->losses, c->logits, c->targets, c->N, c->V);
}

/* V = 37 covers both the 8-wide and the scalar exp loop; row 2 is masked. */
TEST(grad_cross_entropy_finite_differences)
{
    int N = 6, V = 37;
    size_t n = (size_t)N * V;
    int32_t targets[] = {3, 36, -1, 0, 17, 8};
    cross_entropy_ctx c = {zeros((size_t)N), random_array(n, 27, -4, 4), targets, N, V};
    float *r = random_array((size_t)N, 28, 0.1f, 1), *dlogits = random_array(n, 29, -1, 1);
    cp_cross_entropy_backward(dlogits, c.logits, targets, r, N, V);

    objective obj = {cross_entropy_objective_forward, &c, c.losses, r, (size_t)N};
    CHECK_GRAD(gradient_error(&obj, c.logits, dlogits, n, 1), logits, "(N %d, V %d)", N, V);
    free(c.losses), free(c.logits), free(r), free(dlogits);
}

TEST(grad_cross_entropy_masked_row)
{
    int N = 3, V = 20;
    int32_t targets[] = {4, -1, 19};
    float *logits = random_array((size_t)N * V, 30, -4, 4), *losses = zeros((size_t)N);
    float dloss[] = {1.0f, 1.0f, 1.0f};
    float *dlogits = random_array((size_t)N * V, 31, -1, 1);
    cp_cross_entropy_forward(losses, logits, targets, N, V);
    cp_cross_entropy_backward(dlogits, logits, targets, dloss, N, V);

    CHECK(losses[0] > 0.0f);
    CHECK(losses[1] == 0.0f);
    CHECK(losses[2] > 0.0f);
    for (int i = 0; i < V; i++)
        CHECK_MSG(dlogits[V + i] == 0.0f, "masked row: dlogits[%d] = %g", i, dlogits[V + i]);

    /* A gradient row sums to 0 because softmax sums to 1. */
    double sum = 0.0;
    for (int i = 0; i < V; i++)
        sum += dlogits[i];
    CHECK_MSG(fabs(sum) < 1e-6, "row 0 sums to %g", sum);
    free(logits), free(losses), free(dlogits);
}

/* In place (dlogits == logits) and called twice it must give one overwrite. */
TEST(grad_cross_entropy_in_place)
{
    int N = 4, V = 45;
    size_t n = (size_t)N * V;
    int32_t targets[] = {44, 0, -1, 7};
    float dloss[] = {0.25f, 0.25f, 0.25f, 0.25f};
    float *logits = random_array(n, 32, -4, 4), *dlogits = zeros(n);
    float *in_place = copy_array(logits, n);
    cp_cross_entropy_backward(dlogits, logits, targets, dloss, N, V);
    cp_cross_entropy_backward(in_place, in_place, targets, dloss, N, V);
    CHECK(relative_diff(in_place, dlogits, n) == 0.0);

    float *twice = copy_array(dlogits, n);
    cp_cross_entropy_backward(twice, logits, targets, dloss, N, V);
    CHECK(relative_diff(twice, dlogits, n) == 0.0);
    free(logits), free(dlogits), free(in_place), free(twice);
}

/* ---- attention ---- */

typedef struct attention_ctx {
    float *out, *att, *q, *k, *v;
    int B, T, H, KVH, D, window;
} attention_ctx;

static void attention_objective_forward(void *p)
{
    attention_ctx *c = p;
    cp_attention_forward(c->out, c->att, c->q, c->k, c->v, c->B, c->T, c->H, c->KVH, c->D,
                         c->window);
}

static attention_ctx attention_case(int B, int T, int H, int KVH, int D, int window)
{
    size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * KVH * D;
    attention_ctx c = {zeros(nq), zeros((size_t)B * H * T * T), random_array(nq, 33, -2, 2),
                       random_array(nkv, 34, -2, 2), random_array(nkv, 35, -1, 1),
                       B, T, H, KVH, D, window};
    return c;
}

static void attention_case_free(attention_ctx *c)
{
    free(c->out), free(c->att), free(c->q), free(c->k), free(c->v);
}

TEST(grad_attention_finite_differences)
{
    /* (B, T, H, KVH, D, window, step): grouped, one kv head per query head
     * (where window 1 leaves dq = dk = 0), and T = 70 across the kernels'
     * 64-row query blocks, with and without a window reaching back across. */
    int cases[][7] = {{2, 7, 4, 2, 6, 0, 1}, {2, 7, 4, 2, 6, 3, 1}, {1, 5, 2, 2, 4, 2, 1},
                      {1, 5, 2, 2, 4, 1, 1}, {1, 70, 2, 1, 8, 0, 5}, {1, 70, 2, 1, 8, 20, 5}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        int B = cases[k][0], T = cases[k][1], H = cases[k][2], KVH = cases[k][3];
        int D = cases[k][4], W = cases[k][5], step = cases[k][6];
        size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * KVH * D;
        attention_ctx c = attention_case(B, T, H, KVH, D, W);
        float *r = random_array(nq, 36, -1, 1), *scratch = zeros((size_t)B * H * T * T);
        float *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
        attention_objective_forward(&c);
        cp_attention_backward(dq, dk, dv, scratch, r, c.att, c.q, c.k, c.v, B, T, H, KVH, D, W);

        objective obj = {attention_objective_forward, &c, c.out, r, nq};
        CHECK_GRAD(gradient_error(&obj, c.q, dq, nq, (size_t)step), q, "(case %zu)", k);
        CHECK_GRAD(gradient_error(&obj, c.k, dk, nkv, (size_t)step), k, "(case %zu)", k);
        CHECK_GRAD(gradient_error(&obj, c.v, dv, nkv, (size_t)step), v, "(case %zu)", k);
        attention_case_free(&c);
        free(r), free(scratch), free(dq), free(dk), free(dv);
    }
}

/* ---- accumulation ---- */

/* Two calls into zeroed gradients must give twice one call. */
static void check_doubled(const float *twice, const float *once, size_t n, const char *label)
{
    double max_diff = 0.0, max_once = 0.0;
    for (size_t i = 0; i < n; i++) {
        max_diff = fmax(max_diff, fabs((double)twice[i] - 2.0 * once[i]));
        max_once = fmax(max_once, fabs((double)once[i]));
    }
    CHECK_MSG(max_once > 0.0, "%s: the gradient is all zeros", label);
    CHECK_MSG(max_diff <= 1e-6 * max_once, "%s: two calls differ from twice one call by %g",
              label, max_diff);
}

TEST(grad_matmul_accumulates)
{
    int N = 70, IC = 24, OC = 20;
    size_t ni = (size_t)N * IC, nw = (size_t)OC * IC;
    float *x = random_array(ni, 37, -1, 1), *w = random_array(nw, 38, -1, 1);
    float *dout = random_array((size_t)N * OC, 39, -1, 1);
    float *g1[3] = {zeros(ni), zeros(nw), zeros((size_t)OC)};
    float *g2[3] = {zeros(ni), zeros(nw), zeros((size_t)OC)};
    cp_matmul_backward(g1[0], g1[1], g1[2], dout, x, w, N, IC, OC);
    for (int i = 0; i < 2; i++)
        cp_matmul_backward(g2[0], g2[1], g2[2], dout, x, w, N, IC, OC);
    check_doubled(g2[0], g1[0], ni, "matmul dinp");
    check_doubled(g2[1], g1[1], nw, "matmul dweight");
    check_doubled(g2[2], g1[2], (size_t)OC, "matmul dbias");

    size_t sizes[3] = {ni, nw, (size_t)OC};
    for (int i = 0; i < 3; i++) {
        memset(g1[i], 0, sizes[i] * sizeof(float));
        memset(g2[i], 0, sizes[i] * sizeof(float));
    }
    cp_matmul_backward_ref(g1[0], g1[1], g1[2], dout, x, w, N, IC, OC);
    for (int i = 0; i < 2; i++)
        cp_matmul_backward_ref(g2[0], g2[1], g2[2], dout, x, w, N, IC, OC);
    check_doubled(g2[0], g1[0], ni, "matmul reference dinp");
    check_doubled(g2[1], g1[1], nw, "matmul reference dweight");
    check_doubled(g2[2], g1[2], (size_t)OC, "matmul reference dbias");
    free(x), free(w), free(dout);
    for (int i = 0; i < 3; i++)
        free(g1[i]), free(g2[i]);
}

TEST(grad_rmsnorm_accumulates)
{
    int N = 40, C = 512;
    size_t n = (size_t)N * C;
    float *x = random_array(n, 40, -2, 2), *w = random_array((size_t)C, 41, 0.5f, 1.5f);
    float *dout = random_array(n, 42, -1, 1), *out = zeros(n), *rstd = zeros((size_t)N);
    float *dinp1 = zeros(n), *dw1 = zeros((size_t)C), *dinp2 = zeros(n), *dw2 = zeros((size_t)C);
    cp_rmsnorm_forward(out, rstd, x, w, N, C, RMSNORM_EPS);
    cp_rmsnorm_backward(dinp1, dw1, dout, x, w, rstd, N, C);
    for (int i = 0; i < 2; i++)
        cp_rmsnorm_backward(dinp2, dw2, dout, x, w, rstd, N, C);
    check_doubled(dinp2, dinp1, n, "rmsnorm dinp");
    check_doubled(dw2, dw1, (size_t)C, "rmsnorm dweight");
    free(x), free(w), free(dout), free(out), free(rstd), free(dinp1), free(dw1), free(dinp2);
    free(dw2);
}

TEST(grad_swiglu_accumulates)
{
    size_t n = 5000;
    float *gate = random_array(n, 43, -6, 6), *up = random_array(n, 44, -2, 2);
    float *dout = random_array(n, 45, -1, 1);
    float *dg1 = zeros(n), *du1 = zeros(n), *dg2 = zeros(n), *du2 = zeros(n);
    cp_swiglu_backward(dg1, du1, dout, gate, up, n);
    for (int i = 0; i < 2; i++)
        cp_swiglu_backward(dg2, du2, dout, gate, up, n);
    check_doubled(dg2, dg1, n, "swiglu dgate");
    check_doubled(du2, du1, n, "swiglu dup");
    free(gate), free(up), free(dout), free(dg1), free(du1), free(dg2), free(du2);
}

TEST(grad_embedding_accumulates)
{
    int V = 40, N = 300, C = 256;
    int32_t *ids = malloc(N * sizeof *ids);
    for (int i = 0; i < N; i++)
        ids[i] = (i * 3) % V;
    float *dout = random_array((size_t)N * C, 46, -1, 1);
    float *d1 = zeros((size_t)V * C), *d2 = zeros((size_t)V * C);
    cp_embedding_backward(d1, dout, ids, N, C);
    for (int i = 0; i < 2; i++)
        cp_embedding_backward(d2, dout, ids, N, C);
    check_doubled(d2, d1, (size_t)V * C, "embedding dtable");
    free(ids), free(dout), free(d1), free(d2);
}

TEST(grad_attention_accumulates)
{
    int B = 2, T = 70, H = 4, KVH = 2, D = 8, W = 0;
    size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * KVH * D;
    attention_ctx c = attention_case(B, T, H, KVH, D, W);
    float *dout = random_array(nq, 47, -1, 1), *scratch = zeros((size_t)B * H * T * T);
    float *g1[3] = {zeros(nq), zeros(nkv), zeros(nkv)};
    float *g2[3] = {zeros(nq), zeros(nkv), zeros(nkv)};
    attention_objective_forward(&c);
    cp_attention_backward(g1[0], g1[1], g1[2], scratch, dout, c.att, c.q, c.k, c.v, B, T, H, KVH,
                          D, W);
    for (int i = 0; i < 2; i++)
        cp_attention_backward(g2[0], g2[1], g2[2], scratch, dout, c.att, c.q, c.k, c.v, B, T, H,
                              KVH, D, W);
    check_doubled(g2[0], g1[0], nq, "attention dq");
    check_doubled(g2[1], g1[1], nkv, "attention dk");
    check_doubled(g2[2], g1[2], nkv, "attention dv");
    attention_case_free(&c);
    free(dout), free(scratch);
    for (int i = 0; i < 3; i++)
        free(g1[i]), free(g2[i]);
}

/* ---- layernorm ---- */

typedef struct layernorm_ctx {
    float *out, *mean, *rstd, *inp, *weight, *bias;
    int N, C;
} layernorm_ctx;

static void layernorm_objective_forward(void *p)
{
    layernorm_ctx *c = p;
    cp_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->weight, c->bias, c->N, c->C, 1e-5f);
}

TEST(grad_layernorm_finite_differences)
{
    int shapes[][3] = {{5, 12, 1}, {40, 256, 7}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int N = shapes[s][0], C = shapes[s][1], step = shapes[s][2];
        size_t n = (size_t)N * C;
        layernorm_ctx c = {zeros(n), zeros((size_t)N), zeros((size_t)N),
                           random_array(n, 31, -2, 2), random_array((size_t)C, 32, 0.5f, 1.5f),
                           random_array((size_t)C, 33, -0.5f, 0.5f), N, C};
        float *r = random_array(n, 34, -1, 1);
        float *dinp = zeros(n), *dweight = zeros((size_t)C), *dbias = zeros((size_t)C);
        layernorm_objective_forward(&c);
        float *mean = copy_array(c.mean, (size_t)N), *rstd = copy_array(c.rstd, (size_t)N);
        cp_layernorm_backward(dinp, dweight, dbias, r, c.inp, c.weight, mean, rstd, N, C);

        objective obj = {layernorm_objective_forward, &c, c.out, r, n};
        CHECK_GRAD(gradient_error(&obj, c.inp, dinp, n, (size_t)step), inp, "(N %d, C %d)", N, C);
        CHECK_GRAD(gradient_error(&obj, c.weight, dweight, (size_t)C, 1), weight, "(N %d, C %d)",
                   N, C);
        CHECK_GRAD(gradient_error(&obj, c.bias, dbias, (size_t)C, 1), bias, "(N %d, C %d)", N, C);
        free(c.out), free(c.mean), free(c.rstd), free(c.inp), free(c.weight), free(c.bias);
        free(r), free(dinp), free(dweight), free(dbias), free(mean), free(rstd);
    }
}

/* ---- GELU (tanh approximation) ---- */

typedef struct gelu_ctx {
    float *out, *inp;
    size_t n;
} gelu_ctx;

static void gelu_objective_forward(void *p)
{
    gelu_ctx *c = p;
    cp_gelu_tanh_forward(c->out, c->inp, c->n);
}

TEST(grad_gelu_finite_differences)
{
    size_t n = 300;
    gelu_ctx c = {zeros(n), random_array(n, 41, -4, 4), n};
    float *r = random_array(n, 42, -1, 1), *dinp = zeros(n);
    cp_gelu_tanh_backward(dinp, r, c.inp, n);
    objective obj = {gelu_objective_forward, &c, c.out, r, n};
    CHECK_GRAD(gradient_error(&obj, c.inp, dinp, n, 1), inp, "(n %zu)", n);

    /* Spot values of 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))). */
    float x[3] = {-1.0f, 0.5f, 2.0f}, y[3];
    cp_gelu_tanh_forward(y, x, 3);
    CHECK_CLOSE(y[0], -0.158808009, 1e-6);
    CHECK_CLOSE(y[1], 0.345714254, 1e-6);
    CHECK_CLOSE(y[2], 1.954597694, 1e-6);
    free(c.out), free(c.inp), free(r), free(dinp);
}

/* ---- matmul with (IC, OC) weights ---- */

typedef struct matmul_kn_ctx {
    float *out, *inp, *weight, *bias;
    int N, IC, OC;
} matmul_kn_ctx;

static void matmul_kn_objective_forward(void *p)
{
    matmul_kn_ctx *c = p;
    cp_matmul_kn_forward(c->out, c->inp, c->weight, c->bias, c->N, c->IC, c->OC);
}

TEST(grad_matmul_kn_finite_differences)
{
    int shapes[][3] = {{5, 7, 4}, {70, 24, 48}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        size_t n_in = (size_t)N * IC, n_w = (size_t)IC * OC, n_out = (size_t)N * OC;
        matmul_kn_ctx c = {zeros(n_out), random_array(n_in, 51, -1, 1),
                           random_array(n_w, 52, -1, 1), random_array((size_t)OC, 53, -1, 1), N,
                           IC, OC};
        float *r = random_array(n_out, 54, -1, 1);
        float *dinp = zeros(n_in), *dweight = zeros(n_w), *dbias = zeros((size_t)OC);
        cp_matmul_kn_backward(dinp, dweight, dbias, r, c.inp, c.weight, N, IC, OC);

        /* The forward equals the (OC, IC) kernel on the transposed weight. */
        float *wt = zeros(n_w), *ref = zeros(n_out);
        for (int i = 0; i < IC; i++)
            for (int o = 0; o < OC; o++)
                wt[(size_t)o * IC + i] = c.weight[(size_t)i * OC + o];
        cp_matmul_forward_ref(ref, c.inp, wt, c.bias, N, IC, OC);
        matmul_kn_objective_forward(&c);
        CHECK_MSG(relative_diff(c.out, ref, n_out) < 1e-5, "forward differs from the reference");

        objective obj = {matmul_kn_objective_forward, &c, c.out, r, n_out};
        CHECK_GRAD(gradient_error(&obj, c.inp, dinp, n_in, 3), inp, "(%d, %d, %d)", N, IC, OC);
        CHECK_GRAD(gradient_error(&obj, c.weight, dweight, n_w, 5), weight, "(%d, %d, %d)", N, IC,
                   OC);
        CHECK_GRAD(gradient_error(&obj, c.bias, dbias, (size_t)OC, 1), bias, "(%d, %d, %d)", N, IC,
                   OC);
        free(c.out), free(c.inp), free(c.weight), free(c.bias), free(r);
        free(dinp), free(dweight), free(dbias), free(wt), free(ref);
    }
}
