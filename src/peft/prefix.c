/*
 * Prefix tuning as Hugging Face PEFT defines it (peft_type PREFIX_TUNING):
 * n trainable key/value positions before every layer's own keys and values,
 * through the model's attention prefix hook. The keys are used as given (no
 * RoPE), every query attends to them, and the real tokens' positions start
 * at n.
 *
 * prompt_embeddings is (n, L * 2 * W) with W = KVH * head_dim: row t contains
 * layer 0's key, layer 0's value, layer 1's key, ... of virtual position t,
 * each (KVH, head_dim), the order PEFT's get_prompt views it in. PEFT sizes
 * the prefixes by key/value heads for grouped-query models (its token_dim
 * becomes W).
 *
 * With --prefix-projection the prefixes are trained as PEFT's PrefixEncoder
 * trains them, tanh(E W1ᵀ + b1) W2ᵀ + b2 with E (n, W), W1 (W, W) and W2
 * (L * 2 * W, W), and the run folder stores the projected prefixes, which is
 * what PEFT saves too.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "ops/matmul.h"
#include "peft/method.h"
#include "peft/prompt_io.h"

/* The projection MLP's tensors, each with its gradient. */
enum { MLP_EMBED, MLP_W1, MLP_B1, MLP_W2, MLP_B2, MLP_COUNT };

typedef struct prefix_state {
    int n, L, W, row;    /* virtual positions, layers, KVH * D, L * 2 * W */
    int hidden;          /* the projection's hidden size (PEFT's encoder_hidden_size) */
    int projection;
    float *prefix;       /* (n, row) PEFT's layout: the parameters, or the MLP's output */
    float *dprefix;      /* (n, row) its gradient */
    float *kv;           /* (L, 2, n, W) the prefixes as attention reads them */
    float *mlp[MLP_COUNT], *dmlp[MLP_COUNT];
    float *act;          /* (n, hidden) tanh of the first layer, for the backward pass */
    float *dact;         /* (n, hidden) its gradient */
    float *memory;
} prefix_state;

/* Sizes of the MLP's tensors, in enum order. */
static void mlp_sizes(const prefix_state *ps, size_t size[MLP_COUNT])
{
    size_t n = ps->n, W = ps->W, E = ps->hidden, R = ps->row;
    size[MLP_EMBED] = n * W;
    size[MLP_W1] = E * W;
    size[MLP_B1] = E;
    size[MLP_W2] = R * E;
    size[MLP_B2] = R;
}

/* One allocation for the prefixes, their gradient, the per-layer copy and,
 * with the projection, the MLP's tensors, gradients and activation. */
static cp_status alloc_state(cp_method *self, const cp_model_config *cfg, int n, int projection,
                             cp_error *err)
{
    prefix_state *ps = calloc(1, sizeof *ps);
    self->state = ps;
    if (!ps)
        return cp_error_nomem(err, "the prefix state", sizeof *ps);
    ps->n = n;
    ps->L = cfg->n_layers;
    ps->W = cfg->n_kv_heads * cfg->head_dim;
    ps->row = ps->L * 2 * ps->W;
    ps->hidden = ps->W;
    ps->projection = projection;

    size_t size[MLP_COUNT], prefix = (size_t)n * ps->row, total = 3 * prefix;
    mlp_sizes(ps, size);
    for (int i = 0; projection && i < MLP_COUNT; i++)
        total += 2 * size[i];
    if (projection)
        total += 2 * (size_t)n * ps->hidden;
    ps->memory = calloc(total, sizeof(float));
    self->params = calloc(MLP_COUNT, sizeof *self->params);
    if (!ps->memory || !self->params)
        return cp_error_nomem(err, "the prefixes", total * sizeof(float));

    float *p = ps->memory;
    ps->prefix = p, p += prefix;
    ps->dprefix = p, p += prefix;
    ps->kv = p, p += prefix;
    if (!projection) {
        self->params[0] = (cp_param_ref){"prompt_embeddings", ps->prefix, ps->dprefix, prefix, 1};
        self->n_params = 1;
        return CP_OK;
    }
    static const char *const names[MLP_COUNT] = {"embedding", "transform.0.weight",
                                                 "transform.0.bias", "transform.2.weight",
                                                 "transform.2.bias"};
    for (int i = 0; i < MLP_COUNT; i++) {
        ps->mlp[i] = p, p += size[i];
        ps->dmlp[i] = p, p += size[i];
        /* Biases take no weight decay, as in Hugging Face's Trainer. */
        int decay = i != MLP_B1 && i != MLP_B2;
        self->params[i] = (cp_param_ref){names[i], ps->mlp[i], ps->dmlp[i], size[i], decay};
    }
    ps->act = p, p += (size_t)n * ps->hidden;
    ps->dact = p;
    self->n_params = MLP_COUNT;
    return CP_OK;
}

/* prefix = tanh(E W1ᵀ + b1) W2ᵀ + b2, keeping the tanh for the backward pass. */
static void project_forward(prefix_state *ps)
{
    size_t n = (size_t)ps->n * ps->hidden;
    cp_matmul_forward(ps->act, ps->mlp[MLP_EMBED], ps->mlp[MLP_W1], ps->mlp[MLP_B1], ps->n,
                      ps->W, ps->hidden);
    for (size_t i = 0; i < n; i++)
        ps->act[i] = tanhf(ps->act[i]);
    cp_matmul_forward(ps->prefix, ps->act, ps->mlp[MLP_W2], ps->mlp[MLP_B2], ps->n, ps->hidden,
                      ps->row);
}

/* Backward of project_forward from dprefix, which it then clears. */
static void project_backward(prefix_state *ps)
{
    size_t n = (size_t)ps->n * ps->hidden;
    float *dact = ps->dact;
    memset(dact, 0, n * sizeof *dact);
    cp_matmul_backward(dact, ps->dmlp[MLP_W2], ps->dmlp[MLP_B2], ps->dprefix, ps->act,
                       ps->mlp[MLP_W2], ps->n, ps->hidden, ps->row);
    for (size_t i = 0; i < n; i++)
        dact[i] *= 1.0f - ps->act[i] * ps->act[i];
    cp_matmul_backward(ps->dmlp[MLP_EMBED], ps->dmlp[MLP_W1], ps->dmlp[MLP_B1], dact,
                       ps->mlp[MLP_EMBED], ps->mlp[MLP_W1], ps->n, ps->W, ps->hidden);
    memset(ps->dprefix, 0, (size_t)ps->n * ps->row * sizeof(float));
}

/* Recomputes the prefixes from the current parameters and copies them into
 * the per-layer arrays (L, 2, n, W) attention reads. */
static void refresh(prefix_state *ps)
{
    if (ps->projection)
        project_forward(ps);
    size_t W = ps->W;
    for (int t = 0; t < ps->n; t++)
        for (int j = 0; j < 2 * ps->L; j++) /* j = 2 l (key) or 2 l + 1 (value) */
            memcpy(ps->kv + ((size_t)j * ps->n + t) * W, ps->prefix + (size_t)t * ps->row + j * W,
                   W * sizeof(float));
}

/* U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch.nn.Linear's initialization of
 * its weight and bias. */
static void fill_uniform(float *x, size_t n, int fan_in, cp_rng *rng)
{
    float bound = 1.0f / sqrtf((float)fan_in);
    for (size_t i = 0; i < n; i++)
        x[i] = bound * (2.0f * cp_rng_uniform(rng) - 1.0f);
}

static cp_status prefix_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                               cp_error *err)
{
    if (s->n_virtual_tokens <= 0)
        return cp_error_set(err, CP_ERR_INPUT, "--num-virtual-tokens must be positive, got %d",
                            s->n_virtual_tokens);
    cp_status st = alloc_state(self, &m->cfg, s->n_virtual_tokens, s->prefix_projection, err);
    if (st != CP_OK)
        return st;
    prefix_state *ps = self->state;
    cp_rng rng;
    cp_rng_seed(&rng, s->seed);
    if (!ps->projection) {
        cp_prompt_fill_normal(ps->prefix, (size_t)ps->n * ps->row, &rng);
        return CP_OK;
    }
    size_t size[MLP_COUNT];
    mlp_sizes(ps, size);
    cp_prompt_fill_normal(ps->mlp[MLP_EMBED], size[MLP_EMBED], &rng);
    fill_uniform(ps->mlp[MLP_W1], size[MLP_W1], ps->W, &rng);
    fill_uniform(ps->mlp[MLP_B1], size[MLP_B1], ps->W, &rng);
    fill_uniform(ps->mlp[MLP_W2], size[MLP_W2], ps->hidden, &rng);
    fill_uniform(ps->mlp[MLP_B2], size[MLP_B2], ps->hidden, &rng);
    return CP_OK;
}

/* A loaded adapter contains the prefixes themselves, also when they were
 * trained through the projection. */
static cp_status prefix_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_prompt_config c = {.peft_type = "PREFIX_TUNING"};
    cp_status st = cp_prompt_config_load(dir, &m->cfg, &c, err);
    if (st == CP_OK)
        st = alloc_state(self, &m->cfg, c.n_virtual_tokens, 0, err);
    if (st != CP_OK)
        return st;
    prefix_state *ps = self->state;
    return cp_prompt_embeddings_load(dir, ps->prefix, ps->n, ps->row, err);
}

static cp_status prefix_save(const cp_method *self, const cp_model *m, const char *dir,
                             const char *base_model, cp_error *err)
{
    prefix_state *ps = self->state;
    cp_prompt_config c = {
        .peft_type = "PREFIX_TUNING",
        .n_virtual_tokens = ps->n,
        .token_dim = ps->W,
        .num_attention_heads = m->cfg.n_kv_heads,
        .num_layers = ps->L,
        .prefix_projection = ps->projection,
        .encoder_hidden_size = ps->hidden,
    };
    if (ps->projection)
        project_forward(ps);
    cp_status st = cp_prompt_embeddings_save(dir, ps->prefix, ps->n, ps->row, err);
    if (st == CP_OK)
        st = cp_prompt_config_save(&c, dir, base_model, err);
    return st;
}

static void prefix_destroy(cp_method *self)
{
    prefix_state *ps = self->state;
    if (ps)
        free(ps->memory);
    free(ps);
}

/* The prefixes need no activation buffers that depend on the batch. */
static cp_status prefix_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    (void)self, (void)rows, (void)training, (void)err;
    return CP_OK;
}

static int prefix_tokens(const cp_method *self)
{
    return ((const prefix_state *)self->state)->n;
}

static void prefix_attention(cp_method *self, int l, const float **k, const float **v)
{
    prefix_state *ps = self->state;
    if (l == 0)
        refresh(ps);
    size_t block = (size_t)ps->n * ps->W;
    *k = ps->kv + (size_t)(2 * l) * block;
    *v = ps->kv + (size_t)(2 * l + 1) * block;
}

/* Scatters layer l's gradients into PEFT's layout; after layer 0, the last,
 * the projection's backward pass turns them into the MLP's gradients. */
static void prefix_attention_backward(cp_method *self, int l, const float *dk, const float *dv)
{
    prefix_state *ps = self->state;
    size_t W = ps->W;
    for (int t = 0; t < ps->n; t++) {
        float *row = ps->dprefix + (size_t)t * ps->row + (size_t)2 * l * W;
        cp_add_inplace(row, dk + t * W, W);
        cp_add_inplace(row + W, dv + t * W, W);
    }
    if (l == 0 && ps->projection)
        project_backward(ps);
}

const cp_method_ops cp_prefix_method = {
    .name = "prefix",
    .peft_type = "PREFIX_TUNING",
    .summary = "trainable key/value prefixes in every layer (--num-virtual-tokens, "
               "--prefix-projection)",
    .saves_modules = 1,
    .create = prefix_create,
    .load = prefix_load,
    .save = prefix_save,
    .destroy = prefix_destroy,
    .reserve = prefix_reserve,
    .prefix_tokens = prefix_tokens,
    .attention_prefix = prefix_attention,
    .attention_prefix_backward = prefix_attention_backward,
};
