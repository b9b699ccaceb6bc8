/*
 * The batched forward pass of the decoder over B sequences of T tokens,
 * keeping the activations a backward pass needs when asked to.
 */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/embedding.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "peft/method.h"

/* Points every buffer into one allocation, in the order of the size table. */
cp_status cp_forward_buffers_init(cp_forward_buffers *fb, const cp_model_config *cfg, int B,
                                  int T, int save_all_layers, cp_error *err)
{
    memset(fb, 0, sizeof *fb);
    size_t BT = (size_t)B * T, C = cfg->hidden_size, F = cfg->intermediate_size;
    size_t H = cfg->n_heads, KVH = cfg->n_kv_heads, D = cfg->head_dim, V = cfg->vocab_size;
    size_t L = save_all_layers ? (size_t)cfg->n_layers : 1;

    struct {
        float **field;
        size_t count;
    } table[] = {
        {&fb->residual, L * BT * C},   {&fb->norm1, L * BT * C},
        {&fb->rstd1, L * BT},          {&fb->mean1, L * BT},
        {&fb->mean2, L * BT},          {&fb->mean_f, BT},
        {&fb->qkv, BT * (H + 2 * KVH) * D}, {&fb->q, L * BT * H * D},
        {&fb->k, L * BT * KVH * D},    {&fb->v, L * BT * KVH * D},
        {&fb->att, L * B * H * T * T}, {&fb->attn_out, L * BT * H * D},
        {&fb->mid, L * BT * C},        {&fb->norm2, L * BT * C},
        {&fb->rstd2, L * BT},          {&fb->gate, L * BT * F},
        {&fb->up, L * BT * F},         {&fb->swiglu, L * BT * F},
        {&fb->scratch, BT * C},        {&fb->final, BT * C},
        {&fb->norm_f, BT * C},         {&fb->rstd_f, BT},
        {&fb->logits, BT * V},
    };
    size_t n_fields = sizeof table / sizeof *table, total = 0;
    for (size_t i = 0; i < n_fields; i++)
        total += table[i].count;

    fb->memory = malloc(total * sizeof(float));
    fb->pos = malloc(BT * sizeof *fb->pos);
    if (!fb->memory || !fb->pos) {
        cp_forward_buffers_free(fb);
        return cp_error_nomem(err, "activations", total * sizeof(float));
    }
    float *p = fb->memory;
    for (size_t i = 0; i < n_fields; i++) {
        *table[i].field = p;
        p += table[i].count;
    }
    for (size_t i = 0; i < BT; i++)
        fb->pos[i] = (int)(i % (size_t)T);
    fb->B = B;
    fb->T = T;
    fb->n_saved_layers = (int)L;
    return CP_OK;
}

void cp_forward_buffers_free(cp_forward_buffers *fb)
{
    free(fb->memory);
    free(fb->pos);
    memset(fb, 0, sizeof *fb);
}

cp_layer_acts cp_forward_layer(const cp_forward_buffers *fb, const cp_model_config *c, int l)
{
    size_t slot = fb->n_saved_layers > 1 ? (size_t)l : 0;
    size_t BT = (size_t)fb->B * fb->T, C = c->hidden_size, F = c->intermediate_size;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t att = (size_t)fb->B * c->n_heads * fb->T * fb->T;
    return (cp_layer_acts){
        .residual = fb->residual + slot * BT * C,
        .norm1 = fb->norm1 + slot * BT * C,
        .mean1 = fb->mean1 + slot * BT,
        .rstd1 = fb->rstd1 + slot * BT,
        .q = fb->q + slot * BT * qd,
        .k = fb->k + slot * BT * kvd,
        .v = fb->v + slot * BT * kvd,
        .att = fb->att + slot * att,
        .attn_out = fb->attn_out + slot * BT * qd,
        .mid = fb->mid + slot * BT * C,
        .norm2 = fb->norm2 + slot * BT * C,
        .mean2 = fb->mean2 + slot * BT,
        .rstd2 = fb->rstd2 + slot * BT,
        .gate = fb->gate + slot * BT * F,
        .up = fb->up + slot * BT * F,
        .swiglu = fb->swiglu + slot * BT * F,
    };
}

void cp_add_inplace(float *dst, const float *src, size_t n)
{
#pragma omp parallel for if (n > 65536)
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
}

const float *cp_model_proj_weight(const cp_model *m, int l, int proj)
{
    return m->layers[l].w[proj];
}

void cp_model_project(const cp_model *m, int l, int proj, float *out, const float *x, int N)
{
    int in, outd;
    cp_proj_shape(&m->cfg, (cp_proj)proj, &in, &outd);
    const float *w = cp_model_proj_weight(m, l, proj), *b = m->layers[l].bias[proj];
    cp_method *method = m->method;
    const float *xin = x;
    if (method && method->ops->project_input)
        xin = method->ops->project_input(method, l, (cp_proj)proj, x, N);
    if (m->weights_in_out)
        cp_matmul_kn_forward(out, xin, w, b, N, in, outd);
    else
        cp_matmul_forward(out, xin, w, b, N, in, outd);
    if (method && method->ops->project)
        method->ops->project(method, l, (cp_proj)proj, out, x, N);
}

void cp_model_norm(const cp_model *m, float *out, float *mean, float *rstd, const float *inp,
                   const float *weight, const float *bias, int N)
{
    const cp_model_config *c = &m->cfg;
    if (c->norm == CP_NORM_LAYER)
        cp_layernorm_forward(out, mean, rstd, inp, weight, bias, N, c->hidden_size,
                             c->rms_norm_eps);
    else
        cp_rmsnorm_forward(out, rstd, inp, weight, N, c->hidden_size, c->rms_norm_eps);
}

void cp_model_embed(const cp_model *m, float *out, const int32_t *ids, const int *pos, int N)
{
    int C = m->cfg.hidden_size;
    cp_embedding_forward(out, ids, m->embed, N, C);
    if (!m->pos_embed)
        return;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < C; i++)
            out[(size_t)n * C + i] += m->pos_embed[(size_t)pos[n] * C + i];
}

void cp_model_qkv(const cp_model *m, int l, float *q, float *k, float *v, const float *x,
                  float *qkv, const int *pos, int N)
{
    const cp_model_config *c = &m->cfg;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;
    if (c->fused_qkv) {
        /* One product, then each row's [q | k | v] split into the three buffers. */
        size_t qd = (size_t)H * D, kvd = (size_t)KVH * D, row = qd + 2 * kvd;
        cp_model_project(m, l, CP_PROJ_QKV, qkv, x, N);
        for (int n = 0; n < N; n++) {
            memcpy(q + n * qd, qkv + n * row, qd * sizeof(float));
            memcpy(k + n * kvd, qkv + n * row + qd, kvd * sizeof(float));
            memcpy(v + n * kvd, qkv + n * row + qd + kvd, kvd * sizeof(float));
        }
    } else {
        cp_model_project(m, l, CP_PROJ_Q, q, x, N);
        cp_model_project(m, l, CP_PROJ_K, k, x, N);
        cp_model_project(m, l, CP_PROJ_V, v, x, N);
    }
    if (c->use_rope) {
        cp_rope_forward(q, pos, N, H, D, m->inv_freq);
        cp_rope_forward(k, pos, N, KVH, D, m->inv_freq);
    }
}

void cp_model_mlp_hidden(const cp_model *m, int l, float *hidden, float *gate, float *up,
                         const float *x, int N)
{
    size_t n = (size_t)N * m->cfg.intermediate_size;
    cp_model_project(m, l, CP_PROJ_UP, up, x, N);
    if (m->cfg.mlp == CP_MLP_GELU_TANH) {
        cp_gelu_tanh_forward(hidden, up, n);
        return;
    }
    cp_model_project(m, l, CP_PROJ_GATE, gate, x, N);
    cp_swiglu_forward(hidden, gate, up, n);
}

/* One decoder layer: x_out = mid + mlp(norm2(mid)), mid = x_in + attn(norm1(x_in)). */
static void layer_forward(const cp_model *m, cp_forward_buffers *fb, int l, float *x_out)
{
    const cp_model_config *c = &m->cfg;
    const cp_layer_weights *w = &m->layers[l];
    cp_layer_acts a = cp_forward_layer(fb, c, l);
    int B = fb->B, T = fb->T, N = B * T, C = c->hidden_size;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;

    /* Attention block. */
    cp_model_norm(m, a.norm1, a.mean1, a.rstd1, a.residual, w->attn_norm, w->attn_norm_bias, N);
    cp_model_qkv(m, l, a.q, a.k, a.v, a.norm1, fb->qkv, fb->pos, N);
    cp_attention_forward(a.attn_out, a.att, a.q, a.k, a.v, B, T, H, KVH, D, c->sliding_window);
    cp_model_project(m, l, CP_PROJ_O, fb->scratch, a.attn_out, N);
    memcpy(a.mid, a.residual, (size_t)N * C * sizeof(float));
    cp_add_inplace(a.mid, fb->scratch, (size_t)N * C);

    /* MLP block. */
    cp_model_norm(m, a.norm2, a.mean2, a.rstd2, a.mid, w->mlp_norm, w->mlp_norm_bias, N);
    cp_model_mlp_hidden(m, l, a.swiglu, a.gate, a.up, a.norm2, N);
    cp_model_project(m, l, CP_PROJ_DOWN, fb->scratch, a.swiglu, N);
    memcpy(x_out, a.mid, (size_t)N * C * sizeof(float));
    cp_add_inplace(x_out, fb->scratch, (size_t)N * C);
}

void cp_model_forward(const cp_model *m, cp_forward_buffers *fb, const int32_t *ids)
{
    const cp_model_config *c = &m->cfg;
    int N = fb->B * fb->T, C = c->hidden_size;

    cp_model_embed(m, fb->residual, ids, fb->pos, N);
    for (int l = 0; l < c->n_layers; l++) {
        /* The output of layer l is the input of layer l + 1, or the final state. */
        float *x_out = fb->final;
        if (l + 1 < c->n_layers)
            x_out = cp_forward_layer(fb, c, l + 1).residual;
        layer_forward(m, fb, l, x_out);
    }
    cp_model_norm(m, fb->norm_f, fb->mean_f, fb->rstd_f, fb->final, m->final_norm,
                  m->final_norm_bias, N);
    cp_matmul_forward(fb->logits, fb->norm_f, m->lm_head, NULL, N, C, c->vocab_size);
}
