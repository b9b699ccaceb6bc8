/* Bottleneck adapters: settings, weights, the forward and backward passes at
 * one site, and the registered "adapter" method over them. */
#include "peft/bottleneck.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "ops/matmul.h"
#include "peft/method.h"

cp_status cp_bottleneck_parse_config(const char *name, int sites[CP_BN_SITE_COUNT], cp_error *err)
{
    if (name && strcmp(name, "houlsby") == 0) {
        sites[CP_BN_SITE_ATTENTION] = 1, sites[CP_BN_SITE_OUTPUT] = 1;
        return CP_OK;
    }
    if (name && strcmp(name, "pfeiffer") == 0) {
        sites[CP_BN_SITE_ATTENTION] = 0, sites[CP_BN_SITE_OUTPUT] = 1;
        return CP_OK;
    }
    return cp_error_set(err, CP_ERR_INPUT,
                        "--adapter-config \"%s\" is not a bottleneck configuration; use houlsby "
                        "(after attention and MLP) or pfeiffer (after the MLP)",
                        name ? name : "");
}

static const char *const activation_names[] = {"relu", "swish", "gelu"};

cp_status cp_bottleneck_parse_activation(const char *name, cp_bn_activation *act, cp_error *err)
{
    for (int i = 0; name && i < 3; i++)
        if (strcmp(name, activation_names[i]) == 0) {
            *act = (cp_bn_activation)i;
            return CP_OK;
        }
    return cp_error_set(err, CP_ERR_INPUT,
                        "--non-linearity \"%s\" is not supported; use relu, swish or gelu",
                        name ? name : "");
}

const char *cp_bottleneck_activation_name(cp_bn_activation act) { return activation_names[act]; }

/* Lays every adapted slot's four tensors, then their gradients, into two arrays. */
static cp_status allocate_slots(cp_bottleneck *bn, cp_error *err)
{
    size_t C = (size_t)bn->cfg.hidden_size, R = (size_t)bn->R;
    size_t per_slot = 2 * R * C + R + C, n_slots = 0;
    for (int s = 0; s < CP_BN_SITE_COUNT; s++)
        n_slots += (size_t)bn->sites[s] * bn->n_layers;
    bn->n_weights = n_slots * per_slot;
    bn->slots = calloc((size_t)bn->n_layers * CP_BN_SITE_COUNT, sizeof *bn->slots);
    bn->weights = calloc(bn->n_weights, sizeof(float));
    bn->grads = calloc(bn->n_weights, sizeof(float));
    if (!bn->slots || !bn->weights || !bn->grads)
        return cp_error_nomem(err, "bottleneck adapter weights", 2 * bn->n_weights * sizeof(float));

    size_t offset = 0;
    for (int l = 0; l < bn->n_layers; l++) {
        for (int s = 0; s < CP_BN_SITE_COUNT; s++) {
            if (!bn->sites[s])
                continue;
            cp_bn_slot *slot = cp_bottleneck_slot(bn, l, (cp_bn_site)s);
            float *w = bn->weights + offset, *g = bn->grads + offset;
            slot->down = w, slot->d_down = g;
            slot->down_bias = w + R * C, slot->d_down_bias = g + R * C;
            slot->up = w + R * C + R, slot->d_up = g + R * C + R;
            slot->up_bias = w + 2 * R * C + R, slot->d_up_bias = g + 2 * R * C + R;
            offset += per_slot;
        }
    }
    return CP_OK;
}

cp_status cp_bottleneck_init(cp_bottleneck *bn, const cp_model_config *cfg,
                             const int sites[CP_BN_SITE_COUNT], int reduction_factor,
                             cp_bn_activation act, uint64_t seed, cp_error *err)
{
    memset(bn, 0, sizeof *bn);
    int C = cfg->hidden_size;
    if (reduction_factor <= 0 || reduction_factor > C)
        return cp_error_set(err, CP_ERR_INPUT,
                            "--reduction-factor must be between 1 and the hidden size %d, got %d",
                            C, reduction_factor);
    bn->cfg = *cfg;
    memcpy(bn->sites, sites, sizeof bn->sites);
    bn->reduction_factor = reduction_factor;
    bn->R = C / reduction_factor;
    bn->act = act;
    bn->n_layers = cfg->n_layers;
    cp_status st = allocate_slots(bn, err);
    if (st != CP_OK) {
        cp_bottleneck_free(bn);
        return st;
    }

    /* down: Kaiming-uniform with a = sqrt(5) as nn.Linear draws it, the
     * bound 1 / sqrt(C); biases and up stay zero. */
    cp_rng rng;
    cp_rng_seed(&rng, seed);
    float bound = 1.0f / sqrtf((float)C);
    for (int l = 0; l < bn->n_layers; l++)
        for (int s = 0; s < CP_BN_SITE_COUNT; s++) {
            cp_bn_slot *slot = cp_bottleneck_slot(bn, l, (cp_bn_site)s);
            for (size_t i = 0; slot->down && i < (size_t)bn->R * C; i++)
                slot->down[i] = (2.0f * cp_rng_uniform(&rng) - 1.0f) * bound;
        }
    return CP_OK;
}

void cp_bottleneck_free(cp_bottleneck *bn)
{
    free(bn->slots);
    free(bn->weights);
    free(bn->grads);
    free(bn->saved);
    free(bn->scratch);
    memset(bn, 0, sizeof *bn);
}

cp_status cp_bottleneck_reserve(cp_bottleneck *bn, int rows, int training, cp_error *err)
{
    size_t C = (size_t)bn->cfg.hidden_size, R = (size_t)bn->R;
    if (rows > bn->scratch_rows) {
        float *grown = realloc(bn->scratch, (size_t)rows * (2 * R + C) * sizeof(float));
        if (!grown)
            return cp_error_nomem(err, "bottleneck scratch", (size_t)rows * (2 * R + C) * sizeof(float));
        bn->scratch = grown;
        bn->scratch_rows = rows;
    }
    if (!training || rows <= bn->max_rows)
        return CP_OK;
    size_t n_slots = (size_t)(bn->sites[0] + bn->sites[1]) * bn->n_layers;
    free(bn->saved);
    bn->saved = malloc(n_slots * rows * (C + R) * sizeof(float));
    if (!bn->saved)
        return cp_error_nomem(err, "bottleneck activations", n_slots * rows * (C + R) * sizeof(float));
    bn->max_rows = rows;
    return CP_OK;
}

/* The saved h (max_rows, C) of an adapted slot; z (max_rows, R) follows it. */
static float *saved_h(const cp_bottleneck *bn, int layer, cp_bn_site s)
{
    size_t index = 0, C = (size_t)bn->cfg.hidden_size;
    for (int l = 0; l <= layer; l++)
        for (int t = 0; t < CP_BN_SITE_COUNT; t++) {
            if (l == layer && t == (int)s)
                return bn->saved + index * bn->max_rows * (C + bn->R);
            index += (size_t)bn->sites[t];
        }
    return NULL;
}

static void activation_forward(cp_bn_activation act, float *a, const float *z, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float x = z[i];
        if (act == CP_BN_RELU)
            a[i] = x > 0.0f ? x : 0.0f;
        else if (act == CP_BN_SWISH)
            a[i] = x / (1.0f + expf(-x));
        else
            a[i] = 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2));
    }
}

/* dz (n) = da ⊙ act'(z), in place over da. */
static void activation_backward(cp_bn_activation act, float *da, const float *z, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float x = z[i], d;
        if (act == CP_BN_RELU) {
            d = x > 0.0f ? 1.0f : 0.0f;
        } else if (act == CP_BN_SWISH) {
            float sig = 1.0f / (1.0f + expf(-x));
            d = sig * (1.0f + x * (1.0f - sig));
        } else {
            float pdf = expf(-0.5f * x * x) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
            d = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2)) + x * pdf;
        }
        da[i] *= d;
    }
}

void cp_bottleneck_forward(cp_bottleneck *bn, int layer, cp_bn_site s, float *out, int N)
{
    const cp_bn_slot *slot = cp_bottleneck_slot(bn, layer, s);
    if (!slot->down)
        return;
    size_t C = (size_t)bn->cfg.hidden_size, R = (size_t)bn->R;
    CP_ASSERT(N <= bn->scratch_rows);
    float *z = bn->scratch, *a = bn->scratch + (size_t)N * R, *u = a + (size_t)N * R;
    if (bn->training) {
        CP_ASSERT(N <= bn->max_rows);
        float *h = saved_h(bn, layer, s);
        memcpy(h, out, (size_t)N * C * sizeof(float));
        z = h + (size_t)bn->max_rows * C;
    }

    /* z = h downᵀ + b_down; out += act(z) upᵀ + b_up. */
    cp_matmul_forward(z, out, slot->down, slot->down_bias, N, (int)C, (int)R);
    activation_forward(bn->act, a, z, (size_t)N * R);
    cp_matmul_forward(u, a, slot->up, slot->up_bias, N, (int)R, (int)C);
    cp_add_inplace(out, u, (size_t)N * C);
}

void cp_bottleneck_backward(cp_bottleneck *bn, int layer, cp_bn_site s, float *dout, int N)
{
    const cp_bn_slot *slot = cp_bottleneck_slot(bn, layer, s);
    if (!slot->down)
        return;
    size_t C = (size_t)bn->cfg.hidden_size, R = (size_t)bn->R;
    CP_ASSERT(N <= bn->max_rows && N <= bn->scratch_rows);
    const float *h = saved_h(bn, layer, s), *z = h + (size_t)bn->max_rows * C;
    float *dz = bn->scratch, *a = bn->scratch + (size_t)N * R;

    /* Undoes out += a upᵀ + b_up: d_up += doutᵀ a, d_up_bias += Σ dout, da = dout up. */
    activation_forward(bn->act, a, z, (size_t)N * R);
    memset(dz, 0, (size_t)N * R * sizeof(float));
    cp_matmul_backward(dz, slot->d_up, slot->d_up_bias, dout, a, slot->up, N, (int)R, (int)C);
    activation_backward(bn->act, dz, z, (size_t)N * R);

    /* Undoes z = h downᵀ + b_down; dh = dout (the identity path) + dz down. */
    cp_matmul_backward(dout, slot->d_down, slot->d_down_bias, dz, h, slot->down, N, (int)C,
                       (int)R);
}

/* ---- The registered method ---- */

static cp_bottleneck *bn_of(const cp_method *self) { return self->state; }

/* Four optimizer entries per adapter: weights decay, biases do not. */
static cp_status list_params(cp_method *self, cp_error *err)
{
    cp_bottleneck *bn = bn_of(self);
    int cap = bn->n_layers * CP_BN_SITE_COUNT * 4, n = 0;
    size_t C = (size_t)bn->cfg.hidden_size, R = (size_t)bn->R;
    self->params = calloc((size_t)cap, sizeof *self->params);
    if (!self->params)
        return cp_error_nomem(err, "parameter list", (size_t)cap * sizeof *self->params);
    for (int l = 0; l < bn->n_layers; l++)
        for (int s = 0; s < CP_BN_SITE_COUNT; s++) {
            cp_bn_slot *slot = cp_bottleneck_slot(bn, l, (cp_bn_site)s);
            if (!slot->down)
                continue;
            self->params[n++] = (cp_param_ref){"adapter_down", slot->down, slot->d_down, R * C, 1};
            self->params[n++] = (cp_param_ref){"adapter_down.bias", slot->down_bias,
                                               slot->d_down_bias, R, 0};
            self->params[n++] = (cp_param_ref){"adapter_up", slot->up, slot->d_up, C * R, 1};
            self->params[n++] = (cp_param_ref){"adapter_up.bias", slot->up_bias, slot->d_up_bias,
                                               C, 0};
        }
    self->n_params = n;
    return CP_OK;
}

static cp_status bn_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                           cp_error *err)
{
    int sites[CP_BN_SITE_COUNT];
    cp_bn_activation act;
    cp_status st = cp_bottleneck_parse_config(s->adapter_config, sites, err);
    if (st == CP_OK)
        st = cp_bottleneck_parse_activation(s->non_linearity, &act, err);
    if (st == CP_OK && s->targets_given)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "--target does not apply to bottleneck adapters; choose their places "
                          "with --adapter-config houlsby or pfeiffer");
    if (st != CP_OK)
        return st;
    cp_bottleneck *bn = malloc(sizeof *bn);
    if (!bn)
        return cp_error_nomem(err, "the bottleneck adapters", sizeof *bn);
    st = cp_bottleneck_init(bn, &m->cfg, sites, s->reduction_factor, act, s->seed, err);
    if (st != CP_OK) {
        free(bn);
        return st;
    }
    self->state = bn;
    return list_params(self, err);
}

static cp_status bn_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_bottleneck *bn = malloc(sizeof *bn);
    if (!bn)
        return cp_error_nomem(err, "the bottleneck adapters", sizeof *bn);
    cp_status st = cp_bottleneck_load(bn, dir, &m->cfg, err);
    if (st != CP_OK) {
        free(bn);
        return st;
    }
    self->state = bn;
    return list_params(self, err);
}

static cp_status bn_save(const cp_method *self, const cp_model *m, const char *dir,
                         const char *base_model, cp_error *err)
{
    (void)m;
    return cp_bottleneck_save(bn_of(self), dir, base_model, err);
}

static void bn_destroy(cp_method *self)
{
    if (self->state)
        cp_bottleneck_free(self->state);
    free(self->state);
}

static cp_status bn_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    return cp_bottleneck_reserve(bn_of(self), rows, training, err);
}

/* The adapter site after projection p, or -1 where none sits. */
static int site_of(cp_proj p)
{
    if (p == CP_PROJ_O)
        return CP_BN_SITE_ATTENTION;
    if (p == CP_PROJ_DOWN)
        return CP_BN_SITE_OUTPUT;
    return -1;
}

static void bn_project(cp_method *self, int l, cp_proj p, float *out, const float *x, int N)
{
    (void)x;
    cp_bottleneck *bn = bn_of(self);
    bn->training = self->training;
    if (site_of(p) >= 0)
        cp_bottleneck_forward(bn, l, (cp_bn_site)site_of(p), out, N);
}

static void bn_project_backward(cp_method *self, int l, cp_proj p, float *dx, float *dout,
                                const float *x, int N)
{
    (void)dx, (void)x;
    if (site_of(p) >= 0)
        cp_bottleneck_backward(bn_of(self), l, (cp_bn_site)site_of(p), dout, N);
}

const cp_method_ops cp_bottleneck_method = {
    .name = "adapter",
    .peft_type = NULL, /* PEFT has no bottleneck adapters: adapter_config.json records cpeft_method */
    .summary = "bottleneck adapters on the attention and MLP outputs (--adapter-config, "
               "--reduction-factor, --non-linearity)",
    .saves_modules = 1,
    .rewrites_output_grad = 1,
    .create = bn_create,
    .load = bn_load,
    .save = bn_save,
    .destroy = bn_destroy,
    .reserve = bn_reserve,
    .project = bn_project,
    .project_backward = bn_project_backward,
};
