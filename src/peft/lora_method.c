/*
 * LoRA as a registered method: the cp_method_ops table over cp_lora
 * (lora.c computes, lora_io.c reads and writes the PEFT files). DoRA is the
 * same method with use_dora set: its attached copy of the table differs only
 * in rewrites_output_grad, because its backward pass scales dout.
 */
#include <stdlib.h>

#include "model/model.h"
#include "peft/lora_io.h"
#include "peft/method.h"

/* The method's state: the adapter, and whether the method frees it. */
typedef struct lora_state {
    cp_lora *lora;
    int owned;
} lora_state;

static cp_lora *lora_of(const cp_method *self) { return ((lora_state *)self->state)->lora; }

/* One optimizer entry per A and B matrix and DoRA magnitude. The magnitude
 * decays like the matrices, as the Hugging Face Trainer decays every
 * parameter but biases and norm weights. */
static cp_status list_params(cp_method *self, cp_error *err)
{
    cp_lora *lora = lora_of(self);
    int cap = lora->n_layers * CP_PROJ_COUNT * 3, n = 0;
    self->params = calloc((size_t)cap, sizeof *self->params);
    if (!self->params)
        return cp_error_nomem(err, "parameter list", (size_t)cap * sizeof *self->params);
    size_t r = (size_t)lora->params.r;
    for (int l = 0; l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!s->A)
                continue;
            const char *name = cp_proj_name(&lora->cfg, (cp_proj)p);
            self->params[n++] = (cp_param_ref){name, s->A, s->dA, r * s->in, 1};
            self->params[n++] = (cp_param_ref){name, s->B, s->dB, r * s->out, 1};
            if (s->magnitude)
                self->params[n++] =
                    (cp_param_ref){name, s->magnitude, s->dmagnitude, (size_t)s->out, 1};
        }
    }
    self->n_params = n;
    return CP_OK;
}

extern const cp_method_ops cp_lora_method;
static const cp_method_ops dora_ops;

static cp_status wrap(cp_method *self, cp_lora *lora, int owned, cp_error *err)
{
    if (lora->params.use_dora && !lora->bound) {
        if (owned) {
            cp_lora_free(lora);
            free(lora);
        }
        return cp_error_set(err, CP_ERR_INPUT,
                            "the DoRA adapter is not bound to a model; call cp_lora_bind_model "
                            "before attaching it");
    }
    /* A method that wraps LoRA's hooks (QLoRA) keeps its own table, which
     * must then let project_backward scale dout. */
    if (lora->params.use_dora && self->ops == &cp_lora_method)
        self->ops = &dora_ops;
    CP_ASSERT(!lora->params.use_dora || self->ops->rewrites_output_grad);
    lora_state *state = malloc(sizeof *state);
    if (!state) {
        if (owned) {
            cp_lora_free(lora);
            free(lora);
        }
        return cp_error_nomem(err, "the LoRA state", sizeof *state);
    }
    *state = (lora_state){lora, owned};
    self->state = state;
    return list_params(self, err);
}

static cp_status lora_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                             cp_error *err)
{
    cp_lora_params p = s->lora;
    if (s->targets_given)
        p.targets = s->targets;
    else if (m->cfg.fused_qkv)
        p.targets = 1u << CP_PROJ_QKV; /* PEFT's default for GPT-2: c_attn */
    cp_lora *lora = malloc(sizeof *lora);
    if (!lora)
        return cp_error_nomem(err, "the adapter", sizeof *lora);
    cp_status st = cp_lora_init(lora, &m->cfg, &p, err);
    if (st != CP_OK) {
        free(lora);
        return st;
    }
    if ((st = cp_lora_bind_model(lora, m, 1, err)) != CP_OK) {
        cp_lora_free(lora);
        free(lora);
        return st;
    }
    return wrap(self, lora, 1, err);
}

static cp_status lora_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_lora *lora = malloc(sizeof *lora);
    if (!lora)
        return cp_error_nomem(err, "the adapter", sizeof *lora);
    cp_status st = cp_lora_load(lora, dir, &m->cfg, err);
    if (st != CP_OK) {
        free(lora);
        return st;
    }
    if ((st = cp_lora_bind_model(lora, m, 0, err)) != CP_OK) {
        cp_lora_free(lora);
        free(lora);
        return st;
    }
    return wrap(self, lora, 1, err);
}

static cp_status lora_save(const cp_method *self, const cp_model *m, const char *dir,
                           const char *base_model, cp_error *err)
{
    (void)m;
    return cp_lora_save(lora_of(self), dir, base_model, err);
}

static void lora_destroy(cp_method *self)
{
    lora_state *state = self->state;
    if (state && state->owned) {
        cp_lora_free(state->lora);
        free(state->lora);
    }
    free(state);
}

static cp_status lora_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    cp_lora *lora = lora_of(self);
    return training ? cp_lora_reserve(lora, rows, err) : cp_lora_reserve_eval(lora, rows, err);
}

static void lora_project(cp_method *self, int l, cp_proj p, float *out, const float *x, int N)
{
    cp_lora *lora = lora_of(self);
    lora->training = self->training;
    cp_lora_forward(lora, l, p, out, x, N);
}

static void lora_project_backward(cp_method *self, int l, cp_proj p, float *dx, float *dout,
                                  const float *x, int N)
{
    cp_lora_backward(lora_of(self), l, p, dx, dout, x, N);
}

const cp_method_ops cp_lora_method = {
    .name = "lora",
    .peft_type = "LORA",
    .saves_modules = 1,
    .summary = "low-rank adapters B A beside the frozen projections (--r, --alpha, --rslora, "
               "--dora, --target)",
    .create = lora_create,
    .load = lora_load,
    .save = lora_save,
    .destroy = lora_destroy,
    .reserve = lora_reserve,
    .project = lora_project,
    .project_backward = lora_project_backward,
};

/* The table a DoRA adapter attaches with: LoRA's, but dout reaches
 * project_backward as a copy it may scale. */
static const cp_method_ops dora_ops = {
    .name = "lora",
    .peft_type = "LORA",
    .saves_modules = 1,
    .summary = "weight-decomposed LoRA",
    .rewrites_output_grad = 1,
    .create = lora_create,
    .load = lora_load,
    .save = lora_save,
    .destroy = lora_destroy,
    .reserve = lora_reserve,
    .project = lora_project,
    .project_backward = lora_project_backward,
};

cp_status cp_lora_method_wrap(cp_lora *lora, cp_method **out, cp_error *err)
{
    *out = calloc(1, sizeof **out);
    if (!*out)
        return cp_error_nomem(err, "the method", sizeof **out);
    (*out)->ops = &cp_lora_method;
    (*out)->training = lora->training;
    cp_status st = wrap(*out, lora, 0, err);
    if (st != CP_OK) {
        cp_method_free(*out);
        *out = NULL;
    }
    return st;
}
