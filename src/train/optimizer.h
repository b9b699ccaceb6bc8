/*
 * AdamW with decoupled weight decay, and global-norm gradient clipping, both
 * following PyTorch 1.13 (torch.optim.AdamW without amsgrad or maximize, and
 * torch.nn.utils.clip_grad_norm_ with the L2 norm).
 *
 * The optimizer updates parameter tensors that the caller owns and keeps one
 * allocation for the two moment buffers. Its state (m, v, step) can be read
 * out and written back as plain arrays for checkpoints.
 */
#ifndef CP_OPTIMIZER_H
#define CP_OPTIMIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* One trainable tensor as the optimizer sees it. The caller owns both arrays. */
typedef struct cp_param_ref {
    const char *name; /* for error messages; may be NULL */
    float *param;     /* (n,) updated in place by cp_adamw_step */
    float *grad;      /* (n,) read by cp_adamw_step, scaled by cp_grad_clip_norm */
    size_t n;
    int decay;        /* 1: weight decay applies (weights), 0: it does not (biases, norms) */
} cp_param_ref;

/* Hyperparameters; cp_adamw_default_config gives torch.optim.AdamW's defaults:
 * betas (0.9, 0.999), eps 1e-8, weight_decay 0.01. */
typedef struct cp_adamw_config {
    double beta1;
    double beta2;
    double eps;          /* added after the square root of the corrected v */
    double weight_decay; /* applied as param *= 1 - lr * weight_decay */
} cp_adamw_config;

cp_adamw_config cp_adamw_default_config(void);

/* The optimizer. Fields are read-only for callers. m and v hold the tensors
 * of params one after another, in the order given to cp_adamw_init. */
typedef struct cp_adamw {
    cp_adamw_config cfg;
    cp_param_ref *params; /* (n_params,) a copy of the list; the arrays stay the caller's */
    int n_params;
    size_t n_total;       /* sum of params[i].n */
    float *m;             /* (n_total,) first moment */
    float *v;             /* (n_total,) second moment; m and v share one allocation */
    int64_t step;         /* optimizer steps taken */
} cp_adamw;

/* Validates cfg (betas in [0, 1), eps > 0, weight_decay >= 0) and zeroes the
 * moments. The param arrays must outlive the optimizer. Release with
 * cp_adamw_free. */
cp_status cp_adamw_init(cp_adamw *opt, const cp_param_ref *params, int n_params,
                        const cp_adamw_config *cfg, cp_error *err);
void cp_adamw_free(cp_adamw *opt);

/* Applies one AdamW update with learning rate lr to every parameter from its
 * current gradient, then counts the step. With t = step after counting:
 *   p -= lr * wd * p                      (only where decay is 1)
 *   m  = beta1 * m + (1 - beta1) * g
 *   v  = beta2 * v + (1 - beta2) * g * g
 *   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps) */
void cp_adamw_step(cp_adamw *opt, double lr);

/* Returns the number of optimizer steps taken (including imported ones). */
int64_t cp_adamw_step_count(const cp_adamw *opt);

/* A view of the optimizer state, valid until the next step, import or free. */
typedef struct cp_adamw_state {
    const float *m; /* (n,) */
    const float *v; /* (n,) */
    size_t n;
    int64_t step;
} cp_adamw_state;

cp_adamw_state cp_adamw_export(const cp_adamw *opt);

/* Copies m, v (n values each) and the step count into the optimizer. The
 * count must match the optimizer's parameters; v must be finite and >= 0,
 * m finite, step >= 0. On error the state is unchanged. */
cp_status cp_adamw_import(cp_adamw *opt, const float *m, const float *v, size_t n, int64_t step,
                          cp_error *err);

/* Computes the L2 norm of all gradients together (accumulated in double) and
 * stores it in *norm. When max_norm > 0 and max_norm / (norm + 1e-6) < 1, it
 * multiplies every gradient by that factor, as clip_grad_norm_ does, so a norm
 * within 1e-6 below max_norm still scales by a factor just under 1. A
 * max_norm <= 0 only measures. A NaN or infinite norm leaves the gradients
 * unchanged and returns CP_ERR_INPUT naming the first tensor with a
 * non-finite value; *norm still receives it. */
cp_status cp_grad_clip_norm(const cp_param_ref *params, int n_params, double max_norm,
                            double *norm, cp_error *err);

#endif
