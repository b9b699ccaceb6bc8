/* (IA)³: the scaling vectors, their forward and backward passes at one
 * projection, and the registered "ia3" method over them. */
#include "peft/ia3.h"

#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "peft/method.h"

unsigned cp_ia3_default_targets(const cp_model_config *cfg)
{
    if (cfg->fused_qkv)
        return (1u << CP_PROJ_QKV) | (1u << CP_PROJ_DOWN);
    if (strcmp(cfg->model_type, "qwen2") == 0)
        return (1u << CP_PROJ_Q) | (1u << CP_PROJ_V) | (1u << CP_PROJ_DOWN);
    return (1u << CP_PROJ_K) | (1u << CP_PROJ_V) | (1u << CP_PROJ_DOWN);
}

unsigned cp_ia3_default_feedforward(const cp_model_config *cfg)
{
    (void)cfg; /* down_proj, or GPT-2's mlp.c_proj: CP_PROJ_DOWN in both */
    return 1u << CP_PROJ_DOWN;
}

/* The length of (layer, p)'s vector: the input width of a feed-forward
 * target, else the output width. */
static int vector_length(const cp_model_config *cfg, unsigned feedforward, cp_proj p)
{
    int in, out;
    cp_proj_shape(cfg, p, &in, &out);
    return feedforward & (1u << p) ? in : out;
}

cp_status cp_ia3_init(cp_ia3 *ia3, const cp_model_config *cfg, unsigned targets,
                      unsigned feedforward, cp_error *err)
{
    memset(ia3, 0, sizeof *ia3);
    if (!targets)
        return cp_error_set(err, CP_ERR_INPUT, "IA3 needs at least one target module");
    if (targets & ~cp_proj_all(cfg))
        return cp_error_set(err, CP_ERR_INPUT,
                            "IA3 targets include a projection that model_type %s does not have",
                            cfg->model_type);
    ia3->cfg = *cfg;
    ia3->targets = targets;
    ia3->feedforward = feedforward & targets;
    ia3->n_layers = cfg->n_layers;
    size_t slots = (size_t)cfg->n_layers * CP_PROJ_COUNT;
    ia3->vec = calloc(slots, sizeof *ia3->vec);
    ia3->grad = calloc(slots, sizeof *ia3->grad);
    ia3->saved_offset = calloc(slots, sizeof *ia3->saved_offset);
    for (int p = 0; p < CP_PROJ_COUNT; p++)
        if (targets & (1u << p))
            ia3->n_weights += (size_t)cfg->n_layers * vector_length(cfg, ia3->feedforward, p);
    ia3->weights = malloc(ia3->n_weights * sizeof(float));
    ia3->grads = calloc(ia3->n_weights, sizeof(float));
    if (!ia3->vec || !ia3->grad || !ia3->saved_offset || !ia3->weights || !ia3->grads) {
        cp_ia3_free(ia3);
        return cp_error_nomem(err, "IA3 vectors", 2 * ia3->n_weights * sizeof(float));
    }

    /* PEFT initializes every vector to ones, so the adapted model starts as the base. */
    size_t offset = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            if (!(targets & (1u << p)))
                continue;
            size_t slot = (size_t)l * CP_PROJ_COUNT + p;
            ia3->vec[slot] = ia3->weights + offset;
            ia3->grad[slot] = ia3->grads + offset;
            offset += (size_t)vector_length(cfg, ia3->feedforward, p);
        }
    }
    for (size_t i = 0; i < ia3->n_weights; i++)
        ia3->weights[i] = 1.0f;
    return CP_OK;
}

void cp_ia3_free(cp_ia3 *ia3)
{
    free(ia3->vec);
    free(ia3->grad);
    free(ia3->weights);
    free(ia3->grads);
    free(ia3->saved);
    free(ia3->saved_offset);
    free(ia3->scaled_input);
    memset(ia3, 0, sizeof *ia3);
}

cp_status cp_ia3_reserve(cp_ia3 *ia3, int rows, int training, cp_error *err)
{
    /* Scratch for the scaled input of feed-forward targets, for any pass. */
    int widest = 0;
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        int in, out;
        cp_proj_shape(&ia3->cfg, (cp_proj)p, &in, &out);
        if (ia3->feedforward & (1u << p) && in > widest)
            widest = in;
    }
    if (rows > ia3->scratch_rows) {
        float *grown = realloc(ia3->scaled_input, (size_t)rows * (widest ? widest : 1) * sizeof(float));
        if (!grown)
            return cp_error_nomem(err, "IA3 scratch", (size_t)rows * widest * sizeof(float));
        ia3->scaled_input = grown;
        ia3->scratch_rows = rows;
    }
    if (!training || rows <= ia3->max_rows)
        return CP_OK;

    /* Training: every output-scaled slot keeps its unscaled output. */
    size_t total = 0;
    for (int l = 0; l < ia3->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            unsigned bit = 1u << p;
            if (!(ia3->targets & bit) || ia3->feedforward & bit)
                continue;
            ia3->saved_offset[(size_t)l * CP_PROJ_COUNT + p] = total;
            total += (size_t)rows * vector_length(&ia3->cfg, ia3->feedforward, (cp_proj)p);
        }
    }
    free(ia3->saved);
    ia3->saved = malloc((total ? total : 1) * sizeof(float));
    if (!ia3->saved)
        return cp_error_nomem(err, "IA3 activations", total * sizeof(float));
    ia3->max_rows = rows;
    return CP_OK;
}

float *cp_ia3_vector(const cp_ia3 *ia3, int layer, cp_proj p, int *len)
{
    float *v = ia3->vec[(size_t)layer * CP_PROJ_COUNT + p];
    *len = v ? vector_length(&ia3->cfg, ia3->feedforward, p) : 0;
    return v;
}

void cp_ia3_scale_output(cp_ia3 *ia3, int layer, cp_proj p, float *out, int N)
{
    int n_out;
    const float *v = cp_ia3_vector(ia3, layer, p, &n_out);
    if (!v || ia3->feedforward & (1u << p))
        return;
    if (ia3->training) {
        CP_ASSERT(N <= ia3->max_rows);
        memcpy(ia3->saved + ia3->saved_offset[(size_t)layer * CP_PROJ_COUNT + p], out,
               (size_t)N * n_out * sizeof(float));
    }
#pragma omp parallel for if ((size_t)N * n_out > 65536)
    for (int n = 0; n < N; n++)
        for (int j = 0; j < n_out; j++)
            out[(size_t)n * n_out + j] *= v[j];
}

void cp_ia3_output_backward(cp_ia3 *ia3, int layer, cp_proj p, float *dout, int N)
{
    int n_out;
    const float *v = cp_ia3_vector(ia3, layer, p, &n_out);
    if (!v || ia3->feedforward & (1u << p))
        return;
    CP_ASSERT(N <= ia3->max_rows);
    float *dv = ia3->grad[(size_t)layer * CP_PROJ_COUNT + p];
    const float *base = ia3->saved + ia3->saved_offset[(size_t)layer * CP_PROJ_COUNT + p];

    /* y = base ⊙ l: dl += Σ_n dy ⊙ base, and d(base) = dy ⊙ l. */
#pragma omp parallel for if ((size_t)N * n_out > 65536)
    for (int j = 0; j < n_out; j++) {
        double sum = 0.0;
        for (int n = 0; n < N; n++)
            sum += (double)dout[(size_t)n * n_out + j] * base[(size_t)n * n_out + j];
        dv[j] += (float)sum;
    }
#pragma omp parallel for if ((size_t)N * n_out > 65536)
    for (int n = 0; n < N; n++)
        for (int j = 0; j < n_out; j++)
            dout[(size_t)n * n_out + j] *= v[j];
}

const float *cp_ia3_scale_input(cp_ia3 *ia3, int layer, cp_proj p, const float *x, int N)
{
    int n_in;
    const float *v = cp_ia3_vector(ia3, layer, p, &n_in);
    if (!v || !(ia3->feedforward & (1u << p)))
        return x;
    CP_ASSERT(N <= ia3->scratch_rows);
    float *xs = ia3->scaled_input;
#pragma omp parallel for if ((size_t)N * n_in > 65536)
    for (int n = 0; n < N; n++)
        for (int i = 0; i < n_in; i++)
            xs[(size_t)n * n_in + i] = x[(size_t)n * n_in + i] * v[i];
    return xs;
}

void cp_ia3_input_backward(cp_ia3 *ia3, int layer, cp_proj p, float *dx, const float *dxin,
                           const float *x, int N)
{
    int n_in;
    const float *v = cp_ia3_vector(ia3, layer, p, &n_in);
    if (!v || !(ia3->feedforward & (1u << p))) {
        /* The product used x itself. */
        int in, out;
        cp_proj_shape(&ia3->cfg, p, &in, &out);
        cp_add_inplace(dx, dxin, (size_t)N * in);
        return;
    }
    float *dv = ia3->grad[(size_t)layer * CP_PROJ_COUNT + p];

    /* xin = x ⊙ l: dl += Σ_n dxin ⊙ x, and dx += dxin ⊙ l. */
#pragma omp parallel for if ((size_t)N * n_in > 65536)
    for (int i = 0; i < n_in; i++) {
        double sum = 0.0;
        for (int n = 0; n < N; n++)
            sum += (double)dxin[(size_t)n * n_in + i] * x[(size_t)n * n_in + i];
        dv[i] += (float)sum;
    }
#pragma omp parallel for if ((size_t)N * n_in > 65536)
    for (int n = 0; n < N; n++)
        for (int i = 0; i < n_in; i++)
            dx[(size_t)n * n_in + i] += dxin[(size_t)n * n_in + i] * v[i];
}

/* ---- The registered method ---- */

static cp_ia3 *ia3_of(const cp_method *self) { return self->state; }

/* One optimizer entry per vector. IA3 vectors are scales near one, so they
 * get no weight decay (decay toward zero would shrink the projections). */
static cp_status list_params(cp_method *self, cp_error *err)
{
    cp_ia3 *ia3 = ia3_of(self);
    int cap = ia3->n_layers * CP_PROJ_COUNT, n = 0;
    self->params = calloc((size_t)cap, sizeof *self->params);
    if (!self->params)
        return cp_error_nomem(err, "parameter list", (size_t)cap * sizeof *self->params);
    for (int l = 0; l < ia3->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            int len;
            float *v = cp_ia3_vector(ia3, l, (cp_proj)p, &len);
            if (v)
                self->params[n++] = (cp_param_ref){cp_proj_name(&ia3->cfg, (cp_proj)p), v,
                                                   ia3->grad[(size_t)l * CP_PROJ_COUNT + p],
                                                   (size_t)len, 0};
        }
    }
    self->n_params = n;
    return CP_OK;
}

/* Takes ownership of ia3 (heap-allocated) as self's state. */
static cp_status adopt(cp_method *self, cp_ia3 *ia3, cp_error *err)
{
    self->state = ia3;
    return list_params(self, err);
}

static cp_status ia3_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                            cp_error *err)
{
    /* --target replaces PEFT's default targets; the feed-forward modules
     * stay the architecture's, as PEFT keeps them when only target_modules
     * is given. */
    unsigned targets = s->targets_given ? s->targets : cp_ia3_default_targets(&m->cfg);
    cp_ia3 *ia3 = malloc(sizeof *ia3);
    if (!ia3)
        return cp_error_nomem(err, "the IA3 adapter", sizeof *ia3);
    cp_status st = cp_ia3_init(ia3, &m->cfg, targets, cp_ia3_default_feedforward(&m->cfg), err);
    if (st != CP_OK) {
        free(ia3);
        return s->targets_given ? cp_error_prefix(err, "--target") : st;
    }
    return adopt(self, ia3, err);
}

static cp_status ia3_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_ia3 *ia3 = malloc(sizeof *ia3);
    if (!ia3)
        return cp_error_nomem(err, "the IA3 adapter", sizeof *ia3);
    cp_status st = cp_ia3_load(ia3, dir, &m->cfg, err);
    if (st != CP_OK) {
        free(ia3);
        return st;
    }
    return adopt(self, ia3, err);
}

static cp_status ia3_save(const cp_method *self, const cp_model *m, const char *dir,
                          const char *base_model, cp_error *err)
{
    (void)m;
    return cp_ia3_save(ia3_of(self), dir, base_model, err);
}

static void ia3_destroy(cp_method *self)
{
    if (self->state)
        cp_ia3_free(self->state);
    free(self->state);
}

static cp_status ia3_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    return cp_ia3_reserve(ia3_of(self), rows, training, err);
}

static void ia3_project(cp_method *self, int l, cp_proj p, float *out, const float *x, int N)
{
    (void)x;
    cp_ia3 *ia3 = ia3_of(self);
    ia3->training = self->training;
    cp_ia3_scale_output(ia3, l, p, out, N);
}

static void ia3_project_backward(cp_method *self, int l, cp_proj p, float *dx, float *dout,
                                 const float *x, int N)
{
    (void)dx, (void)x;
    cp_ia3_output_backward(ia3_of(self), l, p, dout, N);
}

static const float *ia3_project_input(cp_method *self, int l, cp_proj p, const float *x, int N)
{
    return cp_ia3_scale_input(ia3_of(self), l, p, x, N);
}

static void ia3_project_input_backward(cp_method *self, int l, cp_proj p, float *dx,
                                       const float *dxin, const float *x, int N)
{
    cp_ia3_input_backward(ia3_of(self), l, p, dx, dxin, x, N);
}

const cp_method_ops cp_ia3_method = {
    .name = "ia3",
    .peft_type = "IA3",
    .summary = "(IA)3: learned vectors scaling k, v and the MLP input of down_proj (--target)",
    .saves_modules = 1,
    .rewrites_output_grad = 1,
    .create = ia3_create,
    .load = ia3_load,
    .save = ia3_save,
    .destroy = ia3_destroy,
    .reserve = ia3_reserve,
    .project = ia3_project,
    .project_backward = ia3_project_backward,
    .project_input = ia3_project_input,
    .project_input_backward = ia3_project_input_backward,
};
