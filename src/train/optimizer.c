/*
 * AdamW and gradient clipping. The per-element arithmetic is float32 in the
 * same order as PyTorch's single-tensor AdamW, with the scalar factors (bias
 * corrections, step size) computed in double as Python computes them, so
 * results agree with torch to float32 rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "train/optimizer.h"

/* Tensors below this size are updated on one thread: a parallel region costs
 * more than the loop. */
#define PARALLEL_MIN 65536

cp_adamw_config cp_adamw_default_config(void)
{
    return (cp_adamw_config){.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
}

static cp_status check_config(const cp_adamw_config *c, cp_error *err)
{
    if (!(c->beta1 >= 0.0 && c->beta1 < 1.0) || !(c->beta2 >= 0.0 && c->beta2 < 1.0))
        return cp_error_set(err, CP_ERR_INPUT, "AdamW betas (%g, %g) must lie in [0, 1)",
                            c->beta1, c->beta2);
    if (!(c->eps > 0.0) || !isfinite(c->eps))
        return cp_error_set(err, CP_ERR_INPUT, "AdamW eps %g must be positive and finite", c->eps);
    if (!(c->weight_decay >= 0.0) || !isfinite(c->weight_decay))
        return cp_error_set(err, CP_ERR_INPUT,
                            "weight decay %g must be non-negative and finite", c->weight_decay);
    return CP_OK;
}

cp_status cp_adamw_init(cp_adamw *opt, const cp_param_ref *params, int n_params,
                        const cp_adamw_config *cfg, cp_error *err)
{
    memset(opt, 0, sizeof *opt);
    CP_ASSERT(n_params >= 0 && (params || n_params == 0));
    cp_status st = check_config(cfg, err);
    if (st != CP_OK)
        return st;

    size_t total = 0;
    for (int i = 0; i < n_params; i++) {
        CP_ASSERT(params[i].n == 0 || (params[i].param && params[i].grad));
        if (params[i].n > SIZE_MAX / (2 * sizeof(float)) - total)
            return cp_error_set(err, CP_ERR_NOMEM, "AdamW state for %d tensors overflows size_t",
                                n_params);
        total += params[i].n;
    }

    /* One allocation: m is the first n_total floats, v the next n_total. */
    size_t bytes = (total > 0 ? total : 1) * 2 * sizeof(float);
    opt->m = calloc(1, bytes);
    if (!opt->m)
        return cp_error_nomem(err, "AdamW moments", bytes);
    opt->v = opt->m + total;

    size_t list_bytes = (size_t)(n_params > 0 ? n_params : 1) * sizeof *opt->params;
    opt->params = malloc(list_bytes);
    if (!opt->params) {
        free(opt->m);
        opt->m = opt->v = NULL;
        return cp_error_nomem(err, "AdamW parameter list", list_bytes);
    }
    if (n_params > 0)
        memcpy(opt->params, params, (size_t)n_params * sizeof *params);
    opt->n_params = n_params;
    opt->n_total = total;
    opt->cfg = *cfg;
    return CP_OK;
}

void cp_adamw_free(cp_adamw *opt)
{
    if (!opt)
        return;
    free(opt->m);
    free(opt->params);
    memset(opt, 0, sizeof *opt);
}

/* The scalar factors of one step, rounded to float as torch rounds a Python
 * scalar for a float32 tensor op. */
typedef struct step_factors {
    float decay_keep;   /* 1 - lr * weight_decay */
    float beta1, one_minus_beta1;
    float beta2, one_minus_beta2;
    float bc2_sqrt;     /* sqrt(1 - beta2^t) */
    float eps;
    float neg_step;     /* -lr / (1 - beta1^t) */
} step_factors;

/* Updates one tensor: p, g, m, v are (n,). */
static void adamw_update(float *p, const float *g, float *m, float *v, size_t n, int decay,
                         const step_factors *f)
{
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) {
        float p_new = decay ? p[i] * f->decay_keep : p[i];
        float m_new = m[i] * f->beta1 + f->one_minus_beta1 * g[i];
        float v_new = v[i] * f->beta2 + f->one_minus_beta2 * g[i] * g[i];
        float denom = sqrtf(v_new) / f->bc2_sqrt + f->eps;
        m[i] = m_new;
        v[i] = v_new;
        p[i] = p_new + f->neg_step * (m_new / denom);
    }
}

void cp_adamw_step(cp_adamw *opt, double lr)
{
    const cp_adamw_config *c = &opt->cfg;
    opt->step++;
    double t = (double)opt->step;
    double bc1 = 1.0 - pow(c->beta1, t);
    double bc2 = 1.0 - pow(c->beta2, t);
    step_factors f = {
        .decay_keep = (float)(1.0 - lr * c->weight_decay),
        .beta1 = (float)c->beta1,
        .one_minus_beta1 = (float)(1.0 - c->beta1),
        .beta2 = (float)c->beta2,
        .one_minus_beta2 = (float)(1.0 - c->beta2),
        .bc2_sqrt = (float)sqrt(bc2),
        .eps = (float)c->eps,
        .neg_step = (float)(-(lr / bc1)),
    };

    size_t offset = 0;
    for (int i = 0; i < opt->n_params; i++) {
        const cp_param_ref *pr = &opt->params[i];
        adamw_update(pr->param, pr->grad, opt->m + offset, opt->v + offset, pr->n,
                     pr->decay && c->weight_decay != 0.0, &f);
        offset += pr->n;
    }
}

int64_t cp_adamw_step_count(const cp_adamw *opt) { return opt->step; }

cp_adamw_state cp_adamw_export(const cp_adamw *opt)
{
    return (cp_adamw_state){.m = opt->m, .v = opt->v, .n = opt->n_total, .step = opt->step};
}

cp_status cp_adamw_import(cp_adamw *opt, const float *m, const float *v, size_t n, int64_t step,
                          cp_error *err)
{
    if (n != opt->n_total)
        return cp_error_set(err, CP_ERR_INPUT,
                            "optimizer state has %zu values per moment, but the trainable "
                            "parameters have %zu; the checkpoint belongs to another adapter setup",
                            n, opt->n_total);
    if (step < 0)
        return cp_error_set(err, CP_ERR_INPUT, "optimizer step count %lld is negative",
                            (long long)step);
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(m[i]))
            return cp_error_set(err, CP_ERR_INPUT,
                                "optimizer state: first moment %zu is %g, expected a finite value",
                                i, (double)m[i]);
        if (!isfinite(v[i]) || v[i] < 0.0f)
            return cp_error_set(err, CP_ERR_INPUT,
                                "optimizer state: second moment %zu is %g, expected a finite "
                                "value >= 0",
                                i, (double)v[i]);
    }
    memcpy(opt->m, m, n * sizeof *m);
    memcpy(opt->v, v, n * sizeof *v);
    opt->step = step;
    return CP_OK;
}

/* Returns the sum of squares of x (n,), accumulated in double. */
static double sum_squares(const float *x, size_t n)
{
    double sum = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sum) if (n >= PARALLEL_MIN)
    for (size_t i = 0; i < n; i++)
        sum += (double)x[i] * (double)x[i];
    return sum;
}

static cp_status report_nonfinite(const cp_param_ref *pr, int index, double norm, cp_error *err)
{
    size_t at = 0;
    while (at < pr->n && isfinite(pr->grad[at]))
        at++;
    double value = at < pr->n ? (double)pr->grad[at] : NAN;
    return cp_error_set(err, CP_ERR_INPUT,
                        "gradient norm is %g: tensor %d (%s) has gradient %g at element %zu; "
                        "training diverged, so lower the learning rate or check the data",
                        norm, index, pr->name ? pr->name : "unnamed", value, at);
}

cp_status cp_grad_clip_norm(const cp_param_ref *params, int n_params, double max_norm,
                            double *norm, cp_error *err)
{
    double total = 0.0;
    int first_bad = -1;
    for (int i = 0; i < n_params; i++) {
        double s = sum_squares(params[i].grad, params[i].n);
        if (!isfinite(s) && first_bad < 0)
            first_bad = i;
        total += s;
    }
    *norm = sqrt(total);
    if (first_bad >= 0 || !isfinite(*norm))
        return report_nonfinite(&params[first_bad >= 0 ? first_bad : 0],
                                first_bad >= 0 ? first_bad : 0, *norm, err);
    if (!(max_norm > 0.0))
        return CP_OK;

    /* clip_grad_norm_ multiplies by min(1, coef) unconditionally; a factor of
     * exactly 1 changes nothing, so it is skipped here. */
    double coef = max_norm / (*norm + 1e-6);
    if (coef >= 1.0)
        return CP_OK;
    float scale = (float)coef;
    for (int i = 0; i < n_params; i++) {
        float *g = params[i].grad;
        size_t n = params[i].n;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
        for (size_t j = 0; j < n; j++)
            g[j] *= scale;
    }
    return CP_OK;
}
